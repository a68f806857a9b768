"""cxr_core.evaluation_view: the metrics page's tables from a model folder's evaluation files."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cxr_core import evaluation_view as ev
from cxr_core import metrics
from cxr_core.card import ModelCard

CLASSES = ["NORMAL", "PNEUMONIA"]


@pytest.fixture()
def predictions() -> pd.DataFrame:
    return pd.DataFrame({
        "path": [f"img{i}.jpeg" for i in range(8)],
        "source": ["kermany"] * 5 + ["covid"] * 3,
        "true_class": ["NORMAL", "NORMAL", "NORMAL", "PNEUMONIA", "PNEUMONIA", "PNEUMONIA", "NORMAL", "OTHER"],
        "p_NORMAL": [0.9, 0.6, 0.3, 0.45, 0.1, 0.8, 0.7, 0.5],
        "p_PNEUMONIA": [0.1, 0.4, 0.7, 0.55, 0.9, 0.2, 0.3, 0.5],
        "predicted_class": ["NORMAL", "NORMAL", "PNEUMONIA", "PNEUMONIA", "PNEUMONIA", "NORMAL", "NORMAL", "NORMAL"],
        "split": ["test"] * 7 + ["train"],
    })


def card(thresholds: dict[str, float] | None = None) -> ModelCard:
    return ModelCard(name="m", architecture="tiny", input_size=64, class_names=CLASSES, target_layer="relu",
                     negative_class="NORMAL", thresholds=thresholds or {"PNEUMONIA": 0.5})


def test_labelled_keeps_known_classes_of_the_split(predictions):
    y, probs, rows = ev.labelled(predictions, CLASSES, "test")
    assert y.tolist() == [0, 0, 0, 1, 1, 1, 0]
    assert probs.shape == (7, 2) and probs[2].tolist() == [0.3, 0.7]
    assert len(rows) == 7
    assert len(ev.labelled(predictions, CLASSES, None)[0]) == 7  # the OTHER row is dropped either way
    with pytest.raises(ValueError, match="p_COVID"):
        ev.labelled(predictions, ["NORMAL", "COVID"])


def test_operating_point_counts_and_rates(predictions):
    y, probs, _ = ev.labelled(predictions, CLASSES, "test")
    point = ev.operating_point(y, probs, CLASSES, "PNEUMONIA", 0.5, negative_label="NORMAL")
    # PNEUMONIA called for p >= 0.5: rows 2, 3, 4 -> tp 2 (3, 4), fp 1 (2), fn 1 (5), tn 3.
    assert point.counts.tolist() == [[3, 1], [1, 2]]
    assert point.labels == ("NORMAL", "PNEUMONIA")
    assert point.rates["sensitivity"] == pytest.approx(2 / 3)
    assert point.rates["specificity"] == pytest.approx(3 / 4)
    assert point.rates["ppv"] == pytest.approx(2 / 3) and point.rates["npv"] == pytest.approx(3 / 4)
    strict = ev.operating_point(y, probs, CLASSES, "PNEUMONIA", 0.8)
    assert strict.counts.tolist() == [[4, 0], [2, 1]] and strict.labels[0] == "not PNEUMONIA"


def test_row_normalised_rows_sum_to_one_or_zero():
    out = ev.row_normalised(np.array([[3, 1], [0, 0]]))
    np.testing.assert_allclose(out, [[0.75, 0.25], [0.0, 0.0]])


def test_decisions_follow_the_card_rule_with_overrides(predictions):
    _, probs, _ = ev.labelled(predictions, CLASSES, "test")
    assert ev.decisions(card(), probs).tolist() == [0, 0, 1, 1, 1, 0, 0]
    assert ev.decisions(card(), probs, {"PNEUMONIA": 0.6}).tolist() == [0, 0, 1, 0, 1, 0, 0]


def test_report_table_matches_metrics_evaluate(predictions):
    y, probs, _ = ev.labelled(predictions, CLASSES, "test")
    table = ev.report_table(y, probs, CLASSES)
    reference = metrics.evaluate(y, probs, CLASSES)
    assert table.loc["PNEUMONIA", "auc"] == pytest.approx(reference["per_class"]["PNEUMONIA"]["auc"])
    assert table.loc["NORMAL", "sensitivity"] == pytest.approx(3 / 4)
    assert table.loc["overall", "accuracy"] == pytest.approx(5 / 7)
    assert table.loc["overall", "support"] == 7


def test_calibration_table_has_the_metrics_ece(predictions):
    y, probs, _ = ev.labelled(predictions, CLASSES, "test")
    bins, ece = ev.calibration_table(y, probs, n_bins=5)
    assert len(bins) == 5 and bins["count"].sum() == 7
    assert ece == pytest.approx(metrics.calibration(y, probs, 5)["ece"])


def test_curve_groups_pair_train_and_validation():
    history = pd.DataFrame({"epoch": [0, 1], "loss": [1.0, 0.5], "val_loss": [1.1, 0.7], "accuracy": [0.5, 0.7],
                            "val_accuracy": [0.4, 0.6], "lr": [1e-3, 1e-4], "phase": ["head", "fine"]})
    assert ev.curve_groups(history) == {"loss": ["loss", "val_loss"], "accuracy": ["accuracy", "val_accuracy"]}


def test_data_summary_counts_per_source_class_split():
    split = pd.DataFrame({"path": list("abcde"), "source": ["k", "k", "k", "c", "c"],
                          "class": ["NORMAL", "NORMAL", "PNEUMONIA", "NORMAL", "NORMAL"],
                          "split": ["train", "test", "train", "train", "val"],
                          "patient": ["p1", "p2", "p1", "q", "r"], "duplicate_of": [None, None, None, "d", None]})
    table = ev.data_summary(split)
    assert table.loc[("k", "NORMAL"), "train"] == 1 and table.loc[("k", "NORMAL"), "test"] == 1
    assert table.loc[("total", ""), "total"] == 5
    assert ev.split_facts(split) == {"images": 5, "images with a patient id": 5, "patients": 4, "duplicates": 1}
    unnamed = split.assign(patient=["p1", None, "", "p2", "p2"])  # two images without an id: not counted as patients
    assert ev.split_facts(unnamed) == {"images": 5, "images with a patient id": 3, "patients": 2, "duplicates": 1}


def test_per_source_results(predictions):
    table = ev.per_source(predictions, card(), "test")
    assert table.loc["kermany", "n"] == 5 and table.loc["covid", "n"] == 2
    assert table.loc["kermany", "accuracy"] == pytest.approx(4 / 5)
    assert table.loc["kermany", "auc"] == pytest.approx(5 / 6)  # 0.55 (PNEUMONIA) ranks below 0.7 (NORMAL)


def test_per_source_accuracy_follows_the_cards_rule_not_the_top_class():
    rows = pd.DataFrame({"source": ["s"] * 4, "true_class": ["NORMAL", "NORMAL", "PNEUMONIA", "PNEUMONIA"],
                         "p_NORMAL": [0.9, 0.9, 0.6, 0.7], "p_PNEUMONIA": [0.1, 0.1, 0.4, 0.3], "split": "test"})
    low = card({"PNEUMONIA": 0.2})  # PNEUMONIA called from 0.2: every film right, though NORMAL is the top class
    assert ev.per_source(rows, low, "test").loc["s", "accuracy"] == pytest.approx(1.0)
    assert ev.per_source(rows, card({"PNEUMONIA": 0.5}), "test").loc["s", "accuracy"] == pytest.approx(0.5)


def test_probabilities_read_back_bit_for_bit(tmp_path):
    """A threshold fitted to one validation probability must compare with that probability exactly as trained."""
    values = np.random.default_rng(5).random(2000)
    pd.DataFrame({"p_PNEUMONIA": values, "true_class": "NORMAL"}).to_csv(tmp_path / "predictions.csv", index=False)
    back = ev.read_evaluation(tmp_path).predictions["p_PNEUMONIA"].to_numpy()
    assert (back == values).all()


def test_read_evaluation_names_what_is_missing(tmp_path, predictions):
    predictions.to_csv(tmp_path / "predictions.csv", index=False)
    (tmp_path / "metrics.json").write_text("{not json")
    found = ev.read_evaluation(tmp_path)
    assert found.predictions is not None and len(found.predictions) == 8
    assert found.metrics is None and found.history is None and found.split is None
    assert any(m.startswith("metrics.json") and "unreadable" in m for m in found.missing)
    assert any(m.startswith("history.csv") and "not in the model folder" in m for m in found.missing)
    (tmp_path / "metrics.json").write_text(json.dumps({"auc": 0.9}))
    assert ev.read_evaluation(tmp_path).metrics == {"auc": 0.9}


def test_splits_puts_held_out_first(predictions):
    assert ev.splits(predictions) == ["test", "train"]
    assert ev.splits(predictions.drop(columns="split")) == []


def test_train_rows_sort_after_every_held_out_split_and_nan_rows_are_refused():
    frame = pd.DataFrame({"split": ["train", "val", "test", "external", "other"]})
    assert ev.splits(frame) == ["test", "external", "other", "val", "train"][:2] + ["val", "other", "train"]
    broken = pd.DataFrame({"true_class": ["A", "B"], "p_A": [0.5, np.nan], "p_B": [0.5, np.nan]})
    with pytest.raises(ValueError, match="1 of 2 rows have probabilities that are not finite"):
        ev.labelled(broken, ["A", "B"])


def test_a_figure_is_never_rounded_to_certainty():
    """2500 positives and one missed: sensitivity 0.9996 read "1.000" and the missed cell "0.00" on the Metrics page."""
    from cxr_core.evaluation_view import figure

    assert [figure(v) for v in (0.9996, 0.99996, 1.0, 0.0004, 0.0, 0.5, 0.12345)] == [
        "0.9996", "0.99996", "1.000", "0.0004", "0.000", "0.500", "0.123"]
    assert [figure(v, percent=True) for v in (0.9996, 1.0, 0.25)] == ["99.96%", "100.0%", "25.0%"]
    assert figure(None) == figure(float("nan")) == "n/a"
    assert figure(1 / 2500, 2) == "0.0004" and figure(2499 / 2500, 2) == "0.9996"


def test_the_row_normalised_confusion_cells_read_one_missed_film():
    counts = np.array([[500, 0], [1, 2499]])
    assert ev.fraction_texts(counts) == [["1.00", "0.00"], ["0.0004", "0.9996"]]
