"""What a run may score as held out: no near-copy of a training film across a reused manifest's splits, no
film that the starting weights trained on, and no external film whose copy trained the model (``rescore``).
Real Kermany films; ``dataset.prepare`` only, no training."""

from __future__ import annotations

import csv
import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA
from PIL import Image

from training import cache, data, dataset, hygiene, rescore
from training.config import TrainConfig

KERMANY = DATA / "kermany" / "train"
SIZE = 64


def _link(src: Path, dst: Path, n: int) -> list[Path]:
    dst.mkdir(parents=True, exist_ok=True)
    made = []
    for name in sorted(p.name for p in src.iterdir())[:n]:
        (dst / name).symlink_to(src / name)
        made.append(dst / name)
    return made


def _reencoded_copy(film: Path, dst: Path) -> Path:
    """The film saved again under a compilation's name, as a redistributor would (other size and quality)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    Image.open(film).convert("L").resize((300, 280), Image.BILINEAR).save(dst, quality=75)
    return dst


@pytest.fixture(scope="module")
def films(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lineage")
    _link(KERMANY / "NORMAL", root / "kermany" / "NORMAL", 20)
    _link(KERMANY / "PNEUMONIA", root / "kermany" / "PNEUMONIA", 20)
    return {"root": root, "kermany": root / "kermany", "cache": root / "cache"}


def _config(films, out: Path, sources: list[Path], **kw) -> TrainConfig:
    return TrainConfig(data=[str(s) for s in sources], out=str(out), architecture="tiny", input_size=SIZE,
                       cache_dir=str(films["cache"]), **kw)


def _manifest(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _write_manifest(rows: list[dict[str, str]], path: Path) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=data.MANIFEST_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _keys(prepared: dataset.Prepared, split: str) -> set[str]:
    return {r.key for r in prepared.splits[split].records}


def test_a_reused_manifest_does_not_hold_out_a_near_copy_of_a_training_film(films, tmp_path):
    """A split written before the near-duplicate check (or by hand) put a film in train and its re-encoded
    copy in test: the copy is left out of scoring, recorded as a near duplicate of the training film."""
    fresh = dataset.prepare(_config(films, tmp_path / "a", [films["kermany"]]), tmp_path / "a", log=lambda _: None)
    rows = _manifest(tmp_path / "a" / "split.csv")
    film = next(r for r in fresh.splits["train"].records if r.label == "NORMAL")
    copy = _reencoded_copy(film.path, tmp_path / "compilation" / "NORMAL" / "Normal-1.jpeg")
    twin = next(r for r in rows if r["split"] == "val")  # two val films that are copies stay as the manifest says
    twin_copy = _reencoded_copy(films["kermany"] / twin["path"], tmp_path / "compilation" / "NORMAL" / "Normal-2.jpeg")
    rows += [{**dict.fromkeys(data.MANIFEST_FIELDS, ""), "path": f"NORMAL/{p.name}", "source": "compilation",
              "class": "NORMAL", "split": split} for p, split in ((copy, "test"), (twin_copy, "val"))]
    manifest = _write_manifest(rows, tmp_path / "manifest.csv")
    lines: list[str] = []
    config = _config(films, tmp_path / "b", [films["kermany"], tmp_path / "compilation"],
                     split_manifest=str(manifest))
    prepared = dataset.prepare(config, tmp_path / "b", log=lines.append)
    assert "compilation/NORMAL/Normal-1.jpeg" not in _keys(prepared, "test")
    assert "compilation/NORMAL/Normal-2.jpeg" in _keys(prepared, "val")  # same split: kept
    assert film.key in _keys(prepared, "train")
    assert any("left 1 films out of test (1)" in line for line in lines), lines
    dropped = [r for r in _manifest(tmp_path / "b" / "split.csv") if r["path"] == "NORMAL/Normal-1.jpeg"]
    assert [(r["split"], r["duplicate_of"], r["duplicate_kind"]) for r in dropped] == [("duplicate", film.key, "near")]
    assert prepared.summary()["near_duplicates_removed"] == 1
    assert prepared.summary()["held_out_duplicates_removed"] == 1  # the copy in test
    assert prepared.summary()["films_with_patient_id"] == {"compilation": "0 of 1", "kermany": "40 of 40"}
    # A manifest's removed copies all read "duplicate", whatever split they left: the number is then not known
    # (it counted every one of them as held out before).
    written = _manifest(tmp_path / "b" / "split.csv")
    assert any(r["split"] == "duplicate" for r in written)
    reread = _config(films, tmp_path / "c", [films["kermany"], tmp_path / "compilation"],
                     split_manifest=str(tmp_path / "b" / "split.csv"))
    again = dataset.prepare(reread, tmp_path / "c", log=lambda _: None)
    assert again.summary()["held_out_duplicates_removed"] is None
    # Every other film keeps the manifest's split.
    for name in ("train", "val", "test"):
        assert _keys(prepared, name) - {"compilation/NORMAL/Normal-2.jpeg"} == _keys(fresh, name)


def _starting_folder(tiny_model_dir: Path, rows: list[dict[str, str]], dst: Path) -> Path:
    shutil.copytree(tiny_model_dir, dst)
    _write_manifest(rows, dst / "split.csv")
    return dst


def test_films_the_starting_weights_trained_on_are_not_scored_as_held_out(films, tmp_path, tiny_model_dir):
    """Fine-tuning from one of our models: a val/test/external film in the starting model's train split, or
    whose dropped copy was, is left out of scoring, so the figures stay about films the weights never saw."""
    fresh = dataset.prepare(_config(films, tmp_path / "a", [films["kermany"]]), tmp_path / "a", log=lambda _: None)
    rows = _manifest(tmp_path / "a" / "split.csv")
    val_film = sorted(_keys(fresh, "val"))[0]
    test_film = sorted(_keys(fresh, "test"))[0]
    via_copy = sorted(_keys(fresh, "test"))[1]  # the starting model trained on a compilation's copy of it
    copy = _reencoded_copy(films["kermany"] / via_copy.split("/", 1)[1],
                           tmp_path / "compilation" / "NORMAL" / "Normal-9.jpeg")
    start_rows = [{**r, "split": "train" if f"{r['source']}/{r['path']}" in (val_film, test_film) else r["split"]}
                  for r in rows]
    start_rows.append({**dict.fromkeys(data.MANIFEST_FIELDS, ""), "path": f"NORMAL/{copy.name}",
                       "source": "compilation", "class": "NORMAL", "split": "train"})
    start = _starting_folder(tiny_model_dir, start_rows, tmp_path / "start")
    lines: list[str] = []
    out = tmp_path / "b"
    # A fresh split of the Kermany films and the compilation: the compilation's copy is dropped as a near-copy
    # of the Kermany original (its name carries the patient), which lands in test as before.
    config = _config(films, out, [films["kermany"], tmp_path / "compilation"], weights=str(start))
    prepared = dataset.prepare(config, out, log=lines.append)
    assert val_film not in _keys(prepared, "val") and test_film not in _keys(prepared, "test")
    assert via_copy not in _keys(prepared, "test")
    assert _keys(prepared, "val") == _keys(fresh, "val") - {val_film}
    assert _keys(prepared, "test") == _keys(fresh, "test") - {test_film, via_copy}
    assert any("trained on 3 films of this run's held-out splits" in line and "val 1, test 2" in line
               for line in lines), lines
    written = {f"{r['source']}/{r['path']}": r for r in _manifest(out / "split.csv")}
    assert written[val_film]["duplicate_kind"] == "seen" and written[val_film]["duplicate_of"] == val_film
    assert written[via_copy]["duplicate_of"] == "compilation/NORMAL/Normal-9.jpeg"
    assert prepared.summary()["seen_by_starting_weights_removed"] == 3
    # Reading that split back (``--resume``, ``rescore``) keeps them out.
    again = dataset.prepare(dataclasses.replace(config, split_manifest=str(out / "split.csv")), tmp_path / "c",
                            log=lambda _: None)
    assert _keys(again, "train") == _keys(prepared, "train")
    assert _keys(again, "val") == _keys(prepared, "val") and _keys(again, "test") == _keys(prepared, "test")
    # A start from weights with no split of ours (none, imagenet, a .h5 file) changes nothing.
    plain = dataset.prepare(dataclasses.replace(config, weights="none"), tmp_path / "d", log=lambda _: None)
    assert _keys(plain, "test") == _keys(fresh, "test") and _keys(plain, "val") == _keys(fresh, "val")


def test_rescore_external_drops_a_copy_of_a_training_film_even_when_its_name_carries_a_patient(films, tmp_path):
    """The training split holds a compilation's copy of a Kermany film (no patient id in its name); scored as an
    external source, the Kermany original must not count as a film the model never saw."""
    original = sorted((films["kermany"] / "NORMAL").iterdir())[0]
    other = sorted((films["kermany"] / "NORMAL").iterdir())[1]
    copy = _reencoded_copy(original, tmp_path / "compilation" / "NORMAL" / "Normal-1.jpeg")
    train_records = [data.Record(copy, "NORMAL/Normal-1.jpeg", "compilation", "NORMAL", split="train")]
    train_images = cache.decode(train_records, SIZE, None).images
    prepared = dataset.Prepared(["NORMAL", "PNEUMONIA"], {"train": dataset.Split(train_records, train_images,
                                                                                np.zeros(1, np.int64))})
    external = tmp_path / "external"
    for film in (original, other):
        (external / "NORMAL").mkdir(parents=True, exist_ok=True)
        (external / "NORMAL" / film.name).symlink_to(film)
    lines: list[str] = []
    split = rescore._external(prepared, [str(external)], None, TrainConfig(data=[], input_size=SIZE, cache_dir=""),
                              lines.append)
    assert [r.rel for r in split.records] == [f"NORMAL/{other.name}"]
    assert data.patient_id(original.name)  # the original's name carries a patient id: it still goes
    assert any("1 near-copies of training films" in line for line in lines), lines


def _rescored_external(train_records: list[data.Record], external: Path, duplicates=()) -> tuple[list[str], list[str]]:
    """``rescore._external`` of the labelled folder ``external`` for a model whose train split is ``train_records``
    (and whose split.csv lists ``duplicates``): the external films kept (their paths) and the lines it logged."""
    labels = np.array([["NORMAL", "PNEUMONIA"].index(r.label) for r in train_records], np.int64)
    prepared = dataset.Prepared(["NORMAL", "PNEUMONIA"], {"train": dataset.Split(
        train_records, cache.decode(train_records, SIZE, None).images, labels)}, duplicates=list(duplicates))
    lines: list[str] = []
    split = rescore._external(prepared, [str(external)], None, TrainConfig(data=[], input_size=SIZE, cache_dir=""),
                              lines.append)
    return [r.rel for r in split.records], lines


def test_rescore_external_leaves_out_the_other_films_of_a_patient_whose_film_trained_as_a_copy(tmp_path):
    """A compilation's unnamed copy of Kermany's IM-0429-0001 trained the model: scored as external, neither that
    film nor the patient's other film (IM-0429-0001-0001) is held out from the model; another patient's film is."""
    normal = KERMANY / "NORMAL"
    original, sibling, stranger = normal / "IM-0429-0001.jpeg", normal / "IM-0429-0001-0001.jpeg", normal / \
        "IM-0115-0001.jpeg"
    assert data.patient_id(original.name) == data.patient_id(sibling.name) != data.patient_id(stranger.name)
    copy = _reencoded_copy(original, tmp_path / "compilation" / "NORMAL" / "Normal-1.jpeg")
    train_records = [data.Record(copy, "NORMAL/Normal-1.jpeg", "compilation", "NORMAL", split="train")]
    external = tmp_path / "kermany"
    (external / "NORMAL").mkdir(parents=True)
    for film in (original, sibling, stranger):
        (external / "NORMAL" / film.name).symlink_to(film)
    kept, lines = _rescored_external(train_records, external)
    assert kept == [f"NORMAL/{stranger.name}"]
    assert any("left out 1 films of patients in the model's train, val or test split" in line for line in lines), lines


def test_rescore_external_drops_a_copy_of_a_film_its_starting_weights_trained_on(tmp_path):
    """A film the model's start trained on (a "seen" row of its split.csv, not in its own train split), re-encoded
    under a compilation's name in an external folder: not held out from the model, so not scored."""
    normal = KERMANY / "NORMAL"
    seen_film, other = normal / "IM-0115-0001.jpeg", normal / "IM-0117-0001.jpeg"
    train_film = KERMANY / "PNEUMONIA" / sorted(p.name for p in (KERMANY / "PNEUMONIA").iterdir())[0]
    train_records = [data.Record(train_film, f"PNEUMONIA/{train_film.name}", "kermany", "PNEUMONIA", split="train")]
    seen = data.Record(seen_film, f"NORMAL/{seen_film.name}", "kermany", "NORMAL", split="duplicate",
                       duplicate_of=f"kermany/NORMAL/{seen_film.name}", duplicate_kind="seen")
    external = tmp_path / "compilation"
    _reencoded_copy(seen_film, external / "NORMAL" / "Normal-7.jpeg")
    (external / "NORMAL" / other.name).symlink_to(other)
    kept, lines = _rescored_external(train_records, external, [seen])
    assert kept == [f"NORMAL/{other.name}"]
    assert any("1 near-copies of training films" in line for line in lines), lines


def test_rescore_external_knows_a_training_patient_under_another_folder_name(tmp_path):
    """Kermany downloaded twice: the model trained on IM-0429-0001 from 'kermany'; scored from a folder named
    'chest_xray', the patient's other film is not held out from it; another patient's film is."""
    normal = KERMANY / "NORMAL"
    trained, sibling, stranger = (normal / n for n in ("IM-0429-0001.jpeg", "IM-0429-0001-0002.jpeg",
                                                        "IM-0115-0001.jpeg"))
    train_records = [data.Record(trained, f"NORMAL/{trained.name}", "kermany", "NORMAL", split="train",
                                 patient=data.patient_id(trained.name))]
    external = tmp_path / "chest_xray"
    (external / "NORMAL").mkdir(parents=True)
    for film in (sibling, stranger):
        (external / "NORMAL" / film.name).symlink_to(film)
    kept, lines = _rescored_external(train_records, external)
    assert kept == [f"NORMAL/{stranger.name}"]
    assert any("left out 1 films of patients in the model's train, val or test split" in line for line in lines), lines


def test_a_patient_whose_film_was_collapsed_into_a_copy_counts_in_the_copy_s_split():
    """A Kermany test film dropped as a byte or near copy of a compilation's training film (no patient in its name)
    puts its patient in train: the patient's other test and external films leave; a copy kept in test moves a
    patient's later films only (external), never its train films; a copy of a film in no split changes nothing."""
    root = Path("/x")
    kept = data.Record(root / "Normal-1.png", "N/Normal-1.png", "compilation", "NORMAL", split="train")
    kept_test = data.Record(root / "Normal-2.png", "N/Normal-2.png", "compilation", "NORMAL", split="test")

    def film(name: str, split: str) -> data.Record:
        return data.Record(root / name, f"N/{name}", "kermany", "NORMAL", split=split, patient=name[:7])

    copies = [dataclasses.replace(film("IM-0001-0001.jpeg", "test"), duplicate_of=kept.key, duplicate_kind="bytes"),
              dataclasses.replace(film("IM-0004-0001.jpeg", "external"), duplicate_of=kept.key,
                                  duplicate_kind="near"),
              dataclasses.replace(film("IM-0002-0001.jpeg", "train"), duplicate_of=kept_test.key,
                                  duplicate_kind="near"),
              dataclasses.replace(film("IM-0003-0001.jpeg", "test"), duplicate_of="compilation/N/gone.png",
                                  duplicate_kind="near")]
    records = [kept, kept_test, film("IM-0001-0002.jpeg", "test"), film("IM-0004-0002.jpeg", "external"),
               film("IM-0002-0002.jpeg", "train"), film("IM-0003-0002.jpeg", "test")]
    left, dropped = data.separate_patients(records, copies)
    assert [r.rel for r in left] == ["N/Normal-1.png", "N/Normal-2.png", "N/IM-0002-0002.jpeg", "N/IM-0003-0002.jpeg"]
    assert {d.rel: d.duplicate_of for d in dropped} == {"N/IM-0001-0002.jpeg": "kermany/patient IM-0001",
                                                      "N/IM-0004-0002.jpeg": "kermany/patient IM-0004"}
    assert data.separate_patients(records)[1] == []  # without the copies, nothing ties them


def test_a_patient_whose_film_is_a_copy_of_a_copy_of_a_training_film_leaves_the_later_split():
    """A chain of copies: Kermany's test film IM-0100-0001 has the same bytes as a compilation's unnamed film, which
    was itself dropped as a near-copy of another training film. The patient's film trained the model (as that
    film), so the patient's other test film leaves test."""
    root = Path("/x")
    trained = data.Record(root / "reencoded.png", "N/reencoded.png", "other", "NORMAL", split="train")
    compilation = data.Record(root / "Normal-9.png", "N/Normal-9.png", "compilation", "NORMAL", split="train",
                              duplicate_of=trained.key, duplicate_kind="near")
    named = data.Record(root / "IM-0100-0001.png", "N/IM-0100-0001.png", "kermany", "NORMAL", split="test",
                        patient="IM-0100", duplicate_of=compilation.key, duplicate_kind="bytes")
    sibling = data.Record(root / "IM-0100-0002.png", "N/IM-0100-0002.png", "kermany", "NORMAL", split="test",
                          patient="IM-0100")
    left, dropped = data.separate_patients([trained, sibling], [named, compilation])
    assert [r.rel for r in left] == ["N/reencoded.png"]
    assert [(d.rel, d.duplicate_of) for d in dropped] == [("N/IM-0100-0002.png", "kermany/patient IM-0100")]
    assert data.kept_of([named, compilation]) == {named.key: trained.key, compilation.key: trained.key}
    loop = [dataclasses.replace(named, duplicate_of=compilation.key),
            dataclasses.replace(compilation, duplicate_of=named.key)]
    assert data.kept_of(loop) == {named.key: named.key, compilation.key: compilation.key}  # a loop ends


def test_rescore_external_leaves_out_the_other_films_of_the_model_s_val_and_test_patients(tmp_path):
    """A training run leaves a patient's films out of every later split; rescore --external must too. One patient's
    film is in the model's val split (it chose the thresholds), another's in its test split: their other films are
    not scored as external; a stranger's film is."""
    normal = KERMANY / "NORMAL"
    by_patient: dict[str, list[Path]] = {}
    for name in sorted(p.name for p in normal.iterdir()):
        by_patient.setdefault(data.patient_id(name), []).append(normal / name)
    (val_film, val_sibling), (test_film, test_sibling) = [v[:2] for k, v in by_patient.items() if k and len(v) > 1][:2]
    stranger = next(v[0] for k, v in by_patient.items()
                    if k and k not in {data.patient_id(val_film.name), data.patient_id(test_film.name)})
    train_film = KERMANY / "PNEUMONIA" / sorted(p.name for p in (KERMANY / "PNEUMONIA").iterdir())[0]

    def split_of(films: list[Path], split: str) -> dataset.Split:
        recs = [data.Record(f, f"{f.parent.name}/{f.name}", "kermany", f.parent.name, split=split,
                            patient=data.patient_id(f.name)) for f in films]
        labels = np.array([["NORMAL", "PNEUMONIA"].index(r.label) for r in recs], np.int64)
        return dataset.Split(recs, cache.decode(recs, SIZE, None).images, labels)

    prepared = dataset.Prepared(["NORMAL", "PNEUMONIA"], {"train": split_of([train_film], "train"),
                                                         "val": split_of([val_film], "val"),
                                                         "test": split_of([test_film], "test")})
    external = tmp_path / "chest_xray"
    (external / "NORMAL").mkdir(parents=True)
    for film in (val_sibling, test_sibling, stranger):
        (external / "NORMAL" / film.name).symlink_to(film)
    lines: list[str] = []
    split = rescore._external(prepared, [str(external)], None, TrainConfig(data=[], input_size=SIZE, cache_dir=""),
                              lines.append)
    assert [r.rel for r in split.records] == [f"NORMAL/{stranger.name}"]
    assert any("left out 2 films of patients in the model's train, val or test split" in line for line in lines)


def test_a_held_out_source_left_with_no_film_is_said_and_its_split_can_be_reused(films, tmp_path):
    """Every film of the held-out source is a byte copy of a training film: the run says it has no external figures,
    and its split.csv (whose only rows of that source are duplicates) still names the source for --resume,
    --split-manifest and rescore."""
    ext = tmp_path / "ext"
    _link(films["kermany"] / "NORMAL", ext / "NORMAL", 3)
    config = _config(films, tmp_path / "a", [films["kermany"], ext], holdout_source="ext")
    lines: list[str] = []
    prepared = dataset.prepare(config, tmp_path / "a", log=lines.append)
    assert len(prepared.splits["external"].records) == 0
    assert any("no film of the held-out source(s) ext is left to score" in line for line in lines), lines
    rows = _manifest(tmp_path / "a" / "split.csv")
    assert {r["split"] for r in rows if r["source"] == "ext"} == {"duplicate"}
    again = dataset.prepare(dataclasses.replace(config, split_manifest=str(tmp_path / "a" / "split.csv")),
                            tmp_path / "b", log=lambda _: None)
    assert _keys(again, "test") == _keys(prepared, "test") and len(again.splits["external"].records) == 0


def test_split_first_keeps_the_training_copy_and_across_splits_only_keeps_copies_within_a_split():
    root = Path("/x")
    base = np.random.default_rng(0).integers(0, 255, (32, 32)).astype(np.uint8)
    other = np.random.default_rng(1).integers(0, 255, (32, 32)).astype(np.uint8)
    named = data.Record(root / "IM-0001-0001.jpeg", "N/IM-0001-0001.jpeg", "kermany", "N", split="external",
                        patient="IM-0001")
    train_copy = data.Record(root / "Normal-1.png", "N/Normal-1.png", "compilation", "N", split="train")
    records, images = [named, train_copy], np.stack([base, base])
    assert hygiene.collapse(records, images)[0] == [0]  # by name: the film that carries a patient id
    assert hygiene.collapse(records, images, split_first=True)[0] == [1]
    manifest = [data.Record(root / n, n, "s", "N", split=s) for n, s in
                (("a", "val"), ("b", "val"), ("c", "train"), ("d", "test"), ("e", "test"))]
    kept, dropped = hygiene.collapse(manifest, np.stack([base, base, base, other, other]), across_splits_only=True)
    assert kept == [2, 3, 4] and {(d.rel, d.duplicate_of) for d in dropped} == {("a", "s/c"), ("b", "s/c")}


def test_external_rows_of_a_manifest_are_said_to_go_unscored_without_holdout_source(films, tmp_path):
    dataset.prepare(_config(films, tmp_path / "a", [films["kermany"]]), tmp_path / "a", log=lambda _: None)
    rows = _manifest(tmp_path / "a" / "split.csv")
    rows[0]["split"] = "external"
    manifest = _write_manifest(rows, tmp_path / "manifest.csv")
    lines: list[str] = []
    prepared = dataset.prepare(_config(films, tmp_path / "b", [films["kermany"]], split_manifest=str(manifest)),
                               tmp_path / "b", log=lines.append)
    assert "external" not in prepared.splits
    assert any("marks 1 films external; they are not scored without --holdout-source" in line for line in lines)


def test_a_patients_other_film_and_a_film_under_another_layout_are_not_held_out_from_the_start(films, tmp_path,
                                                                                               tiny_model_dir):
    """The split is by patient: when the starting weights trained on one film of a patient, the patient's other
    films are not held out from them either. And a film the start trained on is found by its content when the
    start's split names it under another folder layout (its run was given the parent folder, say)."""
    fresh = dataset.prepare(_config(films, tmp_path / "a", [films["kermany"]]), tmp_path / "a", log=lambda _: None)
    rows = _manifest(tmp_path / "a" / "split.csv")
    held = {r["path"]: r for r in rows if r["split"] in ("val", "test")}
    by_patient: dict[str, list[str]] = {}
    for path, r in held.items():
        by_patient.setdefault(r["patient"], []).append(path)
    patient, (trained_film, sibling, *_) = next((p, sorted(f)) for p, f in sorted(by_patient.items()) if len(f) > 1)
    moved = next(p for p in sorted(held) if held[p]["patient"] != patient)  # named under another layout there
    start_rows = []
    for r in rows:
        if r["path"] == trained_film:
            r = {**r, "split": "train"}
        elif r["path"] == moved:
            r = {**r, "split": "train", "path": f"train/{moved}"}
        start_rows.append(r)
    start = _starting_folder(tiny_model_dir, start_rows, tmp_path / "start")
    lines: list[str] = []
    prepared = dataset.prepare(_config(films, tmp_path / "b", [films["kermany"]], weights=str(start)), tmp_path / "b",
                               log=lines.append)
    scored = _keys(prepared, "val") | _keys(prepared, "test")
    everything = _keys(fresh, "val") | _keys(fresh, "test")
    for path in (trained_film, sibling, moved):
        assert f"kermany/{path}" not in scored, path
    assert scored == everything - {f"kermany/{p}" for p in by_patient[patient]} - {f"kermany/{moved}"}
    # A start that trained on a compilation's copy of the film (the Kermany original counts as seen through the
    # copy this run finds): the patient's other film goes too.
    copy = _reencoded_copy(films["kermany"] / trained_film, tmp_path / "compilation" / "NORMAL" / "Normal-7.jpeg")
    via_copy = [*rows, {**dict.fromkeys(data.MANIFEST_FIELDS, ""), "path": f"NORMAL/{copy.name}",
                        "source": "compilation", "class": "NORMAL", "split": "train"}]
    start2 = _starting_folder(tiny_model_dir, via_copy, tmp_path / "start2")
    prepared2 = dataset.prepare(_config(films, tmp_path / "c", [films["kermany"], tmp_path / "compilation"],
                                        weights=str(start2)), tmp_path / "c", log=lambda _: None)
    assert _keys(prepared2, "val") | _keys(prepared2, "test") == everything - {f"kermany/{p}"
                                                                               for p in by_patient[patient]}
    written = {r["path"]: r for r in _manifest(tmp_path / "b" / "split.csv")}
    assert written[sibling]["duplicate_kind"] == "seen"
    assert written[sibling]["duplicate_of"] == f"kermany/{trained_film}"


def test_what_a_model_trained_on_includes_what_its_own_start_trained_on(tmp_path):
    """A model fine-tuned from another inherits its training films: the child's split.csv marks them "seen"
    (held out from the child's scoring), and a grandchild must leave them out too, with their copies."""
    blank = dict.fromkeys(data.MANIFEST_FIELDS, "")
    rows = [
        {**blank, "path": "A/1.png", "source": "s", "split": "train", "patient": "p1", "sha256": "a1"},
        {**blank, "path": "A/2.png", "source": "s", "split": "duplicate", "patient": "p2", "sha256": "a2",
         "duplicate_of": "s/A/2.png", "duplicate_kind": "seen"},  # the grandparent trained on it
        {**blank, "path": "A/3.png", "source": "s", "split": "duplicate", "sha256": "a3",
         "duplicate_of": "t/B/9.png", "duplicate_kind": "seen"},  # ... on a copy of it, t/B/9.png
        {**blank, "path": "C/4.png", "source": "c", "split": "duplicate", "sha256": "a4",
         "duplicate_of": "s/A/3.png", "duplicate_kind": "near"},  # a copy of an inherited film
        {**blank, "path": "A/5.png", "source": "s", "split": "val", "patient": "p5", "sha256": "a5"},
    ]
    trained = data.trained_films(_write_manifest(rows, tmp_path / "split.csv"))
    assert trained.keys == {"s/A/1.png", "s/A/2.png", "s/A/3.png", "t/B/9.png", "c/C/4.png"}
    assert trained.sha256 == {"a1", "a2", "a3", "a4"} and trained.patients == {"p1", "p2"}


def test_a_file_name_that_is_not_utf8_is_logged_printably(films, tmp_path):
    """An unreadable file whose name holds a byte that is not UTF-8: the log line said its name with a surrogate
    escape, which print() cannot write on a UTF-8 terminal (the run stopped there)."""
    root = tmp_path / "odd"
    _link(KERMANY / "NORMAL", root / "NORMAL", 10)
    _link(KERMANY / "PNEUMONIA", root / "PNEUMONIA", 10)
    with open(bytes(root / "NORMAL") + b"/bad\xff.jpeg", "wb"):
        pass  # empty: unreadable
    lines: list[str] = []

    def log(line: str) -> None:
        line.encode("utf-8")  # what print() does on a UTF-8 terminal: a surrogate raises UnicodeEncodeError
        lines.append(line)

    dataset.prepare(_config(films, tmp_path / "out", [root]), tmp_path / "out", log=log)
    assert any(line.startswith("skipped unreadable file odd/NORMAL/bad\ufffd.jpeg") for line in lines), lines
