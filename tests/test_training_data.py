"""training.data and training.cache on real files: class maps, patient-level split, duplicates, bad files."""

from __future__ import annotations

import json
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA

from cxr_core import preprocess
from training import cache, data

KERMANY = DATA / "kermany" / "train"
COVID_SET = DATA / "covid19_image_dataset" / "train"


def _link(src_dir: Path, dst_dir: Path, n: int, offset: int = 0) -> list[str]:
    dst_dir.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in src_dir.iterdir())[offset:offset + n]
    for name in names:
        (dst_dir / name).symlink_to(src_dir / name)
    return names


def test_patient_ids_follow_the_kermany_names():
    assert data.patient_id("person1234_bacteria_5678.jpeg") == "person1234"
    assert data.patient_id("person1234_virus_5679.jpeg") == "person1234"
    assert data.patient_id("IM-0115-0001.jpeg") == "IM-0115"
    assert data.patient_id("NORMAL2-IM-0383-0001.jpeg") == "NORMAL2-IM-0383"
    assert data.patient_id("NORMAL2-IM-0587-0001-0002.jpeg") == "NORMAL2-IM-0587"
    assert data.patient_id("COVID-1.jpeg") == ""
    assert data.patient_id("COVID-00003a.jpeg") == data.patient_id("COVID-00003b.jpeg") == "COVID-00003"
    assert data.patient_id("COVID-00003.jpeg") == ""  # an unlettered film is a case of its own


def test_lettered_covid19_image_dataset_films_of_one_case_share_a_split():
    found = data.scan([DATA / "covid19_image_dataset" / "train"], {"Covid": "COVID-19", "Normal": "NORMAL",
                                                                  "Viral Pneumonia": "PNEUMONIA"})
    cases: dict[str, set[str]] = {}
    for record in data.split(found.records, seed=7):
        if record.patient:
            cases.setdefault(record.patient, set()).add(record.split)
    assert len(cases) == 3  # COVID-00003, -00013 and -00015 each have an a and a b film
    assert all(len(splits) == 1 for splits in cases.values()), cases


def test_full_kermany_split_keeps_each_patient_in_one_split():
    found = data.scan([KERMANY])
    assert len(found.records) == 5216 and found.classes == ["NORMAL", "PNEUMONIA"]
    assert all(r.patient for r in found.records)  # every Kermany name carries its patient
    records = data.split(found.records, (0.8, 0.1, 0.1), seed=7)
    splits_of = defaultdict(set)
    for r in records:
        splits_of[r.patient].add(r.split)
    assert max(len(s) for s in splits_of.values()) == 1
    assert len(splits_of) > 2500  # many patients: the grouping is not trivially one group
    per = Counter((r.split, r.label) for r in records)
    for label, total in (("NORMAL", 1341), ("PNEUMONIA", 3875)):
        assert per[("train", label)] / total == pytest.approx(0.8, abs=0.02)
        assert per[("test", label)] / total == pytest.approx(0.1, abs=0.02)
    # Same seed, same split; another seed, another split.
    assert [r.split for r in data.split(found.records, seed=7)] == [r.split for r in records]
    assert [r.split for r in data.split(found.records, seed=8)] != [r.split for r in records]


def test_class_map_merges_two_real_sources(tmp_path):
    _link(KERMANY / "NORMAL", tmp_path / "kermany" / "NORMAL", 5)
    _link(KERMANY / "PNEUMONIA", tmp_path / "kermany" / "PNEUMONIA", 6)
    for folder, n in (("Normal", 3), ("Viral Pneumonia", 4), ("Covid", 2)):
        _link(COVID_SET / folder, tmp_path / "covid" / "train" / folder, n)
    mapping = data.parse_class_map(["Normal=NORMAL", "Viral Pneumonia=PNEUMONIA", "Covid=COVID-19"])
    found = data.scan([tmp_path / "kermany", tmp_path / "covid" / "train"], mapping)
    assert found.classes == ["COVID-19", "NORMAL", "PNEUMONIA"]
    assert found.unmapped == []
    assert Counter((r.source, r.label) for r in found.records) == {
        ("kermany", "NORMAL"): 5, ("kermany", "PNEUMONIA"): 6,
        ("covid", "NORMAL"): 3, ("covid", "PNEUMONIA"): 4, ("covid", "COVID-19"): 2,
    }
    # A source given as DIR/train/CLASS with no val/test is split like a flat folder.
    assert {r.split for r in found.records} == {""}
    # A folder the map does not cover (and that names no target class) is reported and skipped.
    partial = data.scan([tmp_path / "covid" / "train"], {"Normal": "NORMAL", "Covid": "COVID-19"})
    assert partial.unmapped == ["covid/Viral Pneumonia"]
    assert Counter(r.label for r in partial.records) == {"NORMAL": 3, "COVID-19": 2}


def test_class_map_file_and_bad_entries(tmp_path):
    path = tmp_path / "map.txt"
    path.write_text("# merge the sets\nViral Pneumonia = PNEUMONIA\nCovid=COVID-19\n\nOther=\n")
    mapping = data.read_class_map(path)
    assert mapping == {"Viral Pneumonia": "PNEUMONIA", "Covid": "COVID-19", "Other": ""}
    assert data.map_folder("covid", mapping) == "COVID-19"
    assert data.map_folder("other", mapping) is None
    with pytest.raises(ValueError, match="FOLDER=CLASS"):
        data.parse_class_map(["Covid"])


def test_given_splits_are_respected_and_missing_ones_carved_from_train(tmp_path):
    for split, offset in (("train", 0), ("val", 20), ("test", 25)):
        _link(KERMANY / "NORMAL", tmp_path / "full" / split / "NORMAL", 5 if split != "train" else 20, offset)
        _link(KERMANY / "PNEUMONIA", tmp_path / "full" / split / "PNEUMONIA", 5 if split != "train" else 20, offset)
    found = data.scan([tmp_path / "full"])
    records = data.split(found.records, seed=1)
    assert all(r.split == r.rel.split("/")[0] for r in records)
    # train + test given, no val: val comes out of train only, test untouched.
    shutil.rmtree(tmp_path / "full" / "val")
    records = data.split(data.scan([tmp_path / "full"]).records, (0.8, 0.1, 0.1), seed=1)
    assert all(r.split == "test" for r in records if r.rel.startswith("test/"))
    from_train = Counter(r.split for r in records if r.rel.startswith("train/"))
    assert set(from_train) == {"train", "val"} and from_train["val"] >= 2


def test_duplicates_collapse_and_leave_the_held_out_side(tmp_path):
    root = tmp_path / "dup"
    names = _link(KERMANY / "NORMAL", root / "train" / "NORMAL", 4)
    _link(KERMANY / "NORMAL", root / "val" / "NORMAL", 2, 10)
    _link(KERMANY / "NORMAL", root / "test" / "NORMAL", 2, 20)
    shutil.copyfile(KERMANY / "NORMAL" / names[0], root / "test" / "NORMAL" / "copy_in_test.jpeg")
    shutil.copyfile(KERMANY / "NORMAL" / names[1], root / "train" / "NORMAL" / "copy_in_train.jpeg")
    records, dropped = data.deduplicate(data.scan([root]).records)
    assert len(records) == 8
    assert {d.rel: d.duplicate_of for d in dropped} == {
        "test/NORMAL/copy_in_test.jpeg": f"dup/train/NORMAL/{names[0]}",
        "train/NORMAL/copy_in_train.jpeg": f"dup/train/NORMAL/{names[1]}",
    }
    assert all(len(r.sha256) == 64 for r in records)
    manifest = data.write_manifest([*records, *dropped], tmp_path / "split.csv")
    back = data.read_manifest(manifest, [root])
    assert [(r.rel, r.split, r.sha256) for r in back[:8]] == [(r.rel, r.split, r.sha256) for r in records]
    assert [r.split for r in back[8:]] == ["duplicate", "duplicate"]


def test_a_hand_written_manifest_needs_only_path_source_class_and_split(tmp_path):
    """A manifest written by hand (path, source, class, split) ended in KeyError 'patient', and a file that is no
    manifest in KeyError 'source'; the patient now comes from the file name, and missing columns are named."""
    root = tmp_path / "films"
    (root / "NORMAL").mkdir(parents=True)
    manifest = tmp_path / "hand.csv"
    manifest.write_text("path,source,class,split\nNORMAL/person12_bacteria_3.jpeg,films,NORMAL,train\n"
                        "NORMAL/IM-0001-0001.jpeg,films,NORMAL,val\n")
    back = data.read_manifest(manifest, [root])
    assert [(r.rel, r.split, r.patient, r.sha256, r.duplicate_of) for r in back] == [
        ("NORMAL/person12_bacteria_3.jpeg", "train", "person12", "", ""), ("NORMAL/IM-0001-0001.jpeg", "val",
                                                                            "IM-0001", "", "")]
    history = tmp_path / "history.csv"
    history.write_text("epoch,loss,val_loss\n1,0.5,0.6\n")
    with pytest.raises(ValueError, match="has no column path, source, class, split"):
        data.read_manifest(history, [root])


def test_a_class_map_that_contradicts_itself_or_names_no_folder_is_refused():
    """Normal=NORMAL then normal=PNEUMONIA kept the last line (folders match whatever the case), and =NORMAL was
    a map for a folder with no name: both went through without a word."""
    assert data.parse_class_map(["Normal=NORMAL", "Normal=NORMAL", "Other="]) == {"Normal": "NORMAL", "Other": ""}
    with pytest.raises(ValueError, match="gives folder 'normal' twice: Normal=NORMAL and normal=PNEUMONIA"):
        data.parse_class_map(["Normal=NORMAL", "normal=PNEUMONIA"])
    with pytest.raises(ValueError, match="names no folder"):
        data.parse_class_map(["=NORMAL"])


def test_two_data_folders_never_share_a_source_name():
    """Folders x, x-2 and another x made two sources 'x-2' (the third's name was x plus the count of names
    taken): their films were read under one name, and a resumed run lost half of them as unreadable."""
    taken: list[str] = []
    for folder in ("/a/x", "/b/x-2", "/c/x", "/d/x"):
        taken.append(data.source_name(Path(folder), taken))
    assert taken == ["x", "x-2", "x-3", "x-4"]


def test_a_byte_copy_keeps_the_name_that_carries_the_patient(tmp_path):
    """A compilation (its source name sorts first) holds a renamed copy of a Kermany film: the Kermany name, which
    carries the patient, is kept, so that the child's other films split with it (the compilation's was kept)."""
    (original,) = [p for p in sorted((KERMANY / "PNEUMONIA").iterdir()) if p.name.startswith("person1000_")][:1]
    (tmp_path / "acomp" / "PNEUMONIA").mkdir(parents=True)
    shutil.copyfile(original, tmp_path / "acomp" / "PNEUMONIA" / "Pneumonia-1.jpeg")
    (tmp_path / "kermany" / "PNEUMONIA").mkdir(parents=True)
    (tmp_path / "kermany" / "PNEUMONIA" / original.name).symlink_to(original)
    records, dropped = data.deduplicate(data.scan([tmp_path / "acomp", tmp_path / "kermany"]).records)
    assert [(r.source, r.patient) for r in records] == [("kermany", "person1000")]
    assert [(d.source, d.duplicate_of) for d in dropped] == [("acomp", f"kermany/PNEUMONIA/{original.name}")]


def test_bad_files_are_reported_and_skipped(tmp_path):
    good = KERMANY / "NORMAL" / "IM-0115-0001.jpeg"
    folder = tmp_path / "bad" / "NORMAL"
    folder.mkdir(parents=True)
    shutil.copyfile(good, folder / "good.jpeg")
    (folder / "empty.jpeg").write_bytes(b"")
    (folder / "notes.jpeg").write_text("patient notes, not an image\n" * 20)
    (folder / "truncated.jpeg").write_bytes(good.read_bytes()[:2000])
    records, _ = data.deduplicate(data.scan([tmp_path / "bad"]).records)
    decoded = cache.decode(records, 32, tmp_path / "cache")
    assert [r.rel for r in decoded.records] == ["NORMAL/good.jpeg"]
    assert sorted(s["path"] for s in decoded.skipped) == ["bad/NORMAL/empty.jpeg", "bad/NORMAL/notes.jpeg",
                                                          "bad/NORMAL/truncated.jpeg"]
    assert all(s["error"] for s in decoded.skipped)
    # The cached pixels are exactly the serving preprocessing of the file.
    from cxr_core import imaging

    expected = preprocess.prepare(imaging.load(good).pixels, 32)
    np.testing.assert_array_equal(decoded.images[0], expected)
    # A second pass reads the cache (the .npy exists); unreadable files are tried again (not remembered).
    (npy,) = (tmp_path / "cache").rglob("*.npy")
    assert npy.relative_to(tmp_path / "cache").parts[:2] == (cache.reader_key(), "32")
    assert not list((tmp_path / "cache").rglob("*.err"))
    again = cache.decode(records, 32, tmp_path / "cache")
    np.testing.assert_array_equal(again.images, decoded.images)
    assert again.skipped == decoded.skipped


def test_cached_pixels_belong_to_the_reader_that_made_them(tmp_path, monkeypatch):
    """Pixels cached by another reader (before a windowing fix, another decoder) are not served; a film replaced
    on disk since its manifest gave it a sha256 is refused, not served the old film's pixels."""
    good = KERMANY / "NORMAL" / "IM-0115-0001.jpeg"
    (tmp_path / "d" / "NORMAL").mkdir(parents=True)
    shutil.copyfile(good, tmp_path / "d" / "NORMAL" / "a.jpeg")
    records, _ = data.deduplicate(data.scan([tmp_path / "d"]).records)
    fresh = cache.decode(records, 32, tmp_path / "cache").images[0]
    (npy,) = (tmp_path / "cache").rglob("*.npy")
    np.save(npy, np.zeros((32, 32), np.uint8))  # what an older reader made of the file
    assert cache.decode(records, 32, tmp_path / "cache").images[0].max() == 0  # this reader's entry: served
    monkeypatch.setattr(cache, "reader_key", lambda: "another-reader")
    np.testing.assert_array_equal(cache.decode(records, 32, tmp_path / "cache").images[0], fresh)
    monkeypatch.undo()

    other = KERMANY / "NORMAL" / "IM-0117-0001.jpeg"
    shutil.copyfile(other, tmp_path / "d" / "NORMAL" / "a.jpeg")  # replaced after the split was written
    replaced = cache.decode(records, 32, tmp_path / "cache")
    assert replaced.records == [] and "changed since the split manifest" in replaced.skipped[0]["error"]


def test_a_cache_that_cannot_be_written_costs_the_caching_not_the_films(tmp_path):
    """A full disk or an unusable cache folder used to count every film as unreadable ("could not read the file"):
    the films were read, only their cache entries failed. They stay in the run, and the note says why."""
    (tmp_path / "d" / "NORMAL").mkdir(parents=True)
    for name in ("IM-0115-0001.jpeg", "IM-0117-0001.jpeg"):
        shutil.copyfile(KERMANY / "NORMAL" / name, tmp_path / "d" / "NORMAL" / name)
    records, _ = data.deduplicate(data.scan([tmp_path / "d"]).records)
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")  # a cache under it cannot be made: a real OS error (ENOTDIR)
    decoded = cache.decode(records, 32, blocked / "cache")
    assert decoded.skipped == [] and len(decoded.records) == 2
    np.testing.assert_array_equal(decoded.images, cache.decode(records, 32, None).images)
    assert decoded.cache_note.startswith(f"the pixel cache at {blocked / 'cache'} could not be written (Not a "
                                         "directory): 2 film(s) were read but not cached")
    assert "--cache-dir" in decoded.cache_note and blocked.read_text() == "not a folder"
    assert cache.decode(records, 32, tmp_path / "cache").cache_note == ""


def test_flags_and_config_file_make_one_config(tmp_path):
    from training.__main__ import config_from_args, parse
    from training.config import TrainConfig

    settings = tmp_path / "run.json"
    settings.write_text(json.dumps({"architecture": "densenet121", "epochs": 7, "lr": 0.01,
                                    "class_map": {"Covid": "COVID-19"}}))
    map_file = tmp_path / "map.txt"
    map_file.write_text("Viral Pneumonia=PNEUMONIA\n")
    args = parse(["/data/a", "/data/b", "--config", str(settings), "--lr", "0.002", "--map-file", str(map_file),
                  "--map", "Normal=NORMAL", "--split", "0.7,0.15,0.15", "--no-augment", "--distribute"])
    config = config_from_args(args)
    assert config.data == ["/data/a", "/data/b"] and args.command == "train"
    assert (config.architecture, config.epochs, config.lr) == ("densenet121", 7, 0.002)  # the flag wins
    assert config.class_map == {"Covid": "COVID-19", "Viral Pneumonia": "PNEUMONIA", "Normal": "NORMAL"}
    assert config.split == (0.7, 0.15, 0.15) and config.augment is False and config.distribute is True
    assert config.optimizer == "adamax" and config.input_size == 224  # the seeds' defaults
    with pytest.raises(SystemExit):
        parse(["train", "/data/a", "--optimizer", "sgd"])
    # A file's split is used (a tuple flag default never equalled the file's list); a flag given on the command
    # line wins even when it repeats the default.
    settings.write_text(json.dumps({"split": [0.6, 0.2, 0.2], "epochs": 7, "batch_size": 64}))
    default_epochs = TrainConfig(data=[]).epochs
    config = config_from_args(parse(["/data/a", "--config", str(settings), "--epochs", str(default_epochs)]))
    assert config.split == (0.6, 0.2, 0.2) and config.batch_size == 64 and config.epochs == default_epochs
    # A yes/no flag never swallows a data folder, and a misspelt value is an error, not "no".
    for argv in (["--augment", "/data/a", "/data/b"], ["/data/a", "--freeze-batchnorm", "flase"]):
        with pytest.raises(SystemExit):
            parse(argv)
    assert config_from_args(parse(["/data/a", "--freeze-batchnorm", "off", "--augment"])).augment is True


def test_settings_used_only_after_training_and_text_settings_are_checked_before_it():
    """--target-sensitivity 95 trained every epoch and then failed, and the run could neither be resumed with
    0.95 (a setting a checkpoint fixes) nor started again; a JSON list for a text setting ended in a traceback."""
    from training.config import TrainConfig

    with pytest.raises(ValueError, match=r"target_sensitivity must be in \(0, 1\], got 95.*0.95, not 95"):
        TrainConfig(data=[], target_sensitivity=95)
    with pytest.raises(ValueError, match="target_sensitivity"):
        TrainConfig(data=[], target_sensitivity=0)
    assert TrainConfig(data=[], target_sensitivity=1.0).target_sensitivity == 1.0
    with pytest.raises(ValueError, match="'holdout_source' must be text, got \\['nih'\\].*comma-separated"):
        TrainConfig.from_dict({"data": [], "holdout_source": ["nih"]})
    with pytest.raises(ValueError, match="'optimizer' must be text"):
        TrainConfig.from_dict({"data": [], "optimizer": 3})
    assert TrainConfig.from_dict({"data": [], "holdout_source": "a,b"}).holdout_sources == ["a", "b"]


def test_the_checkpoint_s_list_of_trained_films_keeps_names_that_are_not_utf8(tmp_path):
    """A film whose name is not valid UTF-8 (bytes kept as surrogates, as split.csv keeps them) made every run
    fail after decoding, when the checkpoint wrote the films it trained on."""
    from types import SimpleNamespace

    from training import loop
    from training.config import TrainConfig

    key = "bad\udcff/f\udcfe0.jpeg"
    film = SimpleNamespace(key=key, source="bad\udcff", sha256="ab" * 32, patient="")
    run = loop.Loop(None, None, TrainConfig(data=[]), tmp_path)
    run.record_trained({"train": SimpleNamespace(records=[film])}, None)
    (tmp_path / ".ckpt" / "state.json").write_text("{}")
    assert loop.read_trained(tmp_path) == [{"key": key, "source": film.source, "sha256": film.sha256, "patient": ""}]


def test_a_patient_in_more_than_one_given_split_keeps_only_the_earliest():
    """Splits given as folders (DIR/train, DIR/test) are kept as they are: a patient with films in both sat in
    train and test while the card said the split was by patient."""
    from training import data

    def rec(rel: str, split: str, patient: str, source: str = "s") -> data.Record:
        return data.Record(path=Path("/x") / rel, rel=rel, source=source, label="A", split=split, patient=patient)

    records = [rec("t1.png", "train", "p1"), rec("v1.png", "val", "p1"), rec("e1.png", "test", "p1"),
               rec("v2.png", "val", "p2"), rec("e2.png", "test", "p2"), rec("e3.png", "test", "p3"),
               rec("o1.png", "test", "p1", source="other"), rec("x1.png", "external", "p1"), rec("n.png", "test", "")]
    kept, dropped = data.separate_patients(records)
    assert [r.rel for r in kept] == ["t1.png", "v2.png", "e3.png", "n.png"]
    # external is the latest split: a patient's film there is not held out from a model that trained on the patient;
    # and a patient id names the patient whatever folder holds the film (o1.png: the same collection downloaded
    # under another folder name)
    assert [(d.rel, d.duplicate_of, d.duplicate_kind) for d in dropped] == [
        ("v1.png", "s/patient p1", "patient"), ("e1.png", "s/patient p1", "patient"),
        ("e2.png", "s/patient p2", "patient"), ("o1.png", "other/patient p1", "patient"),
        ("x1.png", "s/patient p1", "patient")]


def test_class_folders_that_differ_only_in_case_are_one_class(tmp_path):
    """a/NORMAL and b/Normal without a map: one class, named as first met (evaluate and rescore match names whatever
    their case, so two classes would put every normal film under one of them)."""
    _link(KERMANY / "NORMAL", tmp_path / "a" / "NORMAL", 2)
    _link(KERMANY / "NORMAL", tmp_path / "b" / "Normal", 2, offset=2)
    _link(KERMANY / "PNEUMONIA", tmp_path / "b" / "pneumonia", 2)
    found = data.scan([tmp_path / "a", tmp_path / "b"])
    assert found.classes == ["NORMAL", "pneumonia"]
    assert sorted(r.label for r in found.records) == ["NORMAL"] * 4 + ["pneumonia"] * 2


def test_the_thresholds_shortfall_as_the_app_decides_is_measured_and_said():
    """Thresholds are fitted one vs rest, the app calls the most probable class over its threshold: a COVID-19 film
    over the COVID-19 threshold whose PNEUMONIA probability is higher (and over its own) is called PNEUMONIA, so the
    sensitivity as served is below the one-vs-rest figure. Each such class is named with both figures."""
    from cxr_core import card as card_lib
    from training.config import TrainConfig
    from training.train import fit_thresholds, served_shortfall

    classes = ["COVID-19", "NORMAL", "PNEUMONIA"]
    c = card_lib.ModelCard(name="t", architecture="tiny", input_size=32, class_names=classes, target_layer="relu",
                           negative_class="NORMAL")
    covid = [(0.9, 0.05, 0.05)] * 6 + [(0.3, 0.1, 0.6)] * 4  # 4 of 10 also over PNEUMONIA's, and more probable
    normal = [(0.01, 0.98, 0.01)] * 10
    pneumonia = [(0.05, 0.35, 0.6)] * 10
    probs = np.array(covid + normal + pneumonia)
    y = np.array([0] * 10 + [1] * 10 + [2] * 10)
    c.thresholds = fit_thresholds(y, probs, classes, "NORMAL", TrainConfig(data=[], target_sensitivity=0.95), log=print)
    assert c.thresholds == {"COVID-19": pytest.approx(0.3), "PNEUMONIA": pytest.approx(0.6)}
    notes = served_shortfall(c, y, probs, 0.95)
    assert notes == ["COVID-19: validation sensitivity 1.000 one vs rest at its threshold 0.3000, 0.600 as the app "
                     "decides (10 films; 4 over their threshold were called another class that was over its own and "
                     "more probable)"]
    c.thresholds = {}
    assert served_shortfall(c, y, probs, 0.95) == []  # top-class rule: no thresholds, nothing to compare
