"""Probing how a classifier sees an image: occlusion sensitivity, simple perturbations, confident errors.

Model-agnostic (numpy/OpenCV and ``Classifier`` calls only), for the instructor view:
occlusion slides a grey patch over the image and records how much the class probability
drops; perturbations are pure functions on float32 HxW images in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import pandas as pd

from cxr_core import preprocess

PERTURBATION_KINDS = ("flip", "rotate", "contrast", "blur", "noise")
# (kind, amount): flip 1 = left-right; rotate in degrees; contrast factor about the mean;
# blur sigma as a fraction of the shorter side; noise standard deviation in [0, 1] units.
DEFAULT_PERTURBATIONS: tuple[tuple[str, float], ...] = (
    ("flip", 1.0), ("rotate", -10.0), ("rotate", 10.0), ("contrast", 0.6), ("contrast", 1.5),
    ("blur", 0.01), ("blur", 0.03), ("noise", 0.03), ("noise", 0.1),
)
AMOUNT_UNITS = {"flip": "left-right", "rotate": "degrees", "contrast": "x about the mean",
                "blur": "sigma, fraction of the shorter side", "noise": "std, intensity units"}


def _positions(size: int, patch: int, stride: int) -> list[int]:
    """Patch origins covering 0..size-1, the last one flush with the edge."""
    starts = list(range(0, max(size - patch, 0) + 1, stride))
    if starts[-1] + patch < size:
        starts.append(size - patch)
    return starts


def occlusion(classifier: Any, pixels_uint8: np.ndarray, class_index: int, patch: int | None = None,
              stride: int | None = None, batch_size: int = 32, fill: float | None = None) -> np.ndarray:
    """Occlusion sensitivity: float32 (S, S), the mean drop in ``class_index``'s probability.

    ``pixels_uint8`` is the model-size image (S, S) from ``preprocess.prepare``. Each
    ``patch`` x ``patch`` square (default S/8, stride default patch/2) is set to ``fill``
    (default the image mean, 0..255) and the calibrated probability is recomputed in batches.
    A pixel's value is the mean of (p_original - p_occluded) over the patches covering it:
    positive where hiding the region lowers the class probability.
    """
    img = np.asarray(pixels_uint8)
    if img.ndim != 2 or img.shape[0] != img.shape[1]:
        raise ValueError(f"expected a square (S, S) uint8 image, got shape {img.shape}")
    size = img.shape[0]
    patch = int(patch or max(size // 8, 1))
    stride = int(stride or max(patch // 2, 1))
    if not 0 < patch <= size or stride < 1:
        raise ValueError(f"patch must be in 1..{size} and stride positive, got patch={patch}, stride={stride}")
    value = float(img.mean()) if fill is None else float(fill)
    base = float(classifier.probabilities(preprocess.to_batch(img))[0, class_index])
    boxes = [(y, x) for y in _positions(size, patch, stride) for x in _positions(size, patch, stride)]
    total = np.zeros((size, size), np.float64)
    count = np.zeros((size, size), np.float64)
    for start in range(0, len(boxes), batch_size):
        chunk = boxes[start:start + batch_size]
        batch = np.repeat(img[None].astype(np.float32), len(chunk), axis=0)
        for i, (y, x) in enumerate(chunk):
            batch[i, y:y + patch, x:x + patch] = value
        probs = classifier.probabilities(preprocess.to_batch(batch))[:, class_index]
        for (y, x), p in zip(chunk, probs, strict=True):
            total[y:y + patch, x:x + patch] += base - float(p)
            count[y:y + patch, x:x + patch] += 1
    return (total / np.maximum(count, 1)).astype(np.float32)


def occlusion_heatmap(drop: np.ndarray) -> np.ndarray:
    """An occlusion map (probability drops, any sign) as float32 in [0, 1] for drawing.

    Only drops count (hiding the region lowered the probability); they are divided by the
    largest drop. A map without any drop is all zeros.
    """
    positive = np.clip(np.asarray(drop, dtype=np.float32), 0.0, None)
    peak = float(positive.max()) if positive.size else 0.0
    return positive / peak if peak > 0 else np.zeros_like(positive)


def perturb(pixels: np.ndarray, kind: str, amount: float, seed: int = 0) -> np.ndarray:
    """A perturbed copy of a float32 HxW image in [0, 1] (see AMOUNT_UNITS for ``amount``)."""
    img = np.clip(np.asarray(pixels, dtype=np.float32), 0.0, 1.0)
    if img.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale image, got shape {img.shape}")
    h, w = img.shape
    if kind == "flip":
        return img[:, ::-1].copy() if amount else img.copy()
    if kind == "rotate":
        matrix = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), float(amount), 1.0)
        return cv2.warpAffine(img, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                              borderValue=0.0)
    if kind == "contrast":
        mean = float(img.mean())
        return np.clip(mean + float(amount) * (img - mean), 0.0, 1.0).astype(np.float32)
    if kind == "blur":
        sigma = float(amount) * min(h, w)
        if sigma <= 0:
            return img.copy()
        return cv2.GaussianBlur(img, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)
    if kind == "noise":
        noise = np.random.default_rng(seed).normal(0.0, float(amount), img.shape)
        return np.clip(img + noise, 0.0, 1.0).astype(np.float32)
    raise ValueError(f"unknown perturbation {kind!r}; choose one of {PERTURBATION_KINDS}")


def perturbation_table(classifier: Any, pixels: np.ndarray,
                       kinds: Sequence[tuple[str, float]] = DEFAULT_PERTURBATIONS,
                       seed: int = 0) -> list[dict[str, Any]]:
    """Predictions for the original image and each (kind, amount) perturbation, one batched call.

    Rows: {kind, amount, <class>: probability for each class, top_class, decision, change}
    where ``change`` is the shift in the original top class's probability (row - original).
    """
    images = [np.asarray(pixels, np.float32)] + [perturb(pixels, k, a, seed) for k, a in kinds]
    predictions = classifier.predict_pixels(images)
    top = int(np.argmax(predictions[0].probabilities))
    rows = []
    for (kind, amount), pred in zip([("original", 0.0), *kinds], predictions, strict=True):
        row: dict[str, Any] = {"kind": kind, "amount": float(amount)}
        row.update(pred.as_dict())
        row.update(top_class=pred.top_class, decision=pred.decision,
                   change=pred.probabilities[top] - predictions[0].probabilities[top])
        rows.append(row)
    return rows


def confident_errors(predictions: pd.DataFrame, class_names: Sequence[str], k: int = 8,
                     split: str | None = "test") -> pd.DataFrame:
    """The ``k`` wrong predictions with the highest probability of the class called, most confident first.

    ``predictions`` has predictions.csv's columns (true_class, p_<CLASS>..., predicted_class,
    optional split). Only rows of ``split`` are used when the column exists (None: all rows).
    Adds ``confidence`` (the called class's probability: at a threshold it can be below the top class's,
    which for a wrong call is often the true class's) to the returned rows.
    """
    prob_cols = [f"p_{c}" for c in class_names]
    missing = {"path", "true_class", "predicted_class", *prob_cols} - set(predictions.columns)
    if missing:
        raise ValueError(f"predictions lack columns {sorted(missing)}")
    # As text: a CSV read back gives class names that look like numbers ("0", "1") as integers.
    rows = predictions.assign(true_class=predictions["true_class"].astype(str),
                              predicted_class=predictions["predicted_class"].astype(str))
    if split is not None and "split" in rows.columns:
        rows = rows[rows["split"].astype(str) == split]
    rows = rows[rows["true_class"].isin(list(class_names))]
    wrong = rows[rows["true_class"] != rows["predicted_class"]].copy()
    wrong = wrong[wrong["predicted_class"].isin(list(class_names))]
    called = [prob_cols.index(f"p_{c}") for c in wrong["predicted_class"].astype(str)]
    wrong["confidence"] = wrong[prob_cols].to_numpy(dtype=np.float64)[np.arange(len(wrong)), called] if called else []
    return wrong.sort_values("confidence", ascending=False, kind="stable").head(k).reset_index(drop=True)
