"""Cached loaders and the widgets every page shares (model selector, research banner).

Pages import this module; it is the only place that keeps process-wide state. A model is
loaded once per process with ``st.cache_resource`` and shared by every browser session
(``Classifier`` serialises calls with its own lock).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import streamlit as st

import auth
from cxr_core import card as card_lib
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


def default_model(folders: list[Path]) -> Path:
    """The model served to users who may not choose: env CXR_DEFAULT_MODEL (a folder name), else the first."""
    wanted = os.environ.get("CXR_DEFAULT_MODEL")
    return next((f for f in folders if f.name == wanted), folders[0])


def list_models() -> list[Path]:
    """Model folders (those holding a model_card.json) under ``models_root()``, sorted by name."""
    root = models_root()
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / card_lib.CARD_FILE).is_file())


@st.cache_resource(show_spinner="Loading the model (once per server process)...")
def load_model(folder: str, weights_sha256: str = "") -> tuple[Any, Any]:
    """(Classifier, Explainer) for a model folder, loaded once per process and shared.

    ``weights_sha256`` only keys the cache, so a replaced model folder is loaded afresh.
    Raises ``ModelCardError`` for a missing, invalid or tampered folder.
    """
    from cxr_core import explain, models

    classifier = models.load(folder)
    return classifier, explain.Explainer(classifier)


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


def card_summary_ui(card: card_lib.ModelCard) -> None:
    """The card's summary in the sidebar: classes, decision rule, data, headline metrics, version, hash."""
    st.sidebar.markdown(f"**{card.name}** · version {card.version} · `{card.architecture}` {card.input_size} px")
    st.sidebar.markdown("Classes: " + ", ".join(f"`{c}`" for c in card.class_names))
    if card.thresholds:
        rule = ", ".join(f"{c} ≥ {t:.2f}" for c, t in card.thresholds.items())
        st.sidebar.caption(f"Decision: {rule}; otherwise {card.negative_class or 'top class'}.")
    metrics = headline_metrics(card.metrics)
    if metrics:
        st.sidebar.markdown(" · ".join(f"{k}: **{v:.3g}**" for k, v in metrics.items()))
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
        loaded = load_model(choice, card.weights_sha256)
        note = loaded[0].runner.note
        st.sidebar.caption(f"Inference: {loaded[0].engine_label}" + (f" ({note})" if note else ""))
        return loaded
    except ModelCardError as err:
        st.sidebar.error(str(err))
    except Exception as err:  # a broken model folder must not take the page down
        st.sidebar.error(f"Model '{card.name}' could not be loaded ({type(err).__name__}: {err}). "
                         "Reinstall the model folder or choose another model.")
    return None


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
