"""The batch review table: one row per scored file, its filters and its CSV export.

Rows come from ``cxr_core.pipeline.classify_many`` items (name, prediction or None, error or
None, ImageInfo, uint8 thumbnail) and their ``cxr_core.quality`` reports. The table holds no image bytes except the
small thumbnail data URI, and never any DICOM patient tag; the CSV export drops the thumbnail.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterable, Sequence
from os import PathLike
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from cxr_core import csvsafe, imaging, quality
from cxr_core.imaging import LoadedImage
from cxr_core.quality import QualityReport

THUMBNAIL = "thumbnail"
FLAGS = {
    "positive": "positive decision",
    "low_confidence": "low confidence",
    "not_chest": "probably not a chest X-ray",
    "unfamiliar": "unlike the training films",
    "error": "unreadable",
}


def thumbnail_uri(thumbnail: np.ndarray | None) -> str | None:
    """A uint8 HxW or HxWx3 thumbnail (or float in [0, 1]) as a ``data:image/png;base64,...`` URI."""
    if thumbnail is None:
        return None
    arr = np.asarray(thumbnail)
    if arr.dtype != np.uint8:
        arr = np.rint(np.clip(arr.astype(np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(arr).save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def assess_item(item: Any, original: bytes | str | PathLike | np.ndarray | None = None) -> QualityReport | None:
    """cxr_core.quality rules for a scored batch item, from its thumbnail and ImageInfo (no second decode).

    The pixel rules use the scores the pipeline measured on the full film (``item.image_scores``), else the
    thumbnail (uint8, longer side ~96 px) stands in for it; the aspect ratio comes from ImageInfo.
    ``original`` (the file's bytes, its path, or its ``quality.colour_sample``) enables the colour rule. None for
    unreadable items.
    """
    if getattr(item, "quality", None) is not None:  # the pipeline already assessed it
        return item.quality
    if item.prediction is None or item.thumbnail is None or item.info is None:
        return None
    pixels = np.asarray(item.thumbnail, dtype=np.float32) / 255.0
    try:
        return quality.assess(LoadedImage(pixels=pixels, info=item.info), original,
                              getattr(item, "image_scores", None))
    except Exception:  # a quality check is advice: its failure must not cost the batch its table
        return None


def table_row(item: Any, report: QualityReport | None, class_names: Sequence[str]) -> dict[str, Any]:
    """One item's row without the thumbnail: file, top class and probability, p per class, decision,
    flags, quality notes, error (the Batch review CSV's columns; ``python -m scoring`` writes the same)."""
    pred = item.prediction
    not_chest = report.probably_not_chest if report is not None else None
    row: dict[str, Any] = {"file": csvsafe.safe_text(item.name)}
    row["top_class"] = pred.top_class if pred else None
    row["top_probability"] = pred.top_probability if pred else np.nan
    for name in class_names:
        row[f"p_{name}"] = pred.as_dict()[name] if pred else np.nan
    row["decision"] = pred.decision if pred else None
    row["positive"] = bool(pred.positive) if pred else False
    row["low_confidence"] = bool(pred.low_confidence) if pred else False
    row["not_chest"] = bool(not_chest) if not_chest is not None else False
    # The familiarity check (empty when the model folder has none): distance, and the flag past its threshold.
    row["familiarity"] = pred.familiarity if pred and pred.familiarity is not None else np.nan
    row["unfamiliar"] = bool(pred.unfamiliar) if pred and pred.unfamiliar is not None else False
    row["quality_notes"] = "; ".join(report.reasons) if report is not None else ""
    # What the reader changed in the picture that the model saw (shown inverted, frames left out, transparency,
    # missing samples): the batch tables, their CSV and python -m scoring say what the Classify page says.
    info = getattr(item, "info", None)
    row["reading_notes"] = "; ".join(imaging.reading_notes(info, cautions=True)) if info is not None else ""
    row["error"] = item.error or ""
    return row


def row_columns(class_names: Sequence[str]) -> list[str]:
    """The columns of ``table_row``, in order."""
    return ["file", "top_class", "top_probability", *[f"p_{c}" for c in class_names], "decision",
            "positive", "low_confidence", "not_chest", "familiarity", "unfamiliar", "quality_notes", "reading_notes",
            "error"]


def batch_table(items: Sequence[Any], class_names: Sequence[str],
                reports: Sequence[QualityReport | None] | None = None) -> pd.DataFrame:
    """One row per item: thumbnail, file, top class and probability, p per class, decision, flags, error.

    ``reports`` (aligned with ``items``, see ``assess_item``) fill the not-a-chest flag and its
    reasons. Unreadable items keep their row with empty predictions and the error message.
    """
    reports = list(reports) if reports is not None else [getattr(i, "quality", None) for i in items]
    rows = [{THUMBNAIL: thumbnail_uri(getattr(item, "thumbnail", None)), **table_row(item, report, class_names)}
            for item, report in zip(items, reports, strict=True)]
    return pd.DataFrame(rows, columns=[THUMBNAIL, *row_columns(class_names)])


def filter_table(table: pd.DataFrame, decisions: Sequence[str] | None = None, flags: Sequence[str] = (),
                 text: str = "") -> pd.DataFrame:
    """Rows whose decision is in ``decisions`` (None: any), that carry every flag in ``flags``
    (keys of FLAGS) and whose file name contains ``text`` (case-insensitive). Index is kept."""
    keep = pd.Series(True, index=table.index)
    if decisions is not None:
        keep &= table["decision"].isin(list(decisions))
    for flag in flags:
        if flag not in FLAGS:
            raise ValueError(f"unknown flag {flag!r}; choose from {sorted(FLAGS)}")
        keep &= table["error"].astype(str) != "" if flag == "error" else table[flag].astype(bool)
    if text.strip():
        keep &= table["file"].astype(str).str.contains(text.strip(), case=False, regex=False)
    return table[keep]


def summary(table: pd.DataFrame) -> dict[str, int]:
    """How many files, and how many of them carry each flag."""
    counts = {"files": int(len(table)), "unreadable": int((table["error"].astype(str) != "").sum())}
    for flag in ("positive", "low_confidence", "not_chest", "unfamiliar"):
        counts[flag] = int(table[flag].astype(bool).sum())
    return counts


def export_csv(table: pd.DataFrame, card: Any = None) -> str:
    """The table as CSV text without the thumbnail column (probabilities to 6 decimals), safe to open in a
    spreadsheet (``cxr_core.csvsafe``: no cell becomes a formula, whatever the file names). With ``card``, every
    row also names the model that scored it (name, weights and card hashes, as ``python -m scoring`` writes) and
    its intended use: a CSV passed on keeps both."""
    table = table.drop(columns=[THUMBNAIL], errors="ignore")
    if card is not None:
        from cxr_core.card import RESEARCH_USE

        table = table.assign(model=card.name, weights_sha256=card.weights_sha256, card_sha256=card.card_sha256,
                             intended_use=RESEARCH_USE)
    return csvsafe.to_csv(table, index=False, float_format="%.6f")


def unique_names(names: Iterable[str]) -> list[str]:
    """Names made valid Unicode (``csvsafe.safe_text``) and unique by appending ' (2)', ' (3)'... to repeats."""
    names = [csvsafe.safe_text(n) for n in names]  # shown and exported: valid Unicode whatever the file name's bytes
    taken, repeats, out = set(names), dict.fromkeys(names, 2), []
    for name in names:
        if name not in out:  # the first of its name keeps it
            out.append(name)
            continue
        while f"{name} ({repeats[name]})" in taken:  # never another file's own name, e.g. a real 'a.png (2)'
            repeats[name] += 1
        out.append(f"{name} ({repeats[name]})")
        taken.add(out[-1])
    return out
