"""Instructor view: how the model sees one image (CAM methods, layers, occlusion, perturbations)
and the held-out split's most confident errors."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pandas as pd
import plotly.express as px
import streamlit as st

import auth
import ui
from cxr_core import csvsafe, imaging, overlay, paths, preprocess, probe, quality, report
from cxr_core import evaluation_view as ev
from cxr_core.errors import UnreadableImageError
from cxr_core.explain import METHODS

METHOD_LABELS = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "scorecam": "Score-CAM",
                 "layercam": "LayerCAM", "smoothgrad": "SmoothGrad"}
SOURCES = ("Upload an image", "From the held-out split", "From the data root")
# The sources that read files on the server, and the action each needs (auth.SERVER_ACTIONS).
SOURCE_ACTIONS = {SOURCES[1]: "held_out_films", SOURCES[2]: "server_folders"}
DISPLAY_SIZE = 512  # longest side of the pictures drawn here, in pixels
LISTED = 500  # held-out films or data-root files a choice lists at most (a selectbox of thousands is unusable)


@st.cache_data(max_entries=64, show_spinner="Computing the heatmap...")
def explain(_explainer, model_key: str, batch, method: str, class_index: int, layer: str | None):
    """One heatmap (S, S) in [0, 1]; ``model_key`` (``ui.model_version``) and the batch key the cache."""
    return _explainer.explain(batch, method, class_index, layer).heatmap


@st.cache_data(max_entries=16, show_spinner="Occluding patches...")
def occlusion(_classifier, model_key: str, image, class_index: int, patch: int):
    return probe.occlusion(_classifier, image, class_index, patch=patch)


def display(pixels):
    """The image at display size, float32 in [0, 1] (heatmaps are drawn over this)."""
    return overlay.thumbnail(pixels, DISPLAY_SIZE) / 255.0


def half(rgb):
    """A drawn overlay at half display size, every side at least 1 px: ``st.image(width=...)`` rounds a 512 x 1
    strip (an image wider than about 341:1) to 0 rows and fails."""
    return overlay.fit(rgb, DISPLAY_SIZE // 2)


def search_roots(card) -> list[Path]:
    """Where held-out images may lie: the configured data root, then the folders the model was trained on."""
    roots = [ui.data_root()] if ui.data_root() else []
    for folder in card.recipe.get("data", []) or []:
        folder = Path(folder)
        roots.append(folder if folder.is_absolute() else ui.REPO / folder)
    return roots


def held_out_rows(predictions: pd.DataFrame | None) -> pd.DataFrame | None:
    """The held-out split's rows of predictions.csv (test first, then val; all rows when unsplit)."""
    if predictions is None:
        return None
    split = next(iter(ev.splits(predictions)), None)
    return predictions if split is None else predictions[predictions["split"].astype(str) == split]


def image_source_ui(card, held_out: pd.DataFrame | None) -> tuple[str, Path | bytes] | None:
    """The chosen image as (name, path or in-memory bytes), or None with a note."""
    offered = [s for s in SOURCES if s not in SOURCE_ACTIONS or auth.allowed(SOURCE_ACTIONS[s])]
    source = st.radio("Image", offered, horizontal=True, key="instructor_source")
    if source == SOURCES[0]:
        upload = st.file_uploader("A radiograph (JPEG, PNG or DICOM)", type=None, key="instructor_upload",
                                  help=ui.UPLOAD_HELP)
        return (upload.name, upload.getvalue()) if upload else None
    if source == SOURCES[1]:
        if held_out is None or held_out.empty:
            st.info("This model folder has no predictions.csv, so there is no held-out split to pick from.")
            return None
        if not {"path", "true_class"} <= set(held_out.columns):
            st.warning("This model folder's predictions.csv has no path or true_class column (another version?), so "
                       "there is no held-out split to pick from. Score the model again (`python -m training "
                       "rescore MODEL`).")
            return None
        rows = held_out.reset_index(drop=True)
        narrow = st.columns(2)  # the split sorted by source then class: its first rows are one source and class
        for col, column, what in ((narrow[0], "source", "source"), (narrow[1], "true_class", "true class")):
            values = sorted(rows[column].astype(str).unique()) if column in rows.columns else []
            if len(values) > 1:
                pick = col.selectbox(f"Only this {what}", [None, *values], key=f"instructor_held_{column}",
                                     format_func=lambda v, w=what: f"any {w}" if v is None else csvsafe.safe_text(v))
                if pick is not None:
                    rows = rows[rows[column].astype(str) == pick].reset_index(drop=True)
        if len(rows) > LISTED:
            st.caption(f"The first {LISTED} of these {len(rows)} films are listed: choose a source or a true class "
                       "above to reach the others.")
            rows = rows.head(LISTED)
        i = st.selectbox("Held-out image", range(len(rows)), key="instructor_held_out",
                         format_func=lambda i: csvsafe.safe_text(f"{rows.at[i, 'path']} "
                                                                 f"(true {rows.at[i, 'true_class']})"))
        source_name = str(rows.at[i, "source"]) if "source" in rows.columns else ""
        found = paths.locate(str(rows.at[i, "path"]), source_name, search_roots(card))
        if found is None:
            st.warning(f"Cannot find {ui.plain(rows.at[i, 'path'])} under the data root or the training folders.")
            return None
        return found.name, found
    refused = auth.refusal("server_folders")
    if refused:
        st.info(refused, icon="🔒")
        return None
    root = ui.data_root()
    if root is None:
        st.info("Set the environment variable CXR_DATA_ROOT to pick images from a folder on the server.")
        return None
    folder = st.selectbox("Folder", [""] + paths.subfolders(root), key="instructor_folder",
                          format_func=lambda p: csvsafe.safe_text(p) or "(the data root itself)")
    try:  # the folder may have gone since the list was drawn
        files = paths.list_images(paths.resolve_under(root, folder), recursive=False, limit=LISTED + 1, root=root)
    except (ValueError, OSError) as err:
        st.error(ui.plain(err) if isinstance(err, ValueError)
                 else f"The folder could not be read ({type(err).__name__}).")
        return None
    if not files:
        st.info("No images directly in this folder; choose a sub-folder.")
        return None
    if len(files) > LISTED:
        files = files[:LISTED]
        st.caption(f"The first {LISTED} images of this folder (by name) are listed: put the one you want in a "
                   "sub-folder of the data root to reach it.")
    picked = st.selectbox("File", files, format_func=lambda p: csvsafe.safe_text(p.name), key="instructor_file")
    return picked.name, picked


def methods_ui(explainer, model_key: str, batch, shown, class_index: int, colormap: str) -> None:
    st.subheader("One image, several CAM methods")
    slow = st.checkbox("Include Score-CAM (one forward pass per feature channel: slow on large models)",
                       key="instructor_scorecam")
    methods = [m for m in METHODS if m != "scorecam" or slow]
    if not explainer.classifier.model_built:
        st.caption("The first map that needs gradients (Score-CAM, SmoothGrad, earlier layers) loads TensorFlow "
                   "and the full model: about 15 s, once per server.")
    cols = st.columns(len(methods))
    for col, method in zip(cols, methods, strict=True):
        try:
            heat = explain(explainer, model_key, batch, method, class_index, None)
        except Exception as err:  # noqa: BLE001 - one method failing leaves the others
            ui.explain_failed(METHOD_LABELS[method], err, col)
            continue
        col.image(overlay.overlay(shown, heat, colormap), caption=METHOD_LABELS[method])
    st.caption("Grad-CAM, Grad-CAM++ and LayerCAM weight the last feature map by gradients; Score-CAM by how "
               "much each channel alone raises the score; SmoothGrad averages input gradients over noisy copies. "
               "At the last layer of these models (average pooling, then one linear layer) the gradient is the "
               "same at every position, so Grad-CAM++ and LayerCAM give the same map: Grad-CAM without the "
               "features that lower the score. At earlier layers they differ.")


def layers_ui(explainer, model_key: str, batch, shown, class_index: int, colormap: str) -> None:
    st.subheader("Grad-CAM at a chosen layer")
    try:  # builds the Keras model when predictions came from the engine cache: a failure here costs this part only
        layers = explainer.layer_choices()
    except Exception as err:  # noqa: BLE001
        ui.explain_failed("The layer list", err)
        return
    layer = st.select_slider("Layer (end of each block; the last is the model's target layer)", layers,
                             value=layers[-1], key="instructor_layer")
    try:
        heat = explain(explainer, model_key, batch, "gradcam", class_index, layer)
    except Exception as err:  # noqa: BLE001
        ui.explain_failed(f"Grad-CAM at {layer}", err)
        return
    st.image(half(overlay.overlay(shown, heat, colormap)), caption=f"Grad-CAM at {layer}")
    st.caption("Early layers see edges and texture at high resolution; later layers see larger, more abstract parts.")


def occlusion_ui(classifier, model_key: str, image, shown, class_index: int, colormap: str) -> None:
    st.subheader("Occlusion sensitivity")
    size = classifier.input_size
    patch = st.select_slider("Patch size (pixels of the model input)", [max(size // d, 2) for d in (16, 8, 4)],
                             value=max(size // 8, 2), key="instructor_patch")
    if not st.checkbox("Compute the occlusion map", key="instructor_occlusion",
                       help="Hides one grey patch at a time (half-patch stride) and re-scores the image in batches."):
        st.caption("Model-agnostic: where does hiding the image lower the probability? Tick the box to compute it.")
        return
    try:
        drop = occlusion(classifier, model_key, image, class_index, patch)
    except Exception as err:  # noqa: BLE001
        ui.explain_failed("The occlusion map", err)
        return
    name = classifier.card.class_names[class_index]
    # Each pixel holds the mean change over the patches that cover it (they overlap by half): the figures are those.
    largest = float(drop.max())
    caption = (f"Largest mean drop in P({name}) at a pixel, over the patches that cover it when hidden: "
               f"{largest:.3f}" if largest > 0 else
               f"Hiding patches lowers P({name}) nowhere on average: the map is blank (the largest mean rise at a "
               f"pixel is {max(0.0, -float(drop.min())):.3f})")
    st.image(half(overlay.overlay(shown, probe.occlusion_heatmap(drop), colormap)), caption=caption)


def perturbations_ui(classifier, pixels) -> None:
    st.subheader("How simple changes move the prediction")
    try:
        rows = pd.DataFrame(probe.perturbation_table(classifier, pixels))
    except Exception as err:  # noqa: BLE001
        ui.explain_failed("The perturbation table", err)
        return
    rows["change"] = rows["change"].astype(float)
    label = [k if k == "original" else f"{k} {a:g}" for k, a in zip(rows["kind"], rows["amount"], strict=True)]
    top = rows.loc[0, "top_class"]
    fig = px.bar(rows.assign(perturbation=label), x="perturbation", y=top, color="decision",
                 labels={top: f"P({top})"}, range_y=[0, 1])
    fig.update_layout(height=320, margin={"t": 20})
    st.plotly_chart(fig, key="instructor_perturbations")
    st.dataframe(rows, hide_index=True, key="instructor_perturbation_table",
                 column_config={"change": st.column_config.NumberColumn(f"Change in P({top})", format="%+.3f")})
    st.caption("Amounts: " + "; ".join(f"{k} in {u}" for k, u in probe.AMOUNT_UNITS.items()) + ".")


def gallery_ui(classifier, explainer, model_key: str, held_out: pd.DataFrame | None, colormap: str) -> None:
    st.header("Most confident errors of the held-out split")
    refused = auth.refusal("held_out_films")
    if refused:
        st.info(refused, icon="🔒")
        return
    if held_out is None:
        st.info("This model folder has no predictions.csv, so there is no gallery of errors.")
        return
    card = classifier.card
    k = st.slider("How many", 2, 16, 8, key="instructor_gallery_k")
    try:
        errors = probe.confident_errors(held_out, card.class_names, k=k, split=None)
    except ValueError as err:  # a predictions.csv of another version or other classes
        st.warning(f"This model folder's predictions.csv does not fit its card ({err}), so there is no gallery of "
                   "errors. Score the model again (`python -m training rescore MODEL`).")
        return
    if errors.empty:
        st.success("No wrong predictions in the held-out split.")
        return
    roots = search_roots(card)
    cols = st.columns(4)
    shown: list[str] = []
    for i, row in errors.iterrows():
        col = cols[i % 4]
        caption = f"{row['path']}: true {row['true_class']}, called {row['predicted_class']} ({row['confidence']:.2f})"
        found = paths.locate(str(row["path"]), str(row.get("source", "")), roots)
        if found is None:
            col.warning(f"Cannot find {ui.plain(row['path'])} under the data root or the training folders.")
            continue
        try:
            image = imaging.load(found, found.name)
        except UnreadableImageError as err:
            col.error(ui.plain(f"{row['path']}: {err}"))
            continue
        batch = preprocess.model_input(image.pixels, classifier.input_size)
        try:
            heat = explain(explainer, model_key, batch, "gradcam", card.class_names.index(row["predicted_class"]),
                           None)
        except Exception as err:  # noqa: BLE001 - the other films of the gallery stand
            ui.explain_failed(f"Grad-CAM for {ui.plain(caption)}", err, col)
            continue
        col.image(overlay.overlay(display(image.pixels), heat, colormap), caption=ui.plain(caption))
        shown.append(str(found))
    if shown:  # held-out films (possibly a hospital's) were read and shown: one line per gallery shown
        marker = hashlib.sha256("\0".join([model_key, *shown]).encode()).hexdigest()
        auth.record_once(marker, "classify", model=card.name, weights_sha256=card.weights_sha256, source="held_out",
                         counts={"images": len(shown)})


ui.research_banner()
auth.require("instructor")
st.title("Instructor: how the model sees")
classifier, explainer, model_dir = ui.require_model("Choose a working model in the sidebar.")
model_card = classifier.card
model_key = f"{model_dir}:{ui.model_version(model_card)}"
held_out = held_out_rows(ev.read_evaluation(model_dir).predictions)
colormap = st.sidebar.selectbox("Colormap", list(overlay.COLORMAPS), key="instructor_colormap")
chosen = image_source_ui(model_card, held_out)
image_pixels = None
if chosen is not None:
    try:
        loaded = imaging.load(chosen[1], chosen[0])
        image_pixels = loaded.pixels
    except UnreadableImageError as err:
        st.error(str(err))
if image_pixels is not None:
    model_batch = preprocess.model_input(image_pixels, classifier.input_size)
    marker = hashlib.sha256(chosen[1] if isinstance(chosen[1], bytes) else os.fsencode(chosen[1])).hexdigest()
    audited = {"model": model_card.name, "weights_sha256": model_card.weights_sha256,
               "source": ("upload", "held_out", "data_root")[SOURCES.index(st.session_state["instructor_source"])]}
    try:
        prediction = classifier.predict(model_batch)[0]
    except Exception as err:  # noqa: BLE001 - the gallery below still stands
        ui.explain_failed("The prediction for this image", err)
        image_pixels = None
        # The film was read: on record though not classified.
        auth.record_once(marker + model_card.weights_sha256, "classify", **audited, counts={"images": 1, "failed": 1})
if image_pixels is not None:
    auth.record_once(marker + model_card.weights_sha256, "classify", **audited,
                     counts={"images": 1, "positive": int(prediction.positive)})
    names = list(model_card.class_names)
    explained_for = marker + ui.model_version(model_card)
    if (st.session_state.get("instructor_class_for") != explained_for  # another image or model: explain anew
            or "instructor_class" not in st.session_state):  # or the widget's state went with another page
        st.session_state["instructor_class_for"] = explained_for  # the class it was called
        st.session_state["instructor_class"] = prediction.decision
    target = st.selectbox("Class to explain", names, key="instructor_class")
    st.caption(" · ".join(f"P({c}) = {p:.3f}" for c, p in prediction.as_dict().items())
               + f" · decision {prediction.decision}")
    # The cautions the Classify page gives (not a chest, low confidence, a threshold call, unlike the training
    # films, what the reader changed): a class is shown how the model behaves on this very film.
    for line in report.cautions(prediction, model_card, quality.assess(loaded, chosen[1]), loaded.info):
        st.warning(line, icon="⚠️")
    shown_image = display(image_pixels)
    target_index = names.index(target)
    methods_ui(explainer, model_key, model_batch, shown_image, target_index, colormap)
    layers_ui(explainer, model_key, model_batch, shown_image, target_index, colormap)
    occlusion_ui(classifier, model_key, preprocess.prepare(image_pixels, classifier.input_size), shown_image,
                 target_index, colormap)
    perturbations_ui(classifier, image_pixels)
gallery_ui(classifier, explainer, model_key, held_out, colormap)
