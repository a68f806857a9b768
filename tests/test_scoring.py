"""python -m scoring, local engine: the same rows as classify_many and the Batch review CSV; manifests; --resume."""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pydicom
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



def _one_film_scored(tmp_path: Path, model: Path) -> tuple[Path, Path]:
    """A folder of one real film, scored once with ``model`` into r.parquet: (the folder, the output)."""
    folder = tmp_path / "films"
    folder.mkdir()
    (folder / "0.jpeg").write_bytes(FILMS[0].read_bytes())
    out = tmp_path / "r.parquet"
    run(Config(str(folder), model=str(model), out=str(out)), log=lambda _: None)
    return folder, out

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
    # The four files that could not be fetched are not "scored now": --resume tries them again.
    assert len(table) == len(paths) and summary.errors == 6 and (summary.scored, summary.retry) == (2, 4)
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
    assert f"'{tmp_path / 'nothing'}' does not exist: check the path" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("not a manifest")
    assert main([str(tmp_path / "notes.txt"), "--model", str(tiny_model_dir)]) == 2
    assert "neither a folder nor a CSV/Parquet manifest" in capsys.readouterr().err
    (tmp_path / "m.csv").write_text("file\na.png\n")
    assert main([str(tmp_path / "m.csv"), "--model", str(tiny_model_dir), "--out", str(tmp_path / "r.parquet")]) == 2
    assert "has no 'path' column" in capsys.readouterr().err
    # What a spreadsheet saves: UTF-16, semicolons, a padded header; each said (they got the bare message).
    for content, hint in ((b"\xff\xfe" + "path\na.png\n".encode("utf-16-le"), "saved as UTF-16"),
                          (b"path;model\na.png;x\n", "separated by semicolons"), (b"path\tx\na.png\t1\n", "by tabs"),
                          (b" Path \na.png\n", "named 'path' with spaces, quotes or capitals")):
        (tmp_path / "m.csv").write_bytes(content)
        assert main([str(tmp_path / "m.csv"), "--model", str(tiny_model_dir), "--out",
                     str(tmp_path / "r.parquet")]) == 2
        assert hint in capsys.readouterr().err, content
    # SOURCE films.csv with --out films.parquet --csv would write the results over the manifest itself.
    (tmp_path / "films.csv").write_text("path\na.png\n")
    assert main([str(tmp_path / "films.csv"), "--model", str(tiny_model_dir), "--out", str(tmp_path / "films.parquet"),
                 "--csv"]) == 2
    assert "would overwrite the source" in capsys.readouterr().err
    assert (tmp_path / "films.csv").read_text() == "path\na.png\n"
    # The same manifest named as a file:// URL (read as that file) is the same source.
    pd.DataFrame({"path": ["a.png"]}).to_parquet(tmp_path / "list.parquet")
    before = (tmp_path / "list.parquet").read_bytes()
    assert main([f"file://{tmp_path / 'list.parquet'}", "--model", str(tiny_model_dir),
                 "--out", str(tmp_path / "list.parquet")]) == 2
    assert "would overwrite the source" in capsys.readouterr().err
    assert (tmp_path / "list.parquet").read_bytes() == before


def test_cli_refuses_an_output_it_could_not_write_before_scoring(tmp_path, tiny_model_dir, data_dir, capsys):
    """Checked before any film is scored (these failed after the whole run, at the first part or the commit)."""
    (tmp_path / "a.jpeg").write_bytes(FILMS[0].read_bytes())
    (tmp_path / "afile").write_text("x")
    (tmp_path / "done.parquet").mkdir()
    (tmp_path / "busy.parquet.parts").write_text("x")
    cases = {str(tmp_path / "afile" / "r.parquet"): "is not a folder",
             str(tmp_path / "no" / "such" / "r.parquet"): "does not exist",
             str(tmp_path / "done.parquet"): "is a folder",
             str(tmp_path / "busy.parquet"): "(where the parts go) is a file"}
    for out, message in cases.items():
        assert main([str(tmp_path), "--model", str(tiny_model_dir), "--out", out]) == 2, out
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (out, err)
        assert not err.count("scoring: ") > 1


def test_cli_says_when_the_ray_cluster_cannot_be_reached(tmp_path, tiny_model_dir, data_dir):
    """--address with no Ray there: a message, not a traceback (run as a user would, in its own process)."""
    import subprocess
    import sys

    from scoring.localcluster import free_ports

    (tmp_path / "a.jpeg").write_bytes(FILMS[0].read_bytes())
    done = subprocess.run([sys.executable, "-m", "scoring", str(tmp_path), "--model", str(tiny_model_dir),
                           "--out", str(tmp_path / "r.parquet"), "--engine", "ray",
                           "--address", f"127.0.0.1:{free_ports(1)[0]}"],
                          capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 2, done.stderr[-2000:]
    assert "cannot reach the Ray cluster" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "r.parquet").exists()


def test_resume_keeps_the_scored_row_of_a_path_listed_twice(tmp_path, tiny_model_dir, data_dir):
    """The output holds a duplicate's error row after its scored row; --resume must not let it win."""
    (tmp_path / "a.jpeg").write_bytes(FILMS[0].read_bytes())
    (tmp_path / "b.jpeg").write_bytes(FILMS[1].read_bytes())
    pd.DataFrame({"path": ["a.jpeg", "b.jpeg", "a.jpeg"]}).to_csv(tmp_path / "list.csv", index=False)
    config = Config(str(tmp_path / "list.csv"), model=str(tiny_model_dir), out=str(tmp_path / "r.parquet"))
    first_summary = run(config, log=lambda _: None)
    first = pd.read_parquet(tmp_path / "r.parquet")
    summary = run(Config(**{**config.__dict__, "resume": True}), log=lambda _: None)
    again = pd.read_parquet(tmp_path / "r.parquet")
    assert (summary.scored, summary.skipped, summary.errors) == (0, 2, 1)
    assert again.loc[0, "error"] == "" and again.loc[0, "sha256"] == sha256(FILMS[0])
    assert again.loc[2, "error"].startswith("duplicate of manifest row 1")
    assert (summary.positive, summary.errors) == (first_summary.positive, first_summary.errors)
    pd.testing.assert_frame_equal(again.drop(columns="scored_at"), first.drop(columns="scored_at"))


def test_resume_with_another_model_scores_its_rows_again(tmp_path, tiny_model_dir, data_dir):
    """Same classes, other weights: rows of the first model are not 'done', so one output never mixes models."""
    from conftest import _train_tiny

    from cxr_core import card as card_lib

    other = _train_tiny(tmp_path / "tiny-other", ["NORMAL", "PNEUMONIA"], 64, 5)
    folder = tmp_path / "films"
    folder.mkdir()
    for i, film in enumerate(FILMS[:3]):
        (folder / f"{i}.jpeg").write_bytes(film.read_bytes())
    out = tmp_path / "r.parquet"
    run(Config(str(folder), model=str(tiny_model_dir), out=str(out)), log=lambda _: None)
    (folder / "3.jpeg").write_bytes(FILMS[3].read_bytes())
    summary = run(Config(str(folder), model=str(other), out=str(out), resume=True), log=lambda _: None)
    table = pd.read_parquet(out)
    assert (summary.scored, summary.skipped) == (4, 0)
    assert set(table["weights_sha256"]) == {card_lib.read(other).weights_sha256}


def test_a_run_without_resume_replaces_an_output_of_other_classes(tmp_path, tiny_model_dir, tiny_model3_dir,
                                                                    data_dir):
    folder, out = _one_film_scored(tmp_path, tiny_model_dir)
    assert run(Config(str(folder), model=str(tiny_model3_dir), out=str(out)), log=lambda _: None).scored == 1
    assert "p_COVID-19" in pd.read_parquet(out).columns  # replaced, as the README says
    run(Config(str(folder), model=str(tiny_model_dir), out=str(out)), log=lambda _: None)
    assert "p_COVID-19" not in pd.read_parquet(out).columns
    with pytest.raises(ValueError, match="written for other classes"):  # --resume still refuses to mix them
        run(Config(str(folder), model=str(tiny_model3_dir), out=str(out), resume=True), log=lambda _: None)


def test_malformed_paths_and_urls_become_error_rows(tmp_path, tiny_model_dir, data_dir):
    (tmp_path / "a.jpeg").write_bytes(FILMS[0].read_bytes())
    paths = ["a.jpeg", "http://[::1/x.jpeg", f"http://127.0.0.1:{_closed_port()}/John Smith.jpeg", "bad\x00name.jpeg",
             "https://scorer:s3cret-pw@archive.example/films/x.dcm"]
    pd.DataFrame({"path": paths}).to_parquet(tmp_path / "list.parquet")
    out = tmp_path / "r.parquet"
    summary = run(Config(str(tmp_path / "list.parquet"), model=str(tiny_model_dir), out=str(out)), log=lambda _: None)
    table = pd.read_parquet(out)
    assert summary.files == 5 and summary.errors == 4 and table.loc[0, "error"] == ""
    for error in table.loc[1:3, "error"]:
        assert error.startswith("Could not read") and "Check the path or URL" in error, error
    assert "carries credentials (a user name or password" in table.loc[4, "error"]
    assert table.loc[4, "path"] == table.loc[4, "file"] == "https://archive.example/films/x.dcm"
    assert not any("s3cret" in str(v) for v in table.to_numpy().ravel())  # the password is not in the output


def test_a_file_name_that_is_not_utf8_is_an_error_row_and_the_rest_are_scored(tmp_path, tiny_model_dir, data_dir):
    import os

    folder = tmp_path / "films"
    folder.mkdir()
    (folder / "a.jpeg").write_bytes(FILMS[0].read_bytes())
    with open(os.path.join(os.fsencode(folder), b"M\xfcller.jpeg"), "wb") as fh:  # a Latin-1 name
        fh.write(FILMS[1].read_bytes())
    out = tmp_path / "r.parquet"
    summary = run(Config(str(folder), model=str(tiny_model_dir), out=str(out), csv=True), log=lambda _: None)
    table = pd.read_parquet(out)
    assert (summary.files, summary.errors) == (2, 1)
    bad = table[table["error"] != ""].iloc[0]
    assert bad["file"] == "M\ufffdller.jpeg" and "not valid UTF-8" in bad["error"] and "rename" in bad["error"]
    assert table[table["error"] == ""]["file"].tolist() == ["a.jpeg"]
    assert run(Config(str(folder), model=str(tiny_model_dir), out=str(out), resume=True),
               log=lambda _: None).scored == 0


def test_a_slice_keeps_each_file_s_colour_sample_not_its_bytes(tmp_path, tiny_model_dir, data_dir, monkeypatch):
    """A slice is 8 batches of files scored together; it kept every file's bytes for the colour rule (128 DX DICOMs:
    4-8 GB per worker). It keeps the colour rule's small thumbnail, and the rule still gives the same answer."""
    import io

    import cv2
    from PIL import Image

    from cxr_core import quality

    rng = np.random.default_rng(0)
    smooth = cv2.resize(cv2.GaussianBlur(rng.uniform(0, 255, (48, 64, 3)).astype(np.float32), (0, 0), 3), (1600, 1200))
    photo = np.rint((smooth - smooth.min()) / np.ptp(smooth) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, "PNG")
    (tmp_path / "photo.png").write_bytes(buf.getvalue())
    (tmp_path / "a.jpeg").write_bytes(FILMS[0].read_bytes())
    kept = []
    assess = review.assess_item
    monkeypatch.setattr(review, "assess_item", lambda item, original=None: kept.append(original) or
                        assess(item, original))
    run(Config(str(tmp_path), model=str(tiny_model_dir), out=str(tmp_path / "r.parquet")), log=lambda _: None)
    table = pd.read_parquet(tmp_path / "r.parquet").set_index("file")
    assert len(kept) == 2 and not any(isinstance(k, bytes | bytearray) for k in kept)
    assert all(k is None or (isinstance(k, np.ndarray) and k.nbytes <= 256 * 256 * 3) for k in kept)
    assert table.loc["photo.png", "not_chest"] and "colour picture" in table.loc["photo.png", "quality_notes"]
    expected = quality.colourfulness(buf.getvalue())
    assert expected > 3 * quality.COLOUR_MAX and f"{expected:.1f}" in table.loc["photo.png", "quality_notes"]


def test_manifest_rows_that_cannot_become_paths_are_error_rows(tmp_path):
    """From a review: a malformed URL with a password, a missing value of a string-typed Parquet column (pd.NA), and
    a CSV that is not UTF-8 (one bad row stopped the whole run with a codec error)."""
    from scoring import sources

    (tmp_path / "a.jpeg").write_bytes(FILMS[0].read_bytes())
    rows = ["a.jpeg", "http://scorer:s3cret@[::1/x.png", None]
    pd.DataFrame({"path": pd.array(rows, dtype="string")}).to_parquet(tmp_path / "m.parquet")
    entries = sources.list_entries(str(tmp_path / "m.parquet"))
    assert entries[0] == sources.Entry(str(tmp_path / "a.jpeg"), "a.jpeg")
    assert "carries credentials (a user name or password" in entries[1].problem and "s3cret" not in repr(entries[1])
    assert entries[2].problem == "manifest row 3 has no path; give a file path or URL"
    (tmp_path / "m.csv").write_bytes(b"path\na.jpeg\nM\xfcller.jpeg\n")  # Latin-1
    entries = sources.list_entries(str(tmp_path / "m.csv"))
    assert entries[0].problem is None and "not valid UTF-8" in entries[1].problem
    assert entries[1].file == "M\ufffdller.jpeg"


def test_a_manifest_url_with_a_password_is_refused_before_anything_is_read():
    from scoring import sources

    with pytest.raises(ValueError, match=r"carries credentials \(a user name or password") as err:
        sources.list_entries("https://scorer:s3cret@archive.example/films/list.csv")
    assert "s3cret" not in str(err.value) and "https://archive.example/films/list.csv" in str(err.value)


def test_a_folder_that_cannot_be_listed_is_an_error_row(tmp_path, tiny_model_dir, data_dir, monkeypatch):
    import os

    for name in ("a", "locked"):
        (tmp_path / "films" / name).mkdir(parents=True)
    (tmp_path / "films" / "a" / "1.jpeg").write_bytes(FILMS[0].read_bytes())
    (tmp_path / "films" / "locked" / "2.jpeg").write_bytes(FILMS[1].read_bytes())
    scandir = os.scandir

    def refusing(path):  # as root, chmod would not stop the listing
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied")
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    summary = run(Config(str(tmp_path / "films"), model=str(tiny_model_dir), out=str(tmp_path / "r.parquet")),
                  log=lambda _: None)
    table = pd.read_parquet(tmp_path / "r.parquet").set_index("file")
    assert (summary.files, summary.scored, summary.errors) == (2, 1, 1)
    assert table.loc["locked/", "error"].startswith("This folder could not be listed (Permission denied)")


def test_resume_scores_again_under_a_changed_card_with_the_same_weights(tmp_path, tiny_model_dir, data_dir):
    """A recalibrated card (other temperature) changes every probability though the weights are the same: a resumed
    run must not keep the old card's rows beside the new card's."""
    import dataclasses
    import shutil

    from cxr_core import card as card_lib

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    folder = tmp_path / "films"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.jpeg").write_bytes(FILMS[i].read_bytes())
    out = tmp_path / "r.parquet"
    run(Config(str(folder), model=str(model), out=str(out)), log=lambda _: None)
    before = pd.read_parquet(out)
    assert set(before["card_sha256"]) == {card_lib.read(model).card_sha256}
    card_lib.save(dataclasses.replace(card_lib.read(model), temperature=3.0), model)
    summary = run(Config(str(folder), model=str(model), out=str(out), resume=True), log=lambda _: None)
    after = pd.read_parquet(out)
    assert summary.scored == 3 and set(after["card_sha256"]) == {card_lib.read(model).card_sha256}
    assert set(after["weights_sha256"]) == set(before["weights_sha256"])  # the same weights
    assert not np.allclose(after["top_probability"], before["top_probability"])
    assert run(Config(str(folder), model=str(model), out=str(out), resume=True), log=lambda _: None).scored == 0


def test_a_pipe_or_folder_in_a_manifest_is_an_error_row_not_a_hang(tmp_path, tiny_model_dir, data_dir):
    """A FIFO listed in a manifest must not block a worker for ever waiting for a writer (open() would)."""
    import os
    import threading

    from scoring import sources

    (tmp_path / "a.jpeg").write_bytes(FILMS[0].read_bytes())
    os.mkfifo(tmp_path / "pipe.dcm")
    (tmp_path / "sub").mkdir()
    outcome: list[BaseException | bytes] = []

    def read() -> None:
        try:
            outcome.append(sources.read_bytes(str(tmp_path / "pipe.dcm")))
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():
        with open(tmp_path / "pipe.dcm", "wb"):  # a writer, so that the blocked reader ends
            pass
        pytest.fail("reading a FIFO blocked")
    assert isinstance(outcome[0], sources.SourceError) and "not a regular file" in str(outcome[0])
    paths = [str(tmp_path / name) for name in ("a.jpeg", "pipe.dcm", "sub")]
    pd.DataFrame({"path": paths}).to_csv(tmp_path / "list.csv", index=False)
    out = tmp_path / "r.parquet"
    summary = run(Config(str(tmp_path / "list.csv"), model=str(tiny_model_dir), out=str(out)), log=lambda _: None)
    table = pd.read_parquet(out)
    assert (summary.files, summary.errors) == (3, 2) and table.loc[0, "error"] == ""
    assert "not a regular file" in table.loc[1, "error"] and "is a folder" in table.loc[2, "error"]


def test_a_file_over_the_size_limit_is_refused_before_it_is_read(tmp_path, tiny_model_dir, data_dir, monkeypatch):
    """A huge file (here sparse, 300 MB) is an error row, refused from its size before its bytes fill the
    worker's memory; the film beside it is scored. Over HTTP, a body is never read past the limit."""
    import tracemalloc

    from cxr_core import limits
    from scoring import sources

    (tmp_path / "a.jpeg").write_bytes(FILMS[0].read_bytes())
    with open(tmp_path / "huge.dcm", "wb") as f:
        f.truncate(300 * limits.MiB)
    tracemalloc.start()
    with pytest.raises(sources.SourceError, match=r"too large \(300 MB or more, over the limit of 256 MB\)"):
        sources.read_bytes(str(tmp_path / "huge.dcm"))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 5 * limits.MiB
    summary = run(Config(str(tmp_path), model=str(tiny_model_dir), out=str(tmp_path / "r.parquet")), log=lambda _: None)
    table = pd.read_parquet(tmp_path / "r.parquet").set_index("file")
    assert (summary.files, summary.scored, summary.errors, summary.retry) == (2, 1, 1, 1)  # refused before reading
    assert table.loc["huge.dcm", "error"].startswith("The file is too large") and table.loc["a.jpeg", "error"] == ""
    # HTTP, with and without a Content-Length (a stream), against a small limit.
    monkeypatch.setattr(limits, "MAX_FILE_BYTES", 1000)
    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "big.png").write_bytes(b"x" * 5000)
    server, url = _serve(tmp_path / "web")
    try:
        with pytest.raises(sources.SourceError, match="too large"):
            sources.read_bytes(f"{url}/big.png")
        monkeypatch.setattr(http.server.SimpleHTTPRequestHandler, "send_header",
                            lambda self, k, v: None if k == "Content-Length" else
                            http.server.BaseHTTPRequestHandler.send_header(self, k, v))
        with pytest.raises(sources.SourceError, match="too large"):
            sources.read_bytes(f"{url}/big.png")
    finally:
        server.shutdown()


def test_resume_tries_again_the_files_the_model_failed_on(tmp_path, tiny_model_dir, data_dir, monkeypatch):
    """A film that was read but that the model failed on (memory, an engine error) is not 'done': --resume
    scores it; an unreadable file (its content decides) stays done."""
    for i, film in enumerate(FILMS[:2]):
        (tmp_path / f"{i}.jpeg").write_bytes(film.read_bytes())
    (tmp_path / "notes.png").write_bytes(b"not an image")
    config = Config(str(tmp_path), model=str(tiny_model_dir), out=str(tmp_path / "r.parquet"))

    def failing(self, batch):
        raise MemoryError("engine out of memory")

    with monkeypatch.context() as patch:
        patch.setattr(models.Classifier, "predict", failing)
        first = run(config, log=lambda _: None)
    table = pd.read_parquet(tmp_path / "r.parquet").set_index("file")
    assert first.errors == 3 and table.loc["0.jpeg", "error"].startswith("This file could not be processed")
    assert table.loc[["0.jpeg", "1.jpeg"], "sha256"].tolist() == ["", ""]
    assert table.loc["notes.png", "sha256"] != ""
    again = run(Config(**{**config.__dict__, "resume": True}), log=lambda _: None)
    assert (again.scored, again.skipped, again.errors) == (2, 1, 1)
    table = pd.read_parquet(tmp_path / "r.parquet").set_index("file")
    assert table.loc[["0.jpeg", "1.jpeg"], "error"].tolist() == ["", ""]
    assert table.loc[["0.jpeg", "1.jpeg"], "sha256"].tolist() == [sha256(f) for f in FILMS[:2]]


def test_relative_paths_in_a_manifest_read_from_a_url_are_beside_that_manifest(tmp_path, tiny_model_dir, data_dir,
                                                                                 monkeypatch):
    """A manifest at http://host/dir/list.csv naming "a.jpeg" means http://host/dir/a.jpeg, not a file called
    a.jpeg in the worker's working folder (which, here, holds another film under that name)."""
    web = tmp_path / "web" / "dir"
    web.mkdir(parents=True)
    (web / "a.jpeg").write_bytes(FILMS[0].read_bytes())
    (web / "sub").mkdir()
    (web / "sub" / "b.jpeg").write_bytes(FILMS[1].read_bytes())
    pd.DataFrame({"path": ["a.jpeg", "sub/b.jpeg", "../dir/a.jpeg"]}).to_csv(web / "list.csv", index=False)
    decoy = tmp_path / "cwd"
    decoy.mkdir()
    (decoy / "a.jpeg").write_bytes(FILMS[2].read_bytes())
    monkeypatch.chdir(decoy)
    server, url = _serve(tmp_path / "web")
    try:
        summary = run(Config(f"{url}/dir/list.csv", model=str(tiny_model_dir), out=str(tmp_path / "r.parquet")),
                      log=lambda _: None)
    finally:
        server.shutdown()
    table = pd.read_parquet(tmp_path / "r.parquet")
    assert table["path"].tolist() == [f"{url}/dir/a.jpeg", f"{url}/dir/sub/b.jpeg", f"{url}/dir/a.jpeg"]
    assert table["sha256"].tolist()[:2] == [sha256(FILMS[0]), sha256(FILMS[1])]
    assert table["error"].tolist()[2].startswith("duplicate of manifest row 1")
    assert summary.errors == 1


def test_a_second_run_into_the_same_output_is_refused_while_the_first_holds_it(tmp_path, tiny_model_dir, data_dir):
    """Two runs into one --out: the second removed the first's parts on its start and the first's commit merged
    the second's rows (another model's, perhaps) into its output. Now the second is refused, and the first's
    work is untouched."""
    from scoring.store import Store

    folder = tmp_path / "films"
    folder.mkdir()
    for i, film in enumerate(FILMS[:2]):
        (folder / f"{i}.jpeg").write_bytes(film.read_bytes())
    out = tmp_path / "r.parquet"
    config = Config(str(folder), model=str(tiny_model_dir), out=str(out))
    run(config, log=lambda _: None)
    before = out.read_bytes()
    first = Store(out, ["NORMAL", "PNEUMONIA"])
    first.start(resume=True)
    first.write_part([{"path": "kept"}])
    with pytest.raises(ValueError, match="another scoring run is writing"):
        run(config, log=lambda _: None)
    assert out.read_bytes() == before and len(list(first.parts.glob("part-*"))) == 1
    first.close()
    assert run(config, log=lambda _: None).scored == 2  # free again


def test_a_resumed_run_s_rows_win_whatever_the_clock_says(tmp_path, tiny_model_dir, data_dir):
    """Parts were named by the wall clock: a resumed run on a machine whose clock is behind the interrupted run's
    (another driver, a reboot) wrote parts that sorted first, so the commit kept the old rows over its fresh ones
    (a file scored now stayed 'not found'). Runs are numbered after the parts that are there now."""
    import time

    from cxr_core import card as card_lib
    from scoring.job import engine_rows
    from scoring.rows import Pending, error_row
    from scoring.sources import list_entries
    from scoring.store import Store

    folder = tmp_path / "films"
    folder.mkdir()
    (folder / "0.jpeg").write_bytes(FILMS[0].read_bytes())
    config = Config(str(folder), model=str(tiny_model_dir), out=str(tmp_path / "r.parquet"))
    ours = card_lib.read(tiny_model_dir)
    path = str(folder / "0.jpeg")
    interrupted = Store(config.out, ours.class_names)
    interrupted.start(resume=False)
    interrupted._run = time.time_ns() + 3600 * 10**9  # its clock an hour ahead of this machine's
    interrupted.write_part([error_row(path, "0.jpeg", "File not found", ours)])
    interrupted.close()  # killed: no commit
    resumed = Store(config.out, ours.class_names)
    assert resumed.start(resume=True) == {}  # the failed row is not done: it is scored again
    (block,) = engine_rows(config, [Pending(path, "0.jpeg")], ours.card_sha256)
    resumed.write_part(block)
    rows = resumed.commit(list_entries(str(folder)), ours)
    resumed.close()
    assert rows["error"].tolist() == [block[0]["error"]] and rows["sha256"].tolist() == [block[0]["sha256"]] != [""]


def test_an_empty_or_unmounted_source_leaves_the_output_as_it_was(tmp_path, tiny_model_dir, data_dir):
    folder, out = _one_film_scored(tmp_path, tiny_model_dir)
    before = out.read_bytes()
    empty = tmp_path / "mnt"
    empty.mkdir()
    for resume in (False, True):
        with pytest.raises(ValueError, match="lists no image files"):
            run(Config(str(empty), model=str(tiny_model_dir), out=str(out), resume=resume), log=lambda _: None)
    assert out.read_bytes() == before


def test_rows_come_only_from_the_model_the_run_checked(tmp_path, tiny_model_dir, data_dir):
    """A model folder replaced while the source was listed (or another copy on a node) is refused, and a commit
    keeps no row of another card, so one output never mixes models."""
    from conftest import _train_tiny

    from cxr_core import card as card_lib
    from cxr_core.errors import ModelCardError
    from scoring.job import engine_rows
    from scoring.rows import Pending
    from scoring.sources import list_entries
    from scoring.store import Store

    folder = tmp_path / "films"
    folder.mkdir()
    (folder / "0.jpeg").write_bytes(FILMS[0].read_bytes())
    config = Config(str(folder), model=str(tiny_model_dir), out=str(tmp_path / "r.parquet"))
    pending = [Pending(str(folder / "0.jpeg"), "0.jpeg")]
    with pytest.raises(ModelCardError, match="holds another version"):
        list(engine_rows(config, pending, "0" * 64))
    ours = card_lib.read(tiny_model_dir)
    (block,) = engine_rows(config, pending, ours.card_sha256)
    assert block[0]["card_sha256"] == ours.card_sha256 and block[0]["engine"].startswith("OpenVINO")
    other = card_lib.read(_train_tiny(tmp_path / "tiny-other", ["NORMAL", "PNEUMONIA"], 64, 5))
    store = Store(config.out, ours.class_names)
    store.start(resume=False)
    store.write_part([{**block[0], "card_sha256": other.card_sha256}])
    with pytest.raises(RuntimeError, match="1 of 1 files have no result yet"):
        store.commit(list_entries(str(folder)), ours)
    store.write_part(block)
    assert store.commit(list_entries(str(folder)), ours)["card_sha256"].tolist() == [ours.card_sha256]
    store.close()


def test_resume_tries_again_a_file_this_machine_could_not_read(tmp_path, tiny_model_dir, data_dir, monkeypatch):
    """Out of memory while decoding (or a decoder missing on the node, or a bug) is no property of the file: the
    row keeps no sha256 and --resume reads it again; the unscored row names no engine."""
    from pydicom.pixels import get_decoder

    for i, film in enumerate(FILMS[:2]):
        (tmp_path / f"{i}.jpeg").write_bytes(film.read_bytes())
    j2k = data_dir / "dicom" / "pydicom-data" / "RG1_J2KI.dcm"
    (tmp_path / "2.dcm").write_bytes(j2k.read_bytes())
    config = Config(str(tmp_path), model=str(tiny_model_dir), out=str(tmp_path / "r.parquet"))
    real, target = imaging._read_pillow, FILMS[1].read_bytes()
    decoder = get_decoder(pydicom.dcmread(j2k, stop_before_pixels=True).file_meta.TransferSyntaxUID)

    def short_of_memory(fp, *args):
        data = fp.read()
        fp.seek(0)
        if data == target:
            raise MemoryError
        return real(fp, *args)

    with monkeypatch.context() as patch:
        patch.setattr(imaging, "_read_pillow", short_of_memory)
        patch.setattr(decoder, "_available", {})  # this node lacks the JPEG 2000 decoder packages
        patch.setattr(decoder, "_unavailable", {"pylibjpeg": ("pylibjpeg-openjpeg",)})
        first = run(config, log=lambda _: None)
    table = pd.read_parquet(tmp_path / "r.parquet").set_index("file")
    assert first.errors == 2 and table.loc["1.jpeg", "error"].startswith("The image is too large to load")
    assert table.loc["2.dcm", "error"].startswith("This computer has no decoder for this DICOM's compression")
    assert table.loc[["1.jpeg", "2.dcm"], "sha256"].tolist() == ["", ""]
    assert table.loc[["1.jpeg", "2.dcm"], "engine"].tolist() == ["", ""] and table.loc["0.jpeg", "engine"] != ""
    again = run(Config(**{**config.__dict__, "resume": True}), log=lambda _: None)
    assert (again.scored, again.skipped, again.errors) == (2, 1, 0)


def test_signed_urls_are_refused_like_passwords_and_never_written(tmp_path, tiny_model_dir, data_dir):
    """A pre-signed S3 / GCS URL or an Azure SAS carries its credential in the query: it went into the path and
    file columns, the CSV and the messages. Such rows are error rows shown without their query; an ordinary query
    stays; a manifest URL that is itself signed is refused."""
    from scoring import sources

    (tmp_path / "a.jpeg").write_bytes(FILMS[0].read_bytes())
    signed = ["https://bucket.s3.amazonaws.com/x.dcm?X-Amz-Algorithm=AWS4&X-Amz-Credential=AKIDSECRET&"
              "X-Amz-Signature=feedface", "https://acct.blob.core.windows.net/c/y.dcm?sv=2024&sig=SASSECRET",
              "https://storage.googleapis.com/b/z.dcm?X%2DGoog%2DSignature=GOOGSECRET"]
    pd.DataFrame({"path": ["a.jpeg", *signed, "https://archive.example/w.dcm?series=2"]}).to_parquet(
        tmp_path / "list.parquet")
    entries = sources.list_entries(str(tmp_path / "list.parquet"))
    assert [e.problem is not None for e in entries] == [False, True, True, True, False]
    assert [e.path for e in entries[1:4]] == ["https://bucket.s3.amazonaws.com/x.dcm",
                                              "https://acct.blob.core.windows.net/c/y.dcm",
                                              "https://storage.googleapis.com/b/z.dcm"]
    assert entries[4].path == "https://archive.example/w.dcm?series=2"
    assert not [s for e in entries for s in ("AKIDSECRET", "feedface", "SASSECRET", "GOOGSECRET") if s in repr(e)]
    with pytest.raises(ValueError, match="carries credentials") as err:
        sources.list_entries("https://bucket.s3.amazonaws.com/list.csv?X-Amz-Signature=feedface")
    assert "feedface" not in str(err.value)


def test_a_source_folder_that_cannot_be_listed_is_refused_and_the_output_kept(tmp_path, tiny_model_dir, data_dir,
                                                                               capsys):
    """An unreadable SOURCE was one error row ("./") that the commit wrote over the whole earlier output, even with
    --resume."""
    from scoring_inputs import unreadable

    folder, out = _one_film_scored(tmp_path, tiny_model_dir)
    before = out.read_bytes()
    with unreadable(folder):
        for resume in ([], ["--resume"]):
            assert main([str(folder), "--model", str(tiny_model_dir), "--out", str(out), *resume]) == 2
            err = capsys.readouterr().err
            assert f"the folder {folder} could not be listed (Permission denied)" in err, err
            assert "output was left as it was" in err and "Traceback" not in err
    assert out.read_bytes() == before


def test_resume_keeps_the_rows_of_a_folder_that_could_not_be_listed_this_time(tmp_path, tiny_model_dir, data_dir):
    from scoring_inputs import unreadable

    folder = tmp_path / "films"
    for sub in ("a", "locked/deep"):
        (folder / sub).mkdir(parents=True)
    (folder / "a" / "1.jpeg").write_bytes(FILMS[0].read_bytes())
    (folder / "locked" / "2.jpeg").write_bytes(FILMS[1].read_bytes())
    (folder / "locked" / "deep" / "3.jpeg").write_bytes(FILMS[2].read_bytes())
    out = tmp_path / "r.parquet"
    config = Config(str(folder), model=str(tiny_model_dir), out=str(out), resume=True)
    run(config, log=lambda _: None)
    first = pd.read_parquet(out).set_index("file")
    with unreadable(folder / "locked"):
        summary = run(config, log=lambda _: None)
    table = pd.read_parquet(out)
    assert table["file"].tolist() == ["a/1.jpeg", "locked/", "locked/2.jpeg", "locked/deep/3.jpeg"]
    assert table.loc[1, "error"].startswith("This folder could not be listed (Permission denied)")
    kept = table.set_index("file").loc[["locked/2.jpeg", "locked/deep/3.jpeg"]]
    pd.testing.assert_frame_equal(kept, first.loc[["locked/2.jpeg", "locked/deep/3.jpeg"]])
    assert (summary.files, summary.scored, summary.skipped, summary.errors) == (4, 0, 1, 1)
    # Readable again: its files are done (nothing scored), and the folder's error row is gone.
    summary = run(config, log=lambda _: None)
    assert (summary.files, summary.scored, summary.skipped, summary.errors) == (3, 0, 3, 0)
    pd.testing.assert_frame_equal(pd.read_parquet(out).set_index("file"), first)


def test_relative_rows_of_a_url_manifest_are_checked_for_credentials(tmp_path):
    """A relative row is joined onto the manifest's URL, its query included: "x.png?X-Amz-Signature=..." became a
    signed URL in the output. Names such as password, api-key and client_secret are credentials too."""
    from scoring import sources

    web = tmp_path / "web"
    web.mkdir()
    rows = ["a.jpeg?X-Amz-Signature=SECRET1", "b.jpeg?password=SECRET2", "c.jpeg?api-key=SECRET3",
            "d.jpeg?client_secret=SECRET4", "https://archive.example/e.dcm?APIKEY=SECRET5",
            "https://archive.example/f.dcm?Passwd=SECRET6", "g.jpeg?series=2"]
    pd.DataFrame({"path": rows}).to_csv(web / "list.csv", index=False)
    server, url = _serve(web)
    try:
        entries = sources.list_entries(f"{url}/list.csv")
    finally:
        server.shutdown()
    assert all("carries credentials" in e.problem for e in entries[:6]), entries
    assert [e.path for e in entries[:4]] == [f"{url}/{n}.jpeg" for n in "abcd"]
    assert [e.file for e in entries[:4]] == [f"{n}.jpeg" for n in "abcd"]
    assert entries[6] == sources.Entry(f"{url}/g.jpeg?series=2", "g.jpeg?series=2")
    assert "SECRET" not in repr(entries)


def test_symbolic_links_in_a_folder_are_followed_and_a_loose_one_is_an_error_row(tmp_path, tiny_model_dir,
                                                                                 data_dir):
    """Links leading out of the folder and links leading nowhere were left out with no row, count or message."""
    folder, store = tmp_path / "archive", tmp_path / "volume2"
    (store / "2024").mkdir(parents=True)
    folder.mkdir()
    (folder / "a.jpeg").write_bytes(FILMS[0].read_bytes())
    (store / "b.jpeg").write_bytes(FILMS[1].read_bytes())
    (store / "2024" / "c.jpeg").write_bytes(FILMS[2].read_bytes())
    (folder / "b.jpeg").symlink_to(store / "b.jpeg")  # a file elsewhere
    (folder / "2024").symlink_to(store / "2024")  # a folder elsewhere
    (folder / "gone.jpeg").symlink_to(tmp_path / "Doe_John" / "x.jpeg")  # leads nowhere
    (folder / "up").symlink_to(folder)  # a loop back to the top
    summary = run(Config(str(folder), model=str(tiny_model_dir), out=str(tmp_path / "r.parquet")), log=lambda _: None)
    table = pd.read_parquet(tmp_path / "r.parquet").set_index("file")
    assert table.index.tolist() == ["2024/c.jpeg", "a.jpeg", "b.jpeg", "gone.jpeg"]
    assert (summary.files, summary.scored, summary.errors) == (4, 3, 1)
    assert table.loc["b.jpeg", "sha256"] == sha256(FILMS[1]) and table.loc["2024/c.jpeg", "sha256"] == sha256(FILMS[2])
    assert table.loc["gone.jpeg", "error"].startswith("This is a symbolic link that leads nowhere")
    assert "Doe_John" not in table.loc["gone.jpeg", "error"]  # the target's name is not the user's to see there


def test_manifest_problems_are_named_without_quoting_its_rows(tmp_path, tiny_model_dir, capsys):
    """A manifest without a header: its first row (a file name: patient data) was printed as its column names."""
    (tmp_path / "list.csv").write_text("Doe_John_1937.png,chest\nRoe_Jane.png,chest\n")
    assert main([str(tmp_path / "list.csv"), "--model", str(tiny_model_dir), "--out", str(tmp_path / "r.parquet")]) == 2
    err = capsys.readouterr().err
    assert "has no 'path' column (it has 2 columns, none named 'path')" in err and "must be a header" in err
    assert "Doe" not in err and "chest" not in err


def test_a_parquet_path_column_must_be_text(tmp_path):
    """A binary column gave "b'a.jpeg'" as every path; a list column, the lists' text. Bytes are decoded (the
    non-UTF-8 check applies); other types are refused, their values unquoted."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from scoring import sources

    pq.write_table(pa.table({"path": pa.array([b"a.jpeg", b"M\xfcller.jpeg", None], pa.binary())}),
                   tmp_path / "bytes.parquet")
    entries = sources.list_entries(str(tmp_path / "bytes.parquet"))
    assert entries[0] == sources.Entry(str(tmp_path / "a.jpeg"), "a.jpeg")
    assert "not valid UTF-8" in entries[1].problem and entries[1].file == "M\ufffdller.jpeg"
    assert entries[2].problem == "manifest row 3 has no path; give a file path or URL"
    for name, column, kind in [("lists", pa.array([["Doe.png"], ["b.png"]]), "lists"),
                               ("numbers", pa.array([1937, 2]), "numbers")]:
        pq.write_table(pa.table({"path": column}), tmp_path / f"{name}.parquet")
        with pytest.raises(ValueError, match=f"has a 'path' column of {kind}, not text") as err:
            sources.list_entries(str(tmp_path / f"{name}.parquet"))
        assert "Doe" not in str(err.value) and "1937" not in str(err.value)


def test_a_source_that_cannot_be_read_says_so_and_speaks_of_no_parts(tmp_path, tiny_model_dir, data_dir, capsys):
    """A folder named like a manifest was read as one (IsADirectoryError), and that, an unreadable manifest and a
    lock that cannot be taken all said "the parts written so far are kept ... rerun with --resume" though nothing
    was written; an empty CSV said "No columns to parse from file" without naming it."""
    from scoring_inputs import unreadable

    (tmp_path / "scans.csv").mkdir()
    (tmp_path / "scans.csv" / "a.jpeg").write_bytes(FILMS[0].read_bytes())
    out = tmp_path / "r.parquet"
    assert main([str(tmp_path / "scans.csv"), "--model", str(tiny_model_dir), "--out", str(out)]) == 0
    assert pd.read_parquet(out)["file"].tolist() == ["a.jpeg"]
    capsys.readouterr()
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "locked.csv").write_text("path\na.jpeg\n")
    (tmp_path / "torn.parquet").write_bytes(b"PAR1 not really")
    cases = {"empty.csv": "the manifest {} is empty; its first line must be a header with a 'path' column",
             "locked.csv": "the manifest {} cannot be read (no permission)",
             "missing.csv": "the manifest {} does not exist",
             "torn.parquet": "the manifest {} could not be read as a Parquet file"}
    for name, message in cases.items():
        with unreadable(tmp_path / "locked.csv"):
            code = main([str(tmp_path / name), "--model", str(tiny_model_dir), "--out", str(tmp_path / "x.parquet")])
        err = capsys.readouterr().err
        assert code == 2 and message.format(tmp_path / name) in err, err
        assert "parts" not in err and "--resume" not in err and "Traceback" not in err
    # An OSError before anything is written (the output's lock is a folder): nothing to resume from.
    (tmp_path / ".r.parquet.lock").unlink()
    (tmp_path / ".r.parquet.lock").mkdir()
    assert main([str(tmp_path / "scans.csv"), "--model", str(tiny_model_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Is a directory" in err and "nothing was written and the output was left as it was" in err, err
    assert "parts" not in err and "--resume" not in err


def test_the_summary_gives_the_rate_after_the_first_results_and_counts_only_files_read(tmp_path, tiny_model_dir,
                                                                                        data_dir):
    """The README promises images/s after the first results (only the overall rate was printed), and "scored now"
    counted files that could not be fetched."""
    import re

    for i, film in enumerate(FILMS[:4]):
        (tmp_path / f"{i}.jpeg").write_bytes(film.read_bytes())
    pd.DataFrame({"path": ["0.jpeg", "1.jpeg", "gone.jpeg", "2.jpeg", "3.jpeg"]}).to_csv(tmp_path / "list.csv",
                                                                                        index=False)
    lines: list[str] = []
    summary = run(Config(str(tmp_path / "list.csv"), model=str(tiny_model_dir), out=str(tmp_path / "r.parquet"),
                         batch_size=1), log=lines.append)
    assert (summary.files, summary.scored, summary.skipped, summary.errors, summary.retry) == (5, 4, 0, 1, 1)
    line = lines[-1]
    assert line.startswith("scoring: 5 files, 4 scored now, 0 already done, 1 errors (1 not fetched or not scored: "
                           "--resume tries them again)"), line
    assert re.search(r"images/s overall; first results after [\d.]+ s, all in the first results$", line), line
    assert summary.later_per_s is None  # 5 files, batches of 1: all in the first slice of 8 batches


@pytest.mark.parametrize(("engine", "actors"), [("local", None), ("ray", 2)])
def test_the_rate_after_the_first_results_starts_after_the_first_slice(tmp_path, tiny_model_dir, data_dir,
                                                                       monkeypatch, engine, actors):
    """An engine scores a slice (rows.SLICE_BATCHES batches) at once and hands it over batch by batch: timed
    from its first batch, the rate 'after the first results' counted the slice's other 7 batches in no time
    (2616 images/s printed beside 87 overall); Ray's actors score one first slice each, side by side. A clock
    that the engine's blocks move: the first slices at 1 s, then one film every 0.5 s."""
    import dataclasses

    from scoring import job, rows

    first = rows.SLICE_BATCHES * (actors or 1)
    films = [tmp_path / f"{i}.jpeg" for i in range(first + 4)]
    for i, path in enumerate(films):
        path.write_bytes(FILMS[i % len(FILMS)].read_bytes())
    clock = {"now": 0.0}
    real = job.engine_rows

    def timed(config, pending, card_sha256=""):  # the rows of this machine's engine, as the cluster's would come
        for n, block in enumerate(real(dataclasses.replace(config, engine="local"), pending, card_sha256)):
            clock["now"] = 1.0 if n < first else clock["now"] + 0.5
            yield block

    monkeypatch.setattr(job, "engine_rows", timed)
    monkeypatch.setattr(job, "time", SimpleNamespace(monotonic=lambda: clock["now"]))
    summary = run(Config(str(tmp_path), model=str(tiny_model_dir), out=str(tmp_path.parent / "rate.parquet"),
                         batch_size=1, engine=engine, actors=actors), log=lambda _: None)
    assert summary.scored == len(films)
    assert summary.later_per_s == pytest.approx(4 / 2.0)  # the 4 films after the slice, in 2 s (it said 11 / 2 s)
    # --resume with 2 films changed: fewer rows than a first slice, so the first results are their first block (at
    # 1 s here), not 0 s, and there is no later rate.
    for path in films[:2]:
        path.write_bytes(FILMS[-1].read_bytes() + b"\0")
    clock["now"] = 0.0
    resumed = run(Config(str(tmp_path), model=str(tiny_model_dir), out=str(tmp_path.parent / "rate.parquet"),
                         batch_size=1, engine=engine, actors=actors, resume=True), log=lambda _: None)
    assert resumed.scored == 2 and resumed.first_s == pytest.approx(1.0) and resumed.later_per_s is None


def test_a_failed_commit_leaves_no_hidden_copy_of_the_rows(tmp_path, tiny_model_dir, data_dir, capsys):
    """A commit that failed (here: a folder where the --csv copy goes) left .r.parquet.<pid>.tmp, every path and
    score under a hidden name; one a killed run left is removed when the next run starts."""
    folder = tmp_path / "films"
    folder.mkdir()
    (folder / "0.jpeg").write_bytes(FILMS[0].read_bytes())
    (tmp_path / "r.csv").mkdir()
    args = [str(folder), "--model", str(tiny_model_dir), "--out", str(tmp_path / "r.parquet"), "--csv"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Is a directory" in err and "the parts written so far are kept: fix it and rerun with --resume" in err
    assert not list(tmp_path.glob(".*.tmp")) and not (tmp_path / "r.parquet").exists()
    assert list((tmp_path / "r.parquet.parts").glob("part-*.parquet"))
    (tmp_path / "r.csv").rmdir()
    stale = [tmp_path / ".r.parquet.999999.tmp", tmp_path / ".r.csv.999999.tmp",
             tmp_path / "r.parquet.parts" / ".part-1-000000.parquet.tmp"]
    for path in stale:
        path.write_text("rows of a killed run")
    others = [tmp_path / ".other.parquet.999999.tmp",  # another output's, and one whose name starts as this one's
              tmp_path / ".r.parquet.v2.parquet.999999.tmp", tmp_path / ".r.csv.v2.csv.999999.tmp"]
    for path in others:
        path.write_text("x")
    assert main([*args, "--resume"]) == 0
    assert not [p for p in stale if p.exists()] and all(p.exists() for p in others)
    assert pd.read_parquet(tmp_path / "r.parquet")["file"].tolist() == ["0.jpeg"]


def test_a_manifest_name_in_the_other_unicode_form_finds_its_file(tmp_path, tiny_model_dir, data_dir):
    """A manifest written with composed accents (NFC) for files copied from macOS, whose names keep them
    decomposed (NFD): the file was 'not found' though it is there. The row keeps the manifest's spelling."""
    import unicodedata

    composed = "Müller_José.jpeg"
    decomposed = unicodedata.normalize("NFD", composed)
    assert composed != decomposed
    (tmp_path / decomposed).write_bytes(FILMS[0].read_bytes())
    pd.DataFrame({"path": [composed, "absent.jpeg"]}).to_csv(tmp_path / "list.csv", index=False)
    out = tmp_path / "r.parquet"
    run(Config(str(tmp_path / "list.csv"), model=str(tiny_model_dir), out=str(out)), log=lambda _: None)
    rows = pd.read_parquet(out)
    assert rows["error"].tolist()[0] in ("", None) and rows["sha256"].tolist()[0] == sha256(FILMS[0])
    assert rows["path"].tolist()[0].endswith(composed)
    assert rows["error"].tolist()[1].startswith("File not found")
