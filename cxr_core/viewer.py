"""The radiologist's viewer: a film beside its heatmap, zooming and panning together (plotly figure, no streamlit).

    shown = viewer.display_copy(image.pixels, heatmap, values=image.values)
    fig = viewer.figure(shown, mode="contours", levels=(0.5, 0.7, 0.9))

Inputs are the film as displayed (float32 HxW in [0, 1], after the DICOM window), the heatmap
(float32 hxw in [0, 1], any size) and, for DICOM, the modality values (float32 HxW: stored values
after Rescale Slope/Intercept or the Modality LUT). The figure holds a *display copy* whose longer
side is at most ``MAX_SIDE`` px; its axes are in the file's pixel coordinates, so hover and zoom
read in file pixels. Both panes share their axes (``matches``): a zoom or pan in one moves the other.
The overlay is a colour wash (``overlay.overlay``) or iso-lines of the heatmap at chosen levels.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from cxr_core import overlay

MAX_SIDE = 1024  # px, longer side of the display copy: sharp at page width, a few MB to the browser
MODES = ("wash", "contours")
LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
DEFAULT_LEVELS = (0.5, 0.7, 0.9)


@dataclass(frozen=True)
class Display:
    """The display copy: ``film`` uint8 (h, w) grey levels, ``heatmap`` float32 (h, w) in [0, 1],
    ``values`` float32 (h, w) modality values or None, ``scale`` file pixels per display pixel (>= 1) along the
    longer side; ``scale_xy`` the same along x and y (each side is rounded to whole display pixels on its own, so
    a 40000 x 1 strip is 1024 x 1: 39.06 file pixels per display pixel across, 1 down)."""

    film: np.ndarray
    heatmap: np.ndarray
    values: np.ndarray | None
    scale: float
    scale_xy: tuple[float, float] = (1.0, 1.0)

    @property
    def shape(self) -> tuple[int, int]:
        return self.film.shape


def display_copy(image: np.ndarray, heatmap: np.ndarray, values: np.ndarray | None = None,
                 max_side: int = MAX_SIDE) -> Display:
    """Film, heatmap and values at the display size (longer side <= ``max_side`` px, aspect kept).

    The film is reduced by area averaging; the values by nearest neighbour, so a hovered value is
    one that is in the file; the heatmap is resized bilinearly (as ``overlay.overlay`` does).
    """
    if max_side < 1:
        raise ValueError(f"max_side must be positive, got {max_side}")
    gray = overlay.to_rgb(image)[..., 0]
    h, w = gray.shape
    if values is not None and np.shape(values) != (h, w):
        raise ValueError(f"values have shape {np.shape(values)}, the film {(h, w)}")
    scale = max(1.0, max(h, w) / max_side)
    size = (max(1, round(w / scale)), max(1, round(h / scale)))  # cv2 order: (width, height)
    if scale > 1.0:
        gray = cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
        if values is not None:
            values = cv2.resize(np.asarray(values, np.float32), size, interpolation=cv2.INTER_NEAREST)
    heat = overlay._check_unit("heatmap", heatmap)
    if heat.shape != gray.shape:
        heat = np.clip(cv2.resize(heat, size, interpolation=cv2.INTER_LINEAR), 0.0, 1.0)
    return Display(gray, heat, None if values is None else np.asarray(values, np.float32), scale,
                   (w / gray.shape[1], h / gray.shape[0]))


def contour_lines(heatmap: np.ndarray, level: float) -> tuple[list[float | None], list[float | None]]:
    """The boundary of ``heatmap >= level`` as plotly line coordinates (x, y in heatmap pixels).

    Each closed line follows the centres of the boundary pixels inside the region; lines are
    separated by None (plotly's gap). Empty lists when no pixel reaches ``level``.
    """
    contours = overlay.level_outlines(overlay._check_unit("heatmap", heatmap), level)
    xs: list[float | None] = []
    ys: list[float | None] = []
    for contour in contours:
        points = contour[:, 0, :]
        closed = np.vstack([points, points[:1]])
        xs.extend(closed[:, 0].astype(float).tolist() + [None])
        ys.extend(closed[:, 1].astype(float).tolist() + [None])
    return xs, ys


def png_uri(rgb: np.ndarray) -> str:
    """uint8 (H, W) or (H, W, 3) RGB -> a PNG data URI (lossless; plotly's Image ``source``)."""
    array = np.asarray(rgb, dtype=np.uint8)
    bgr = array if array.ndim == 2 else cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".png", bgr)
    if not ok:
        raise ValueError(f"could not encode an image of shape {array.shape} as PNG")
    return "data:image/png;base64," + base64.b64encode(encoded.tobytes()).decode("ascii")


def level_colour(level: float, colormap: str) -> str:
    """The colormap's colour at ``level`` as 'rgb(r, g, b)' (contours coloured as the wash would be)."""
    r, g, b = overlay.level_rgb(level, colormap)
    return f"rgb({r}, {g}, {b})"


def _hover(values: np.ndarray | None) -> tuple[np.ndarray | None, str]:
    where = "x %{x:.0f}, y %{y:.0f} (file pixels)"
    if values is None:
        return None, where + "<br>grey level %{z} of 255<extra></extra>"
    integral = np.array_equal(values, np.round(values)) and np.abs(values).max(initial=0) < 2**31
    # The smallest type that holds the values exactly: this array is most of what a DICOM sends to the browser.
    lo, hi = float(values.min(initial=0)), float(values.max(initial=0))
    kinds = (np.uint8, np.int8, np.uint16, np.int16, np.int32) if integral else (np.float32,)
    data = values.astype(next(k for k in kinds if not integral or np.iinfo(k).min <= lo and hi <= np.iinfo(k).max))
    fmt = "" if integral else ":.6g"
    return data, where + (f"<br>value %{{customdata{fmt}}} (after rescale or modality LUT; "
                          "grey level %{z} of 255)<extra></extra>")


def figure(shown: Display, mode: str = "wash", colormap: str = "jet", opacity: float = 0.4,
           levels: Sequence[float] = DEFAULT_LEVELS, titles: tuple[str, str] = ("Film", "Heatmap"),
           height: int = 640, revision: str = "") -> go.Figure:
    """The film (left) and the film with its heatmap (right), axes matched, in file pixel coordinates.

    ``mode`` "wash": the colour wash at ``opacity``; "contours": one line per level in ``levels``
    (in (0, 1)), coloured by ``colormap``, at ``opacity`` (raised to at least 0.6 so lines stay visible).
    ``revision`` keeps the zoom across redraws of the same film (plotly's ``uirevision``).
    """
    if mode not in MODES:
        raise ValueError(f"unknown viewer mode {mode!r}; choose one of {MODES}")
    h, w = shown.shape
    sx, sy = shown.scale_xy  # file pixels per display pixel, across and down
    place = dict(x0=(sx - 1) / 2, dx=sx, y0=(sy - 1) / 2, dy=sy)
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.01, subplot_titles=titles)
    customdata, template = _hover(shown.values)
    fig.add_trace(go.Heatmap(z=shown.film, customdata=customdata, hovertemplate=template, colorscale="gray",
                             zmin=0, zmax=255, showscale=False, name="film", **place), row=1, col=1)
    if mode == "wash":
        fig.add_trace(go.Image(source=png_uri(overlay.overlay(shown.film / np.float32(255), shown.heatmap,
                                                              colormap, opacity)),
                               hoverinfo="skip", name="wash", **place), row=1, col=2)
    else:
        fig.add_trace(go.Image(source=png_uri(shown.film), hoverinfo="skip", name="film", **place), row=1, col=2)
        for level in sorted(set(levels)):
            xs, ys = contour_lines(shown.heatmap, level)
            fig.add_trace(go.Scatter(
                x=[None if x is None else place["x0"] + x * sx for x in xs],
                y=[None if y is None else place["y0"] + y * sy for y in ys],
                mode="lines", line=dict(color=level_colour(level, colormap), width=2),
                opacity=max(opacity, 0.6), name=f"heatmap {level:.0%}",
                hovertemplate=f"heatmap level {level:.0%} of its range<extra></extra>"), row=1, col=2)
    fig.update_xaxes(range=[-0.5, w * sx - 0.5], showgrid=False, zeroline=False, constrain="domain")
    fig.update_yaxes(range=[h * sy - 0.5, -0.5], showgrid=False, zeroline=False, constrain="domain")
    fig.update_layout(xaxis2=dict(matches="x"), yaxis=dict(scaleanchor="x"), yaxis2=dict(matches="y"),
                      height=height, margin=dict(l=0, r=0, t=56, b=0), dragmode="zoom", uirevision=revision,
                      showlegend=mode == "contours", legend=dict(orientation="h", y=-0.02, yanchor="top"),
                      plot_bgcolor="black")
    return fig
