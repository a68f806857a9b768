"""cxr_core.viewer: the display copy, contour lines at their levels, and the figure's panes and axes."""

from __future__ import annotations

import numpy as np
import plotly_spec
import pytest

from cxr_core import overlay, viewer


def _radial(size: int) -> np.ndarray:
    """A heatmap falling linearly from 1 at the centre to 0 at distance ``size / 2``."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c = (size - 1) / 2
    return np.clip(1.0 - np.hypot(xx - c, yy - c) / (size / 2), 0.0, 1.0).astype(np.float32)


def test_small_film_is_shown_pixel_for_pixel():
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 1, (300, 200)).astype(np.float32)
    values = rng.integers(0, 4096, (300, 200)).astype(np.float32)
    shown = viewer.display_copy(image, np.zeros((7, 7), np.float32), values)
    assert shown.scale == 1.0 and shown.shape == (300, 200)
    np.testing.assert_array_equal(shown.film, np.rint(image * 255).astype(np.uint8))
    np.testing.assert_array_equal(shown.values, values)
    assert shown.heatmap.shape == (300, 200)


def test_large_film_is_reduced_to_1024_px_and_values_are_taken_from_the_file():
    image = np.tile(np.linspace(0, 1, 3000, dtype=np.float32), (1500, 1))  # 1500 x 3000, a left-right ramp
    values = np.tile(np.arange(3000, dtype=np.float32) * 7, (1500, 1))
    shown = viewer.display_copy(image, _radial(64), values)
    assert shown.shape == (512, 1024) and shown.scale == pytest.approx(3000 / 1024)
    assert set(np.unique(shown.values)) <= set(values[0])  # nearest neighbour: values that are in the file
    assert shown.film[:, 0].max() <= 2 and shown.film[:, -1].min() >= 253  # the ramp survives area averaging
    assert np.all(np.diff(shown.film[0].astype(int)) >= 0)


def test_a_strip_is_placed_in_file_pixels_along_each_axis():
    """A 1 x 40000 strip: 1024 x 1 display pixels, 39.06 file pixels each across but 1 down, so the strip spans
    exactly the file's 40000 x 1 pixels (one scale for both axes drew it 39 px tall)."""
    shown = viewer.display_copy(np.linspace(0, 1, 40000, dtype=np.float32)[None, :], np.zeros((7, 7), np.float32))
    assert shown.shape == (1, 1024) and shown.scale_xy == (40000 / 1024, 1.0)
    trace = viewer.figure(shown).data[0]
    assert (trace.dx, trace.dy, trace.y0) == (pytest.approx(40000 / 1024), 1.0, 0.0)
    assert trace.x0 + 1023 * trace.dx + trace.dx / 2 == pytest.approx(40000 - 0.5)  # the last column ends there

def test_contour_lines_lie_on_their_level():
    heat = _radial(200)
    for level in (0.3, 0.5, 0.8):
        xs, ys = viewer.contour_lines(heat, level)
        x = np.array([v for v in xs if v is not None])
        y = np.array([v for v in ys if v is not None])
        assert len(x) > 8 and xs.count(None) == 1  # one closed line
        radius = np.hypot(x - 99.5, y - 99.5)
        expected = (1 - level) * 100  # where the radial heatmap equals the level
        assert np.all(np.abs(radius - expected) <= 1.5), (level, radius.min(), radius.max(), expected)


def test_contour_at_an_unreached_level_is_empty_and_bad_levels_are_refused():
    assert viewer.contour_lines(np.full((10, 10), 0.2, np.float32), 0.5) == ([], [])
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="contour level"):
            viewer.contour_lines(_radial(10), bad)


def test_wash_figure_panes_match_and_axes_are_in_file_pixels():
    rng = np.random.default_rng(1)
    image = rng.uniform(0, 1, (2048, 1536)).astype(np.float32)
    shown = viewer.display_copy(image, _radial(32))
    spec = plotly_spec_from(viewer.figure(shown, "wash", "viridis", 0.3, titles=("film", "heat")))
    film, wash = plotly_spec.film(spec), plotly_spec.right_pane(spec)
    np.testing.assert_array_equal(film, shown.film)
    np.testing.assert_array_equal(wash, overlay.overlay(shown.film / np.float32(255), shown.heatmap, "viridis", 0.3))
    layout = spec["layout"]
    assert layout["xaxis2"]["matches"] == "x" and layout["yaxis2"]["matches"] == "y"
    assert layout["xaxis"]["range"] == pytest.approx([-0.5, 1535.5])
    assert layout["yaxis"]["range"] == pytest.approx([2047.5, -0.5])  # top of the film at the top
    assert plotly_spec.titles(spec) == ["film", "heat"]


def test_contour_figure_draws_one_coloured_line_per_level_over_the_film():
    shown = viewer.display_copy(np.full((100, 100), 0.5, np.float32), _radial(100))
    spec = plotly_spec_from(viewer.figure(shown, "contours", "jet", 0.2, levels=(0.7, 0.4, 0.7)))
    drawn = plotly_spec.lines(spec)
    assert list(drawn) == ["heatmap 40%", "heatmap 70%"]
    np.testing.assert_array_equal(plotly_spec.right_pane(spec), shown.film)  # the film itself, unwashed
    colours = {t["name"]: t["line"]["color"] for t in spec["data"] if t["type"] == "scatter"}
    assert colours["heatmap 70%"] == viewer.level_colour(0.7, "jet") != colours["heatmap 40%"]
    assert all(t["opacity"] == 0.6 for t in spec["data"] if t["type"] == "scatter")  # lines stay visible


def test_dicom_hover_shows_stored_values():
    values = np.arange(12, dtype=np.float32).reshape(3, 4) * 100 - 200
    spec = plotly_spec_from(viewer.figure(viewer.display_copy(np.zeros((3, 4), np.float32),
                                                              np.zeros((3, 4), np.float32), values)))
    trace = spec["data"][0]
    np.testing.assert_array_equal(plotly_spec.array(trace["customdata"]), values.astype(np.int32))
    assert "value %{customdata" in trace["hovertemplate"] and "after rescale or modality LUT" in trace["hovertemplate"]


def test_bad_mode_is_refused():
    shown = viewer.display_copy(np.zeros((4, 4), np.float32), np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="viewer mode"):
        viewer.figure(shown, "heatmap")


def plotly_spec_from(fig) -> dict:
    import json

    return json.loads(fig.to_json())
