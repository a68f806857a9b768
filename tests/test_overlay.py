"""cxr_core.overlay: sizes, exact blends at opacity 0 and 1, strict input checks."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from cxr_core import overlay


@pytest.fixture
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.uniform(0, 1, (300, 200)).astype(np.float32)


@pytest.fixture
def heatmap() -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.uniform(0, 1, (7, 7)).astype(np.float32)


def test_overlay_is_at_the_image_size(image, heatmap):
    out = overlay.overlay(image, heatmap)
    assert out.shape == (300, 200, 3)
    assert out.dtype == np.uint8


@pytest.mark.parametrize("colormap", sorted(overlay.COLORMAPS))
def test_opacity_zero_is_the_gray_image(image, heatmap, colormap):
    out = overlay.overlay(image, heatmap, colormap=colormap, opacity=0.0)
    gray = np.rint(image * 255).astype(np.uint8)
    for channel in range(3):
        np.testing.assert_array_equal(out[..., channel], gray)


@pytest.mark.parametrize("colormap", sorted(overlay.COLORMAPS))
def test_opacity_one_is_the_pure_colormap(image, heatmap, colormap):
    out = overlay.overlay(image, heatmap, colormap=colormap, opacity=1.0)
    resized = cv2.resize(heatmap, (200, 300), interpolation=cv2.INTER_LINEAR)
    levels = np.rint(np.clip(resized, 0, 1) * 255).astype(np.uint8)
    expected = cv2.applyColorMap(levels, overlay.COLORMAPS[colormap])[..., ::-1]  # BGR -> RGB
    np.testing.assert_array_equal(out, expected)


def test_half_opacity_is_the_rounded_mean():
    image = np.zeros((4, 4), np.float32)
    heat = np.ones((4, 4), np.float32)  # jet at 1.0 is dark red: RGB (128, 0, 0)
    out = overlay.overlay(image, heat, "jet", 0.5)
    np.testing.assert_array_equal(out[0, 0], [64, 0, 0])
    assert overlay.colorize(heat, "jet")[0, 0].tolist() == [128, 0, 0]


def test_jet_is_rgb_not_bgr():
    cold = overlay.colorize(np.zeros((2, 2), np.float32), "jet")
    assert cold[0, 0, 2] > 100 and cold[0, 0, 0] == 0  # low values are blue


@pytest.mark.parametrize(
    ("image", "heat", "kwargs", "message"),
    [
        (np.full((8, 8), 1.5, np.float32), np.zeros((4, 4), np.float32), {}, "image must be in"),
        (np.zeros((8, 8), np.float32), np.full((4, 4), 255.0, np.float32), {}, "heatmap must be in"),
        (np.zeros((8, 8), np.float32), np.full((4, 4), -0.1, np.float32), {}, "heatmap must be in"),
        (np.zeros((8, 8), np.uint8), np.zeros((4, 4), np.float32), {}, "dtype uint8"),
        (np.zeros((8, 8, 3), np.float32), np.zeros((4, 4), np.float32), {}, "2-D"),
        (np.zeros((8, 8), np.float32), np.zeros((1, 4, 4), np.float32), {}, "2-D"),
        (np.zeros((8, 8), np.float32), np.full((4, 4), np.nan, np.float32), {}, "NaN"),
        (np.zeros((8, 8), np.float32), np.zeros((4, 4), np.float32), {"opacity": 1.2}, "opacity"),
        (np.zeros((8, 8), np.float32), np.zeros((4, 4), np.float32), {"colormap": "rainbowish"}, "rainbowish"),
    ],
)
def test_bad_inputs_raise_value_error(image, heat, kwargs, message):
    with pytest.raises(ValueError, match=message):
        overlay.overlay(image, heat, **kwargs)


def test_to_rgb_repeats_the_gray_levels():
    image = np.array([[0.0, 0.5], [1.0, 0.25]], np.float32)
    rgb = overlay.to_rgb(image)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[..., 1], [[0, 128], [255, 64]])


def test_thumbnail_keeps_the_aspect_ratio(image):
    thumb = overlay.thumbnail(image, size=96)
    assert thumb.shape == (96, 64) and thumb.dtype == np.uint8
    # Area averaging of uniform noise: the mean level is kept, the spread shrinks.
    assert abs(thumb.mean() / 255 - image.mean()) < 0.01
    assert thumb.std() / 255 < image.std() / 2


def test_contours_draw_lines_only_around_the_regions_at_each_level():
    """A round bump: at level 0.5 the line runs around the disc where the heatmap reaches 0.5, in the colormap's
    colour at 0.5; the film stays as it was inside the disc, far outside it, and everywhere with no level."""
    yy, xx = np.mgrid[0:200, 0:200]
    heat = np.clip(1.0 - np.hypot(yy - 100, xx - 100) / 100.0, 0, 1).astype(np.float32)  # 0.5 at radius 50
    image = np.full((200, 200), 0.5, np.float32)
    grey = overlay.to_rgb(image)
    drawn = overlay.contours(image, heat, [0.5], "jet", opacity=1.0)
    assert drawn.shape == (200, 200, 3) and drawn.dtype == np.uint8
    colour = overlay.colorize(np.array([[0.5]], np.float32), "jet")[0, 0]
    for y, x in ((100, 149), (100, 51), (51, 100), (149, 100)):  # on the circle of radius ~49-50, inside the region
        assert (drawn[y, x] == colour).all(), (y, x)
    np.testing.assert_array_equal(drawn[100, 100], grey[100, 100])  # the centre: inside, away from the line
    np.testing.assert_array_equal(drawn[5, 5], grey[5, 5])  # far outside
    changed = np.any(drawn != grey, axis=-1)
    assert 0.01 < changed.mean() < 0.1  # a line, not a wash
    np.testing.assert_array_equal(overlay.contours(image, heat, [], "jet"), grey)
    two = np.any(overlay.contours(image, heat, [0.3, 0.8], "jet") != grey, axis=-1)
    assert two[100, 100 + 70 - 1] and two[100, 100 + 20 - 1] and not changed[100, 100 + 70 - 1]  # radius 70 and 20
    # a low opacity is raised to 0.6: the line stays visible
    faint = overlay.contours(image, heat, [0.5], "jet", opacity=0.1)[100, 149].astype(float)
    np.testing.assert_allclose(faint, 0.4 * grey[100, 149] + 0.6 * colour, atol=1)
    with pytest.raises(ValueError, match="contour level"):
        overlay.contours(image, heat, [1.0])
