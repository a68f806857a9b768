"""Drawing a heatmap over a radiograph (numpy and OpenCV only; pure functions).

Images are float32 HxW in [0, 1] (as cxr_core.imaging returns them), heatmaps float32 hxw in
[0, 1] (as cxr_core.explain returns them, usually at the model's input size). Outputs are uint8
RGB at the *image's* size, so the overlay lines up with the original radiograph. Inputs out of
range are refused rather than clipped: a heatmap in [0, 255] or an image in HU is a bug upstream.
"""

from __future__ import annotations

import cv2
import numpy as np

from cxr_core.limits import MAX_DISPLAY_SIDE

COLORMAPS: dict[str, int] = {
    "jet": cv2.COLORMAP_JET,
    "turbo": cv2.COLORMAP_TURBO,
    "inferno": cv2.COLORMAP_INFERNO,
    "magma": cv2.COLORMAP_MAGMA,
    "plasma": cv2.COLORMAP_PLASMA,
    "viridis": cv2.COLORMAP_VIRIDIS,
    "hot": cv2.COLORMAP_HOT,
}


def _check_unit(name: str, array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 2 or min(array.shape) < 1:
        raise ValueError(f"{name} must be a 2-D (H, W) array, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{name} must be a float array in [0, 1], got dtype {array.dtype}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    lo, hi = float(array.min()), float(array.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"{name} must be in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
    return array.astype(np.float32, copy=False)


def to_rgb(image: np.ndarray) -> np.ndarray:
    """float HxW in [0, 1] -> uint8 (H, W, 3) gray RGB."""
    gray = np.rint(_check_unit("image", image) * 255.0).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)


def colorize(heatmap: np.ndarray, colormap: str = "jet") -> np.ndarray:
    """float hxw in [0, 1] -> uint8 (h, w, 3) RGB through one of COLORMAPS."""
    if colormap not in COLORMAPS:
        raise ValueError(f"unknown colormap {colormap!r}; choose one of {sorted(COLORMAPS)}")
    levels = np.rint(_check_unit("heatmap", heatmap) * 255.0).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(levels, COLORMAPS[colormap]), cv2.COLOR_BGR2RGB)


def _grey_and_heat(image: np.ndarray, heatmap: np.ndarray, opacity: float) -> tuple[np.ndarray, np.ndarray]:
    """The image as grey RGB and the heatmap resized bilinearly to it (inputs and ``opacity`` checked)."""
    gray = to_rgb(image)
    heat = _check_unit("heatmap", heatmap)
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be in [0, 1], got {opacity!r}")
    h, w = gray.shape[:2]
    if heat.shape != (h, w):
        heat = np.clip(cv2.resize(heat, (w, h), interpolation=cv2.INTER_LINEAR), 0.0, 1.0)
    return gray, heat


def overlay(image: np.ndarray, heatmap: np.ndarray, colormap: str = "jet", opacity: float = 0.4) -> np.ndarray:
    """Blend a colorized heatmap over a grayscale image: uint8 (H, W, 3) RGB at the image's size.

    The heatmap is resized bilinearly to the image. ``opacity`` 0 gives the gray image, 1 the
    pure colormap; in between, ``(1 - opacity) * gray + opacity * color``, rounded.
    """
    gray, heat = _grey_and_heat(image, heatmap, opacity)
    color = colorize(heat, colormap)
    blended = (1.0 - opacity) * gray.astype(np.float32) + opacity * color.astype(np.float32)
    return np.rint(blended).astype(np.uint8)


def level_outlines(heat: np.ndarray, level: float) -> tuple[np.ndarray, ...]:
    """The outlines (OpenCV contours, in ``heat``'s pixels) of the regions where ``heat`` reaches ``level``, which
    must be in (0, 1): what the viewer's contour lines (``cxr_core.viewer``) and the report's (``contours``) draw."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"a contour level must be in (0, 1), got {level!r}")
    found, _ = cv2.findContours((heat >= level).astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    return found


def level_rgb(level: float, colormap: str) -> tuple[int, int, int]:
    """The colormap's colour at ``level`` (a contour line at that level is coloured as the wash would be)."""
    r, g, b = colorize(np.array([[level]], np.float32), colormap)[0, 0]
    return int(r), int(g), int(b)


def contours(image: np.ndarray, heatmap: np.ndarray, levels, colormap: str = "jet",
             opacity: float = 0.6) -> np.ndarray:
    """Lines around the regions where the heatmap reaches each of ``levels`` (in (0, 1)), over the grey image:
    uint8 (H, W, 3) RGB at the image's size, as the viewer's "Contour lines" mode draws them (each line in the
    colormap's colour at its level, blended at ``opacity`` raised to at least 0.6, so the film stays visible
    between the lines). The heatmap is resized bilinearly to the image first; lines are about 1/300 of the
    image's longer side thick (at least 2 pixels)."""
    gray, heat = _grey_and_heat(image, heatmap, opacity)
    h, w = heat.shape
    thickness = max(2, round(max(h, w) / 300))
    lines = gray.copy()
    drawn = np.zeros((h, w), np.uint8)
    for level in sorted(set(levels)):
        found = level_outlines(heat, level)
        cv2.drawContours(lines, found, -1, level_rgb(level, colormap), thickness)
        cv2.drawContours(drawn, found, -1, 1, thickness)
    alpha = max(opacity, 0.6) * drawn[..., None].astype(np.float32)
    return np.rint((1.0 - alpha) * gray.astype(np.float32) + alpha * lines.astype(np.float32)).astype(np.uint8)


def thumbnail(image: np.ndarray, size: int = 96) -> np.ndarray:
    """float HxW in [0, 1] -> uint8 grayscale whose longer side is ``size`` px (aspect kept)."""
    if size < 1:
        raise ValueError(f"thumbnail size must be positive, got {size}")
    img = _check_unit("image", image)
    h, w = img.shape
    scale = size / max(h, w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    small = cv2.resize(img, (new_w, new_h), interpolation=interp)
    return np.rint(np.clip(small, 0.0, 1.0) * 255.0).astype(np.uint8)


def fit(image: np.ndarray, max_side: int = MAX_DISPLAY_SIDE) -> np.ndarray:
    """An image (float HxW in [0, 1], or uint8 HxW[x3]) shrunk by area averaging so that its longer side is at most
    ``max_side`` px, aspect kept and every side at least 1 px; returned unchanged when already small enough.

    What the browser and the report get: a 30000 x 10 strip becomes 1400 x 1, not an error or a 0 px image.
    """
    if max_side < 1:
        raise ValueError(f"max_side must be positive, got {max_side}")
    h, w = image.shape[:2]
    if max(h, w) <= max_side:
        return image
    scale = max_side / max(h, w)
    size = (max(1, min(max_side, round(w * scale))), max(1, min(max_side, round(h * scale))))
    # A 49,000,000 x 1 strip is first decimated by striding, so the area resize sees at most ~32768 px a side.
    step = max(1, -(-max(h, w) // 32767))
    small = cv2.resize(np.ascontiguousarray(image[::step, ::step]), size, interpolation=cv2.INTER_AREA)
    return np.clip(small, 0.0, 1.0).astype(image.dtype) if image.dtype != np.uint8 else small
