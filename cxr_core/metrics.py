"""How good a classifier is: ROC/AUC, confusion, operating points, calibration (numpy + scikit-learn).

Conventions: ``y_true`` is an int array (N,) of class indices into ``class_names``;
``probs`` is float (N, C) of probabilities in the same class order; binary helpers take
``y_true_bin`` (N,) in {0, 1} and ``scores`` (N,) where higher means more likely positive.
Every result is JSON-serialisable (python floats, ints, lists); a ratio that is undefined
(0/0, or an AUC without both positives and negatives) is ``None``, never NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax
from sklearn import metrics as skm


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den else None


def _check(y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str] | None = None) -> tuple:
    y = np.asarray(y_true).astype(int).ravel()
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != y.shape[0]:
        raise ValueError(f"expected probs (N, C) for {y.shape[0]} labels, got shape {p.shape}")
    if class_names is not None and p.shape[1] != len(class_names):
        raise ValueError(f"probs has {p.shape[1]} columns but {len(class_names)} class names were given")
    if y.size and (y.min() < 0 or y.max() >= p.shape[1]):
        raise ValueError(f"labels must lie in 0..{p.shape[1] - 1}, got {y.min()}..{y.max()}")
    bad = int((~np.isfinite(p)).any(axis=1).sum())
    if bad:  # a diverged model writes NaN probabilities: a clear refusal, not sklearn's error or a NaN figure
        raise ValueError(f"{bad} of {p.shape[0]} rows have probabilities that are not finite numbers (NaN or "
                         "infinity): the model's outputs are broken; score it again or retrain it")
    return y, p


def _binary_auc(y_bin: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC AUC, or None when only one class is present (AUC undefined)."""
    if np.unique(y_bin).size < 2:
        return None
    return float(skm.roc_auc_score(y_bin, scores))


def roc_curves(y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """One-vs-rest ROC curve per class: {class: {fpr, tpr, thresholds, auc}}.

    A class without positives or without negatives gets empty curves and auc None. The
    first threshold of sklearn's curve is +inf (nothing called positive); it is written as None.
    """
    y, p = _check(y_true, probs, class_names)
    curves: dict[str, dict[str, Any]] = {}
    for c, name in enumerate(class_names):
        y_bin = (y == c).astype(int)
        auc = _binary_auc(y_bin, p[:, c])
        if auc is None:
            curves[name] = {"fpr": [], "tpr": [], "thresholds": [], "auc": None}
            continue
        fpr, tpr, thr = skm.roc_curve(y_bin, p[:, c])
        curves[name] = {
            "fpr": fpr.tolist(),
            "tpr": tpr.tolist(),
            "thresholds": [float(t) if math.isfinite(t) else None for t in thr],
            "auc": auc,
        }
    return curves


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Confusion counts, int (C, C): rows the true class, columns the predicted class."""
    return skm.confusion_matrix(np.asarray(y_true).ravel(), np.asarray(y_pred).ravel(), labels=list(range(n_classes)))


def _rates(tp: int, fp: int, tn: int, fn: int) -> dict[str, Any]:
    return {
        "tp": int(tp), "fp": int(fp), "tn": int(tn), "fn": int(fn),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "accuracy": _ratio(tp + tn, tp + fp + tn + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
    }


def binary_at_threshold(y_true_bin: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, Any]:
    """Counts and rates when ``scores >= threshold`` is called positive."""
    y = np.asarray(y_true_bin).astype(int).ravel()
    called = (np.asarray(scores, dtype=np.float64).ravel() >= threshold).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(y, called, labels=[0, 1]).ravel()
    return _rates(tp, fp, tn, fn)


def calibration(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 10) -> dict[str, Any]:
    """Reliability of the top-class confidence in ``n_bins`` equal-width bins (lower, upper].

    ECE = sum over bins of count/N * |accuracy - confidence|. Empty bins have count 0 and
    confidence/accuracy None.
    """
    y, p = _check(y_true, probs)
    if n_bins < 1:
        raise ValueError(f"n_bins must be positive, got {n_bins}")
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    bins, ece = [], 0.0
    for b in range(n_bins):
        mask = index == b
        count = int(mask.sum())
        acc = float(correct[mask].mean()) if count else None
        mean_conf = float(conf[mask].mean()) if count else None
        if count:
            ece += count / y.size * abs(acc - mean_conf)
        bins.append({"lower": float(edges[b]), "upper": float(edges[b + 1]), "confidence": mean_conf,
                     "accuracy": acc, "count": count})
    return {"bins": bins, "ece": float(ece)}


def classification_report(y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """sklearn's per-class precision/recall/f1/support report as a dict (0 where undefined)."""
    return skm.classification_report(
        np.asarray(y_true).ravel(), np.asarray(y_pred).ravel(), labels=list(range(len(class_names))),
        target_names=list(class_names), output_dict=True, zero_division=0,
    )


def evaluate(
    y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str], decisions: np.ndarray | None = None
) -> dict[str, Any]:
    """All summary metrics of one labelled set, JSON-ready.

    ``decisions``: the predicted class index per sample (e.g. from the card's thresholds);
    default argmax of ``probs``. ``auc``: for two classes the AUC of the second class, else the
    macro mean of the one-vs-rest AUCs of the classes for which it is defined (None if none is).
    """
    y, p = _check(y_true, probs, class_names)
    pred = p.argmax(axis=1) if decisions is None else np.asarray(decisions).astype(int).ravel()
    if pred.shape != y.shape:
        raise ValueError(f"expected {y.size} decisions, got shape {pred.shape}")
    cm = confusion(y, pred, len(class_names))
    total = int(cm.sum())
    per_class: dict[str, dict[str, Any]] = {}
    for c, name in enumerate(class_names):
        tp = int(cm[c, c])
        fn, fp = int(cm[c].sum()) - tp, int(cm[:, c].sum()) - tp
        rates = _rates(tp, fp, total - tp - fn - fp, fn)
        per_class[name] = {
            "auc": _binary_auc((y == c).astype(int), p[:, c]),
            "sensitivity": rates["sensitivity"],
            "specificity": rates["specificity"],
            "precision": rates["ppv"],
            "npv": rates["npv"],
            "f1": rates["f1"],
            "support": int(cm[c].sum()),
        }
    aucs = [v["auc"] for v in per_class.values() if v["auc"] is not None]
    if len(class_names) == 2:
        auc = per_class[class_names[1]]["auc"]
    else:
        auc = float(np.mean(aucs)) if aucs else None
    calib = calibration(y, p)
    return {
        "n": int(y.size),
        "accuracy": _ratio(int(np.trace(cm)), total),
        "auc": auc,
        "classes": list(class_names),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "ece": calib["ece"],
        "calibration": calib["bins"],
        "report": classification_report(y, pred, class_names),
    }


def fit_temperature(logits: np.ndarray, y_true: np.ndarray, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The temperature T > 0 minimising the mean NLL of softmax(logits / T) on labelled data."""
    y, z = _check(y_true, logits)
    rows = np.arange(y.size)

    def nll(log_t: float) -> float:
        return float(-log_softmax(z / math.exp(log_t), axis=1)[rows, y].mean())

    result = minimize_scalar(nll, bounds=(math.log(bounds[0]), math.log(bounds[1])), method="bounded",
                             options={"xatol": 1e-5})
    return float(math.exp(result.x))


def _roc(y_true_bin: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y = np.asarray(y_true_bin).astype(int).ravel()
    if np.unique(y).size < 2:
        raise ValueError("an operating point needs both positive and negative samples")
    return skm.roc_curve(y, np.asarray(scores, dtype=np.float64).ravel(), drop_intermediate=False)


def threshold_for_sensitivity(y_true_bin: np.ndarray, scores: np.ndarray, target: float = 0.95) -> float:
    """The highest threshold at which ``scores >= threshold`` reaches sensitivity >= ``target``."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    _, tpr, thr = _roc(y_true_bin, scores)
    # tpr rises as the thresholds fall, so the first point that reaches the target is the highest threshold.
    return float(thr[int(np.argmax(tpr >= target - 1e-12))])


def youden_threshold(y_true_bin: np.ndarray, scores: np.ndarray) -> float:
    """The threshold maximising Youden's J = sensitivity + specificity - 1."""
    fpr, tpr, thr = _roc(y_true_bin, scores)
    # Index 0 is sklearn's +inf threshold (nothing positive), never a usable operating point.
    return float(thr[1:][int(np.argmax((tpr - fpr)[1:]))])
