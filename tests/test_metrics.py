"""cxr_core.metrics against hand-computed small examples and scikit-learn references."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from cxr_core import metrics

# Six samples, three negatives then three positives. Positive-vs-negative pairs ranked right:
# 0.35 beats only 0.1 (1), 0.8 and 0.9 beat all three (3 + 3): AUC = 7/9.
Y6 = np.array([0, 0, 0, 1, 1, 1])
S6 = np.array([0.1, 0.4, 0.6, 0.35, 0.8, 0.9])


def _two_class(scores: np.ndarray) -> np.ndarray:
    return np.stack([1 - scores, scores], axis=1)


@pytest.mark.parametrize(
    ("threshold", "expected"),
    [
        # called: 0.6, 0.8, 0.9 -> TP 2, FP 1, TN 2, FN 1
        (0.5, dict(tp=2, fp=1, tn=2, fn=1, sensitivity=2 / 3, specificity=2 / 3, ppv=2 / 3, npv=2 / 3,
                   accuracy=4 / 6, f1=2 / 3)),
        # called: 0.8, 0.9 -> TP 2, FP 0, TN 3, FN 1
        (0.7, dict(tp=2, fp=0, tn=3, fn=1, sensitivity=2 / 3, specificity=1.0, ppv=1.0, npv=3 / 4,
                   accuracy=5 / 6, f1=4 / 5)),
        # called: 0.4, 0.6, 0.8, 0.9 -> TP 2, FP 2, TN 1, FN 1
        (0.38, dict(tp=2, fp=2, tn=1, fn=1, sensitivity=2 / 3, specificity=1 / 3, ppv=1 / 2, npv=1 / 2,
                    accuracy=3 / 6, f1=4 / 7)),
        # the threshold is inclusive: 0.35 itself is called
        (0.35, dict(tp=3, fp=2, tn=1, fn=0, sensitivity=1.0, specificity=1 / 3, ppv=3 / 5, npv=1.0,
                    accuracy=4 / 6, f1=6 / 8)),
    ],
)
def test_binary_at_threshold_hand_example(threshold, expected):
    got = metrics.binary_at_threshold(Y6, S6, threshold)
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value), key
        assert type(got[key]) is type(value), key


def test_undefined_ratios_are_none():
    # No positives and nothing called: sensitivity, PPV and F1 are 0/0.
    got = metrics.binary_at_threshold(np.zeros(4, int), np.array([0.1, 0.2, 0.3, 0.4]), 0.9)
    assert (got["tp"], got["fp"], got["tn"], got["fn"]) == (0, 0, 4, 0)
    assert got["sensitivity"] is None and got["ppv"] is None and got["f1"] is None
    assert got["specificity"] == 1.0 and got["npv"] == 1.0 and got["accuracy"] == 1.0


def test_roc_auc_hand_example_perfect_and_inverted():
    assert metrics.roc_curves(Y6, _two_class(S6), ["N", "P"])["P"]["auc"] == pytest.approx(7 / 9)
    assert metrics.roc_curves(Y6, _two_class(S6), ["N", "P"])["N"]["auc"] == pytest.approx(7 / 9)
    perfect = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    assert metrics.roc_curves(Y6, _two_class(perfect), ["N", "P"])["P"]["auc"] == 1.0
    assert metrics.roc_curves(Y6, _two_class(1 - perfect), ["N", "P"])["P"]["auc"] == 0.0


def test_roc_curve_points_and_json():
    curve = metrics.roc_curves(Y6, _two_class(S6), ["N", "P"])["P"]
    # The curve starts at (0, 0) for the "nothing positive" threshold (+inf, written as None) and ends at (1, 1).
    assert (curve["fpr"][0], curve["tpr"][0], curve["thresholds"][0]) == (0.0, 0.0, None)
    assert (curve["fpr"][-1], curve["tpr"][-1]) == (1.0, 1.0)
    assert np.trapezoid(curve["tpr"], curve["fpr"]) == pytest.approx(7 / 9)
    json.dumps(curve, allow_nan=False)


def test_class_without_positives_gets_auc_none():
    y = np.array([0, 1, 0, 1])
    probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.5, 0.3, 0.2], [0.3, 0.6, 0.1]])
    curves = metrics.roc_curves(y, probs, ["A", "B", "C"])
    assert curves["C"] == {"fpr": [], "tpr": [], "thresholds": [], "auc": None}
    assert curves["A"]["auc"] == 1.0
    result = metrics.evaluate(y, probs, ["A", "B", "C"])
    assert result["per_class"]["C"]["auc"] is None
    assert result["per_class"]["C"]["sensitivity"] is None  # no C samples: 0/0
    assert result["per_class"]["C"]["specificity"] == 1.0
    assert result["auc"] == 1.0  # the mean over the classes where AUC is defined


def test_three_class_macro_auc_equals_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    logits = rng.normal(size=(300, 3)) + 1.2 * np.eye(3)[y]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    result = metrics.evaluate(y, probs, ["NORMAL", "PNEUMONIA", "COVID-19"])
    reference = roc_auc_score(y, probs, multi_class="ovr", average="macro")
    assert result["auc"] == pytest.approx(reference, abs=1e-12)
    assert 0.7 < result["auc"] < 0.95  # informative but not perfect, so the check can tell classes apart
    for c, name in enumerate(["NORMAL", "PNEUMONIA", "COVID-19"]):
        assert result["per_class"][name]["auc"] == pytest.approx(roc_auc_score(y == c, probs[:, c]))


def test_two_class_auc_is_auc_of_second_class():
    result = metrics.evaluate(Y6, _two_class(S6), ["NORMAL", "PNEUMONIA"])
    assert result["auc"] == pytest.approx(7 / 9)
    # Argmax calls 0.6, 0.8, 0.9 positive: the threshold-0.5 confusion of the hand example.
    assert result["confusion_matrix"] == [[2, 1], [1, 2]]
    assert result["accuracy"] == pytest.approx(4 / 6)


def test_confusion_rows_are_true_classes():
    cm = metrics.confusion([0, 0, 0, 1, 2], [1, 1, 1, 1, 0], 3)
    assert cm.tolist() == [[0, 3, 0], [0, 1, 0], [1, 0, 0]]
    assert cm.dtype.kind == "i"


def test_evaluate_with_given_decisions_hand_example():
    names = ["NORMAL", "PNEUMONIA", "COVID-19"]
    y = np.array([0, 0, 0, 1, 1, 2])
    probs = np.full((6, 3), 1 / 3)
    decisions = np.array([0, 1, 0, 1, 2, 2])  # e.g. from the card's thresholds, not argmax
    result = metrics.evaluate(y, probs, names, decisions=decisions)
    assert result["n"] == 6 and result["classes"] == names
    assert result["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert result["accuracy"] == pytest.approx(4 / 6)
    normal = result["per_class"]["NORMAL"]  # TP 2, FN 1, FP 0, TN 3
    assert normal["sensitivity"] == pytest.approx(2 / 3) and normal["specificity"] == 1.0
    assert normal["precision"] == 1.0 and normal["npv"] == pytest.approx(3 / 4)
    assert normal["f1"] == pytest.approx(4 / 5) and normal["support"] == 3
    pneumonia = result["per_class"]["PNEUMONIA"]  # TP 1, FN 1, FP 1, TN 3
    assert pneumonia["sensitivity"] == 0.5 and pneumonia["specificity"] == 0.75
    assert pneumonia["precision"] == 0.5 and pneumonia["npv"] == 0.75
    assert pneumonia["auc"] == 0.5  # constant scores rank nothing
    covid = result["per_class"]["COVID-19"]  # TP 1, FN 0, FP 1, TN 4
    assert covid["sensitivity"] == 1.0 and covid["precision"] == 0.5 and covid["support"] == 1
    assert result["report"]["PNEUMONIA"]["recall"] == pytest.approx(pneumonia["sensitivity"])
    assert result["report"]["NORMAL"]["precision"] == pytest.approx(normal["precision"])
    json.dumps(result, allow_nan=False)


def test_evaluate_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="columns"):
        metrics.evaluate(Y6, _two_class(S6), ["A", "B", "C"])
    with pytest.raises(ValueError, match="labels"):
        metrics.evaluate(np.array([0, 2]), np.full((2, 2), 0.5), ["A", "B"])
    with pytest.raises(ValueError, match="decisions"):
        metrics.evaluate(Y6, _two_class(S6), ["A", "B"], decisions=np.zeros(5, int))


def test_classification_report_zero_division():
    report = metrics.classification_report([0, 0, 1], [0, 0, 0], ["NORMAL", "PNEUMONIA"])
    assert report["PNEUMONIA"]["precision"] == 0.0  # nothing predicted PNEUMONIA: 0, not a warning
    assert report["NORMAL"]["precision"] == pytest.approx(2 / 3)
    assert report["NORMAL"]["support"] == 2


def test_ece_hand_example():
    # Top-class confidences 0.9 (right), 0.8 (wrong), 0.7 (right), 0.6 (wrong); 5 bins (lower, upper].
    y = np.array([0, 1, 1, 0])
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6]])
    result = metrics.calibration(y, probs, n_bins=5)
    bins = result["bins"]
    assert [b["count"] for b in bins] == [0, 0, 1, 2, 1]
    assert bins[0]["accuracy"] is None and bins[0]["confidence"] is None
    assert bins[3]["confidence"] == pytest.approx(0.75) and bins[3]["accuracy"] == 0.5
    assert (bins[3]["lower"], bins[3]["upper"]) == pytest.approx((0.6, 0.8))
    # (1/4)|1 - 0.9| + (2/4)|0.5 - 0.75| + (1/4)|0 - 0.6| = 0.025 + 0.125 + 0.15
    assert result["ece"] == pytest.approx(0.3)
    # With evaluate's 10 bins every sample is alone: (0.1 + 0.8 + 0.3 + 0.6) / 4.
    assert metrics.evaluate(y, probs, ["A", "B"])["ece"] == pytest.approx(0.45)


def test_ece_zero_when_confidence_matches_accuracy():
    # Confidence 0.75 in every case and 3 of 4 right.
    y = np.array([0, 0, 0, 1])
    probs = np.tile([0.75, 0.25], (4, 1))
    assert metrics.calibration(y, probs)["ece"] == pytest.approx(0.0, abs=1e-12)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_fit_temperature_recovers_known_temperature():
    rng = np.random.default_rng(42)
    logits = rng.normal(0.0, 3.0, size=(20000, 3))
    probs = _softmax(logits / 2.0)
    y = (rng.random(20000)[:, None] > np.cumsum(probs, axis=1)).sum(axis=1)
    t = metrics.fit_temperature(logits, y)
    assert abs(t - 2.0) < 0.1
    # Labels drawn from the logits themselves: the fitted temperature is 1.
    y1 = (rng.random(20000)[:, None] > np.cumsum(_softmax(logits), axis=1)).sum(axis=1)
    assert abs(metrics.fit_temperature(logits, y1) - 1.0) < 0.1


def test_threshold_for_sensitivity_hand_example():
    assert metrics.threshold_for_sensitivity(Y6, S6, 0.95) == 0.35  # all three positives need 0.35
    assert metrics.threshold_for_sensitivity(Y6, S6, 0.6) == 0.8  # two of three: 0.8
    assert metrics.threshold_for_sensitivity(Y6, S6, 1 / 3) == 0.9
    assert metrics.youden_threshold(Y6, S6) == 0.8  # J = 2/3 - 0
    with pytest.raises(ValueError, match="positive and negative"):
        metrics.threshold_for_sensitivity(np.ones(3, int), np.array([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="target"):
        metrics.threshold_for_sensitivity(Y6, S6, 0.0)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.booleans(), st.floats(0.0, 1.0)), min_size=2, max_size=40),
    st.floats(0.05, 1.0),
)
def test_threshold_for_sensitivity_is_highest_reaching_target(samples, target):
    y = np.array([int(b) for b, _ in samples])
    scores = np.array([s for _, s in samples])
    if y.min() == y.max():
        with pytest.raises(ValueError):
            metrics.threshold_for_sensitivity(y, scores, target)
        return
    t = metrics.threshold_for_sensitivity(y, scores, target)
    assert metrics.binary_at_threshold(y, scores, t)["sensitivity"] >= target - 1e-12
    higher = scores[scores > t]
    if higher.size:  # the next score up already misses the target
        assert metrics.binary_at_threshold(y, scores, higher.min())["sensitivity"] < target - 1e-12


def test_probabilities_that_are_not_finite_are_refused_with_a_clear_message():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [np.nan, np.nan], [0.4, 0.6]])
    with pytest.raises(ValueError, match="1 of 4 rows have probabilities that are not finite"):
        metrics.evaluate(np.array([0, 1, 0, 1]), probs, ["a", "b"])
