"""Reading back the viewer figure a page sent (AppTest's plotly_chart protos): arrays, images, titles."""

from __future__ import annotations

import base64
import json

import cv2
import numpy as np


def array(value) -> np.ndarray:
    """A plotly array as sent: a base64 typed array {dtype, bdata, shape} or a plain (nested) list."""
    if isinstance(value, dict) and "bdata" in value:
        flat = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        shape = tuple(int(n) for n in str(value.get("shape", len(flat))).split(","))
        return flat.reshape(shape)
    return np.asarray(value)


def png(source: str) -> np.ndarray:
    """An image trace's PNG data URI -> uint8 (H, W) grey or (H, W, 3) RGB."""
    encoded = np.frombuffer(base64.b64decode(source.split(",", 1)[1]), np.uint8)
    image = cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED)
    return image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def viewer(at) -> dict:
    """The page's viewer figure (the plotly chart whose traces include the film heatmap) as a dict."""
    specs = [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]
    found = [s for s in specs if any(t.get("name") == "film" and t["type"] == "heatmap" for t in s["data"])]
    assert len(found) == 1, f"expected one viewer figure, found {len(found)}"
    return found[0]


def film(spec: dict) -> np.ndarray:
    """The left pane's grey levels, uint8 (h, w)."""
    return array(next(t for t in spec["data"] if t["type"] == "heatmap")["z"])


def right_pane(spec: dict) -> np.ndarray:
    """The right pane's picture (wash in colour, or the film under contour lines)."""
    return png(next(t for t in spec["data"] if t["type"] == "image")["source"])


def titles(spec: dict) -> list[str]:
    return [a["text"] for a in spec["layout"].get("annotations", [])]


def lines(spec: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Contour traces by name -> (x, y) in file pixels (gaps dropped)."""
    out = {}
    for trace in spec["data"]:
        if trace["type"] == "scatter":
            x = np.array([np.nan if v is None else v for v in trace["x"]], float)
            y = np.array([np.nan if v is None else v for v in trace["y"]], float)
            keep = ~np.isnan(x)
            out[trace["name"]] = (x[keep], y[keep])
    return out
