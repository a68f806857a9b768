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


def _film(**tags) -> bytes:
    """A 16-bit MONOCHROME2 DX film: lungs near 1000, mediastinum near 1400, one hot pixel at 65535."""
    import numpy as np
    from test_imaging import _dicom

    x = np.linspace(-1, 1, 160)
    film = np.tile(1000 + 400 * np.exp(-(x / 0.2) ** 2), (200, 1))
    film += np.random.default_rng(0).integers(-50, 50, film.shape)
    film = film.astype(np.uint16)
    film[0, 0] = 65535
    return _dicom(film, **tags)


def test_a_chosen_window_keeps_the_file_s_sigmoid_curve():
    """PS3.3 C.11.2.1.3: the VOI LUT Function goes with the window. A nudged slider or a preset drew LINEAR, so the
    contrast jumped (1000: 0.119 -> 0.0) on the smallest move."""
    film = _film(WindowCenter=1200, WindowWidth=400, VOILUTFunction="SIGMOID")
    shown = imaging.load(film)
    nudged = imaging.load(film, window=(1200.0, 400.0001))
    assert shown.info.window_source == "file"
    import numpy as np

    np.testing.assert_allclose(nudged.pixels, shown.pixels, atol=1e-5)
    assert 0.05 < float(np.median(nudged.pixels[:, :20])) < 0.2  # a sigmoid's tail, not clipped to black


def test_a_voi_lut_film_s_presets_start_from_its_window_not_from_a_hot_pixel():
    """One pixel at 65535 beside tissue at 950-1450: presets from the full value range were one grey level (all
    black). They start from the file's window (offered as a preset too), and the sliders step finely enough to
    reach it."""
    import numpy as np
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    item = Dataset()
    item.LUTDescriptor = [4096, 0, 12]
    item.LUTData = np.clip((np.arange(4096) - 900) / 600 * 4095, 0, 4095).astype(np.uint16).tobytes()
    film = _film(VOILUTSequence=Sequence([item]), WindowCenter=1200, WindowWidth=500)
    info = imaging.load(film).info
    assert info.window_source == "voi_lut" and info.window is None and info.reference_window == (1200.0, 500.0)
    presets = windowing.presets(info)
    assert list(presets)[:2] == [windowing.VOI_LUT, windowing.AUTO_WITHOUT_LUT]
    assert presets["Bone"] == pytest.approx((1200 + 0.25 * 500, 250.0))
    for name, window in presets.items():
        if name != windowing.VOI_LUT:
            body = imaging.load(film, window=window).pixels[1:, 1:]
            assert len(np.unique(np.rint(body * 255))) > 100, name  # a picture, not a blank
    c_step, w_step = windowing.slider_steps(info)
    assert c_step <= 2.5 and w_step <= 2.5  # some 100 steps across Bone's width; they were 161 and 322
    without = imaging.load(_film(VOILUTSequence=Sequence([item]))).info  # no window in the file: the percentiles
    center, width = without.reference_window
    assert 900 < center - width / 2 < 1100 and 1300 < center + width / 2 < 1500


def test_a_voi_lut_whose_first_value_is_written_unsigned_maps_signed_values():
    """-1024 written as US 64512 in the LUT Descriptor (PS3.3 allows either): signed values were all mapped to the
    LUT's first entry, a black film."""
    import io

    import numpy as np
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    item = Dataset()
    item.LUTDescriptor = [2048, (-1024) & 0xFFFF, 16]
    item.LUTData = np.linspace(0, 65535, 2048).astype(np.uint16).tobytes()
    ds = pydicom.dcmread(io.BytesIO(_film(VOILUTSequence=Sequence([item]))))
    values = (np.frombuffer(ds.PixelData, np.uint16).astype(np.int32) - 1600).clip(-1024, 1023).astype(np.int16)
    ds.PixelRepresentation, ds.PixelData = 1, values.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf)
    img = imaging.load(buf.getvalue())
    assert img.info.window_source == "voi_lut"
    expected = (values.reshape(img.pixels.shape).astype(np.float64) + 1024) / 2047
    np.testing.assert_allclose(img.pixels, expected, atol=1e-3)
