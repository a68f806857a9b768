"""Cached loaders and the widgets every page shares (model selector, research banner).

Pages import this module; it is the only place that keeps process-wide state. A model is
loaded once per process with ``st.cache_resource`` and shared by every browser session
(``Classifier`` serialises calls with its own lock).
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import streamlit as st

from cxr_core import card as card_lib
from cxr_core import overlay, viewer
from cxr_core.errors import ModelCardError

REPO = Path(__file__).resolve().parent
# Accepted upload suffixes. The uploader itself gets type=None: its filter would reject
# extension-less DICOM files, so uploads are validated by content in cxr_core.imaging.
UPLOAD_TYPES = ("jpg", "jpeg", "png", "bmp", "tif", "tiff", "dcm", "dicom")
UPLOAD_HELP = (
    "JPEG, PNG, TIFF or DICOM (.dcm, .dicom or no extension). The file is read in memory "
    "and never stored."
)
MODEL_KEY = "model_dir"


def models_root() -> Path:
    """Folder holding one sub-folder per model: env CXR_MODELS_DIR, default <repo>/models."""
    return Path(os.environ.get("CXR_MODELS_DIR") or REPO / "models")


def data_root() -> Path | None:
    """The configured root for server-side folders (env CXR_DATA_ROOT), or None when unset."""
    value = os.environ.get("CXR_DATA_ROOT")
    return Path(value).resolve() if value else None


def list_models() -> list[Path]:
    """Model folders (those holding a model_card.json) under ``models_root()``, sorted by name."""
    root = models_root()
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / card_lib.CARD_FILE).is_file())


class WarmUp(threading.Thread):
    """Traces a freshly loaded model's graphs in the background, so the first upload finds them ready.

    In the order a clinician needs them: the Grad-CAM pass (prediction and heatmap of an upload),
    the plain forward pass and Grad-CAM++ (a change of explanation method). It touches no Streamlit
    state (so it cannot disturb sessions or AppTest's runtime) and needs no lock of its own: a real
    request for a graph being traced waits on that graph's lock (``tf.function`` traces under its
    lock; ``Classifier`` and ``Explainer`` serialise the forward pass and tf-keras-vis), then uses
    the traced graph. ``done`` is set when it has finished (or failed: then the first request traces).
    """

    def __init__(self, classifier: Any, explainer: Any):
        super().__init__(name=f"warm-up {classifier.card.name}", daemon=True)
        self.classifier, self.explainer = classifier, explainer
        self.done = threading.Event()
        self.seconds: float | None = None
        self.error: str | None = None

    def run(self) -> None:
        import numpy as np

        start = time.perf_counter()
        name, size = self.classifier.card.name, self.classifier.input_size
        blank = np.zeros((1, size, size, 3), np.float32)
        try:
            self.explainer.warm_up()
            self.classifier.logits(blank)
            self.explainer.explain(blank, "gradcam++", class_index=0)
            self.seconds = time.perf_counter() - start
            print(f"cxr: warm-up of {name} done in {self.seconds:.1f} s", file=sys.stderr, flush=True)
        except Exception as err:  # the first request then traces what is missing itself
            self.error = f"{type(err).__name__}: {err}"
            print(f"cxr: warm-up of {name} failed ({self.error})", file=sys.stderr, flush=True)
        finally:
            self.classifier = self.explainer = None  # a cleared cache frees the model
            WARM_UPS.discard(self)
            self.done.set()


WARM_UPS: set[WarmUp] = set()  # the ones still running


@atexit.register
def _finish_warm_ups() -> None:
    """Let a running warm-up finish before the interpreter tears TensorFlow down under it."""
    for warm in list(WARM_UPS):
        warm.done.wait(timeout=120)


@st.cache_resource(show_spinner="Loading the model (once per server process)...")
def load_model(folder: str, weights_sha256: str = "") -> tuple[Any, Any]:
    """(Classifier, Explainer) for a model folder, loaded once per process and shared.

    Returns as soon as the weights are in; a ``WarmUp`` thread then traces the graphs while the
    page is drawn and the clinician picks a file. ``weights_sha256`` only keys the cache, so a
    replaced model folder is loaded afresh. Raises ``ModelCardError`` for a missing, invalid or
    tampered folder.
    """
    from cxr_core import explain, models

    classifier = models.load(folder)
    explainer = explain.Explainer(classifier)
    print(f"cxr: model {classifier.card.name} loaded from {Path(folder).name}", file=sys.stderr, flush=True)
    warm = WarmUp(classifier, explainer)
    WARM_UPS.add(warm)
    warm.start()
    return classifier, explainer


def headline_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The card's numeric metrics flattened to 'split auc' -> value (one level of nesting)."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[key] = float(value)
        elif isinstance(value, dict):
            for sub, v in value.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and sub in ("auc", "accuracy", "ece", "n"):
                    flat[f"{key} {sub}"] = float(v)
    return flat


# What each headline figure means, shown on hover beside the figures.
METRIC_HELP = (
    "On the split named first (test: held out, never used for training or choices; val: validation). "
    "n: number of images. accuracy: share of images whose called class is right. auc: area under the ROC "
    "curve (macro average over classes; 1 is perfect, 0.5 is chance). ece: expected calibration error, the "
    "average gap between predicted probability and observed frequency. best_epoch: the training epoch kept."
)


def format_metric(name: str, value: float) -> str:
    """A headline figure as a clinician reads it: counts as integers, rates as percentages."""
    last = name.split()[-1]
    if last in ("n", "best_epoch", "epochs") or name.endswith("_n"):
        return f"{round(value):,}"
    if last in ("accuracy", "ece", "sensitivity", "specificity", "top_class_accuracy"):
        return f"{value:.1%}"
    return f"{value:.3f}"


def card_summary_ui(card: card_lib.ModelCard) -> None:
    """The card's summary in the sidebar: classes, decision rule, data, headline metrics, version, hash."""
    st.sidebar.markdown(f"**{card.name}** · version {card.version} · `{card.architecture}` {card.input_size} px")
    st.sidebar.markdown("Classes: " + ", ".join(f"`{c}`" for c in card.class_names))
    if card.thresholds:
        rule = ", ".join(f"{c} ≥ {t:.2f}" for c, t in card.thresholds.items())
        st.sidebar.caption(f"Decision: {rule}; otherwise {card.negative_class or 'top class'}.",
                           help="A class is called when its calibrated probability (0 to 1) reaches its threshold; "
                           "thresholds were fitted on the validation split.")
    metrics = headline_metrics(card.metrics)
    if metrics:
        st.sidebar.markdown(" · ".join(f"{k}: **{format_metric(k, v)}**" for k, v in metrics.items()),
                            help=METRIC_HELP)
    if card.training_data:
        with st.sidebar.expander("Training data"):
            st.json(card.training_data, expanded=False)
    st.sidebar.caption(f"Weights sha256 `{card.weights_sha256[:12]}`" + (f" · {card.created}" if card.created else ""))


def model_sidebar() -> tuple[Any, Any] | None:
    """Sidebar model selector; returns the chosen (Classifier, Explainer) or None with a message.

    The choice is kept in ``st.session_state["model_dir"]`` so it survives page changes.
    """
    folders = list_models()
    if not folders:
        st.sidebar.error(
            f"No models found in {models_root()}. Put a model folder (model_card.json + weights) "
            "there, or point the environment variable CXR_MODELS_DIR at a folder of models."
        )
        return None
    names = [str(f) for f in folders]
    current = st.session_state.get(MODEL_KEY)
    index = names.index(current) if current in names else 0
    choice = st.sidebar.selectbox("Model", names, index=index, format_func=lambda p: Path(p).name,
                                  key="_model_select")
    st.session_state[MODEL_KEY] = choice
    try:
        card = card_lib.read(choice)
    except ModelCardError as err:
        st.sidebar.error(str(err))
        return None
    card_summary_ui(card)
    try:
        return load_model(choice, card.weights_sha256)
    except ModelCardError as err:
        st.sidebar.error(str(err))
    except Exception as err:  # a broken model folder must not take the page down
        st.sidebar.error(f"Model '{card.name}' could not be loaded ({type(err).__name__}: {err}). "
                         "Reinstall the model folder or choose another model.")
    return None


VIEWER_CONFIG = {"scrollZoom": True, "displaylogo": False, "modeBarButtonsToRemove": ["lasso2d", "select2d"]}
OVERLAY_MODES = {"wash": "Colour wash", "contours": "Contour lines"}


def viewer_ui(pixels: Any, heatmap: Any, values: Any = None, *, key: str, titles: tuple[str, str],
              revision: str) -> tuple[float, str]:
    """The film beside its heatmap (zoom and pan move both), with the overlay controls above it.

    ``pixels`` float32 HxW in [0, 1] as displayed (after the window), ``heatmap`` float32 in [0, 1],
    ``values`` the DICOM modality values (hover) or None. Widget keys are ``{key}_mode``,
    ``{key}_levels``, ``{key}_opacity``, ``{key}_colormap`` and the chart ``{key}_viewer``;
    ``revision`` keeps the zoom while the same film is redrawn. Returns (opacity, colormap).
    """
    columns = st.columns([2, 3, 2, 2])
    mode = columns[0].radio("Overlay", list(OVERLAY_MODES), format_func=OVERLAY_MODES.get, key=f"{key}_mode",
                            horizontal=True, help="A colour wash over the film, or lines around the regions "
                            "where the heatmap reaches the chosen levels (the film stays visible).")
    levels = columns[1].multiselect(
        "Contour levels", viewer.LEVELS, default=list(viewer.DEFAULT_LEVELS), format_func="{:.0%}".format,
        key=f"{key}_levels", disabled=mode != "contours",
        help="A line is drawn where the heatmap reaches this fraction of its own maximum (100 %).")
    opacity = columns[2].slider("Heatmap opacity", 0.0, 1.0, 0.4, 0.05, key=f"{key}_opacity",
                                help="0 shows the film only, 1 the heatmap only (for lines: at least 0.6).")
    colormap = columns[3].selectbox("Colormap", list(overlay.COLORMAPS), key=f"{key}_colormap",
                                    help="Colours from low (first colour) to high heatmap weight (last).")
    shown = viewer.display_copy(pixels, heatmap, values)
    height = int(min(900, max(420, 680 * shown.shape[0] / shown.shape[1])))
    fig = viewer.figure(shown, mode, colormap, opacity, levels, titles, height=height, revision=revision)
    st.plotly_chart(fig, key=f"{key}_viewer", width="stretch", config=VIEWER_CONFIG)
    st.caption("Drag on either picture to zoom both, double-click to see the whole film again, scroll to zoom, "
               "hover for the pixel's position" + (" and stored value." if values is not None else " and grey level."))
    if mode == "contours" and not levels:
        st.caption("Choose at least one contour level to draw lines.")
    return opacity, colormap


def research_banner() -> None:
    """The research-use-only notice shown at the top of every page."""
    st.warning(card_lib.RESEARCH_USE, icon="⚠️")
