"""The numbers behind the model metrics page, from a model folder's evaluation files.

A trained model folder holds ``metrics.json``, ``predictions.csv`` (path, source, true_class,
p_<CLASS> per class in card order, predicted_class, split), ``history.csv`` and ``split.csv``.
This module reads them and turns predictions into the tables the page draws (ROC, confusion at
a threshold, report, calibration, data summary); the metrics themselves come from cxr_core.metrics.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr_core import csvsafe, metrics
from cxr_core.card import ModelCard
from cxr_core.models import decide

EVALUATION_FILES = {
    "metrics.json": "summary metrics of the held-out split",
    "predictions.csv": "per-image probabilities (ROC, confusion, calibration, error gallery)",
    "history.csv": "training curves",
    "split.csv": "which images were used for training, validation and test",
}


@dataclass
class EvaluationFiles:
    """What a model folder holds for evaluation; absent or unreadable files are None and listed in ``missing``."""

    metrics: dict[str, Any] | None = None
    predictions: pd.DataFrame | None = None
    history: pd.DataFrame | None = None
    split: pd.DataFrame | None = None
    missing: list[str] = field(default_factory=list)


def read_evaluation(folder: str | Path) -> EvaluationFiles:
    """Read the evaluation files of a model folder; what is missing or unreadable is named, with why."""
    folder = Path(folder)
    found = EvaluationFiles()
    for name, purpose in EVALUATION_FILES.items():
        path = folder / name
        if not path.is_file():
            found.missing.append(f"{name} ({purpose}): not in the model folder")
            continue
        try:
            value: Any = json.loads(path.read_text()) if name.endswith(".json") else csvsafe.read_csv(path)
        except (OSError, ValueError) as exc:
            found.missing.append(f"{name} ({purpose}): unreadable ({exc})")
            continue
        setattr(found, name.split(".")[0], value)
    return found


def prob_columns(class_names: Sequence[str]) -> list[str]:
    return [f"p_{c}" for c in class_names]


def labelled(predictions: pd.DataFrame, class_names: Sequence[str],
             split: str | None = None) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """(y_true int (N,), probs float (N, C), rows) of ``split`` (None: all), rows of known classes only."""
    missing = {"true_class", *prob_columns(class_names)} - set(predictions.columns)
    if missing:
        raise ValueError(f"predictions lack columns {sorted(missing)}; they do not fit this model's classes")
    rows = predictions
    if split is not None and "split" in rows.columns:
        rows = rows[rows["split"].astype(str) == split]
    rows = rows[rows["true_class"].astype(str).isin(list(class_names))].reset_index(drop=True)
    index = {c: i for i, c in enumerate(class_names)}
    y = rows["true_class"].astype(str).map(index).to_numpy(dtype=int)
    probs = rows[prob_columns(class_names)].to_numpy(dtype=np.float64)
    bad = int((~np.isfinite(probs)).any(axis=1).sum())
    if bad:  # a diverged model, or a damaged file: said once here, not a crash in every chart
        raise ValueError(f"{bad} of {len(probs)} rows have probabilities that are not finite numbers (NaN or "
                         "infinity); score the model again (python -m training rescore MODEL)")
    return y, probs, rows


def splits(predictions: pd.DataFrame) -> list[str]:
    """Splits present in predictions, held-out ones first (test, the held-out sources' external split, then val)."""
    if "split" not in predictions.columns:
        return []
    present = sorted(predictions["split"].dropna().astype(str).unique())
    order = {"test": 0, "external": 1, "val": 2, "validation": 2, "train": 4}  # train (never held out) last
    return sorted(present, key=lambda s: (order.get(s, 3), s))


def figure(value: float | None, digits: int = 3, percent: bool = False) -> str:
    """A rate or AUC as text, never rounded to certainty: 0.9996 reads 0.9996, not 1.000 (and 0.0004 not 0.000),
    with up to three more digits; "n/a" for None or NaN. ``percent``: as 99.96 %, one decimal to start with."""
    if value is None or not np.isfinite(value):
        return "n/a"
    value = float(value)
    scale, unit, shown = (100.0, "%", 1) if percent else (1.0, "", digits)
    for places in range(shown, shown + 4):
        text = f"{value * scale:.{places}f}"
        rounded = float(text) / scale
        if not ((rounded >= 1 > value) or (rounded <= 0 < value)):
            break
    return text + unit


def fraction_texts(counts: np.ndarray, digits: int = 2) -> list[list[str]]:
    """A confusion matrix's cells as row fractions in text (``figure``: one missed of 2500 reads 0.0004, not 0.00)."""
    return [[figure(v, digits) for v in row] for row in row_normalised(counts)]


def decisions(card: ModelCard, probs: np.ndarray, thresholds: dict[str, float] | None = None) -> np.ndarray:
    """Decided class index per row under the card's rule (cxr_core.models.decide), thresholds overridable."""
    rule = card if thresholds is None else _with_thresholds(card, thresholds)
    index = {c: i for i, c in enumerate(card.class_names)}
    return np.array([index[decide(rule, p).decision] for p in probs], dtype=int)


def _with_thresholds(card: ModelCard, thresholds: dict[str, float]) -> ModelCard:
    data = card.to_dict()
    data["thresholds"] = {**card.thresholds, **thresholds}
    return ModelCard.from_dict(data)


@dataclass(frozen=True)
class OperatingPoint:
    """One class against the rest at a threshold: the 2x2 counts (rows true, cols called) and rates."""

    positive_class: str
    threshold: float
    labels: tuple[str, str]  # (negative label, positive label)
    counts: np.ndarray  # int (2, 2): [[tn, fp], [fn, tp]]
    rates: dict[str, Any]  # cxr_core.metrics.binary_at_threshold


def operating_point(y: np.ndarray, probs: np.ndarray, class_names: Sequence[str], positive_class: str,
                    threshold: float, negative_label: str | None = None,
                    called: np.ndarray | None = None) -> OperatingPoint:
    """``positive_class`` called when its probability >= ``threshold`` (or where ``called``, bool (N,): what a
    rule with more than two classes decides); the rest is the negative label."""
    c = list(class_names).index(positive_class)
    scores = np.asarray(probs)[:, c] if called is None else np.asarray(called, dtype=np.float64)
    cut = threshold if called is None else 0.5
    rates = metrics.binary_at_threshold((np.asarray(y) == c).astype(int), scores, cut)
    counts = np.array([[rates["tn"], rates["fp"]], [rates["fn"], rates["tp"]]], dtype=int)
    negative = negative_label or f"not {positive_class}"
    return OperatingPoint(positive_class, float(threshold), (negative, positive_class), counts, rates)


def row_normalised(counts: np.ndarray) -> np.ndarray:
    """Each row divided by its total (rows with no samples stay 0): the fraction of each true class."""
    counts = np.asarray(counts, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def report_table(y: np.ndarray, probs: np.ndarray, class_names: Sequence[str],
                 decided: np.ndarray | None = None) -> pd.DataFrame:
    """Per-class AUC, sensitivity, specificity, precision, NPV, F1 and support, plus an overall row."""
    result = metrics.evaluate(y, probs, class_names, decided)
    table = pd.DataFrame(result["per_class"]).T
    table.loc["overall"] = {"auc": result["auc"], "support": result["n"]}
    table["accuracy"] = [None] * len(class_names) + [result["accuracy"]]
    return table.astype(float)


def calibration_table(y: np.ndarray, probs: np.ndarray, n_bins: int = 10) -> tuple[pd.DataFrame, float]:
    """Reliability bins (lower, upper, confidence, accuracy, count) of the top-class confidence, and the ECE."""
    result = metrics.calibration(y, probs, n_bins)
    return pd.DataFrame(result["bins"]), result["ece"]


def curve_groups(history: pd.DataFrame) -> dict[str, list[str]]:
    """Training-curve columns grouped by metric: {'loss': ['loss', 'val_loss'], 'accuracy': [...], ...}."""
    skip = {"epoch", "lr", "phase", "seconds", "learning_rate", "time"}
    groups: dict[str, list[str]] = {}
    for col in history.columns:
        if col in skip or not pd.api.types.is_numeric_dtype(history[col]):
            continue
        base = col.removeprefix("val_")
        groups.setdefault(base, []).append(col)
    return groups


def data_summary(split: pd.DataFrame) -> pd.DataFrame:
    """Image counts per source and class (rows) and split (columns) from split.csv, with totals."""
    need = {"source", "class", "split"}
    if not need <= set(split.columns):
        raise ValueError(f"split.csv lacks columns {sorted(need - set(split.columns))}")
    table = pd.crosstab([split["source"], split["class"]], split["split"], margins=True, margins_name="total")
    return table


def split_facts(split: pd.DataFrame) -> dict[str, int]:
    """Headline facts of a split: images, the images whose names carry a patient id and their patients (the
    others are each their own group), and duplicate images (where recorded)."""
    facts = {"images": int(len(split))}
    if "patient" in split.columns:
        named = split["patient"].fillna("").astype(str).str.strip() != ""
        facts["images with a patient id"] = int(named.sum())
        facts["patients"] = int(split.loc[named, "patient"].nunique())
    if "duplicate_of" in split.columns:
        facts["duplicates"] = int(split["duplicate_of"].notna().sum())
    return facts


def per_source(predictions: pd.DataFrame, card: ModelCard, split: str | None = None) -> pd.DataFrame:
    """n, accuracy (under the card's rule, as every other figure of the page) and AUC per data source; empty
    when there is no source column."""
    if "source" not in predictions.columns:
        return pd.DataFrame()
    class_names = list(card.class_names)
    y, probs, rows = labelled(predictions, class_names, split)
    out = []
    for source, idx in rows.groupby(rows["source"].astype(str)).indices.items():
        result = metrics.evaluate(y[idx], probs[idx], class_names, decisions(card, probs[idx]))
        out.append({"source": source, "n": result["n"], "accuracy": result["accuracy"], "auc": result["auc"]})
    return pd.DataFrame(out).set_index("source") if out else pd.DataFrame()


SPLIT_ORDER = ("test", "external", "val", "train")


def split_comparison(metrics_json: dict[str, Any]) -> pd.DataFrame:
    """One row per split of a training run (test, external, val, train) from ``metrics.json``'s ``by_split``.

    Columns: images, accuracy and AUC (fractions), and the familiarity flag rate overall, among the films the
    model got right and among those it got wrong. Empty for a model folder written before splits were recorded.
    """
    by_split = metrics_json.get("by_split") or {}
    rows = []
    for name in sorted(by_split, key=lambda s: (SPLIT_ORDER.index(s) if s in SPLIT_ORDER else 9, s)):
        m = by_split[name]
        fam = m.get("familiarity") or {}
        rows.append({"split": name, "sources": ", ".join(sorted(m.get("by_source") or {})), "images": m.get("n"),
                     "accuracy": m.get("accuracy"), "AUC": m.get("auc"), "unfamiliar": fam.get("rate"),
                     "unfamiliar when right": fam.get("right_rate"), "unfamiliar when wrong": fam.get("wrong_rate")})
    return pd.DataFrame(rows).set_index("split") if rows else pd.DataFrame()


def per_source_per_class(metrics_json: dict[str, Any]) -> pd.DataFrame:
    """Rows (split, source, class): images, accuracy (= sensitivity: share of the class's films called that
    class), one-vs-rest AUC where the source has films of the class and of others, and what the films were called."""
    by_split = metrics_json.get("by_split") or {}
    rows = []
    for name in sorted(by_split, key=lambda s: (SPLIT_ORDER.index(s) if s in SPLIT_ORDER else 9, s)):
        fam = ((by_split[name].get("familiarity") or {}).get("by_group")) or {}
        for source, m in sorted((by_split[name].get("by_source") or {}).items()):
            for cls, c in (m.get("per_class") or {}).items():
                called = c.get("called") or {}
                rows.append({"split": name, "source": source, "class": cls, "images": c.get("n"),
                             "accuracy": c.get("accuracy"), "AUC": c.get("auc"),
                             "called": ", ".join(f"{k} {v}" for k, v in called.items() if v),
                             "source unfamiliar": (fam.get(source) or {}).get("rate")})
    return pd.DataFrame(rows).set_index(["split", "source", "class"]) if rows else pd.DataFrame()


def familiarity_sentence(rates: dict[str, Any] | None) -> str:
    """One sentence on an evaluation's familiarity flags (``familiarity_rates``), or '' without a check."""
    if not rates or not rates.get("n"):
        return ""
    wrong, right = rates.get("wrong", 0), rates.get("right", 0)
    flagged_wrong = rates.get("flagged_wrong", round((rates.get("wrong_rate") or 0) * wrong))  # older files: rates
    flagged_right = rates.get("flagged_right", round((rates.get("right_rate") or 0) * right))
    return (f"The familiarity check flags {rates['flagged']} of {rates['n']} films ({rates['rate']:.1%}) as unlike "
            f"the films the model was trained on: {flagged_wrong} of the {wrong} it gets wrong and {flagged_right} of "
            f"the {right} it gets right.")
