"""The model metrics page (AppTest): held-out charts from a model folder's files, the threshold
slider, a folder without evaluation files, and evaluate-on-a-labelled-folder with a bad file."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from app_models import evaluated_model, labelled_folder
from streamlit.testing.v1 import AppTest

import ui
from cxr_core import card as card_lib
from cxr_core import evaluation_view as ev
from cxr_core import metrics, models
from cxr_core.card import RESEARCH_USE

PAGE = str(Path(__file__).resolve().parents[1] / "pages" / "metrics.py")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("data_root")
    images = labelled_folder(root / "eval")
    models_root = tmp_path_factory.mktemp("models_root")
    folder, predictions = evaluated_model(tiny_model_dir, models_root, images)
    return root, models_root, folder, predictions


def run_page(monkeypatch, models_root, data_root=None) -> AppTest:
    monkeypatch.setenv("CXR_MODELS_DIR", str(models_root))
    if data_root is None:
        monkeypatch.delenv("CXR_DATA_ROOT", raising=False)
    else:
        monkeypatch.setenv("CXR_DATA_ROOT", str(data_root))
    return AppTest.from_file(PAGE, default_timeout=120).run()


def labels_probs(predictions):
    y = (predictions["true_class"] == "PNEUMONIA").to_numpy(int)
    return y, predictions[["p_NORMAL", "p_PNEUMONIA"]].to_numpy(float)


def metric(at: AppTest, label: str, index: int = 0) -> str:
    return [m for m in at.metric if m.label == label][index].value


def plotly_array(value) -> np.ndarray:
    """A plotly JSON array: a plain list, or the typed-array form {dtype, bdata (base64), shape}."""
    if isinstance(value, dict):
        shape = tuple(int(n) for n in str(value.get("shape", "-1")).split(","))
        return np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"]).reshape(shape)
    return np.asarray(value)


def charts(at: AppTest) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def test_held_out_charts_show_the_numbers_of_the_predictions(setup, monkeypatch):
    root, models_root, _, predictions = setup
    at = run_page(monkeypatch, models_root, root)
    assert not at.exception
    assert at.warning[0].value == RESEARCH_USE
    assert len(predictions) == 8  # 4 + 4 real images; the broken file was skipped
    y, probs = labels_probs(predictions)
    roc = metrics.roc_curves(y, probs, ["NORMAL", "PNEUMONIA"])
    names = [t["name"] for c in charts(at) for t in c["data"] if "AUC" in str(t.get("name"))]
    assert f"PNEUMONIA (AUC {roc['PNEUMONIA']['auc']:.3f})" in names
    assert metric(at, "Images") == "8"
    rates = metrics.binary_at_threshold(y, probs[:, 1], 0.5)
    assert metric(at, "Sensitivity") == f"{rates['sensitivity']:.3f}"
    assert metric(at, "Specificity") == f"{rates['specificity']:.3f}"
    counts = [c for c in charts(at) if c["layout"].get("title", {}).get("text") == "Counts"][0]
    assert plotly_array(counts["data"][0]["z"]).tolist() == [[rates["tn"], rates["fp"]], [rates["fn"], rates["tp"]]]
    subheaders = [s.value for s in at.subheader]
    for title in ("ROC curve per class", "Operating point", "Classification report", "Training curves",
                  "Data the model was trained and tested on"):
        assert title in subheaders
    assert any(s.startswith("Calibration (ECE ") for s in subheaders)


def test_threshold_slider_moves_sensitivity_and_specificity(setup, monkeypatch):
    root, models_root, _, predictions = setup
    at = run_page(monkeypatch, models_root, root)
    y, probs = labels_probs(predictions)
    for threshold in (0.2, float(np.median(probs[:, 1])), 0.9):
        at.slider(key="held_out_threshold").set_value(round(threshold, 2)).run()
        rates = metrics.binary_at_threshold(y, probs[:, 1], round(threshold, 2))
        assert metric(at, "Sensitivity") == ("n/a" if rates["sensitivity"] is None else f"{rates['sensitivity']:.3f}")
        assert metric(at, "Specificity") == ("n/a" if rates["specificity"] is None else f"{rates['specificity']:.3f}")
        assert metric(at, "PPV") == ("n/a" if rates["ppv"] is None else f"{rates['ppv']:.3f}")
        assert metric(at, "NPV") == ("n/a" if rates["npv"] is None else f"{rates['npv']:.3f}")


def test_model_without_evaluation_files_says_what_is_missing(tiny_model3_dir, tmp_path, monkeypatch):
    shutil.copytree(tiny_model3_dir, tmp_path / tiny_model3_dir.name)
    at = run_page(monkeypatch, tmp_path)
    assert not at.exception and not at.error
    note = " ".join(i.value for i in at.info)
    assert "predictions.csv" in note and "history.csv" in note and "not in the model folder" in note
    assert "Set the environment variable CXR_DATA_ROOT" in note


def test_evaluate_on_a_labelled_folder_lists_the_skipped_file(setup, monkeypatch):
    root, models_root, _, predictions = setup
    at = run_page(monkeypatch, models_root, root)
    at.text_input(key="eval_path").set_value("eval")
    at.button(key="eval_run").click().run()
    assert not at.exception and not at.error
    assert any("Evaluated 8 images" in s.value for s in at.success)
    assert any("1 file(s) could not be read" in w.value for w in at.warning)
    skipped = [d.value for d in at.dataframe if "error" in d.value.columns][0]
    assert skipped["path"].tolist() == ["NORMAL/broken.jpeg"]
    assert "JPEG" in skipped["error"][0] or "damaged" in skipped["error"][0].lower()
    # The folder's charts use the same functions: its sensitivity equals cxr_core.metrics on the same images.
    y, probs = labels_probs(predictions)
    rates = metrics.binary_at_threshold(y, probs[:, 1], 0.5)
    assert metric(at, "Sensitivity", index=1) == f"{rates['sensitivity']:.3f}"
    at.slider(key="folder_threshold").set_value(0.9).run()
    strict = metrics.binary_at_threshold(y, probs[:, 1], 0.9)
    assert metric(at, "Sensitivity", index=1) == f"{strict['sensitivity']:.3f}"


@pytest.mark.parametrize("path", ["..", "eval/../..", "/etc"])
def test_paths_outside_the_data_root_are_refused(setup, monkeypatch, path):
    root, models_root, _, _ = setup
    at = run_page(monkeypatch, models_root, root)
    at.text_input(key="eval_path").set_value(path)
    at.button(key="eval_run").click().run()
    assert not at.exception
    assert any("outside the data root" in e.value for e in at.error)
    assert at.title[0].value == "Model metrics"


def test_symlink_out_of_the_data_root_is_refused(setup, monkeypatch, tmp_path):
    root, models_root, _, _ = setup
    link = root / "escape"
    link.symlink_to(tmp_path, target_is_directory=True)
    try:
        at = run_page(monkeypatch, models_root, root)
        at.text_input(key="eval_path").set_value("escape")
        at.button(key="eval_run").click().run()
        assert any("outside the data root" in e.value for e in at.error)
    finally:
        link.unlink()


def test_tampered_model_folder_gives_a_message_not_a_traceback(setup, tmp_path, monkeypatch):
    _, _, folder, _ = setup
    broken = tmp_path / folder.name
    shutil.copytree(folder, broken)
    with open(broken / "model.weights.h5", "ab") as fh:
        fh.write(b"tampered")
    at = run_page(monkeypatch, tmp_path)
    assert not at.exception
    assert any("does not match its model card" in e.value for e in at.sidebar.error)
    assert any("Choose a working model" in i.value for i in at.info)


def test_three_class_model_thresholds_one_class_against_the_rest(setup, tiny_model3_dir, tmp_path, monkeypatch):
    root, _, _, _ = setup
    folder, predictions = evaluated_model(tiny_model3_dir, tmp_path, root / "eval")
    # Half the PNEUMONIA films also reach the COVID-19 threshold, with COVID-19 more probable: the card's rule
    # calls them COVID-19, while P(PNEUMONIA) alone passes a low threshold.
    both = predictions.index[predictions["true_class"] == "PNEUMONIA"][::2]
    predictions.loc[both, ["p_NORMAL", "p_PNEUMONIA", "p_COVID-19"]] = [0.1, 0.3, 0.6]
    predictions.to_csv(folder / "predictions.csv", index=False)
    at = run_page(monkeypatch, tmp_path, root)
    assert not at.exception
    assert any("COVID-19: no ROC curve" in c.value for c in at.caption)
    at.selectbox(key="held_out_positive").set_value("PNEUMONIA").run()
    card = models.load(tiny_model3_dir).card
    assert card.thresholds  # the card's rule: the most probable of the classes that reach their thresholds
    y = (predictions["true_class"] == "PNEUMONIA").to_numpy(int)
    probs = predictions[[f"p_{c}" for c in card.class_names]].to_numpy(float)
    differs = False
    for threshold in (0.05, 0.2, 0.4):
        at.slider(key="held_out_threshold").set_value(threshold).run()
        called = ev.decisions(card, probs, {"PNEUMONIA": threshold}) == card.class_names.index("PNEUMONIA")
        rates = metrics.binary_at_threshold(y, called.astype(float), 0.5)  # what the card's rule calls
        assert metric(at, "Sensitivity") == f"{rates['sensitivity']:.3f}", threshold
        assert metric(at, "Specificity") == f"{rates['specificity']:.3f}", threshold
        plain = metrics.binary_at_threshold(y, probs[:, card.class_names.index("PNEUMONIA")], threshold)
        differs |= (plain["sensitivity"], plain["specificity"]) != (rates["sensitivity"], rates["specificity"])
    assert differs  # somewhere one-against-the-rest would have shown other figures than the rule gives
    titles = [c["layout"].get("title", {}).get("text") for c in charts(at)]
    assert "All classes under the card's rule at this threshold" in titles
    at.selectbox(key="held_out_positive").set_value("COVID-19").run()
    assert metric(at, "Sensitivity") == "n/a"  # no COVID-19 image in this set


def test_the_threshold_starts_at_the_card_threshold_of_each_positive_class(setup, tiny_model3_dir, tmp_path,
                                                                          monkeypatch):
    """The slider once kept the previous class's threshold (COVID-19's) under the label of the next (PNEUMONIA)."""
    root, _, _, _ = setup
    evaluated_model(tiny_model3_dir, tmp_path, root / "eval")
    thresholds = {"COVID-19": 0.3042, "PNEUMONIA": 0.7636}
    card_path = tmp_path / tiny_model3_dir.name
    card_lib.save(dataclasses.replace(card_lib.read(card_path), thresholds=thresholds), card_path)
    at = run_page(monkeypatch, tmp_path, root)
    assert not at.exception
    for positive in ("COVID-19", "PNEUMONIA", "COVID-19"):
        at.selectbox(key="held_out_positive").set_value(positive).run()
        assert at.slider(key="held_out_threshold").value == pytest.approx(thresholds[positive]), positive
        assert at.slider(key="held_out_threshold").label == f"Threshold on P({positive})"
    at.slider(key="held_out_threshold").set_value(0.5).run()  # a value the user chose stays while the class does
    assert at.slider(key="held_out_threshold").value == 0.5
    # Another page shown and back: Streamlit drops the slider's own state (not the page's marker of whose threshold
    # it shows); the slider came back at 0.00 under "The card's threshold is 0.3042". It starts at the card's again.
    back = AppTest.from_file(PAGE, default_timeout=120)
    back.session_state["held_out_threshold_for"] = at.session_state["held_out_threshold_for"]
    back.session_state["held_out_positive"] = "COVID-19"
    back.run()
    assert back.slider(key="held_out_threshold").value == pytest.approx(thresholds["COVID-19"])
    assert "0.3042" in back.slider(key="held_out_threshold").help
    assert back.slider(key="held_out_threshold").format == "%.4f"  # the card's four decimals, not "0.30"


def test_folder_with_a_class_folder_linked_out_of_the_root_is_refused(setup, monkeypatch, tmp_path):
    root, models_root, _, _ = setup
    (root / "linked").mkdir(exist_ok=True)
    link = root / "linked" / "NORMAL"
    link.symlink_to(tmp_path, target_is_directory=True)
    try:
        at = run_page(monkeypatch, models_root, root)
        at.text_input(key="eval_path").set_value("linked").run()
        at.button(key="eval_run").click().run()
        assert any("symlinks that lead outside the data root (NORMAL)" in e.value for e in at.error)
        assert not at.success
    finally:
        link.unlink()


def test_external_split_and_per_source_class_tables(setup, tmp_path, monkeypatch):
    """A run with a held-out source: the page sets its split beside the test split, per source and class."""
    from cxr_core import card as card_lib
    from cxr_core import familiarity
    from training import evaluate

    _, _, folder, predictions = setup
    models_root = tmp_path / "models"
    copy = models_root / folder.name
    shutil.copytree(folder, copy)
    card = card_lib.read(copy)
    y, probs = labels_probs(predictions)
    half = len(y) // 2
    rng = np.random.default_rng(0)
    fam = familiarity.Familiarity(np.zeros((1, 4)), np.eye(4)[:, :2], np.ones(2), 1.0, threshold=1.2)
    by_split = {}
    for name, idx, source in (("test", slice(0, half), "kermany"), ("external", slice(half, None), "elsewhere")):
        sources = [source] * len(y[idx])
        m = evaluate.score(card, y[idx], probs[idx], sources)
        distances = fam.distance(rng.normal(size=(len(y[idx]), 4)) * (1.0 if name == "test" else 2.0))
        m["familiarity"] = evaluate.familiarity_rates(card, y[idx], probs[idx], distances, fam, sources)
        by_split[name] = m
    metrics_json = json.loads((copy / "metrics.json").read_text())
    metrics_json["by_split"] = by_split
    (copy / "metrics.json").write_text(json.dumps(metrics_json))
    at = run_page(monkeypatch, models_root)
    assert not at.exception
    comparison = [d.value for d in at.dataframe if "unfamiliar when wrong" in d.value.columns][0]
    assert list(comparison.index) == ["test", "external"]
    for name in ("test", "external"):
        assert comparison.loc[name, "images"] == by_split[name]["n"]
        assert comparison.loc[name, "accuracy"] == pytest.approx(by_split[name]["accuracy"])
        assert comparison.loc[name, "unfamiliar"] == pytest.approx(by_split[name]["familiarity"]["rate"])
    assert comparison.loc["external", "sources"] == "elsewhere"
    detail = [d.value for d in at.dataframe if "called" in d.value.columns][0]
    row = detail.loc[("external", "elsewhere", "PNEUMONIA")]
    ext = by_split["external"]["by_source"]["elsewhere"]["per_class"]["PNEUMONIA"]
    assert row["images"] == ext["n"] and row["accuracy"] == pytest.approx(ext["accuracy"])
    assert row["called"] == ", ".join(f"{k} {v}" for k, v in ext["called"].items() if v)


def test_a_file_typed_as_the_folder_is_a_message(setup, monkeypatch):
    root, models_root, _, _ = setup
    film = next((root / "eval").rglob("*.jpeg")).relative_to(root).as_posix()
    at = run_page(monkeypatch, models_root, root)
    at.text_input(key="eval_path").set_value(film)
    at.button(key="eval_run").click().run()
    assert not at.exception
    assert any(f"'{film}' is not a folder under the data root" in e.value for e in at.error)


def test_a_folder_evaluation_warns_of_the_films_the_model_was_made_with(setup, tmp_path, monkeypatch):
    """Films of the model's own split.csv (found by their bytes) among the evaluated ones: the page says how many,
    in which splits, and the figures without the train and validation films (here the two PNEUMONIA films left)."""
    root, source_models, folder, _ = setup
    models_root = tmp_path / "models"
    shutil.copytree(folder, models_root / folder.name)
    films = [f for cls in ("NORMAL", "PNEUMONIA") for f in sorted((root / "eval" / cls).glob("*.jpeg"))
             if f.name != "broken.jpeg"]
    roles = ["train", "train", "val", "test", "test", "", "", ""]  # NORMAL x4 then PNEUMONIA x4
    rows = [f"{f.parent.name}/{f.name},eval,{f.parent.name},{role},,{hashlib.sha256(f.read_bytes()).hexdigest()},,"
            for f, role in zip(films, roles, strict=True) if role]
    (models_root / folder.name / "split.csv").write_text(
        "path,source,class,split,patient,sha256,duplicate_of,duplicate_kind\n" + "\n".join(rows) + "\n")
    at = run_page(monkeypatch, models_root, root)
    at.text_input(key="eval_path").set_value("eval")
    at.button(key="eval_run").click().run()
    assert not at.exception and not at.error
    (said,) = [w.value for w in at.warning if "used to make this model" in w.value]
    assert said.startswith("3 of these films were used to make this model (train 2, validation 1;")
    assert "Without them: 5 films" in said


def test_a_folder_evaluation_names_the_folders_it_left_out_and_refuses_a_contradictory_map(setup, tmp_path,
                                                                                             monkeypatch):
    """A folder whose class-map line had a typo (Covid=COVID for a model without that class) was left out without
    a word, and the figures read as the whole folder's; two lines for one folder silently kept the last."""
    root, source_models, folder, _ = setup
    data_root = tmp_path / "root"
    for cls in ("NORMAL", "PNEUMONIA"):
        shutil.copytree(root / "eval" / cls, data_root / "ev" / cls)
    shutil.copytree(root / "eval" / "NORMAL", data_root / "ev" / "Covid")
    shutil.copytree(root / "eval" / "NORMAL", data_root / "ev" / "Other")
    at = run_page(monkeypatch, source_models, data_root)
    at.text_input(key="eval_path").set_value("ev")
    at.text_area(key="eval_class_map").set_value("Covid=COVID\nOther=")
    at.button(key="eval_run").click().run()
    assert not at.exception and not at.error
    (said,) = [w.value for w in at.warning if "were not evaluated" in w.value]
    assert said.startswith("1 folder(s) here were not evaluated: 'Covid' (mapped to 'COVID') name none of the "
                           "model's classes (NORMAL, PNEUMONIA)")
    assert "'Other'" not in said  # left out on purpose by the map
    at.text_area(key="eval_class_map").set_value("Normal=NORMAL\nnormal=PNEUMONIA")
    at.button(key="eval_run").click().run()
    assert not at.exception
    assert [e.value for e in at.error] == [ui.plain("the class map gives folder 'normal' twice: Normal=NORMAL and "
                                                    "normal=PNEUMONIA. Keep one line for it")]


def test_a_folder_evaluation_says_what_the_familiarity_check_flags(setup, familiar_model_dir, tmp_path, monkeypatch):
    """Issue 10: every prediction carries the familiarity flag, evaluated folders too: the page says how many of the
    folder's films the check flags, among those the model gets wrong and right (the served flags, counted here)."""
    from training import evaluate

    root = setup[0]
    models_root = tmp_path / "models"
    evaluated_model(familiar_model_dir, models_root, root / "eval")
    at = run_page(monkeypatch, models_root, root)
    at.text_input(key="eval_path").set_value("eval")
    at.button(key="eval_run").click().run()
    assert not at.exception and not at.error
    frame = evaluate.evaluate_folder(models.load(models_root / familiar_model_dir.name), root / "eval").predictions
    flagged, right = int(frame["unfamiliar"].sum()), frame["predicted_class"] == frame["true_class"]
    (said,) = [i.value for i in at.info if "familiarity check flags" in i.value]
    assert said.startswith(f"The familiarity check flags {flagged} of 8 films")
    assert f"{int(frame['unfamiliar'][~right].sum())} of the {int((~right).sum())} it gets wrong" in said
    assert f"{int(frame['unfamiliar'][right].sum())} of the {int(right.sum())} it gets right" in said
