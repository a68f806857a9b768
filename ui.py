"""Cached loaders and the widgets every page shares (model selector, research banner).

Pages import this module; it is the only place that keeps process-wide state. A model is
loaded once per process with ``st.cache_resource`` and shared by every browser session
(``Classifier`` serialises calls with its own lock).
"""

from __future__ import annotations

import ast
import atexit
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import streamlit as st

import auth
from cxr_core import card as card_lib
from cxr_core import csvsafe, overlay, viewer
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


def _serialise_ast_parse() -> None:
    """Make ``ast.parse`` take a process-wide lock, once.

    Python 3.11 keeps the depth counter of its AST constructor in interpreter-wide state
    (CPython gh-106905), so two threads parsing at the same moment can fail with "SystemError:
    AST constructor recursion depth mismatch". Here they do: Streamlit parses each page script
    (``magic.py``) while the model's background warm-up traces TensorFlow functions, whose
    autograph parses Python source (``gast.parse``). CI saw it raised in a page; a later CI page that
    never showed its image fits a warm-up that failed the same way (its log did not say). Both
    call ``ast.parse`` through the module attribute, so one lock
    around it keeps them apart; parses take milliseconds, so nobody waits noticeably.
    """
    if getattr(ast.parse, "cxr_serialised", False):
        return
    parse, lock = ast.parse, threading.RLock()

    def serialised(*args: Any, **kwargs: Any) -> Any:
        with lock:
            return parse(*args, **kwargs)

    serialised.cxr_serialised = True  # type: ignore[attr-defined]
    serialised.cxr_lock = lock  # type: ignore[attr-defined]
    serialised.__wrapped__ = parse  # type: ignore[attr-defined]
    ast.parse = serialised


_serialise_ast_parse()


def _keep_keras_state_between_runs() -> None:
    """Stop Streamlit from calling ``keras.backend.clear_session()`` after every script run, once.

    Streamlit's script runner does that whenever ``keras`` is imported (``_clean_problem_modules``),
    for apps that build a new model on each run. This app builds its models once per process and shares
    them (``st.cache_resource``), so the call only costs: a second full garbage collection after each
    rerun of each session (about 0.25 s with TensorFlow loaded: 70 % of an upload's rerun in AppTest),
    TensorFlow's kernel cache emptied, and Keras' global state replaced for every thread, including a
    background load building a model at that moment. Matplotlib's figures are still closed as before.
    Without the private hook (another Streamlit release) nothing changes.
    """
    from streamlit.runtime.scriptrunner import script_runner

    clean = getattr(script_runner, "_clean_problem_modules", None)
    if clean is None or getattr(clean, "cxr_keeps_keras", False):
        return

    def clean_without_keras() -> None:
        if "matplotlib.pyplot" in sys.modules:
            sys.modules["matplotlib.pyplot"].close("all")

    clean_without_keras.cxr_keeps_keras = True  # type: ignore[attr-defined]
    clean_without_keras.__wrapped__ = clean  # type: ignore[attr-defined]
    script_runner._clean_problem_modules = clean_without_keras


_keep_keras_state_between_runs()


def models_root() -> Path:
    """Folder holding one sub-folder per model: env CXR_MODELS_DIR, default <repo>/models."""
    return card_lib.models_root()


def data_root() -> Path | None:
    """The configured root for server-side folders (env CXR_DATA_ROOT), or None when unset or not a folder
    (then the page says so: every listing under it would fail)."""
    value = os.environ.get("CXR_DATA_ROOT")
    if not value:
        return None
    root = Path(value).resolve()
    if not root.is_dir():
        st.error(f"CXR_DATA_ROOT is set to '{plain(value)}', which is not a folder on this server. Set it to the "
                 "folder that holds the images and restart the app.")
        return None
    return root


_MARKDOWN = re.compile(r"([\\`*_\[\]()#!|<>~$:])")  # what makes links, images, emphasis, directives, maths


def plain(text: object) -> str:
    """``text`` (a file name, anything a user or a file supplied) as valid Unicode with every character that
    Markdown or Streamlit's directives act on escaped, for ``st.markdown``, ``st.subheader``, ``st.error``..."""
    return _MARKDOWN.sub(r"\\\1", csvsafe.safe_text(str(text)))


def default_model(folders: list[Path]) -> Path:
    """The model served to users who may not choose: env CXR_DEFAULT_MODEL (a folder name), else the first."""
    wanted = os.environ.get("CXR_DEFAULT_MODEL")
    return next((f for f in folders if f.name == wanted), folders[0])


def list_models() -> list[Path]:
    """Model folders (those holding a model_card.json) under ``models_root()``, sorted by name."""
    return card_lib.model_folders(models_root())


_TURN = threading.Lock()  # one model load and warm-up at a time (ModelLoad)


class ModelLoad(threading.Thread):
    """One model folder loaded in the background, then its compiled graphs warmed, once per process.

    The page draws (uploader included) while the model loads: from the OpenVINO cache in under a second
    without TensorFlow (``models.load``), or, on a first start or the TensorFlow engine, with TensorFlow's
    import, the build and the weights. Once loaded, the same thread runs what a clinician needs first: the
    Grad-CAM pass (an upload's prediction and heatmap), the plain forward pass and Grad-CAM++ (a change
    of method), which traces them on TensorFlow and compiles nothing more on OpenVINO. It touches
    no Streamlit state, so it cannot disturb sessions (nor AppTest's process-global runtime).
    Requests wait for the warm-up (``result()``), so they never run on the model while it traces:
    a warm-up that let a page request run alongside failed once tracing the forward pass (Keras:
    "Only input tensors may be passed as positional arguments"), and a first request would pay
    the same tracing anyway.
    ``loaded`` and ``warmed`` are set when each part is over (``warmed`` also after a failed load
    or warm-up: the first request then traces what is missing itself).
    Loads take turns, one model's load and warm-up at a time in the process (``_TURN``): Keras builds and
    traces are not safe across threads, and a model whose page never asked for it (an unreadable first
    upload) goes on warming up while the next model loads; on two cores turns cost no time overall.
    ``turn`` is when this load's turn began and ended (``time.perf_counter``).
    """

    def __init__(self, folder: str, card: card_lib.ModelCard):
        super().__init__(name=f"load {card.name}", daemon=True)
        self.folder, self.card = folder, card
        self.loaded, self.warmed = threading.Event(), threading.Event()
        self._model: tuple[Any, Any] | None = None
        self._error: BaseException | None = None
        self.load_s: float | None = None
        self.warm_up_s: float | None = None
        self.turn: tuple[float, float] | None = None
        self.version = ""  # start_loading's key, so that a failed load can be dropped from its cache
        self.forgotten = False  # dropped from it (``_forget``)

    @property
    def failed(self) -> bool:
        """Whether the load raised (the error is re-raised by ``result``)."""
        return self._error is not None

    def result(self) -> tuple[Any, Any]:
        """(Classifier, Explainer), waiting for the load and the warm-up; re-raises what the load raised."""
        self.warmed.wait()
        if self._error is not None:
            raise self._error
        assert self._model is not None
        return self._model

    def run(self) -> None:
        with _TURN:
            self._load_and_warm_up()

    def _load_and_warm_up(self) -> None:
        start = time.perf_counter()
        try:
            from cxr_core import explain, models

            classifier = models.load(self.folder)
            self._model = classifier, explain.Explainer(classifier)
            self.load_s = time.perf_counter() - start
            _say(f"model {self.card.name} loaded in {self.load_s:.1f} s")
        except BaseException as err:  # shown by the page that waits for it
            self._error = err
        finally:
            self.loaded.set()
        try:
            if self._model is not None:
                self._warm_up(*self._model)
        finally:
            self.turn = (start, time.perf_counter())
            self.warmed.set()

    def _warm_up(self, classifier: Any, explainer: Any) -> None:
        import numpy as np

        start = time.perf_counter()
        blank = np.zeros((1, classifier.input_size, classifier.input_size, 3), np.float32)
        steps = (explainer.warm_up, lambda: classifier.logits(blank),
                 lambda: explainer.explain(blank, "gradcam++", class_index=0))
        for step in steps:
            for attempt in (1, 2):  # a trace that failed leaves nothing behind, so it can be tried again
                try:
                    step()
                    break
                except Exception as err:  # then the first request traces what is missing itself
                    _say(f"warm-up of {self.card.name} failed (attempt {attempt}: {type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''})")
            else:
                return
        self.warm_up_s = time.perf_counter() - start
        _say(f"warm-up of {self.card.name} done in {self.warm_up_s:.1f} s")


def first_gradient_note(explainer: Any, method: str, layer: str | None = None) -> str:
    """" (first use: ...)" when this explanation needs the Keras model and it is not built yet (the model is
    served from the OpenVINO cache: TensorFlow is imported and the model built on first need); else ""."""
    if explainer.one_pass(method, layer) or explainer.classifier.model_built:
        return ""
    return " (its first use loads TensorFlow and the full model: about 15 s)"


def _say(message: str) -> None:
    """One line in the server's log (model names and timings only, never patient data)."""
    print(f"cxr: {message}", file=sys.stderr, flush=True)


_LOADS: list[ModelLoad] = []


@atexit.register
def _finish_loads() -> None:
    """Let a running load or warm-up finish before the interpreter tears TensorFlow down under it."""
    for load in _LOADS:
        load.warmed.wait(timeout=120)


def model_version(card: card_lib.ModelCard) -> str:
    """What keys a loaded model: its weights and its card (``training rescore`` rewrites the card, with new
    thresholds, temperature and familiarity model, and keeps the weights byte for byte)."""
    return f"{card.weights_sha256}:{card.card_sha256}"


@st.cache_resource(show_spinner=False)
def start_loading(folder: str, version: str = "") -> ModelLoad:
    """The background load of a model folder, started once per process and shared by every session.

    Returns after checking the card and the weights' hash (a fraction of a second), without waiting
    for TensorFlow. ``version`` (``model_version``) only keys the cache, so a replaced or rescored model
    folder is loaded afresh. Raises ``ModelCardError`` for a missing, invalid or tampered folder (not cached).
    """
    load = ModelLoad(folder, card_lib.load(folder))  # card and weights hash checked here, before the page goes on
    load.version = version
    _LOADS[:] = [*(other for other in _LOADS if not other.warmed.is_set()), load]
    load.start()
    return load


def load_model(folder: str, version: str = "") -> tuple[Any, Any]:
    """(Classifier, Explainer) for a model folder, loaded once per process and shared (waits for the load)."""
    return start_loading(folder, version).result()


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
        rule = ", ".join(f"{c} ≥ {t:.4f}" for c, t in card.thresholds.items())
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


def model_sidebar(wait: bool = True) -> Any:
    """Sidebar model selector; returns the chosen (Classifier, Explainer), or None with a message.

    With ``wait=False`` it returns the ``ModelLoad`` at once (its ``card`` is known, the model may
    still be loading): pass it to ``wait_for_model`` when the model is needed, so the page can draw
    first. The choice is kept in ``st.session_state["model_dir"]`` so it survives page changes.
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
    if auth.allowed("choose_model"):
        index = names.index(current) if current in names else names.index(str(default_model(folders)))
        choice = st.sidebar.selectbox("Model", names, index=index, format_func=lambda p: Path(p).name,
                                      key="_model_select")
    else:  # no selector, and the session's choice is ignored: the role serves the default model only
        choice = str(default_model(folders))
        st.sidebar.caption(f"Model: **{Path(choice).name}** (choosing another model needs the admin role)")
    st.session_state[MODEL_KEY] = choice
    try:
        card = card_lib.read(choice)
    except ModelCardError as err:
        st.sidebar.error(str(err))
        return None
    if current is not None and current != choice:
        auth.record("model_change", model=card.name, weights_sha256=card.weights_sha256)
    card_summary_ui(card)
    try:
        loading = start_loading(choice, model_version(card))
    except ModelCardError as err:
        st.sidebar.error(str(err))
        return None
    if wait or (loading.loaded.is_set() and loading.failed):  # a load that failed says why on every rerun
        return wait_for_model(loading)
    return loading


def require_model(hint: str) -> tuple[Any, Any, str]:
    """The sidebar's model as (Classifier, Explainer, model folder); without one, ``hint`` and the page stops."""
    loaded = model_sidebar()
    model_dir = st.session_state.get(MODEL_KEY)
    if loaded is None or not model_dir:
        st.info(hint)
        st.stop()
    return (*loaded, model_dir)


def wait_for_model(loading: ModelLoad) -> tuple[Any, Any] | None:
    """The loaded (Classifier, Explainer), with a spinner while it loads; None with a message if it failed.

    The sidebar then names the inference engine and precision that serve the model.
    """
    try:
        if loading.warmed.is_set():
            loaded = loading.result()
        else:
            with st.spinner("Loading the model and preparing its graphs (once per server process)..."):
                loaded = loading.result()
        note = loaded[0].runner.note
        st.sidebar.caption(f"Inference: {loaded[0].engine_label}" + (f" ({note})" if note else ""),
                           help="The engine that runs the forward pass (CXR_ENGINE, CXR_PRECISION override it).")
        return loaded
    except ModelCardError as err:
        _forget(loading)  # wrapped OSError or MemoryError, weights changed under it: a reload can mend them
        st.sidebar.error(str(err))
    except Exception as err:  # a broken model folder must not take the page down
        _forget(loading)
        st.sidebar.error(f"Model '{loading.card.name}' could not be loaded ({type(err).__name__}: {err}). It is "
                         "tried again when the page reruns (reload it); if it fails again, reinstall the model "
                         "folder or choose another model.")
    return None


_FORGET = threading.Lock()


def _forget(loading: ModelLoad) -> None:
    """Drop a failed load from the shared cache, so that the next rerun of any session tries afresh (memory, a full
    disk, a share that hiccuped) instead of every user seeing the error until the server restarts. Once per failed
    load: a session still holding it must not drop the new load another session has started since."""
    with _FORGET:
        if loading.forgotten:
            return
        loading.forgotten = True
        start_loading.clear(loading.folder, loading.version)


# No "download plot as PNG": the film would leave the app unaudited (the report's download is the audited way out).
VIEWER_CONFIG = {"scrollZoom": True, "displaylogo": False,
                 "modeBarButtonsToRemove": ["lasso2d", "select2d", "toImage"]}
OVERLAY_MODES = {"wash": "Colour wash", "contours": "Contour lines"}


PRELOAD_AFTER_S = 1.5


def preload_viewer() -> None:
    """An empty, hidden Plotly chart, drawn while the page waits for a file: the browser fetches and starts
    Plotly's code (a few MB, loaded on a page's first chart) while the user picks the file, instead of after
    the upload. Measured with Chromium on 2 cores (``python -m benchmarks --app-only``): the first upload's
    viewer showed 1.75 s after its decision without it. Drawn with the page, Plotly's start-up delayed the page
    itself by 2-3 s; so a fragment draws it ``PRELOAD_AFTER_S`` after the page, in the fragment's own run. It
    used to rerun the whole page for that (``st.rerun(scope="app")``), which could swallow a file uploaded at
    that moment (four sessions uploading at once lost one upload in about five runs); a fragment run leaves
    the rest of the page and its widgets alone. The fragment ticks only until the page's next full run (the
    upload's), which draws the chart with the page. Nothing of it is seen or announced."""
    if st.session_state.get("_viewer_preload") == "drawn":
        _hidden_chart()
        return

    @st.fragment(run_every=PRELOAD_AFTER_S)
    def later() -> None:
        if st.session_state.get("_viewer_preload") is None:
            st.session_state["_viewer_preload"] = "due"  # the page is being drawn: next tick
            return
        st.session_state["_viewer_preload"] = "drawn"
        _hidden_chart()

    later()


def _hidden_chart() -> None:
    import plotly.graph_objects as go

    st.html("<style>.st-key-cxr_viewer_preload {display: none;}</style>")
    with st.container(key="cxr_viewer_preload"):
        st.plotly_chart(go.Figure(), key="cxr_viewer_preload_chart", config={"staticPlot": True})


@dataclass(frozen=True)
class ViewerChoice:
    """What the viewer's controls say: the overlay mode, its contour levels, opacity and colormap."""

    mode: str
    levels: tuple[float, ...]
    opacity: float
    colormap: str

    def draw(self, pixels: Any, heatmap: Any) -> Any:
        """The heatmap over ``pixels`` as the viewer shows it (uint8 RGB): for the report, so that it shows what
        the user looked at (contour lines or the colour wash, the same colormap and opacity)."""
        if self.mode == "contours":  # no level chosen: the film alone, as the viewer shows it then
            return overlay.contours(pixels, heatmap, self.levels, self.colormap, self.opacity)
        return overlay.overlay(pixels, heatmap, self.colormap, self.opacity)

    def describe(self) -> str:
        """" (contour lines at 50, 70, 90 %)" for the contour mode, "" for the wash: the report's caption."""
        if self.mode != "contours":
            return ""
        if not self.levels:
            return " (contour lines: no level chosen)"
        return " (contour lines at " + ", ".join(f"{round(v * 100)}" for v in sorted(self.levels)) + " %)"


def viewer_ui(pixels: Any, heatmap: Any, values: Any = None, *, key: str, titles: tuple[str, str],
              revision: str) -> ViewerChoice:
    """The film beside its heatmap (zoom and pan move both), with the overlay controls above it.

    ``pixels`` float32 HxW in [0, 1] as displayed (after the window), ``heatmap`` float32 in [0, 1],
    ``values`` the DICOM modality values (hover) or None. Widget keys are ``{key}_mode``,
    ``{key}_levels``, ``{key}_opacity``, ``{key}_colormap`` and the chart ``{key}_viewer``;
    ``revision`` keeps the zoom while the same film is redrawn. Returns the controls' ``ViewerChoice``.
    """
    columns = st.columns([2, 3, 2, 2])
    mode = columns[0].radio("Overlay", list(OVERLAY_MODES), format_func=OVERLAY_MODES.get, key=f"{key}_mode",
                            horizontal=True, help="A colour wash over the film, or lines around the regions "
                            "where the heatmap reaches the chosen levels (the film stays visible).")
    levels = columns[1].multiselect(
        "Contour levels", viewer.LEVELS, default=list(viewer.DEFAULT_LEVELS), format_func="{:.0%}".format,
        key=f"{key}_levels", disabled=mode != "contours",
        help="A line is drawn where the heatmap reaches this fraction of its own range (0 % its lowest value, "
             "100 % its highest).")
    opacity = columns[2].slider("Heatmap opacity", 0.0, 1.0, 0.4, 0.05, key=f"{key}_opacity",
                                help="0 shows the film only, 1 the heatmap only (for lines: at least 0.6).")
    colormap = columns[3].selectbox("Colormap", list(overlay.COLORMAPS), key=f"{key}_colormap",
                                    help="Colours from low (first colour) to high heatmap weight (last).")
    shown = viewer.display_copy(pixels, heatmap, values)
    height = int(min(900, max(420, 680 * shown.shape[0] / shown.shape[1])))
    fig = viewer.figure(shown, mode, colormap, opacity, levels, titles, height=height, revision=revision)
    st.plotly_chart(fig, key=f"{key}_viewer", width="stretch", config=VIEWER_CONFIG)
    st.caption("Drag on either picture to zoom both, double-click to see the whole film again, scroll to zoom, "
               "hover for the pixel's position"
               + (" and value (after rescale)." if values is not None else " and grey level."))
    if mode == "contours" and not levels:
        st.caption("Choose at least one contour level to draw lines.")
    return ViewerChoice(mode, tuple(levels), opacity, colormap)


def research_banner() -> None:
    """The research-use-only notice shown at the top of every page."""
    st.warning(card_lib.RESEARCH_USE, icon="⚠️")


def pacs_settings() -> Any:
    """``cxr_core.dicomweb.Settings`` from the secrets' ``[pacs]`` section or CXR_PACS_* env vars; None (PACS
    features off) when neither is set, with an error shown when they are set but wrong."""
    from cxr_core import dicomweb

    try:
        section = st.secrets.get("pacs")
    except Exception:  # no secrets.toml at all (Streamlit raises when none is found)
        section = None
    try:
        return dicomweb.load_settings(dict(section) if section else None)
    except dicomweb.PacsError as err:
        st.error(str(err))
        return None


MAX_BATCH_FILES = 2000  # files scored in one Batch review round (a server folder or uploads)


def explain_failed(what: str, err: BaseException, column=None) -> None:
    """An explanation or probe that failed unexpectedly, said in one line (never a traceback, never the file's
    name); the rest of the page stands."""
    (column or st).error(f"{what} could not be computed (unexpected {type(err).__name__}); the rest of the page "
                         "stands. Try another image, or report it if it keeps failing.")
