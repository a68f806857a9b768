"""python -m scoring, local engine: the same rows as classify_many and the Batch review CSV; manifests; --resume."""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from badinput import corpus
from scoring_inputs import FILMS, batch_review_csv, film_folder, sha256

from cxr_core import imaging, models, pipeline, review
from scoring.__main__ import main
from scoring.job import Config, run

BATCH = 4


@pytest.fixture(scope="module")
def classifier(tiny_model_dir) -> models.Classifier:
    return models.load(tiny_model_dir)


@pytest.fixture(scope="module")
def films(tmp_path_factory, data_dir) -> Path:
    """Real films and the whole bad-input corpus in one folder."""
    root = film_folder(tmp_path_factory.mktemp("films"))
    for case in corpus():
        (root / "corpus").mkdir(exist_ok=True)
        (root / "corpus" / case.name).write_bytes(case.data)
    return root


@pytest.fixture(scope="module")
def scored(films, tiny_model_dir, tmp_path_factory) -> tuple[pd.DataFrame, pd.DataFrame, Path]:
    out = tmp_path_factory.mktemp("out") / "results.parquet"
    summary = run(Config(str(films), model=str(tiny_model_dir), out=str(out), batch_size=BATCH, csv=True,
                         part_size=7), log=lambda _: None)
    assert summary.files == summary.scored and summary.skipped == 0
    csv = pd.read_csv(out.with_suffix(".csv"), dtype=str, keep_default_na=False)
    return pd.read_parquet(out), csv, out


def _listed(films: Path) -> list[Path]:
    """The files a folder source scores: those with image names (viewer.html is not one)."""
    paths = sorted(p for p in films.rglob("*") if p.is_file() and imaging.is_image_name(p.name))
    assert films / "corpus" / "viewer.html" not in paths and len(paths) > 30
    return paths


def test_local_rows_equal_classify_many(films, classifier, scored):
    table, _, out = scored
    paths = _listed(films)
    assert table["path"].tolist() == [str(p) for p in paths]
    assert table["file"].tolist() == [p.relative_to(films).as_posix() for p in paths]
    expected = pipeline.classify_many(classifier, [(p.name, p) for p in paths], batch_size=BATCH)
    for row, item, path in zip(table.itertuples(), expected, paths, strict=True):
        assert row.sha256 == sha256(path)
        if item.prediction is None:
            assert row.error == item.error and row.decision is None and np.isnan(row.p_NORMAL)
        else:
            assert row.error == "" and row.decision == item.prediction.decision
            assert (row.p_NORMAL, row.p_PNEUMONIA) == item.prediction.probabilities
    assert set(table["model"]) == {classifier.card.name}
    assert set(table["weights_sha256"]) == {classifier.card.weights_sha256}
    assert not table["unfamiliar"].any() and table["familiarity"].isna().all()  # the tiny model has no familiarity
    assert not out.with_name(out.name + ".parts").exists()


def test_local_rows_equal_the_batch_review_csv(films, classifier, scored):
    table, csv, _ = scored
    items = [(str(p.relative_to(films).as_posix()), p.read_bytes()) for p in _listed(films)]
    expected = batch_review_csv(classifier, items, BATCH)
    assert list(expected.columns) == review.row_columns(classifier.card.class_names)
    pd.testing.assert_frame_equal(csv[expected.columns], expected)
    # the run really met good, bad and not-a-chest files
    assert (expected["error"] != "").sum() >= 10 and (expected["error"] == "").sum() >= 20
    assert expected.loc[expected["file"] == "dicom/12_CR-ModalitySequenceLUT.dcm", "not_chest"].item() == "True"
    assert table["positive"].any() and not table["positive"].all()


def _serve(folder: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_manifest_rows_with_clear_errors(tmp_path, tiny_model_dir, data_dir):
    film = FILMS[0]
    (tmp_path / "films").mkdir()
    (tmp_path / "films" / "a.jpeg").write_bytes(film.read_bytes())
    server, url = _serve(tmp_path / "films")
    try:
        paths = ["films/a.jpeg", str(tmp_path / "films" / "gone.jpeg"), f"{url}/a.jpeg", f"{url}/missing.png",
                 f"http://127.0.0.1:{_closed_port()}/x.png", "films/a.jpeg", "", "nosuchscheme://bucket/x.dcm"]
        pd.DataFrame({"path": paths, "note": range(len(paths))}).to_parquet(tmp_path / "list.parquet")
        out = tmp_path / "r.parquet"
        summary = run(Config(str(tmp_path / "list.parquet"), model=str(tiny_model_dir), out=str(out)),
                      log=lambda _: None)
    finally:
        server.shutdown()
    table = pd.read_parquet(out)
    assert len(table) == len(paths) and summary.errors == 6 and summary.scored == 6
    assert table["file"].tolist() == paths
    errors = table["error"].tolist()
    assert errors[0] == "" and errors[2] == ""
    assert table.loc[0, "path"] == str(tmp_path / "films" / "a.jpeg")
    assert table.loc[0, "sha256"] == table.loc[2, "sha256"] == hashlib.sha256(film.read_bytes()).hexdigest()
    assert table.loc[0, "p_NORMAL"] == table.loc[2, "p_NORMAL"]  # same bytes, by file or by URL
    assert errors[1].startswith("File not found") and "gone.jpeg" in errors[1]
    assert "HTTP 404" in errors[3]
    assert errors[4].startswith("Could not read") and "refused" in errors[4].lower()
    assert errors[5].startswith("duplicate of manifest row 1")
    assert "row 7 has no path" in errors[6]
    assert errors[7].startswith("Could not read nosuchscheme://")
    assert table.loc[[1, 3, 4, 5, 6, 7], "p_NORMAL"].isna().all() and table.loc[[1, 3, 4], "sha256"].eq("").all()


def test_resume_scores_only_new_and_changed_files(tmp_path, tiny_model_dir, data_dir):
    folder = tmp_path / "films"
    folder.mkdir()
    for i, film in enumerate(FILMS[:6]):
        (folder / f"{i}.jpeg").write_bytes(film.read_bytes())
    out = tmp_path / "r.parquet"
    config = Config(str(folder), model=str(tiny_model_dir), out=str(out), batch_size=2)
    assert run(config, log=lambda _: None).scored == 6
    first = pd.read_parquet(out)
    (folder / "0.jpeg").write_bytes(FILMS[7].read_bytes())  # changed content, same path
    (folder / "new.jpeg").write_bytes(FILMS[8].read_bytes())
    summary = run(Config(**{**config.__dict__, "resume": True}), log=lambda _: None)
    assert (summary.files, summary.scored, summary.skipped) == (7, 2, 5)
    second = pd.read_parquet(out)
    assert second["path"].tolist() == [str(folder / n) for n in ("0.jpeg", "1.jpeg", "2.jpeg", "3.jpeg", "4.jpeg",
                                                                 "5.jpeg", "new.jpeg")]
    assert second.loc[0, "sha256"] == sha256(FILMS[7]) != first.loc[0, "sha256"]
    pd.testing.assert_frame_equal(second.iloc[1:6].reset_index(drop=True), first.iloc[1:6].reset_index(drop=True))


def test_an_unfinished_run_never_commits(tmp_path, tiny_model_dir, data_dir):
    from scoring.sources import list_entries
    from scoring.store import Store

    folder = film_folder(tmp_path / "films")
    store = Store(tmp_path / "r.parquet", ["NORMAL", "PNEUMONIA"])
    store.start(resume=False)
    with pytest.raises(RuntimeError, match="have no result yet"):
        store.commit(list_entries(str(folder)), models.load(tiny_model_dir).card)
    assert not (tmp_path / "r.parquet").exists()


def test_cli_refuses_bad_arguments_with_a_message(tmp_path, tiny_model_dir, capsys):
    assert main([str(tmp_path), "--model", str(tiny_model_dir), "--out", str(tmp_path / "r.csv")]) == 2
    assert "--out must name a .parquet file" in capsys.readouterr().err
    assert main([str(tmp_path / "nothing"), "--model", str(tiny_model_dir)]) == 2
    assert "neither a folder nor a CSV/Parquet manifest" in capsys.readouterr().err
    (tmp_path / "m.csv").write_text("file\na.png\n")
    assert main([str(tmp_path / "m.csv"), "--model", str(tiny_model_dir), "--out", str(tmp_path / "r.parquet")]) == 2
    assert "has no 'path' column" in capsys.readouterr().err
