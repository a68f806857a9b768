"""Classify page: one radiograph -> class probabilities, decision, heatmap, warnings and a report."""

from __future__ import annotations

import hashlib
import re
from typing import TYPE_CHECKING

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

import auth
import ui
from cxr_core import imaging, overlay, quality, report, windowing
from cxr_core.errors import UNEXPECTED, UnreadableImageError

if TYPE_CHECKING:  # imported where it runs: it brings TensorFlow, which the model's loader thread imports meanwhile
    from cxr_core import pipeline

METHOD_LABELS = {
    "gradcam": "Grad-CAM",
    "gradcam++": "Grad-CAM++",
    "scorecam": "Score-CAM (slow)",
    "layercam": "LayerCAM",
    "smoothgrad": "SmoothGrad",
}
# Only these DICOM fields are ever shown (an allow-list: patient, study and site tags never are).
SAFE_TAGS = (
    "Modality", "ViewPosition", "BodyPartExamined", "PhotometricInterpretation", "Rows", "Columns",
    "BitsStored", "BitsAllocated", "Manufacturer", "ManufacturerModelName", "ImagerPixelSpacing", "PixelSpacing",
    "TransferSyntax",
)


@st.cache_data(max_entries=16, show_spinner=False)
def read_image(data: bytes, name: str, window: tuple[float, float] | None) -> imaging.LoadedImage:
    """The upload read in memory (never written to disk); cached per content and window."""
    return imaging.load(data, name, window=window)


@st.cache_data(max_entries=32, show_spinner=False)
def classify(_classifier, _explainer, model_key: str, data: bytes, name: str, class_index: int | None,
             method: str) -> pipeline.Result:
    """Prediction and heatmap for one upload; ``model_key`` (folder + ``ui.model_version``) keys the cache."""
    from cxr_core import pipeline

    return pipeline.classify(_classifier, _explainer, data, name, class_index=class_index, method=method)


def window_ui(info: imaging.ImageInfo, key: str) -> tuple[float, float] | None:
    """Window preset and center/width sliders for a DICOM file; None while the default window is kept."""
    options = windowing.presets(info)
    if not options:
        return None
    default = next(iter(options.values()))
    (c_lo, c_hi), (w_lo, w_hi) = windowing.slider_bounds(info)
    ck, wk, pk = f"center_{key}", f"width_{key}", f"preset_{key}"
    st.session_state.setdefault(ck, default[0])
    st.session_state.setdefault(wk, default[1])

    def apply_preset() -> None:
        st.session_state[ck], st.session_state[wk] = options[st.session_state[pk]]

    st.selectbox("Window preset", list(options), key=pk, on_change=apply_preset,
                 help="Changes what you see, not what the model sees: it is always given the file's default window.")
    units = "in the file's stored-value units (after Rescale Slope/Intercept)"
    c_step, w_step = windowing.slider_steps(info)
    center = st.slider("Window center", c_lo, c_hi, key=ck, step=c_step,
                       help=f"The stored value shown as mid-grey, {units}.")
    width = st.slider("Window width", w_lo, w_hi, key=wk, step=w_step,
                      help=f"The range of stored values spread from black to white, {units}.")
    return None if (center, width) == default else (center, width)


# What each allow-listed field may hold to be shown (PS3.5 value representations): a value whose length was
# damaged runs on into the elements after it (the institution and referring physician follow the manufacturer),
# and st.table renders Markdown (an image link would be fetched by the browser).
_CS = quality.CODE_STRING.pattern
_SHOWN = {"Modality": _CS, "ViewPosition": _CS, "BodyPartExamined": _CS, "PhotometricInterpretation": _CS,
          "Manufacturer": r"[ -~]{0,64}",
          "ManufacturerModelName": r"[ -~]{0,64}", "ImagerPixelSpacing": r"[0-9.eE+\-\[\], ]{0,64}",
          "PixelSpacing": r"[0-9.eE+\-\[\], ]{0,64}"}


def shown_tag(tag: str, value: object) -> str:
    """A DICOM field's value as the metadata table shows it: checked against what the field may hold, then as
    plain text."""
    text = str(value)
    pattern = _SHOWN.get(tag)
    if pattern is not None and not re.fullmatch(pattern, text):
        return "(not shown: not a valid value for this field)"
    return ui.plain(text)


def metadata_ui(info: imaging.ImageInfo) -> None:
    """The de-identified DICOM fields (allow-listed) and what was read."""
    rows = {tag: shown_tag(tag, info.metadata[tag]) for tag in SAFE_TAGS
            if info.metadata.get(tag) not in (None, "")}
    rows["Size (width x height)"] = f"{info.width} x {info.height}"
    window = f"{info.window[0]:.6g} / {info.window[1]:.6g} ({info.window_source})" if info.window else "none"
    rows["Window used (center / width)"] = window
    with st.expander("DICOM metadata (de-identified: no patient, study or site fields)", expanded=False):
        st.table(pd.DataFrame({"Field": list(rows), "Value": [str(v) for v in rows.values()]}), hide_index=True)


def probabilities_ui(prediction, card) -> None:
    """Bar chart of the calibrated probabilities and an exact table beside it."""
    colours = ["#c0392b" if name == prediction.decision and prediction.positive else "#2e6fba"
               for name in prediction.class_names]
    fig = go.Figure(go.Bar(x=list(prediction.probabilities), y=list(prediction.class_names), orientation="h",
                           marker_color=colours, text=[f"{p:.1%}" for p in prediction.probabilities],
                           name="probability", hovertemplate="%{y}: %{x:.4f}<extra></extra>"))
    # Each class's threshold as a tick on its own bar (a line across the chart crossed every bar, and the labels
    # of two thresholds near each other sat on top of each other).
    marked = [(name, t) for name, t in card.thresholds.items() if name in prediction.class_names]
    if marked:
        fig.add_trace(go.Scatter(x=[t for _, t in marked], y=[name for name, _ in marked], mode="markers",
                                 marker=dict(symbol="line-ns-open", size=34, color="#222",
                                             line=dict(width=3, color="#222")),
                                 name="threshold", hovertemplate="%{y} is called at %{x:.4f}<extra></extra>"))
    fig.update_layout(xaxis_range=[0, 1], height=90 + 45 * len(prediction.class_names), showlegend=bool(marked),
                      legend=dict(orientation="h", y=1.02, yanchor="bottom", x=1, xanchor="right"),
                      margin=dict(l=10, r=10, t=30, b=10), xaxis_title="probability")
    st.plotly_chart(fig, key="probabilities_chart")
    st.table(pd.DataFrame({
        "Class": list(prediction.class_names),
        "Probability": [f"{p:.4f}" for p in prediction.probabilities],
        "Threshold": [f"{card.thresholds[n]:.4f}" if n in card.thresholds else "none" for n in prediction.class_names],
    }), hide_index=True)
    st.caption("Probability: temperature-calibrated, from 0 to 1 (the bars show it as a percentage). Threshold: "
               "the probability at which the class is called, fitted on the validation split.")


def warnings_ui(prediction, card, checked: quality.QualityReport) -> list[str]:
    """Low-confidence and not-a-chest warnings; returns their sentences for the report."""
    sentences = []
    if checked.probably_not_chest:
        sentences.append(report.not_chest_line(checked) + " The result is not meaningful for this input.")
        st.warning(sentences[-1], icon="🚫")
        with st.expander("How 'probably not a chest X-ray' is decided"):
            st.markdown("The image is flagged when any of these simple checks fires:\n"
                        + "\n".join(f"- {rule}" for rule in quality.RULES)
                        + f"\n\nOn {quality.CALIBRATION} they flag {quality.FALSE_POSITIVES}.")
    if prediction.low_confidence:
        sentences.append(report.low_confidence_line(prediction, card) + " Treat this result as uncertain.")
        st.warning(sentences[-1], icon="⚠️")
    if called := report.threshold_call_line(prediction, card):
        sentences.append(called)
        st.warning(called, icon="⚖️")
    familiarity_ui(prediction, card)
    return sentences


def familiarity_ui(prediction, card) -> None:
    """The familiarity check: a warning when the film is unlike the training films, else a quiet caption.

    The report draws the same sentence itself (``report.familiarity_line``).
    """
    line = report.familiarity_line(prediction, card)
    if not line:
        return
    if prediction.unfamiliar:
        st.warning(report.unfamiliar_warning(prediction.familiarity, card), icon="❔")
        with st.expander("How the familiarity check works"):
            st.markdown(
                "The model's last feature vector for this film is compared with those of the films it was "
                "trained on (a Mahalanobis distance to the nearest class; about 1 for a typical training film). "
                f"Films further than {card.familiarity.get('percentile', 99):g} % of the validation films are "
                "flagged. A flagged film may come from another kind of scanner, hospital or patient group, or "
                "not be a frontal chest film at all: the model has no experience to judge it by.")
    else:
        st.caption(line)


ui.research_banner()
auth.require("classify")
st.title("Classify a chest radiograph")
loading = ui.model_sidebar(wait=False)  # the uploader shows while TensorFlow and the model load
if loading is None:
    st.info("Choose a working model in the sidebar to classify images.")
    st.stop()
card = loading.card
uploaded = st.file_uploader("Chest radiograph (frontal view)", type=None, help=ui.UPLOAD_HELP, key="classify_upload")
if uploaded is None:
    st.caption(f"Upload one JPEG, PNG or DICOM file. The model '{card.name}' tells "
               + ", ".join(card.class_names) + " apart.")
    ui.preload_viewer()
    st.stop()
model = ui.wait_for_model(loading)
if model is None:
    st.info("Choose a working model in the sidebar to classify images.")
    st.stop()
classifier, explainer = model
model_key = f"{classifier.folder}:{ui.model_version(card)}"  # a rescored card is another model
data = uploaded.getvalue()
key = hashlib.sha256(data).hexdigest()[:16] + card.weights_sha256[:8] + card.card_sha256[:8]
audited = {"model": card.name, "weights_sha256": card.weights_sha256, "source": "upload"}
try:
    first = classify(classifier, explainer, model_key, data, uploaded.name, None, "gradcam")
except UnreadableImageError as err:
    auth.record_once(key, "classify", **audited, counts={"images": 1, "unreadable": 1})
    st.error(str(err))
    st.stop()
except Exception as err:  # defence in depth: an unforeseen failure is a message, never a traceback
    auth.record_once(key, "classify", **audited, counts={"images": 1, "failed": 1})  # the film was read: on record
    st.error(UNEXPECTED.format(kind=type(err).__name__))
    st.stop()
auth.record_once(key, "classify", **audited, counts={"images": 1, "positive": int(first.prediction.positive)})
prediction, info = first.prediction, first.image.info
checked = quality.assess(first.image, data)

controls = st.columns(2)
METHOD_HELP = ("Grad-CAM is computed with the prediction in one pass; so are Grad-CAM++ and LayerCAM, which at this "
               "model's last layer both keep only the features that raise the class's score. Score-CAM and "
               "SmoothGrad take seconds.")
method = controls[0].selectbox("Explanation method", list(METHOD_LABELS), format_func=METHOD_LABELS.get,
                               key="cam_method", help=METHOD_HELP)
# One widget key for every image, reset to the top class when the image changes. (A key per image
# kept each upload's widget alive in the session, and a lambda format_func kept that run's globals,
# pixels and overlays included, alive with it.)
# Also when the widget's own state is gone (Streamlit drops it when another page was shown): it would start at class
# 0 (NORMAL) beside "Decision: PNEUMONIA".
if st.session_state.get("explain_image") != key or "explain_class" not in st.session_state:
    st.session_state["explain_image"] = key
    st.session_state["explain_class"] = first.class_index
explained = controls[1].selectbox("Class to explain", range(len(card.class_names)),
                                  format_func=card.class_names.__getitem__, key="explain_class",
                                  help="The heatmap shows where the model looked for this class.")

result = first
if (explained, method) != (first.class_index, "gradcam"):
    with st.spinner(f"Computing {METHOD_LABELS[method]} for {card.class_names[explained]}..."
                    + ui.first_gradient_note(explainer, method)):
        try:
            result = classify(classifier, explainer, model_key, data, uploaded.name, explained, method)
        except Exception as err:  # e.g. Score-CAM or SmoothGrad failing: the decision stays, with Grad-CAM
            st.error(f"{METHOD_LABELS[method]} could not be computed for this film (unexpected "
                     f"{type(err).__name__}); the heatmap below is Grad-CAM for {card.class_names[first.class_index]}."
                     " Choose another method or class, or report it if it keeps failing.")
            method, explained = "gradcam", first.class_index

left, right = st.columns([3, 2])
with left:
    colour = "red" if prediction.positive else "blue"
    st.markdown(f"### Decision: :{colour}[{prediction.decision}]",
                help="The class called at the model card's thresholds (see the rule below).")
    st.caption(f"Rule: {report.decision_rule(card)}. Probabilities are temperature-calibrated "
               f"(T = {card.temperature:.3g}).")
    sentences = warnings_ui(prediction, card, checked)
    probabilities_ui(prediction, card)
with right:
    window = None
    if info.format == "DICOM":
        window = window_ui(info, key)
        metadata_ui(info)
    else:
        st.caption(f"{info.format} · {info.width} x {info.height} px · {info.bit_depth}-bit")
try:
    shown = first.image if window is None else read_image(data, uploaded.name, window)
except UnreadableImageError as err:  # read once already: only memory or a decoder can fail the second time
    st.warning(f"The film could not be shown at this window ({err}); it is shown at the window it was read with.")
    shown = first.image
film_title = f"{info.format} · {info.width} x {info.height} px · {info.bit_depth}-bit"
method_name = METHOD_LABELS[method].removesuffix(" (slow)")  # the menu's warning is no part of the result
heat_title = f"{method_name} for {card.class_names[explained]}"
choice = ui.viewer_ui(shown.pixels, result.heatmap, shown.values, key="cam", titles=(film_title, heat_title),
                      revision=key)
for note in imaging.reading_notes(info):  # what the reader changed: transparency, non-finite samples
    st.caption(f"Note: {note}.")
sentences += report.reading_lines(info)  # and in the report
pixels = overlay.fit(shown.pixels)  # the report's copy: at most MAX_DISPLAY_SIDE, so a 30000 x 10 strip is drawn
blended = choice.draw(pixels, result.heatmap)  # what the viewer shows: the wash or the contour lines
args = dict(image=pixels, overlay_rgb=blended, prediction=prediction, card=card,
            method=method_name, explained_class=card.class_names[explained], drawn_as=choice.describe(),
            warnings=sentences, engine=classifier.engine_label)
downloads = st.columns(2)
exported = {**audited, "counts": {"reports": 1}}  # the film's result left the app: audited when the file is fetched
downloads[0].download_button("Download report (PNG)", auth.exported(lambda: report.render(**args, fmt="PNG"),
                                                                    **exported),
                             file_name="cxr-report.png", mime="image/png", key="report_png")
downloads[1].download_button("Download report (PDF)", auth.exported(lambda: report.render(**args, fmt="PDF"),
                                                                    **exported),
                             file_name="cxr-report.pdf", mime="application/pdf", key="report_pdf")
