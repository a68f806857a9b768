"""End-to-end smoke runs of ``python -m training`` (tiny model, 32 px, a few dozen real images)."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from conftest import DATA

from cxr_core import card as card_lib
from cxr_core import imaging, metrics, models, preprocess
from training import build, dataset
from training.config import TrainConfig
from training.train import run

REPO = Path(__file__).resolve().parents[1]
KERMANY = DATA / "kermany" / "train"
COVID_SET = DATA / "covid19_image_dataset" / "train"
SMOKE = ["--arch", "tiny", "--input-size", "32", "--batch-size", "16"]


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    result = subprocess.run([sys.executable, "-m", "training", *args], cwd=REPO, env=full_env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def _link(src: Path, dst: Path, n: int, offset: int = 0) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in sorted(p.name for p in src.iterdir())[offset:offset + n]:
        (dst / name).symlink_to(src / name)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("training")
    _link(KERMANY / "NORMAL", root / "cxr" / "NORMAL", 30)
    _link(KERMANY / "PNEUMONIA", root / "cxr" / "PNEUMONIA", 30)
    (root / "cxr" / "NORMAL" / "notes.jpeg").write_text("not an image\n")
    (root / "cxr" / "PNEUMONIA" / "empty.jpeg").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def first_run(work) -> tuple[Path, str]:
    out = work / "runs" / "tiny-a"
    result = _cli("train", str(work / "cxr"), *SMOKE, "--epochs", "1", "--out", str(out),
                  "--cache-dir", str(work / "cache"), "--note", "smoke run; a GPU run should train longer")
    return out, result.stdout


@pytest.fixture(scope="module")
def resumed_run(work, first_run) -> tuple[Path, str]:
    out = work / "runs" / "tiny-b"
    shutil.copytree(first_run[0], out)
    # No `train` subcommand: it is the default.
    result = _cli(str(work / "cxr"), *SMOKE, "--epochs", "2", "--out", str(out), "--cache-dir", str(work / "cache"),
                  "--resume")
    return out, result.stdout


def test_train_writes_a_complete_model_folder(first_run):
    out, stdout = first_run
    for name in ("model.weights.h5", "model_card.json", "history.csv", "split.csv", "skipped.csv",
                 "metrics.json", "predictions.csv"):
        assert (out / name).is_file(), name
    classifier = models.load(out)  # verifies the weights' sha256
    card = classifier.card
    assert card.class_names == ["NORMAL", "PNEUMONIA"] and card.negative_class == "NORMAL"
    assert card.target_layer == "relu" and card.input_size == 32 and card.recipe["epochs"] == 1
    assert card.recipe["note"] == "smoke run; a GPU run should train longer"
    split = pd.read_csv(out / "split.csv")
    counts = split["split"].value_counts().to_dict()
    assert len(split) == 60 and set(counts) == {"train", "val", "test"} and 46 <= counts["train"] <= 50
    assert split.groupby("patient")["split"].nunique().max() == 1
    n_test = counts["test"]
    m = json.loads((out / "metrics.json").read_text())
    for key in ("n", "accuracy", "auc", "classes", "per_class", "confusion_matrix", "ece", "skipped", "roc"):
        assert key in m
    assert m["n"] == n_test and m["classes"] == card.class_names and np.sum(m["confusion_matrix"]) == n_test
    assert sorted(s["path"] for s in m["skipped"]) == ["cxr/NORMAL/notes.jpeg", "cxr/PNEUMONIA/empty.jpeg"]
    assert "skipped unreadable file cxr/NORMAL/notes.jpeg" in stdout
    assert set(m["per_class"]["PNEUMONIA"]) >= {"auc", "sensitivity", "specificity", "precision", "f1", "support"}
    history = pd.read_csv(out / "history.csv")
    assert history["epoch"].tolist() == [1] and history["phase"].tolist() == ["scratch"]
    assert np.isfinite(history[["loss", "val_loss"]].to_numpy()).all()

    preds = pd.read_csv(out / "predictions.csv")
    test = preds[preds["split"] == "test"]
    assert len(test) == n_test and list(preds.columns) == ["path", "source", "true_class", "p_NORMAL", "p_PNEUMONIA",
                                                     "predicted_class", "split", "familiarity", "unfamiliar"]
    # The threshold was fitted on the validation rows, not the test rows.
    val = preds[preds["split"] == "val"]
    expected = metrics.threshold_for_sensitivity((val["true_class"] == "PNEUMONIA").to_numpy(int),
                                                 val["p_PNEUMONIA"].to_numpy(), 0.95)
    assert card.thresholds["PNEUMONIA"] == pytest.approx(expected, abs=1e-9)
    # What is served is what was evaluated: reloading and predicting the test files gives the same numbers.
    pixels = [imaging.load(out.parent.parent / "cxr" / p).pixels for p in test["path"]]
    served = np.array([p.probabilities for p in classifier.predict_pixels(pixels)])
    np.testing.assert_allclose(served, test[["p_NORMAL", "p_PNEUMONIA"]].to_numpy(), atol=1e-5)
    assert [p.decision for p in classifier.predict_pixels(pixels)] == test["predicted_class"].tolist()


def test_resume_continues_from_the_last_epoch(first_run, resumed_run):
    out, stdout = resumed_run
    assert "resuming after epoch 1" in stdout and "Epoch 2/2" in stdout and "Epoch 1/2" not in stdout
    assert "the split comes from split.csv: its classes, splits and patients stand" in stdout
    before = pd.read_csv(first_run[0] / "history.csv")
    history = pd.read_csv(out / "history.csv")
    assert history["epoch"].tolist() == [1, 2]
    pd.testing.assert_frame_equal(history.iloc[:1], before)  # epoch 1 kept, not retrained
    assert json.loads((out / ".ckpt" / "state.json").read_text())["epoch"] == 2
    # Same split as the interrupted run (read back from its manifest).
    pd.testing.assert_frame_equal(pd.read_csv(out / "split.csv"), pd.read_csv(first_run[0] / "split.csv"))
    assert card_lib.load(out).recipe["epochs_run"] == 2


def test_resume_on_another_validation_split_re_measures_the_best_epoch(first_run, work, tmp_path):
    """A resumed run whose validation films changed (here half moved to test) compares its epochs with the best
    epoch's weights measured on the new films, not with a val_loss of films it no longer has."""
    out = tmp_path / "tiny-moved"
    shutil.copytree(first_run[0], out)
    with (out / "split.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    val = [r for r in rows if r["split"] == "val"]
    moved = {r["path"] for r in val[: len(val) // 2]}
    for r in rows:
        r["split"] = "test" if r["path"] in moved else r["split"]
    with (out / "split.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    before = json.loads((out / ".ckpt" / "state.json").read_text())
    assert before["best_epoch"] == 1 and len(before["val_split"]) == 64  # the first run's validation films

    # The expected value, independently: epoch 1's (the first run's served model's) cross-entropy on the films
    # still in val, from its predictions.csv (calibrated probabilities, undone with the card's temperature).
    preds = pd.read_csv(first_run[0] / "predictions.csv", float_precision="round_trip")
    kept = preds[(preds["split"] == "val") & ~preds["path"].isin(moved)]
    assert 0 < len(kept) < len(val)
    card = card_lib.load(first_run[0])
    logits = card.temperature * np.log(kept[[f"p_{c}" for c in card.class_names]].to_numpy())
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    labels = kept["true_class"].map(card.class_names.index).to_numpy()
    expected = float(-log_p[np.arange(len(kept)), labels].mean())
    assert abs(expected - before["best"]) > 1e-3  # the old number is really not this split's

    lines: list[str] = []
    run(TrainConfig(data=[str(work / "cxr")], out=str(out), architecture="tiny", input_size=32, batch_size=16,
                    epochs=2, cache_dir=str(work / "cache"), verbose=0, resume=True), log=lines.append)
    said = [line for line in lines if "re-measured" in line]
    assert len(said) == 1 and f"val_loss {before['best']:.4f} -> " in said[0], lines
    remeasured = float(said[0].split(" -> ")[1].split()[0])
    assert remeasured == pytest.approx(expected, abs=1e-4)
    state = json.loads((out / ".ckpt" / "state.json").read_text())
    epoch2 = state["history"][1]["val_loss"]
    assert state["best"] == pytest.approx(min(remeasured, epoch2), abs=1e-4)
    assert state["best_epoch"] == (2 if epoch2 < state["best"] + 1e-9 and epoch2 <= remeasured else 1)
    assert len(state["val_split"]) == 64 and state["val_split"] != before["val_split"]


def test_a_run_killed_while_saving_an_epoch_resumes_from_the_last_whole_epoch(work, tmp_path, monkeypatch):
    """Killed after epoch 2's weights and optimizer were written but before state.json: the resumed run starts
    from epoch 1's weights and optimizer (not epoch 2's weights under epoch 1's state), and trains epoch 2 again."""
    from training import loop

    out = tmp_path / "torn"
    base = dict(data=[str(work / "cxr")], out=str(out), architecture="tiny", input_size=32, batch_size=16,
                cache_dir=str(work / "cache"), verbose=0)
    run(TrainConfig(**base, epochs=1), log=lambda _: None)
    ckpt = out / ".ckpt"
    first = json.loads((ckpt / "state.json").read_text())
    epoch1 = models.build("tiny", 2, 32)
    epoch1.load_weights(str(ckpt / first["files"]["last"]))

    def killed(path, data):
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(loop, "_atomic_json", killed)
    with pytest.raises(KeyboardInterrupt):
        run(TrainConfig(**base, epochs=2, resume=True), log=lambda _: None)
    monkeypatch.undo()
    assert (ckpt / "last-2.weights.h5").is_file()  # epoch 2 was written, but does not count
    state = json.loads((ckpt / "state.json").read_text())
    assert state["epoch"] == 1 and state["files"] == first["files"]
    served = models.build("tiny", 2, 32)
    served.load_weights(str(ckpt / state["files"]["last"]))
    for a, b in zip(served.get_weights(), epoch1.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)

    lines: list[str] = []
    run(TrainConfig(**base, epochs=2, resume=True), log=lines.append)
    assert "resuming after epoch 1" in lines
    state = json.loads((ckpt / "state.json").read_text())
    assert state["epoch"] == 2 and [r["epoch"] for r in state["history"]] == [1, 2]
    assert sorted(p.name for p in ckpt.iterdir()) == sorted({*state["files"].values(), "state.json", "trained.csv"})


def test_a_mixed_precision_run_is_scored_as_it_is_served(work, tmp_path):
    """Trained in mixed bfloat16, calibrated and scored in float32: predictions.csv (and so the thresholds and
    temperature fitted from it) is what the served float32 model gives, not the bfloat16 model's numbers."""
    out = tmp_path / "bf16"
    run(TrainConfig(data=[str(work / "cxr")], out=str(out), architecture="tiny", input_size=32, batch_size=16,
                    epochs=1, cache_dir=str(work / "cache"), verbose=0, mixed_precision="bfloat16"),
        log=lambda _: None)
    classifier = models.load(out)
    assert classifier.card.recipe["precision_policy"] == "mixed_bfloat16"
    preds = pd.read_csv(out / "predictions.csv", float_precision="round_trip")
    test = preds[preds["split"] == "test"]
    pixels = [imaging.load(work / "cxr" / p).pixels for p in test["path"]]
    served = np.array([p.probabilities for p in classifier.predict_pixels(pixels)])
    np.testing.assert_allclose(served, test[["p_NORMAL", "p_PNEUMONIA"]].to_numpy(), atol=1e-5)


def test_a_float16_run_resumes_in_float32(work, tmp_path):
    """Started on a GPU (mixed float16: a LossScaleOptimizer with variables of its own), continued on a CPU in
    float32: the optimizer's moments carry over instead of the resume being refused."""
    out = tmp_path / "fp16"
    base = dict(data=[str(work / "cxr")], out=str(out), architecture="tiny", input_size=32, batch_size=16,
                cache_dir=str(work / "cache"), verbose=0)
    run(TrainConfig(**base, epochs=1, mixed_precision="float16"), log=lambda _: None)
    with np.load(out / ".ckpt" / "optimizer-1.npz") as saved:
        moments = [saved[k] for k in saved.files]
    run(TrainConfig(**base, epochs=2, mixed_precision="off", resume=True), log=lambda _: None)
    state = json.loads((out / ".ckpt" / "state.json").read_text())
    assert [r["epoch"] for r in state["history"]] == [1, 2]
    assert card_lib.load(out).recipe["precision_policy"] == "float32"
    assert len(moments) > 2 and any(np.abs(m).max() > 0 for m in moments[1:])  # real moments were kept


def test_time_budget_stops_between_epochs_saves_the_model_and_resume_continues(work, tmp_path):
    """--time-budget: no epoch starts that would end past it; the model is saved; --resume finishes the run."""
    out = tmp_path / "tiny-budget"
    base = dict(data=[str(work / "cxr")], out=str(out), architecture="tiny", input_size=32, batch_size=16,
                epochs=3, cache_dir=str(work / "cache"), verbose=0)
    lines: list[str] = []
    run(TrainConfig(**base, time_budget=1e-6), log=lines.append)  # any epoch is longer than 60 microseconds
    assert pd.read_csv(out / "history.csv")["epoch"].tolist() == [1]
    assert any("--time-budget 1e-06 min: stopped after epoch 1 of 3" in line for line in lines), lines
    card = models.load(out).card  # a complete, loadable model folder
    assert card.recipe["stopped_by_time_budget"] is True and card.recipe["epochs_run"] == 1
    state = json.loads((out / ".ckpt" / "state.json").read_text())
    assert state["epoch"] == 1 and state["done"] == []  # not early stopping: the phase is not finished
    run(TrainConfig(**base, resume=True, time_budget=60), log=lambda _: None)
    assert pd.read_csv(out / "history.csv")["epoch"].tolist() == [1, 2, 3]
    assert models.load(out).card.recipe["stopped_by_time_budget"] is False


def test_time_budget_forecasts_from_the_last_epoch_not_the_compile_heavy_first(monkeypatch):
    from types import SimpleNamespace

    from training import loop

    clock = iter([0.0, 200.0, 200.0, 220.0, 220.0, 240.0])  # epoch 1 compiles (200 s), epochs 2-3 take 20 s
    monkeypatch.setattr(loop.time, "perf_counter", lambda: next(clock))
    state = SimpleNamespace(run_started=0.0, first_epoch=0, config=SimpleNamespace(epochs=10), budget_hit=False)
    budget = loop._TimeBudget(state, 290 / 60)
    budget.set_model(SimpleNamespace(stop_training=False))
    stopped = []
    for epoch in range(3):  # each decision alone (stop_training reset), as if the run had gone on
        budget.model.stop_training = False
        budget.on_epoch_begin(epoch)
        budget.on_epoch_end(epoch)
        stopped.append(budget.model.stop_training)
    # After epoch 1: 200 s + 200 s forecast > 290 s. After epoch 2: 220 + 20 < 290 (the mean of 110 s would
    # have stopped it), after epoch 3: 240 + 20 < 290.
    assert stopped == [True, False, False]


def test_time_budget_does_not_count_the_last_epoch_as_stopped(work, tmp_path):
    out = tmp_path / "tiny-budget-last"
    run(TrainConfig(data=[str(work / "cxr")], out=str(out), architecture="tiny", input_size=32, batch_size=16,
                    epochs=1, cache_dir=str(work / "cache"), verbose=0, time_budget=1e-6), log=lambda _: None)
    assert card_lib.load(out).recipe["stopped_by_time_budget"] is False


def test_starting_over_an_earlier_run_needs_resume(first_run, work):
    config = TrainConfig(data=[str(work / "cxr")], out=str(first_run[0]), architecture="tiny", input_size=32)
    with pytest.raises(FileExistsError, match="--resume"):
        run(config, log=lambda _: None)


@pytest.mark.parametrize("resume", [False, True])
def test_a_trained_model_without_its_checkpoint_is_never_trained_over(first_run, work, tmp_path, resume):
    """A shipped model, or one brought back from the GPU machine, has no .ckpt: a run into its folder replaced
    its weights and split.csv, and --resume started it again from the first epoch, both without a word."""
    out = tmp_path / "model"
    shutil.copytree(first_run[0], out, ignore=shutil.ignore_patterns(".ckpt"))
    before = {name: (out / name).read_bytes() for name in ("model.weights.h5", "model_card.json", "split.csv")}
    config = TrainConfig(data=[str(work / "cxr")], out=str(out), architecture="tiny", input_size=32, epochs=1,
                         resume=resume, cache_dir=str(work / "cache"), verbose=0)
    with pytest.raises(FileExistsError, match=f"holds a trained model .* no checkpoint .*--weights {out}"):
        run(config, log=lambda _: None)
    assert {name: (out / name).read_bytes() for name in before} == before


def test_evaluate_a_labelled_folder_with_a_class_map(first_run, work, tmp_path):
    data_dir = tmp_path / "external"
    _link(COVID_SET / "Normal", data_dir / "normal", 4)
    _link(COVID_SET / "Viral Pneumonia", data_dir / "Viral Pneumonia", 5)
    _link(COVID_SET / "Covid", data_dir / "Covid", 2)
    (data_dir / "normal" / "truncated.jpeg").write_bytes((COVID_SET / "Normal" / "01.jpeg").read_bytes()[:500])
    out = tmp_path / "eval"
    result = _cli("evaluate", str(first_run[0]), str(data_dir), "--out", str(out), "--map",
                  "Viral Pneumonia=PNEUMONIA")
    m = json.loads((out / "metrics.json").read_text())
    for key in ("n", "accuracy", "auc", "classes", "per_class", "confusion_matrix", "ece", "skipped"):
        assert key in m
    assert m["n"] == 9 and m["classes"] == ["NORMAL", "PNEUMONIA"]
    assert [row for row in map(sum, m["confusion_matrix"])] == [4, 5]
    assert m["per_class"]["NORMAL"]["support"] == 4 and m["per_class"]["PNEUMONIA"]["support"] == 5
    assert [s["path"] for s in m["skipped"]] == ["normal/truncated.jpeg"] and m["skipped"][0]["error"]
    assert m["unmatched_folders"] == ["Covid"]
    preds = pd.read_csv(out / "predictions.csv")
    assert len(preds) == 9 and set(preds["true_class"]) == {"NORMAL", "PNEUMONIA"}
    y = (preds["true_class"] == "PNEUMONIA").to_numpy(int)
    assert m["auc"] == pytest.approx(metrics.evaluate(y, preds[["p_NORMAL", "p_PNEUMONIA"]].to_numpy(),
                                                      ["NORMAL", "PNEUMONIA"])["auc"])
    # Every film carries the served familiarity distance and flag (issue 10), and the rates are those of the flags
    classifier = models.load(first_run[0])
    films = [data_dir / path for path in preds["path"]]
    served = classifier.predict(preprocess.to_batch([preprocess.prepare(imaging.load(f, f.name).pixels,
                                                                        classifier.input_size) for f in films]))
    np.testing.assert_allclose(preds["familiarity"], [s.familiarity for s in served], rtol=1e-5)
    assert preds["unfamiliar"].tolist() == [s.unfamiliar for s in served]
    fam = m["familiarity"]
    right = (preds["predicted_class"] == preds["true_class"]).to_numpy()
    assert (fam["n"], fam["flagged"], fam["right"], fam["wrong"]) == (9, preds["unfamiliar"].sum(), right.sum(),
                                                                       (~right).sum())
    assert fam["threshold"] == classifier.familiarity.threshold and fam["by_group"]["external"]["n"] == 9
    assert f"flags {fam['flagged']} of 9 films" in result.stdout
    # none of these films is in the model's split.csv: checked, nothing found, no warning
    assert m["training_overlap"] == {"checked": True, "by_split": {}, "made_with": 0, "patients": 0}
    assert set(preds["model_split"].fillna("")) == {""} and "used to make this model" not in result.stdout


def test_evaluate_names_the_films_the_model_was_made_with(first_run, work, tmp_path):
    """Evaluated on its own training folder, every film of the model's split.csv is found by its bytes and named by
    its split; the figures without the train and validation films are those of its test films alone."""
    out = tmp_path / "eval-own"
    result = _cli("evaluate", str(first_run[0]), str(work / "cxr"), "--out", str(out))
    m = json.loads((out / "metrics.json").read_text())
    split = pd.read_csv(first_run[0] / "split.csv", keep_default_na=False)
    split = split[split["split"].isin(["train", "val", "test"])]
    counts = split["split"].value_counts().to_dict()
    assert len(split) == 60 and set(counts) == {"train", "val", "test"}
    overlap = m["training_overlap"]
    assert overlap["checked"] and overlap["by_split"] == counts
    assert overlap["made_with"] == counts["train"] + counts["val"]
    preds = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    assert preds.set_index("path")["model_split"].to_dict() == dict(zip(split["path"], split["split"], strict=True))
    test = preds[preds["model_split"] == "test"]
    assert overlap["without"]["n"] == counts["test"] == len(test)
    assert overlap["without"]["accuracy"] == pytest.approx((test["predicted_class"] == test["true_class"]).mean())
    assert (f"warning: {overlap['made_with']} of these films were used to make this model (train {counts['train']}, "
            f"validation {counts['val']};") in result.stdout


def test_evaluate_names_other_films_of_the_patients_whose_films_made_the_model(tmp_path):
    """Kermany's official test folder shares patients with its train folder: a film that is not in the model's split
    but belongs to a patient of its train, validation or start's films is named (patient:train...) and left out of
    the figures "without them", as a training run would leave it out of test; a test patient's or a stranger's is
    not."""
    from training import evaluate

    (tmp_path / "split.csv").write_text(
        "path,source,class,split,patient,sha256,duplicate_of,duplicate_kind\n"
        "NORMAL/IM-0001-0001.jpeg,kermany,NORMAL,train,IM-0001,aaa,,\n"
        "NORMAL/IM-0002-0001.jpeg,kermany,NORMAL,val,IM-0002,bbb,,\n"
        "NORMAL/IM-0003-0001.jpeg,kermany,NORMAL,test,IM-0003,ccc,,\n"
        "NORMAL/IM-0004-0001.jpeg,kermany,NORMAL,duplicate,,ddd,kermany/NORMAL/IM-0004-0001.jpeg,seen\n"
        "NORMAL/IM-0001-0002.jpeg,kermany,NORMAL,val,,eee,,\n")  # no patient column value: from the name
    files = {}
    for name in ("IM-0001-0003.jpeg", "IM-0002-0002.jpeg", "IM-0003-0002.jpeg", "IM-0004-0002.jpeg",
                 "IM-0005-0001.jpeg", "person1_virus_6.jpeg"):
        (tmp_path / name).write_bytes(name.encode())
        files[name] = tmp_path / name
    overlap, found = evaluate.training_overlap(tmp_path, files)
    assert found == {"IM-0001-0003.jpeg": "patient:train", "IM-0002-0002.jpeg": "patient:val",
                     "IM-0004-0002.jpeg": "patient:seen"}
    assert overlap == {"checked": True, "by_split": {"patient:train": 1, "patient:val": 1, "patient:seen": 1},
                       "made_with": 0, "patients": 3}
    assert [evaluate.flatters(found.get(n, "")) for n in files] == [True, True, False, True, False, False]
    overlap["without_patients"] = {"n": 3, "accuracy": 0.5, "auc": None}
    assert evaluate.overlap_sentence(overlap) == (
        "3 of these films carry the patient id of films used to make it (its start's 1, train 1, validation 1), "
        "matched by the file name alone (another collection that names its files the same way, such as a viewer's "
        "IM-0001-0001 export, matches too): if they are that collection's films, they are not held out from it "
        "either. Without them: 3 films, accuracy 0.500, AUC n/a. The predictions' model_split column names them.")
    overlap.update(made_with=2, by_split={**overlap["by_split"], "train": 2}, without={"n": 4, "accuracy": 0.75,
                                                                                      "auc": 0.8})
    sentence = evaluate.overlap_sentence(overlap)
    assert sentence.startswith("2 of these films were used to make this model (train 2; the same bytes as in its "
                               "split.csv): figures on them flatter it. Without them: 4 films, accuracy 0.750, AUC "
                               "0.800. 3 more carry the patient id")
    assert "Without them too: 3 films, accuracy 0.500" in sentence


def test_split_roles_follow_near_copies_and_the_start_s_films(tmp_path):
    """A near-copy the run dropped counts as the split of the film it copies; a film its start trained on is
    "seen"; a folder without split.csv cannot be checked (and says so)."""
    from training import evaluate

    (tmp_path / "split.csv").write_text(
        "path,source,class,split,patient,sha256,duplicate_of,duplicate_kind\n"
        "a.jpeg,src,NORMAL,train,,aaa,,\n"
        "b.jpeg,src,NORMAL,test,,bbb,,\n"
        "c.jpeg,src,NORMAL,duplicate,,ccc,src/a.jpeg,near\n"
        "d.jpeg,src,NORMAL,duplicate,,ddd,src/b.jpeg,near\n"
        "e.jpeg,src,NORMAL,duplicate,,eee,src/e.jpeg,seen\n"
        "f.jpeg,src,NORMAL,duplicate,,fff,src/e.jpeg,near\n"  # a near-copy of a film its start trained on
        "g.jpeg,src,NORMAL,duplicate,,ggg,src/c.jpeg,near\n"  # a copy of a copy of a train film
        "h.jpeg,src,NORMAL,duplicate,,hhh,src/h.jpeg,near\n")  # a loop in a damaged manifest: no role
    assert evaluate.split_roles(tmp_path) == {"aaa": "train", "bbb": "test", "ccc": "train", "ddd": "test",
                                              "eee": "seen", "fff": "seen", "ggg": "train"}
    files = {}
    for name, data in (("one.png", b"first"), ("two.png", b"second")):
        (tmp_path / name).write_bytes(data)
        files[name] = tmp_path / name
    (tmp_path / "split.csv").write_text(
        "path,source,class,split,patient,sha256,duplicate_of,duplicate_kind\n"
        f"x.png,src,NORMAL,duplicate,,{hashlib.sha256(b'first').hexdigest()},src/x.png,seen\n")
    overlap, found = evaluate.training_overlap(tmp_path, files)
    assert found == {"one.png": "seen"} and overlap == {"checked": True, "by_split": {"seen": 1}, "made_with": 1,
                                                         "patients": 0}
    overlap["without"] = {"n": 1, "accuracy": 1.0, "auc": None}
    assert evaluate.overlap_sentence(overlap).startswith("1 of these films were used to make this model "
                                                         "(its start's 1;")
    (tmp_path / "split.csv").write_text("path,source,class,split\nx.png,src,NORMAL,train\n")  # an older one
    assert evaluate.training_overlap(tmp_path, files)[0]["why"] == ("the model folder's split.csv has no sha256 "
                                                                    "column (written by an older version)")
    (tmp_path / "split.csv").write_text("path,source,class,split,patient,sha256,duplicate_of,duplicate_kind\n")
    assert evaluate.training_overlap(tmp_path, files)[0]["why"] == "the model folder's split.csv lists no films"
    (tmp_path / "split.csv").unlink()
    assert evaluate.training_overlap(tmp_path, files) == ({"checked": False, "why": "the model folder has no "
                                                           "split.csv to compare with"}, {})


def test_evaluate_folder_is_the_same_with_and_without_the_serving_pipeline(first_run, work, monkeypatch):
    from training import evaluate

    classifier = models.load(first_run[0])
    calls: list[tuple[int, int]] = []
    served = evaluate.evaluate_folder(classifier, work / "cxr", progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (62, 62) and served.metrics["n"] == 60
    assert sorted(s["path"] for s in served.skipped) == ["NORMAL/notes.jpeg", "PNEUMONIA/empty.jpeg"]
    monkeypatch.setitem(sys.modules, "cxr_core.pipeline", None)  # as on a machine without TensorFlow
    local = evaluate.evaluate_folder(classifier, work / "cxr", batch_size=7)
    pd.testing.assert_frame_equal(local.predictions, served.predictions, atol=1e-6)
    assert local.skipped == served.skipped and local.metrics["auc"] == pytest.approx(served.metrics["auc"])


def test_compare_tables_two_runs(first_run, resumed_run, tmp_path):
    table_csv = tmp_path / "table.csv"
    result = _cli("compare", str(first_run[0]), str(resumed_run[0]), "--csv", str(table_csv))
    assert "tiny-a" in result.stdout and "tiny-b" in result.stdout and "accuracy" in result.stdout
    with table_csv.open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["run"] for r in rows] == ["tiny-a", "tiny-b"]
    assert [r["epochs"] for r in rows] == ["1", "2"]
    for row, folder in zip(rows, (first_run[0], resumed_run[0]), strict=True):
        m = json.loads((folder / "metrics.json").read_text())
        assert float(row["accuracy"]) == pytest.approx(m["accuracy"]) and row["architecture"] == "tiny"


def test_compare_gives_the_learning_rates_the_epochs_ran_at(tmp_path):
    from training import compare

    pd.DataFrame({"epoch": [1, 2, 3], "lr": [1e-4, 1e-4, 2e-5]}).to_csv(tmp_path / "history.csv", index=False)
    # a card's recipe as a run writes it: the starting weights, not a "pretrained" flag
    recipe = {"lr": 1e-3, "fine_tune_lr": 1e-4, "weights": "models/densenet169-cxr3", "freeze_epochs": 0}
    assert compare._rates(tmp_path, recipe) == "0.0001 -> 2e-05"  # not the unused lr of 0.001
    (tmp_path / "history.csv").unlink()
    assert compare._rates(tmp_path, recipe) == 1e-4
    assert compare._rates(tmp_path, {**recipe, "freeze_epochs": 2}) == 1e-3
    assert compare._rates(tmp_path, {**recipe, "weights": "none"}) == 1e-3  # from scratch: lr


_OTHER_BACKEND_SCRIPT = """
import importlib.abc, importlib.machinery, json, sys
# A GPU box with JAX or PyTorch and no TensorFlow: importing tensorflow fails. The finder answers
# find_spec (torch's dynamo probes modules with it) and the import fails in the loader.
class NoTensorFlow(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            return importlib.machinery.ModuleSpec(name, self)
    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named {spec.name!r} (blocked by the test)", name=spec.name)
    def exec_module(self, module):
        raise AssertionError("unreachable")
sys.meta_path.insert(0, NoTensorFlow())
import numpy as np
from training.__main__ import main
from cxr_core import models
import keras
print("BACKEND", keras.backend.backend())
main(sys.argv[1:])
assert "tensorflow" not in sys.modules, "training imported TensorFlow"
x = np.linspace(0, 255, 2 * 32 * 32 * 3, dtype=np.float32).reshape(2, 32, 32, 3)
print("LOGITS", json.dumps(models.load(sys.argv[sys.argv.index("--out") + 1]).logits(x).tolist()))
"""


TORCH_MISSING = importlib.util.find_spec("torch") is None
# CI (the CI environment variable, as CI services set it) must run the torch case: there a missing torch fails it.
IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
NO_TORCH = ("torch is not installed: .ci/run installs the CPU build (torch==2.13.0) where its wheel lies on disk; "
            "from the registry it would pull several GB of CUDA packages")


@pytest.mark.parametrize("backend", [
    "jax",
    pytest.param("torch", marks=pytest.mark.skipif(TORCH_MISSING and not IN_CI, reason=NO_TORCH)),
])
def test_model_trained_under_another_backend_loads_under_tensorflow_with_the_same_logits(backend, work, tmp_path):
    if backend == "torch" and TORCH_MISSING:  # only reached in CI (locally the case is skipped)
        pytest.fail(f"CI is set but {NO_TORCH}")
    out = tmp_path / f"tiny-{backend}"
    args = [str(work / "cxr"), *SMOKE, "--epochs", "1", "--out", str(out), "--cache-dir", str(work / "cache"),
            "--no-augment"]
    if backend == "jax":
        args.append("--distribute")  # keras.distribution data parallel (one CPU device here)
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "",
           "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", _OTHER_BACKEND_SCRIPT, "train", *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"BACKEND {backend}" in result.stdout
    other_logits = np.array(json.loads(result.stdout.split("LOGITS", 1)[1]))
    assert keras.backend.backend() == "tensorflow"
    classifier = models.load(out)
    recipe = classifier.card.recipe
    assert recipe["hardware"]["backend"] == backend
    if backend == "jax":
        assert recipe["distribution"].startswith("keras.distribution")
    history = pd.read_csv(out / "history.csv")
    assert len(history) == 1 and np.isfinite(history["loss"]).all()
    x = np.linspace(0, 255, 2 * 32 * 32 * 3, dtype=np.float32).reshape(2, 32, 32, 3)
    np.testing.assert_allclose(classifier.logits(x), other_logits, atol=1e-5)
    assert np.abs(other_logits[0] - other_logits[1]).max() > 1e-4  # the input matters: not a constant model


def test_fine_tune_from_our_model_folder_rebuilds_the_head(first_run, work, tmp_path):
    data_dir = tmp_path / "kermany"
    _link(KERMANY / "NORMAL", data_dir / "NORMAL", 12, 100)
    _link(KERMANY / "PNEUMONIA", data_dir / "PNEUMONIA", 12, 100)
    _link(COVID_SET / "Covid", tmp_path / "covid" / "Covid", 20)
    config = TrainConfig(data=[str(data_dir), str(tmp_path / "covid")], out=str(tmp_path / "tiny-3"),
                         architecture="tiny", input_size=32,
                         weights=str(first_run[0]), epochs=1, batch_size=16,  # freeze_epochs auto: a new head
                         class_map={"Covid": "COVID-19"}, cache_dir=str(work / "cache"), verbose=0)
    out = run(config, log=lambda _: None)
    source, tuned = models.load(first_run[0]), models.load(out)
    assert tuned.card.class_names == ["COVID-19", "NORMAL", "PNEUMONIA"]
    assert tuned.model.get_layer("logits").kernel.shape == (16, 3)
    assert tuned.card.recipe["copied_layers"] == 5  # two convolutions, two BatchNorms, the NORMAL/PNEUMONIA columns
    # The frozen phase trained only the head: every backbone weight (BatchNorm statistics too) is the source's.
    for name in ("tiny_conv0", "tiny_bn0", "tiny_conv1", "tiny_bn1"):
        for a, b in zip(source.model.get_layer(name).get_weights(), tuned.model.get_layer(name).get_weights(),
                        strict=True):
            np.testing.assert_array_equal(a, b)
    assert pd.read_csv(out / "history.csv")["phase"].tolist() == ["frozen"]
    assert tuned.card.recipe["freeze_epochs"] == 3  # auto: a new head (a new class) trains alone first
    # Two sources: the held-out metrics are broken down by source, and the card warns about it.
    test = pd.read_csv(out / "predictions.csv").query("split == 'test'")
    by_source = json.loads((out / "metrics.json").read_text())["by_source"]
    assert set(by_source) == {"covid", "kermany"} == set(test["source"])
    assert by_source["covid"]["n"] == (test["source"] == "covid").sum()
    assert list(by_source["covid"]["per_class"]) == ["COVID-19"]
    assert any("source instead of the disease" in note for note in tuned.card.limitations)
    assert tuned.card.training_data["sources"]["covid"]["train"] == {"COVID-19": 16}


def test_continuing_our_model_with_its_head_trains_the_whole_model_from_the_first_epoch(first_run, work):
    """--freeze-epochs is auto: a copied head (same classes) needs no frozen phase, so none is spent."""
    out = work / "runs" / "tiny-continued"
    result = _cli("train", str(work / "cxr"), *SMOKE, "--epochs", "1", "--weights", str(first_run[0]),
                  "--out", str(out), "--cache-dir", str(work / "cache"))
    assert "--freeze-epochs 0 (auto: the head is copied" in result.stdout
    source, continued = models.load(first_run[0]), models.load(out)
    assert continued.card.recipe["freeze_epochs"] == 0
    assert pd.read_csv(out / "history.csv")["phase"].tolist() == ["fine-tune"]
    moved = [name for name in ("tiny_conv0", "tiny_conv1")  # the backbone trained in that one epoch
             if not np.array_equal(source.model.get_layer(name).get_weights()[0],
                                   continued.model.get_layer(name).get_weights()[0])]
    assert moved == ["tiny_conv0", "tiny_conv1"]


def test_starting_from_our_model_keeps_its_head_column_of_each_class(first_run):
    source = models.load(first_run[0])
    config = TrainConfig(data=[], architecture="tiny", input_size=32, weights=str(first_run[0]))
    x = np.linspace(0, 255, 2 * 32 * 32 * 3, dtype=np.float32).reshape(2, 32, 32, 3)
    same, copied = build.build_model(config, ["NORMAL", "PNEUMONIA"])
    assert "logits" in copied and len(copied) == 5
    np.testing.assert_allclose(same.predict_on_batch(x), source.logits(x), atol=1e-6)  # training continues it
    # The same classes in another order: the head is new, each class keeps its own column.
    kernel, bias = (np.asarray(w) for w in source.model.get_layer("logits").get_weights())
    swapped, copied = build.build_model(config, ["PNEUMONIA", "NORMAL"])
    assert "logits" not in copied and copied[-1] == "logits[PNEUMONIA,NORMAL]" and len(copied) == 5
    np.testing.assert_array_equal(swapped.get_layer("logits").get_weights()[0], kernel[:, ::-1])
    np.testing.assert_array_equal(swapped.get_layer("logits").get_weights()[1], bias[::-1])
    np.testing.assert_allclose(swapped.predict_on_batch(x), source.logits(x)[:, ::-1], atol=1e-6)
    # A new class: the two known classes keep their columns, the new one starts fresh (not a copy of either).
    three, copied = build.build_model(config, ["COVID-19", "NORMAL", "PNEUMONIA"])
    assert copied[-1] == "logits[NORMAL,PNEUMONIA]"
    new_kernel, new_bias = three.get_layer("logits").get_weights()
    np.testing.assert_array_equal(new_kernel[:, 1:], kernel)
    np.testing.assert_array_equal(new_bias[1:], bias)
    assert not any(np.allclose(new_kernel[:, 0], kernel[:, i]) for i in range(2))
    np.testing.assert_allclose(three.predict_on_batch(x)[:, 1:], source.logits(x), atol=1e-6)


def test_phases_choose_the_trainable_layers():
    model = models.build("tiny", 2, 32)
    trainable = lambda: sorted(la.name for la in model.layers if la.trainable and la.weights)  # noqa: E731
    build.set_phase(model, "frozen", pretrained=True)
    assert trainable() == ["logits"]
    build.set_phase(model, "fine-tune", "top:1", pretrained=True)
    assert trainable() == ["logits", "tiny_conv1"]
    build.set_phase(model, "fine-tune", "all", pretrained=True)
    assert trainable() == ["logits", "tiny_conv0", "tiny_conv1"]
    build.set_phase(model, "scratch", pretrained=False)
    assert trainable() == ["logits", "tiny_bn0", "tiny_bn1", "tiny_conv0", "tiny_conv1"]
    # More layers asked than there are: all of them (a slice from a negative start trained 5 - 2 = 3 of 2 before);
    # a fraction written with its decimal point, 1.0 included, is a share of them.
    for unfreeze, expected in (("top:5", 2), ("top:2", 2), ("top:1.0", 2), ("top:0.5", 1), ("top:1", 1)):
        build.set_phase(model, "fine-tune", unfreeze, pretrained=True)
        assert len(trainable()) == 1 + expected, unfreeze
    assert [build.unfreeze_count(u, 120) for u in ("top:121", "top:125", "top:1.0", "top:0.3", "top:7")] == [
        120, 120, 120, 36, 7]
    for bad in ("top:0", "top:1.5", "top:-2", "top:x", "top:2.5", "last:3"):
        with pytest.raises(ValueError, match="unfreeze must be all"):
            TrainConfig(data=[], unfreeze=bad)


def test_augmentation_acts_only_in_training():
    config = TrainConfig(data=[], architecture="tiny", input_size=32, seed=3)
    model = models.build("tiny", 2, 32, dropout=0.0)
    wrapped = build.training_model(model, config)
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(wrapped(x, training=False)), np.asarray(model(x, training=False)),
                               atol=1e-6)
    assert np.abs(np.asarray(wrapped(x, training=True)) - np.asarray(model(x, training=True))).max() > 1e-4


def test_balanced_class_weights():
    weights = dataset.class_weights(np.array([0, 0, 0, 1]), 3)
    np.testing.assert_allclose(weights, [4 / 9, 4 / 3, 1.0])


def test_tensorflow_mirrored_strategy_trains(work, tmp_path):
    config = TrainConfig(data=[str(work / "cxr")], out=str(tmp_path / "tiny-mirrored"), architecture="tiny",
                         input_size=32, epochs=1, batch_size=16, distribute=True, augment=False,
                         cache_dir=str(work / "cache"), verbose=0)
    out = run(config, log=lambda _: None)
    recipe = card_lib.load(out).recipe
    assert recipe["distribution"] == "tf.distribute.MirroredStrategy over 1 replica(s)"
    assert len(pd.read_csv(out / "history.csv")) == 1


@pytest.fixture(scope="module")
def holdout_run(work) -> tuple[Path, str]:
    """Two sources, one held out; the held-out one also holds a re-encoded copy of a training film."""
    other = work / "other"
    _link(COVID_SET / "Normal", other / "Normal", 12)
    _link(COVID_SET / "Viral Pneumonia", other / "Viral Pneumonia", 12)
    _link(COVID_SET / "Covid", other / "Covid", 3)
    original = sorted((KERMANY / "NORMAL").iterdir())[0]  # among the first 30 linked into work/cxr
    from PIL import Image

    Image.open(original).convert("L").resize((300, 300)).save(other / "Normal" / "copy-of-a-kermany-film.jpeg",
                                                              quality=75)
    out = work / "runs" / "tiny-holdout"
    result = _cli("train", str(work / "cxr"), str(other), *SMOKE, "--epochs", "1", "--out", str(out),
                  "--cache-dir", str(work / "cache"), "--holdout-source", "other", "--map", "Normal=NORMAL",
                  "--map", "Viral Pneumonia=PNEUMONIA", "--map", "Covid=", "--class-weights", "source-class")
    return out, result.stdout


def test_holdout_source_is_scored_as_the_external_split(holdout_run, work):
    out, stdout = holdout_run
    split = pd.read_csv(out / "split.csv")
    other = split[split["source"] == "other"]
    # Every film of the held-out source is external (never train or val), except the near-copy of a training
    # film, which is dropped in favour of the original (whose name carries its patient).
    assert set(other["split"]) == {"external", "duplicate"}
    copy = other[other["path"] == "Normal/copy-of-a-kermany-film.jpeg"].iloc[0]
    assert copy["split"] == "duplicate" and copy["duplicate_kind"] == "near"
    assert copy["duplicate_of"].startswith("cxr/NORMAL/")
    assert (split[split["source"] == "cxr"]["split"] != "external").all()
    assert "near-duplicates (thumbnail correlation >= 0.99): dropped 1 films; other (copy of cxr): 1" in stdout

    m = json.loads((out / "metrics.json").read_text())
    external = m["external"]
    test_keys = {k for k in m if k not in ("external", "by_split", "split", "skipped", "unmapped_folders")}
    assert test_keys <= set(external) and external["split"] == "external" and external["sources"] == ["other"]
    # 24 films linked; the data itself holds one byte-identical pair among them (Viral Pneumonia 019/020).
    n_ext = int((other["split"] == "external").sum())
    assert n_ext == 23 and external["n"] == n_ext and np.sum(external["confusion_matrix"]) == n_ext
    assert set(m["by_split"]) == {"train", "val", "test", "external"}
    per = m["by_split"]["external"]["by_source"]["other"]["per_class"]
    assert per["NORMAL"]["n"] == 12 and per["PNEUMONIA"]["n"] == 11
    assert per["NORMAL"]["called"]["NORMAL"] + per["NORMAL"]["called"]["PNEUMONIA"] == 12
    assert per["PNEUMONIA"]["auc"] is not None and 0 <= per["PNEUMONIA"]["auc"] <= 1
    for name in ("train", "val", "test", "external"):
        fam = m["by_split"][name]["familiarity"]
        assert fam["right"] + fam["wrong"] == fam["n"] == m["by_split"][name]["n"]

    preds = pd.read_csv(out / "predictions.csv")
    ext = preds[preds["split"] == "external"]
    assert len(ext) == n_ext and set(ext["source"]) == {"other"}
    card = card_lib.load(out)
    assert card.metrics["external"]["n"] == n_ext and card.metrics["external"]["sources"] == ["other"]
    # The held-out source is not among the sources the model was trained on (it was, in the card's words, before).
    assert card.limitations[0].startswith("Trained on cxr;")
    assert not any("different sources" in line for line in card.limitations)
    # The familiarity threshold is the validation percentile; the flags in predictions.csv follow it.
    val = preds[preds["split"] == "val"]
    assert card.familiarity["threshold"] == pytest.approx(np.percentile(val["familiarity"], 99.0), rel=1e-6)
    assert (preds["unfamiliar"] == (preds["familiarity"] > card.familiarity["threshold"])).all()
    assert card.familiarity["sha256"] == card_lib.sha256_of(out / "familiarity.npz")
    assert set(card.recipe["augmentation"]) >= {"rotation", "zoom", "gamma", "blur", "sharpen", "noise"}


def test_holdout_source_must_name_a_source(work, tmp_path):
    config = TrainConfig(data=[str(work / "cxr")], out=str(tmp_path / "x"), architecture="tiny", input_size=32,
                         epochs=1, holdout_source="nowhere", cache_dir=str(work / "cache"))
    with pytest.raises(ValueError, match=r"--holdout-source nowhere: no such source; the sources are \['cxr'\]"):
        run(config, log=lambda _: None)


def _split(sources: list[str], labels: list[int]) -> dataset.Split:
    from training import data

    records = [data.Record(Path(f"/{i}"), f"{i}", s, str(y)) for i, (s, y) in enumerate(zip(sources, labels,
                                                                                            strict=True))]
    return dataset.Split(records, np.zeros((len(labels), 2, 2), np.uint8), np.array(labels))


def test_source_class_weights_give_every_cell_the_same_total():
    # A big pediatric source (90 normal, 300 pneumonia) and a small adult one (30, 20).
    split = _split(["kids"] * 390 + ["adults"] * 50, [0] * 90 + [1] * 300 + [0] * 30 + [1] * 20)
    w = dataset.sample_weights(split, 2, "source-class")
    assert w.mean() == pytest.approx(1.0)
    totals = [w[:90].sum(), w[90:390].sum(), w[390:420].sum(), w[420:].sum()]
    np.testing.assert_allclose(totals, [110.0] * 4, rtol=1e-6)
    # Class balance alone leaves the adults' 50 films under a sixth of the weight; per cell they get half.
    balanced = dataset.sample_weights(split, 2, "balanced")
    assert balanced[390:].sum() / balanced.sum() < 0.16
    assert w[390:].sum() / w.sum() == pytest.approx(0.5)
    # A cell of two films is capped instead of being repeated into overfitting.
    tiny = _split(["a"] * 998 + ["b"] * 2, [0] * 500 + [1] * 498 + [1] * 2)
    wt = dataset.sample_weights(tiny, 2, "source-class")
    assert wt[-1] == pytest.approx(dataset.MAX_CELL_WEIGHT, rel=1e-5) and wt.mean() == pytest.approx(1.0)
    assert wt[:500].sum() == pytest.approx(wt[500:998].sum(), rel=1e-5)  # the other cells keep equal totals
    assert dataset.sample_weights(split, 2, "none") is None
    # Class balance alone gave a class of two films among 998 about 250 times the weight of the others.
    few = _split(["a"] * 1000, [0] * 998 + [1] * 2)
    rare = dataset.sample_weights(few, 2, "balanced")
    raw = dataset.class_weights(few.labels, 2)[few.labels]
    assert raw.max() / raw.mean() > 100 and rare.max() == pytest.approx(dataset.MAX_CELL_WEIGHT, rel=1e-5)
    assert rare.mean() == pytest.approx(1.0) and rare[:-2].std() == pytest.approx(0.0, abs=1e-6)


def test_acquisition_augmentations_do_what_they_say():
    rng = np.random.default_rng(0)
    x = np.repeat(rng.uniform(0, 255, (8, 32, 32, 1)), 3, axis=-1).astype(np.float32)
    gamma = build.RandomGamma(0.5, seed=1)
    y = np.asarray(gamma(x, training=True))
    # Each image is one power law of the input: log(y/255) / log(x/255) is one gamma per image, within bounds.
    ratio = np.log(np.clip(y / 255, 1e-6, 1)) / np.log(np.clip(x / 255, 1e-6, 1 - 1e-6))
    per_image = ratio.reshape(8, -1)
    mid = (x.reshape(8, -1) > 20) & (x.reshape(8, -1) < 235)
    g = np.array([np.median(r[m]) for r, m in zip(per_image, mid, strict=True)])
    assert np.allclose([np.ptp(r[m]) for r, m in zip(per_image, mid, strict=True)], 0, atol=1e-3)
    assert (g >= 1 / 1.5 - 1e-4).all() and (g <= 1.5 + 1e-4).all() and np.ptp(g) > 0.05
    np.testing.assert_array_equal(np.asarray(gamma(x, training=False)), x)

    noise = build.RandomNoise(5.0, seed=2)
    n = np.asarray(noise(np.full((4, 64, 64, 3), 128.0, np.float32), training=True))
    assert np.std(n - 128.0) == pytest.approx(5.0, rel=0.05)
    assert (n[..., 0] == n[..., 1]).all() and (n[..., 1] == n[..., 2]).all()  # grey stays grey, as served
    assert np.asarray(noise(np.zeros((1, 16, 16, 3), np.float32), training=True)).min() == 0.0  # clipped
    np.testing.assert_array_equal(np.asarray(noise(x, training=False)), x)

    config = TrainConfig(data=[], rotation=0, zoom=0, shift=0, contrast=0, brightness=0, blur=0, gamma=0, noise=0,
                         sharpen=0.9)
    sharpen = build.augmentation(config)
    assert [type(layer) for layer in sharpen.layers] == [keras.layers.RandomSharpness]
    smooth = np.tile(np.linspace(0, 255, 32, dtype=np.float32), (32, 1))
    step = np.where(smooth > 127, 200.0, 50.0).astype(np.float32)
    batch = np.repeat(step[None, :, :, None], 3, axis=-1).repeat(8, axis=0)
    sharp = np.asarray(sharpen(batch, training=True))

    # The step between columns 15 and 16, inside the film (the border's zero padding makes edges of its own):
    # sharpening raises it on every film (50 -> 200 is a step of 150), by up to 0.9 x (its 3x3 smoothing's
    # step deficit), and never lowers it, which blurring would.
    steps = sharp[:, 2:-2, 16, 0] - sharp[:, 2:-2, 15, 0]
    assert (steps >= 150 - 1e-3).all() and steps.max() > 170 and np.ptp(steps.mean(axis=1)) > 5

    off = TrainConfig(data=[], gamma=0, noise=0, sharpen=0)
    assert {"gamma", "noise", "sharpen"}.isdisjoint(build.describe_augmentation(off))
    assert build.describe_augmentation(TrainConfig(data=[], augment=False)) == {}


def test_batchnorm_trains_when_continuing_our_model_if_asked():
    model = models.build("tiny", 2, 32)
    build.set_phase(model, "fine-tune", "all", pretrained=True, freeze_batchnorm=False)
    assert {la.name for la in model.layers if la.trainable and la.weights} >= {"tiny_bn0", "tiny_bn1"}
    build.set_phase(model, "fine-tune", "all", pretrained=True)
    assert not {la.name for la in model.layers if la.trainable and la.weights} & {"tiny_bn0", "tiny_bn1"}


def test_rescore_adds_familiarity_and_an_external_source_without_touching_the_weights(first_run, work, tmp_path):
    out = tmp_path / "rescored"
    shutil.copytree(first_run[0], out)
    before = json.loads((out / "metrics.json").read_text())
    weights = (out / "model.weights.h5").read_bytes()
    external = work / "elsewhere"
    _link(COVID_SET / "Normal", external / "Normal", 6)
    _link(COVID_SET / "Viral Pneumonia", external / "Viral Pneumonia", 6)
    _link(COVID_SET / "Covid", external / "Covid", 2)
    result = _cli("rescore", str(out), "--external", str(external), "--map", "Normal=NORMAL",
                  "--map", "Viral Pneumonia=PNEUMONIA", "--cache-dir", str(work / "cache"))
    assert "external: skipped folder elsewhere/Covid" in result.stdout
    assert (out / "model.weights.h5").read_bytes() == weights
    after = json.loads((out / "metrics.json").read_text())
    # Same weights, same split: the test figures are reproduced exactly.
    assert after["n"] == before["n"] and after["accuracy"] == pytest.approx(before["accuracy"])
    assert after["auc"] == pytest.approx(before["auc"])
    assert after["external"]["n"] == 12 and after["external"]["sources"] == ["elsewhere"]
    classifier = models.load(out)
    assert classifier.familiarity is not None
    card = classifier.card
    assert card.training_data["external_sources"] == ["elsewhere"]
    assert card.recipe["rescored"]["external"] == [str(external)]
    preds = pd.read_csv(out / "predictions.csv")
    ext = preds[preds["split"] == "external"]
    assert len(ext) == 12 and ext["familiarity"].notna().all()
    # What is served is what was scored: the served familiarity equals predictions.csv's.
    pixels = [imaging.load(external / p).pixels for p in ext["path"]]
    served = classifier.predict_pixels(pixels)
    np.testing.assert_allclose([p.familiarity for p in served], ext["familiarity"], rtol=1e-4)


def test_rescore_external_keeps_the_held_out_source_and_does_not_score_val_or_test_films_again(holdout_run, work,
                                                                                                  tmp_path):
    """--external replaced the external split: the source held out in training vanished from metrics.json and
    predictions.csv while the card still named it; and the model's own val and test films (which chose its epoch
    and thresholds) were scored as external when they sat in the given folder."""
    from training import rescore

    out = tmp_path / "rescored-holdout"
    shutil.copytree(holdout_run[0], out)
    split = pd.read_csv(out / "split.csv")
    held = int((split["split"] == "external").sum())
    external = tmp_path / "more"
    own = split[(split["source"] == "cxr") & split["split"].isin(["val", "test"])].head(4)
    assert len(own) == 4
    for rel, label in zip(own["path"], own["class"], strict=True):  # the model's own val/test films, renamed
        (external / label).mkdir(parents=True, exist_ok=True)
        (external / label / f"again-{Path(rel).name}").symlink_to(work / "cxr" / rel)
    _link(COVID_SET / "Normal", external / "NORMAL", 3, offset=40)  # films it never saw
    lines: list[str] = []
    external = external.rename(external.parent / "other")  # named like the held-out source (its test/ beside train/)
    rescore.run(out, [str(external)], cache_dir=str(work / "cache"), log=lines.append)
    said = "\n".join(lines)
    assert "4 of its val, test or held-out films (scored there already)" in said
    after = json.loads((out / "metrics.json").read_text())
    # named apart from the model's own sources, so the two folders' figures and keys stay apart
    assert after["external"]["n"] == held + 3 and after["external"]["sources"] == ["other", "other-2"]
    preds = pd.read_csv(out / "predictions.csv")
    ext = preds[preds["split"] == "external"]
    assert sorted(ext["source"].value_counts().items()) == [("other", held), ("other-2", 3)]
    assert not ext["path"].str.startswith(("NORMAL/again-", "PNEUMONIA/again-")).any()


def test_a_class_named_with_markdown_is_refused_before_training_with_how_to_rename_it(tmp_path):
    """A class folder 'Effusion*' would become emphasis on every page and was only refused when the card was
    written, hours later: it is refused before anything is decoded, with the way out (--map)."""
    _link(KERMANY / "NORMAL", tmp_path / "d" / "NORMAL", 4)
    _link(KERMANY / "PNEUMONIA", tmp_path / "d" / "Effusion*", 4)
    said = _cli_fails("train", str(tmp_path / "d"), *SMOKE, "--out", str(tmp_path / "out"))
    assert "class 'Effusion*'" in said and "--map FOLDER=NAME" in said
    assert not (tmp_path / "out" / "model.weights.h5").exists()


def test_rescore_reads_moved_training_data_from_data_and_refuses_missing_folders(first_run, work, tmp_path):
    """A model whose training folders moved: rescore says which folder is missing and how to go on, before loading
    the model; with --data naming them where they are now (same folder name) it reproduces the test figures."""
    out = tmp_path / "moved" / "model"
    shutil.copytree(first_run[0], out)
    card = card_lib.read(out)
    assert card.recipe["data"] == [str(work / "cxr")]
    card.recipe["data"] = [str(tmp_path / "gone" / "cxr")]  # where it was trained
    card.recipe["weights"] = str(tmp_path / "gone" / "start")  # its start's folder, gone since
    card_lib.save(card, out)
    before = json.loads((out / "metrics.json").read_text())
    said = _cli_fails("rescore", str(out), "--cache-dir", str(work / "cache"))
    assert f"training data folder(s) {tmp_path / 'gone' / 'cxr'} are not here" in said and "--data DIR" in said
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "data").mkdir(parents=True)
    said = _cli_fails("rescore", str(out), "--data", str(elsewhere / "data"))
    assert "--data gives the sources ['data']; the model's split names ['cxr']" in said
    from training import rescore  # two folders of one name are told apart by their order, as the run named them

    recipe = ["/old/kermany/train", "/old/nih", "/old/kermany/test"]
    (tmp_path / "new" / "kermany" / "train").mkdir(parents=True)
    (tmp_path / "new" / "kermany" / "test").mkdir(parents=True)
    (tmp_path / "new" / "nih").mkdir(parents=True)
    new = [str(tmp_path / "new" / n) for n in ("kermany/train", "nih", "kermany/test")]
    assert rescore.data_roots(recipe, new) == new
    with pytest.raises(ValueError, match="in the recipe's order"):
        rescore.data_roots(recipe, [new[2], new[1], new[0]])  # train's rows would be read from test
    result = _cli("rescore", str(out), "--data", str(work / "cxr"), "--cache-dir", str(work / "cache"))
    # what its weights trained on is read from its own split.csv, not from the start's folder named in the recipe
    assert "starting weights' folder" not in result.stdout and str(tmp_path / "gone" / "start") not in result.stdout
    after = json.loads((out / "metrics.json").read_text())
    assert after["n"] == before["n"] and after["accuracy"] == pytest.approx(before["accuracy"])
    assert after["auc"] == pytest.approx(before["auc"])
    assert card_lib.read(out).recipe["rescored"]["data"] == [str(work / "cxr")]


def _write_split(rows: list[dict[str, str]], path: Path) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_resume_refuses_a_split_that_holds_out_films_the_checkpoint_trained_on(first_run, work, tmp_path):
    """--resume with another --split-manifest (or a split made afresh) continued the checkpoint's weights on
    whatever split came out: films it trained on could sit in val or test and be scored. The checkpoint lists
    what it trained on; such a split is refused, the run's own resumes."""
    out = tmp_path / "tiny-leak"
    shutil.copytree(first_run[0], out)
    rows = list(csv.DictReader((out / "split.csv").open(newline="")))
    trained = pd.read_csv(out / ".ckpt" / "trained.csv", dtype=str, keep_default_na=False)
    assert sorted(trained["key"]) == sorted(f"{r['source']}/{r['path']}" for r in rows if r["split"] == "train")
    moved = [r["path"] for r in rows if r["split"] == "train"][:3]
    other = tmp_path / "other-split.csv"
    _write_split([{**r, "split": "test" if r["path"] in moved else r["split"]} for r in rows], other)
    config = TrainConfig(data=[str(work / "cxr")], out=str(out), architecture="tiny", input_size=32, batch_size=16,
                         epochs=2, cache_dir=str(work / "cache"), verbose=0, resume=True)
    with pytest.raises(ValueError, match=r"trained on \d+ films that this run's split holds out .*e\.g\. cxr/"):
        run(dataclasses.replace(config, split_manifest=str(other)), log=lambda _: None)
    assert json.loads((out / ".ckpt" / "state.json").read_text())["epoch"] == 1  # nothing trained
    run(config, log=lambda _: None)  # its own split.csv: resumes
    assert json.loads((out / ".ckpt" / "state.json").read_text())["epoch"] == 2


def test_a_manifest_film_that_cannot_be_read_keeps_its_row_and_an_unreadable_file_does_not_stop_a_scan(
        first_run, work, tmp_path, monkeypatch):
    """A film of the split manifest missing on this machine was dropped from the new split.csv, train rows too:
    the weights' record of what they trained on lost it. Its row is kept as it was; the run says so. A file that
    cannot even be hashed in a fresh scan (no permission) is skipped with its reason instead of a traceback."""
    data_dir = tmp_path / "cxr"
    shutil.copytree(work / "cxr", data_dir, symlinks=True)
    rows = list(csv.DictReader((first_run[0] / "split.csv").open(newline="")))
    gone = {split: next(r["path"] for r in rows if r["split"] == split) for split in ("train", "val")}
    for rel in gone.values():
        (data_dir / rel).unlink()
    lines: list[str] = []
    out = tmp_path / "tiny-unread"
    run(TrainConfig(data=[str(data_dir)], out=str(out), architecture="tiny", input_size=32, batch_size=16,
                    epochs=1, cache_dir=str(work / "cache"), verbose=0, split_manifest=str(first_run[0] / "split.csv")),
        log=lines.append)
    assert any("2 films of the split manifest could not be read (train 1, val 1)" in line for line in lines), lines
    kept = {r["path"]: r for r in csv.DictReader((out / "split.csv").open(newline=""))}
    for split, rel in gone.items():
        assert kept[rel]["split"] == split and kept[rel]["sha256"]
    assert len(kept) == len(rows)

    from training import data

    blocked = (data_dir / "NORMAL" / sorted(p.name for p in (data_dir / "NORMAL").iterdir())[0]).resolve()
    real = data.file_sha256

    def sha(path: Path) -> str:
        if Path(path) == blocked:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(data, "file_sha256", sha)
    found = data.scan([str(data_dir)], {}, known=["NORMAL"])
    kept_records, duplicates = data.deduplicate(found.records)
    assert blocked in [r.path for r in kept_records] and not [d for d in duplicates if d.path == blocked]


def test_a_class_too_small_for_every_split_is_said_and_its_weight_capped(work, tmp_path):
    """Two films of a third class: it lands in train only. Nothing said so; the model silently used the top-class
    rule (no threshold can be fitted without validation films of the class) and the class's films got ~20 times
    the weight of the others."""
    root = tmp_path / "cxr"
    _link(KERMANY / "NORMAL", root / "NORMAL", 30)
    _link(KERMANY / "PNEUMONIA", root / "PNEUMONIA", 30)
    _link(KERMANY / "PNEUMONIA", root / "RARE", 2, offset=100)
    lines: list[str] = []
    out = run(TrainConfig(data=[str(root)], out=str(tmp_path / "tiny-rare"), architecture="tiny", input_size=32,
                          batch_size=16, epochs=1, cache_dir=str(work / "cache"), verbose=0,
                          class_weights="balanced"), log=lines.append)
    said = [line for line in lines if "split has no films of RARE" in line]
    assert len(said) == 2 and "top-class rule" in said[0] and "test figures cannot be computed" in said[1], lines
    assert card_lib.load(out).thresholds == {}


def test_rescore_external_matches_class_folders_by_name_whatever_their_case(first_run, work, tmp_path):
    """Without --map, folders 'normal'/'Pneumonia' were not the model's NORMAL/PNEUMONIA (a case-sensitive
    match): everything was silently dropped and the log said 'external: 0 films'. Now they match, a folder
    naming no class is said, and a set with none is refused."""
    from training import rescore

    out = tmp_path / "rescored-case"
    shutil.copytree(first_run[0], out)
    external = tmp_path / "elsewhere"
    _link(COVID_SET / "Normal", external / "normal", 3)
    _link(COVID_SET / "Viral Pneumonia", external / "Pneumonia", 3)
    _link(COVID_SET / "Covid", external / "Covid", 2)
    lines: list[str] = []
    rescore.run(out, [str(external)], cache_dir=str(work / "cache"), log=lines.append)
    assert any("skipped folder elsewhere/Covid (2 films)" in line and "--map 'Covid=CLASS'" in line
               for line in lines), lines
    ext = pd.read_csv(out / "predictions.csv").query("split == 'external'")
    assert sorted(ext["true_class"].value_counts().items()) == [("NORMAL", 3), ("PNEUMONIA", 3)]
    with pytest.raises(ValueError, match="no folder maps to the model's classes"):
        rescore.run(out, [str(external / "Covid")], cache_dir=str(work / "cache"), log=lambda _: None)


def test_rescore_external_leaves_out_other_films_of_patients_the_model_trained_on(first_run, work, tmp_path):
    """--external KERMANY/test is the same source as the model's KERMANY/train, and Kermany's patients have several
    films: one of a training patient's other films was scored as 'never seen'."""
    from training import data, rescore

    out = tmp_path / "rescored-patients"
    shutil.copytree(first_run[0], out)
    rows = list(csv.DictReader((out / "split.csv").open(newline="")))
    linked = {r["path"] for r in rows}
    trained = {r["patient"] for r in rows if r["split"] == "train" and r["patient"]}
    other = next(p for p in sorted((KERMANY / "PNEUMONIA").iterdir())
                 if data.patient_id(p.name) in trained and f"PNEUMONIA/{p.name}" not in linked)
    external = tmp_path / "x" / "cxr" / "test"  # the source the model trained on: 'cxr' (work/cxr)
    _link(KERMANY / "NORMAL", external / "NORMAL", 2, offset=200)
    (external / "PNEUMONIA").mkdir(parents=True)
    (external / "PNEUMONIA" / other.name).symlink_to(other)
    fresh = next(p for p in sorted((KERMANY / "PNEUMONIA").iterdir(), reverse=True)
                 if data.patient_id(p.name) not in trained)
    (external / "PNEUMONIA" / fresh.name).symlink_to(fresh)
    lines: list[str] = []
    rescore.run(out, [str(external)], cache_dir=str(work / "cache"), log=lines.append)
    said = ("the model's weights (or their start) trained on 1 films of this run's held-out splits, on copies of "
            "them or on their patients' other films: left out of scoring (external 1)")
    assert any(said in line for line in lines), lines
    ext = pd.read_csv(out / "predictions.csv").query("split == 'external'")
    assert other.name not in " ".join(ext["path"]) and fresh.name in " ".join(ext["path"]) and len(ext) == 3


ALL_OFF = {"rotation": 0, "zoom": 0, "shift": 0, "contrast": 0, "brightness": 0, "blur": 0, "gamma": 0, "noise": 0,
           "sharpen": 0}


def _only(name: str, value: float) -> keras.Sequential:
    """The run's augmentation with only ``name`` on (at ``value``): one layer."""
    layers = build.augmentation(TrainConfig(data=[], seed=5, **{**ALL_OFF, name: value}))
    assert len(layers.layers) == 1, layers.layers
    return layers


def _bright(batch: np.ndarray) -> list[np.ndarray]:
    """Per film, the (row, column) coordinates of its bright pixels."""
    return [np.argwhere(film[..., 0] > 127) for film in batch]


def test_geometric_augmentations_stay_within_their_bounds_and_vary_per_film():
    """Rotation, zoom and shift (issue 10's acquisition shift), each alone on 16 films: a bar through the centre
    turns by at most the rotation bound; a centred square keeps its centre and changes its side by at most the zoom
    bound; a square moves by at most the shift bound and keeps its size. Each draws anew per film; at 0 each is off."""
    n, size = 16, 64
    bar = np.zeros((n, size, size, 3), np.float32)
    bar[:, 31:33, 8:56] = 255.0
    turned = np.asarray(_only("rotation", 0.05)(bar, training=True))  # +-18 degrees
    angles = []
    for points in _bright(turned):
        centred = points - points.mean(axis=0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        angle = np.degrees(np.arctan2(vt[0][0], vt[0][1]))
        angles.append((angle + 90) % 180 - 90)
    assert max(abs(a) for a in angles) <= 18 + 2 and np.ptp(angles) > 5, angles

    square = np.zeros((n, size, size, 3), np.float32)
    square[:, 24:40, 24:40] = 255.0
    zoomed = np.asarray(_only("zoom", 0.15)(square, training=True))
    sides = [np.sqrt(len(points)) for points in _bright(zoomed)]
    centres = [points.mean(axis=0) for points in _bright(zoomed)]
    assert all(16 / 1.15 - 1 <= s <= 16 / 0.85 + 1 for s in sides) and np.ptp(sides) > 1, sides
    assert all(np.abs(c - 31.5).max() <= 1.0 for c in centres), centres  # about the centre

    moved = np.asarray(_only("shift", 0.1)(square, training=True))  # up to 6.4 px each way
    offsets = np.array([points.mean(axis=0) - 31.5 for points in _bright(moved)])
    assert np.abs(offsets).max() <= 6.4 + 0.5 and np.ptp(offsets[:, 0]) > 2 and np.ptp(offsets[:, 1]) > 2, offsets
    assert all(abs(len(points) - 256) <= 32 for points in _bright(moved))  # moved, not resized
    for layers in (_only("rotation", 0.05), _only("zoom", 0.15), _only("shift", 0.1)):
        np.testing.assert_array_equal(np.asarray(layers(square, training=False)), square)


def test_exposure_and_blur_augmentations_do_what_the_card_says():
    """Contrast scales each film about its mean by a factor within [1 - c, 1 + c]; brightness adds one offset per
    film within +-b of the full range; blur smooths some films with a 3x3 Gaussian and leaves the others as they
    are (never sharpens). Mid-grey films, so that nothing is clipped."""
    rng = np.random.default_rng(1)
    films = np.repeat(rng.uniform(80, 176, (16, 32, 32, 1)), 3, axis=-1).astype(np.float32)

    contrasted = np.asarray(_only("contrast", 0.2)(films, training=True))
    factors = contrasted.reshape(16, -1).std(axis=1) / films.reshape(16, -1).std(axis=1)
    assert (factors >= 0.8 - 1e-3).all() and (factors <= 1.2 + 1e-3).all() and np.ptp(factors) > 0.1, factors
    np.testing.assert_allclose(contrasted.reshape(16, -1).mean(axis=1), films.reshape(16, -1).mean(axis=1),
                               atol=0.5)

    brightened = np.asarray(_only("brightness", 0.1)(films, training=True))
    offsets = (brightened - films).reshape(16, -1)
    assert np.allclose(offsets.std(axis=1), 0, atol=1e-3)  # one offset per film
    assert np.abs(offsets[:, 0]).max() <= 25.5 + 1e-3 and np.ptp(offsets[:, 0]) > 5, offsets[:, 0]

    blurred = np.asarray(_only("blur", 1.0)(films, training=True))

    def roughness(batch: np.ndarray) -> np.ndarray:  # mean absolute difference between neighbours, inside
        inside = batch[:, 2:-2, 2:-2, 0]
        return np.abs(np.diff(inside, axis=2)).mean(axis=(1, 2))

    before, after = roughness(films), roughness(blurred)
    changed = np.abs(blurred - films).reshape(16, -1).max(axis=1) > 1e-3
    assert (after <= before + 1e-3).all() and changed.any(), (before, after)
    assert (after[changed] < before[changed]).all()  # a changed film is smoothed (sigma is drawn per batch)
    for name, value in (("contrast", 0.2), ("brightness", 0.1), ("blur", 1.0)):
        np.testing.assert_array_equal(np.asarray(_only(name, value)(films, training=False)), films)
    assert build.augmentation(TrainConfig(data=[], **ALL_OFF)).layers == []


def _cli_fails(*args: str) -> str:
    """Run the CLI expecting a refusal: exit code 2 and one 'error: ...' line, no traceback. Returns the message."""
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    full_env.pop("CXR_TRACEBACK", None)
    result = subprocess.run([sys.executable, "-m", "training", *args], cwd=REPO, env=full_env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stdout + result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    return line


def test_resume_refuses_settings_that_train_differently_and_says_what_may_change(first_run, work, tmp_path):
    """--resume with another optimizer, input size or augmentation, or without the starting weights, would continue
    the checkpoint as another run (its recipe then naming what never trained): refused, naming the setting. What
    depends on the machine (batch size) may change, and the log says so."""
    out = tmp_path / "tiny-resumed"
    shutil.copytree(first_run[0], out)
    base = [str(work / "cxr"), *SMOKE, "--epochs", "2", "--out", str(out), "--cache-dir", str(work / "cache"),
            "--resume"]
    state = json.loads((out / ".ckpt" / "state.json").read_text())
    assert state["settings"]["optimizer"] == "adamax" and state["settings"]["input_size"] == 32
    said = _cli_fails(*base, "--optimizer", "adam")
    assert "optimizer ('adamax' there, 'adam' here)" in said and "another --out" in said
    assert "noise (2.0 there, 0.0 here)" in _cli_fails(*base, "--noise", "0")
    assert json.loads((out / ".ckpt" / "state.json").read_text()) == state  # nothing trained
    smaller = [a if a != "16" else "8" for a in base]  # --batch-size 8
    result = _cli(*smaller)
    assert "resuming with batch_size 8 (was 16)" in result.stdout and "Epoch 2/2" in result.stdout


def test_the_cli_says_what_was_wrong_instead_of_a_traceback(work, tmp_path):
    """Bad settings and data layouts end in one 'error:' line and exit code 2, found before any film is read where
    they can be: split fractions, a --config file's values (a "false" that would count as true), a folder holding
    split folders beside class folders, a model folder that does not exist."""
    out = str(tmp_path / "never")
    assert "summing to 1" in _cli_fails(str(work / "cxr"), *SMOKE, "--out", out, "--split", "0.8,0.2,0.1")
    config = tmp_path / "settings.json"
    config.write_text(json.dumps({"augment": "perhaps"}))
    assert "setting 'augment' must be true or false" in _cli_fails(str(work / "cxr"), "--config", str(config),
                                                                     "--out", out)
    mixed = tmp_path / "mixed"
    _link(COVID_SET / "Normal", mixed / "NORMAL", 2)
    _link(COVID_SET / "Viral Pneumonia", mixed / "PNEUMONIA", 2)
    _link(COVID_SET / "Normal", mixed / "test" / "NORMAL", 2, offset=5)
    said = _cli_fails(str(mixed), *SMOKE, "--out", out)
    assert "holds split folders (test)" in said and "NORMAL, PNEUMONIA" in said
    assert "is not a model folder: it has no model_card.json" in _cli_fails("evaluate", str(tmp_path / "no-model"),
                                                                             str(mixed), "--out", out)
    assert "is the model folder" in _cli_fails("evaluate", str(mixed), str(mixed), "--out", str(mixed))
    only_test = tmp_path / "only-test"  # a class with test films but no training films: a head it cannot learn
    _link(COVID_SET / "Normal", only_test / "train" / "NORMAL", 12)
    _link(COVID_SET / "Viral Pneumonia", only_test / "train" / "PNEUMONIA", 12)
    _link(COVID_SET / "Covid", only_test / "test" / "COVID", 2)
    assert "the train split has no films of COVID" in _cli_fails(str(only_test), *SMOKE, "--out", out, "--cache-dir",
                                                                  str(work / "cache"))
    assert not Path(out).exists()
