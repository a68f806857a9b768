"""Display window presets and slider bounds for DICOM radiographs (numbers in stored-value units).

A window is (center, width) in the units ``cxr_core.imaging`` applies it in (after the
modality LUT). Radiographs have no Hounsfield scale, so presets are relative: they move and
narrow the image's own window (the file's, or the percentile window ``imaging`` chose), toward
the dark (lung) or bright (bone) end of the *display*. For MONOCHROME1 files, where a larger
stored value is shown darker, "brighter on screen" is a lower stored value.
"""

from __future__ import annotations

import math
from typing import Any

AUTO = "File window"
AUTO_PERCENTILE = "Automatic (0.5-99.5 percentile)"
VOI_LUT = "File's VOI LUT"
AUTO_WITHOUT_LUT = "Window without the LUT"
FULL = "Full range"
# name -> (shift of the center toward bright display, in widths of the base window; width factor)
RELATIVE = {
    "Lung": (-0.15, 0.8),
    "Mediastinum / soft tissue": (0.1, 0.6),
    "Bone": (0.25, 0.5),
}


def presets(info: Any) -> dict[str, tuple[float, float]]:
    """Named (center, width) windows for a DICOM ``imaging.ImageInfo``; empty when it has none.

    The first entry is the window the image was read with (the file's, or the automatic one). A file shown through
    its VOI LUT has no window: its first entry (``VOI_LUT``: choosing it keeps the LUT) holds the full value range,
    which the sliders start from, and the relative presets are taken from that range.
    """
    full = None
    if info.value_range is not None:
        lo, hi = (float(v) for v in info.value_range)
        if hi > lo:
            full = ((lo + hi) / 2.0, hi - lo)
    if info.window is None:
        if info.window_source != "voi_lut" or full is None:
            return {}
        # The presets start from the window the film would have without its LUT (the file's WindowCenter/Width, or
        # the percentiles): from the full range, one hot pixel made them blank.
        reference = getattr(info, "reference_window", None)
        center, width = reference if reference is not None else full
        result = {VOI_LUT: full}
        if reference is not None:
            result[AUTO_WITHOUT_LUT] = (float(reference[0]), float(reference[1]))
    else:
        center, width = (float(v) for v in info.window)
        result = {AUTO if info.window_source == "file" else AUTO_PERCENTILE: (center, width)}
        if full is not None:
            result[FULL] = full
    toward_bright = -1.0 if info.inverted else 1.0
    for name, (shift, factor) in RELATIVE.items():
        result[name] = (center + toward_bright * shift * width, max(width * factor, 1e-6))
    return result


def slider_steps(info: Any) -> tuple[float, float]:
    """(center step, width step): fine enough to move within the base window (the one the relative presets start
    from) in some 200 steps, whatever the value range (one pixel at 65535 beside tissue at
    950-1450 made the steps 160 and 320 units: the file's own width could not be reached by dragging)."""
    (c_lo, c_hi), (w_lo, w_hi) = slider_bounds(info)
    widths = [w for _, w in presets(info).values() if math.isfinite(w) and w > 0]
    fine = min(widths) / 100 if widths else math.inf  # the narrowest preset (Bone: half the base window)

    def step(lo: float, hi: float) -> float:
        chosen = min((hi - lo) / 400, fine)
        return chosen if math.isfinite(chosen) and chosen > 0 else 1.0

    return step(c_lo, c_hi), step(w_lo, w_hi)


def slider_bounds(info: Any) -> tuple[tuple[float, float], tuple[float, float]]:
    """((center min, center max), (width min, width max)) covering the value range and every preset.

    Every preset, the file's own window first, lies inside the bounds whatever the value range (one
    pixel at 65535 beside tissue at 1000-1400 makes the range wide and the file's window narrow).
    """
    windows = [(c, w) for c, w in presets(info).values() if math.isfinite(c) and math.isfinite(w)] or [(0.5, 1.0)]
    if info.value_range is not None and all(math.isfinite(float(v)) for v in info.value_range):
        lo, hi = (float(v) for v in info.value_range)
    else:
        lo, hi = min(c for c, _ in windows), max(c for c, _ in windows)
    # The narrowest span: a millionth of the values' magnitude (values in 0..0.1 after a small RescaleSlope need
    # slider steps far under one unit; a whole-number film's windows are at least 1 wide anyway).
    span = max(hi - lo, max(w for _, w in windows), 1e-6 * max(1.0, abs(lo), abs(hi)))
    c_lo = min([lo] + [c for c, _ in windows])
    c_hi = max([hi] + [c for c, _ in windows])
    if not c_hi > c_lo:  # a constant image: a slider needs room to move
        c_lo, c_hi = c_lo - span / 2, c_hi + span / 2
    w_lo = min([span / 100.0] + [w for _, w in windows])
    return (c_lo, c_hi), (w_lo, max(2.0 * span, max(w for _, w in windows)))
