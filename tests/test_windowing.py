"""cxr_core.windowing: relative presets and slider bounds on real DICOM files."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import DICOM

from cxr_core import imaging, windowing

CR = DICOM / "fo-dicom/CR-MONO1-10-chest.dcm"  # MONOCHROME1, window 550/1024 in the file
J2K = DICOM / "pylibjpeg-data/JPEG2KLossless_1s_1f_u_16_16.dcm"  # MONOCHROME2, no usable window


def test_file_window_comes_first_and_presets_move_toward_bright_in_display_terms():
    info = imaging.load(CR).info
    assert info.inverted  # MONOCHROME1: a larger stored value is shown darker
    presets = windowing.presets(info)
    assert list(presets)[0] == windowing.AUTO and presets[windowing.AUTO] == (550.0, 1024.0)
    # Bone is brighter on screen, so for MONOCHROME1 its center is a *lower* stored value.
    assert presets["Bone"] == pytest.approx((550 - 0.25 * 1024, 0.5 * 1024))
    assert presets["Lung"] == pytest.approx((550 + 0.15 * 1024, 0.8 * 1024))
    lo, hi = info.value_range
    assert presets[windowing.FULL] == pytest.approx(((lo + hi) / 2, hi - lo))


def test_monochrome2_presets_move_the_other_way():
    info = dataclasses.replace(imaging.load(CR).info, inverted=False)
    assert windowing.presets(info)["Bone"] == pytest.approx((550 + 0.25 * 1024, 512.0))


def test_file_without_usable_window_starts_from_the_automatic_window():
    info = imaging.load(J2K).info
    presets = windowing.presets(info)
    assert list(presets)[0] == windowing.AUTO_PERCENTILE
    assert presets[windowing.AUTO_PERCENTILE] == pytest.approx(info.window)
    assert info.value_range[0] <= info.window[0] <= info.value_range[1]


@pytest.mark.parametrize("path", [CR, J2K])
def test_slider_bounds_contain_every_preset(path):
    info = imaging.load(path).info
    (c_lo, c_hi), (w_lo, w_hi) = windowing.slider_bounds(info)
    assert c_lo < c_hi and 0 < w_lo < w_hi
    for center, width in windowing.presets(info).values():
        assert c_lo <= center <= c_hi and w_lo <= width <= w_hi


def test_pictures_without_a_window_have_no_presets(data_dir):
    info = imaging.load(data_dir / "kermany/train/NORMAL/IM-0115-0001.jpeg").info
    assert info.window is None and windowing.presets(info) == {}


def test_a_file_shown_through_its_voi_lut_gets_window_controls_that_start_by_keeping_it():
    """A VOI LUT file has no (center, width): its first preset keeps the LUT (the page passes no window while the
    sliders stay at it), and the others are windows over its value range, so the controls are not missing."""
    info = dataclasses.replace(imaging.load(J2K).info, window=None, window_source="voi_lut", inverted=False)
    lo, hi = info.value_range
    presets = windowing.presets(info)
    assert list(presets)[0] == windowing.VOI_LUT and presets[windowing.VOI_LUT] == ((lo + hi) / 2, hi - lo)
    assert presets["Bone"] == pytest.approx(((lo + hi) / 2 + 0.25 * (hi - lo), 0.5 * (hi - lo)))
    assert windowing.FULL not in presets  # the same window as the first: choosing it must keep the LUT
    (c_lo, c_hi), (w_lo, w_hi) = windowing.slider_bounds(info)
    assert all(c_lo <= c <= c_hi and w_lo <= w <= w_hi for c, w in presets.values())
    flat = dataclasses.replace(info, value_range=(7.0, 7.0))
    assert windowing.presets(flat) == {}  # nothing to window


def test_small_values_get_slider_steps_of_their_own_size():
    info = dataclasses.replace(imaging.load(J2K).info, value_range=(0.0, 0.1), window=(0.05, 0.09),
                               window_source="percentile")
    (c_lo, c_hi), (w_lo, w_hi) = windowing.slider_bounds(info)
    assert w_hi <= 0.25 and (c_lo, c_hi) == (0.0, 0.1)  # not 0..2: some 400 positions over the useful widths
