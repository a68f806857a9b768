"""The one preprocessing path from a read image to the model input.

Training and serving both go through here, so what is served is what was trained:

    pixels (float32 HxW in [0, 1], from cxr_core.imaging)
      -> prepare()      uint8 (S, S), area-resized and quantized: the form training caches
      -> to_batch()     float32 (N, S, S, 3) in [0, 255]: what the model takes

Scaling and normalisation live inside the model graph (cxr_core.models), so callers feed
plain 0..255 pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np


def prepare(pixels: np.ndarray, size: int) -> np.ndarray:
    """Resize a float32 HxW image in [0, 1] to uint8 (size, size).

    Area interpolation when shrinking (no aliasing), bilinear when enlarging; the aspect
    ratio is not kept, as in the public datasets' training pipelines.
    """
    if pixels.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale array, got shape {pixels.shape}")
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    img = np.clip(np.asarray(pixels, dtype=np.float32), 0.0, 1.0)
    h, w = img.shape
    if (h, w) != (size, size):
        shrinking = h * w >= size * size
        interp = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
        img = cv2.resize(img, (size, size), interpolation=interp)
    return np.rint(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)


def to_batch(images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """Stack uint8 (S, S) images into the model input: float32 (N, S, S, 3) in [0, 255]."""
    arr = np.asarray(images)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"expected (N, S, S) or (S, S) uint8 images, got shape {arr.shape}")
    arr = arr.astype(np.float32)
    return np.repeat(arr[..., None], 3, axis=-1)


def model_input(pixels: np.ndarray, size: int) -> np.ndarray:
    """One image straight to the model input: float32 (1, size, size, 3) in [0, 255]."""
    return to_batch(prepare(pixels, size))
