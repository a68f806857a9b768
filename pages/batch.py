"""Batch review: score a server folder or many uploaded files, filter the table, inspect one file's Grad-CAM."""

from __future__ import annotations

import time
from pathlib import Path

import streamlit as st

import auth
import ui
from cxr_core import csvsafe, imaging, paths, pipeline, preprocess, report, review
from cxr_core.errors import UnreadableImageError

STATE = "batch_results"
TABLE_KEY = "batch_table"
DECISIONS_KEY = "batch_decisions"
VIEW_KEY = "batch_view"  # the filters the table's selection was made under
MAX_FILES = ui.MAX_BATCH_FILES
SOURCES = ("Upload files", "Upload a folder", "Folder on the server")
AUDIT_SOURCES = dict(zip(SOURCES, ("upload", "folder_upload", "server_folder"), strict=True))


def server_folder_ui() -> tuple[list[tuple[str, Path]], Path] | None:
    """The files of a folder under the configured data root and the folder, once the user asks to score it."""
    refused = auth.refusal("server_folders")
    if refused:
        st.error(refused, icon="🔒")
        return None
    root = ui.data_root()
    if root is None:
        st.info("Scoring folders on the server is off. Set the environment variable CXR_DATA_ROOT to the folder "
                "that holds the images (only folders inside it can be used), then restart the app.")
        return None
    picked = st.selectbox("Folder under the data root", [""] + paths.subfolders(root), key="batch_pick",
                          format_func=lambda p: csvsafe.safe_text(p) or "(the data root itself)")
    typed = st.text_input("or type a path relative to the data root", key="batch_path")
    recursive = st.checkbox("Include sub-folders", value=True, key="batch_recursive")
    if not st.button("Score folder", type="primary", key="batch_score_folder"):
        return None
    try:
        folder = paths.resolve_under(root, typed or picked)
    except ValueError as err:
        st.error(ui.plain(err))
        return None
    if not folder.is_dir():
        st.error(f"'{ui.plain(typed or picked)}' is a file, not a folder. "
                 "Choose a folder under the data root.")
        return None
    unreadable: list = []
    files = paths.list_images(folder, recursive=recursive, limit=MAX_FILES, root=root, unreadable=unreadable)
    if unreadable:  # said, not taken for an empty folder: their files are not in the table
        blocked = ", ".join(ui.plain(p.relative_to(folder).as_posix() or ".") for p, _ in unreadable[:5])
        reason = unreadable[0][1].strerror or type(unreadable[0][1]).__name__
        st.warning(f"{len(unreadable)} folder(s) could not be read ({reason}): {blocked}"
                   + (" and more" if len(unreadable) > 5 else "") + ". Their files are not scored; ask the "
                   "administrator to let the app read them, or choose another folder.")
    if not files:
        if not unreadable:
            st.warning(f"No image files (JPEG, PNG, DICOM...) in '{ui.plain(typed or picked or '.')}'.")
        return None
    if len(files) == MAX_FILES:
        st.warning(f"Only the first {MAX_FILES} files are scored; choose a smaller folder for the rest.")
    # Names as shown and exported: valid Unicode (a server file name may hold any bytes) and unique.
    names = review.unique_names(p.relative_to(folder).as_posix() for p in files)
    return list(zip(names, files, strict=True)), folder


def upload_ui(directory: bool) -> tuple[list[tuple[str, bytes]], dict[str, tuple[str, str]]] | None:
    """Uploaded files as (unique name, bytes) to score, once the user asks to, and where each stays: name ->
    (the uploader's key, the file's id). The session keeps only that reference, not the bytes: the uploader holds
    the files already, and 2000 films of 30 MB kept a second time would fill the server's memory."""
    key = "batch_folder_upload" if directory else "batch_upload"
    files = st.file_uploader("Chest radiographs" if not directory else "A folder of chest radiographs",
                             type=None, accept_multiple_files="directory" if directory else True,
                             key=key, help=ui.UPLOAD_HELP)
    if not files:
        return None
    if directory:  # a folder upload brings every file along; keep those with image names
        files = [f for f in files if imaging.is_image_name(f.name)]
        if not files:
            st.warning("No image files (JPEG, PNG, DICOM...) in this folder. Choose the folder that holds the films.")
            return None
    if len(files) > MAX_FILES:  # one round's files stay in the uploader for their detail view
        st.warning(f"{len(files)} files chosen: only the first {MAX_FILES} are scored; score the rest in another "
                   "round.")
        files = files[:MAX_FILES]
    if not st.button(f"Score {len(files)} file(s)", type="primary", key="batch_score_upload"):
        return None
    names = review.unique_names(f.name for f in files)
    return ([(name, f.getvalue()) for name, f in zip(names, files, strict=True)],
            {name: (key, f.file_id) for name, f in zip(names, files, strict=True)})


def uploaded_bytes(reference: tuple[str, str]) -> bytes | None:
    """The bytes of a scored upload from the uploader that still holds it (``upload_ui``'s reference); None when
    it holds it no more (the file was removed from it, or the page was left, which empties it)."""
    key, file_id = reference
    held = st.session_state.get(key) or []
    return next((f.getvalue() for f in held if getattr(f, "file_id", None) == file_id), None)


def score_ui(classifier, items: list[tuple[str, Path | bytes]], origin: str, folder: Path | None = None,
             references: dict[str, tuple[str, str]] | None = None) -> None:
    """Score in batches with a progress bar; keep the table and where each file is in the session (a server path,
    or for an upload its place in the uploader: ``references``), never the uploads' bytes.

    ``origin`` ("upload", "folder_upload" or "server_folder") goes to the audit line with the counts, and a
    server ``folder`` as its keyed hash (the audit never holds its name).
    """
    bar = st.progress(0.0, text=f"Scoring {len(items)} file(s)...")

    def progress(done: int, total: int) -> None:
        bar.progress(done / max(total, 1), text=f"Scored {done} of {total} file(s)")

    results = pipeline.classify_many(classifier, items, batch_size=16, progress=progress)
    # The file (bytes or server path) for the colour rule, whichever way it came.
    reports = [review.assess_item(item, source) for item, (_, source) in zip(results, items, strict=True)]
    bar.empty()
    table = review.batch_table(results, classifier.card.class_names, reports)
    auth.record("batch", model=classifier.card.name, weights_sha256=classifier.card.weights_sha256, source=origin,
                counts=review.summary(table), folder=str(folder) if folder is not None else None)
    sources = {name: (references or {}).get(name, source) for name, source in items}  # no upload's bytes kept
    what = f"{len(items)} uploaded file(s)"
    if folder is not None:  # as the user names it: relative to the data root
        root = ui.data_root()
        shown = folder.relative_to(root).as_posix() if root and folder.is_relative_to(root) else folder.name
        what = f"the folder '{shown}'"
    st.session_state[STATE] = {"model": ui.model_version(classifier.card), "table": table, "sources": sources,
                               "stamps": {name: _stamp(source) for name, source in sources.items()},
                               "origin": origin, "what": what, "when": time.strftime("%H:%M")}
    # A new table: the old selection and decision filter (its options were the old table's) go with the old one.
    for key in (DECISIONS_KEY, "batch_class_file"):
        st.session_state.pop(key, None)
    clear_selection()


def _stamp(source: Path | bytes) -> tuple[int, int] | None:
    """A server file's (size, modification time) when it was scored; None for uploaded bytes (kept as they were)."""
    if not isinstance(source, Path):
        return None
    try:
        info = source.stat()
    except OSError:
        return None
    return info.st_size, info.st_mtime_ns


def column_config(class_names: list[str]) -> dict:
    config = {
        review.THUMBNAIL: st.column_config.ImageColumn("Image", width="small"),
        "file": st.column_config.TextColumn("File"),
        "top_class": st.column_config.TextColumn("Top class"),
        "top_probability": st.column_config.NumberColumn(
            "Top probability", format="%.3f", help="The most probable class's calibrated probability (0 to 1)"),
        "decision": st.column_config.TextColumn("Decision", help="At the model card's thresholds"),
        "positive": st.column_config.CheckboxColumn("Positive"),
        "low_confidence": st.column_config.CheckboxColumn("Low confidence"),
        "not_chest": st.column_config.CheckboxColumn("Not a chest X-ray?", help="cxr_core.quality rules"),
        "familiarity": st.column_config.NumberColumn(
            "Familiarity", format="%.4f", help="Distance of the film's features from the training films' (about 1 "
            "for a typical training film; empty when the model has no familiarity check)"),
        "unfamiliar": st.column_config.CheckboxColumn(
            "Unlike training films?", help="Past the familiarity threshold fitted on validation films: treat the "
            "result as unreliable"),
        "quality_notes": st.column_config.TextColumn("Why flagged"),
        "reading_notes": st.column_config.TextColumn("Reader's changes", help="What the reader changed in the "
                                                     "picture the model saw: shown inverted, frames left out..."),
        "error": st.column_config.TextColumn("Error", width="large"),
    }
    for name in class_names:
        config[f"p_{name}"] = st.column_config.ProgressColumn(
            f"P({name})", min_value=0.0, max_value=1.0, format="%.3f", help=f"Calibrated probability of {name}, 0 to 1")
    return config


def clear_selection() -> None:
    """No row selected, in the session and in the browser: popping the key would clear only the server's copy, and
    the browser (the table keeps its identity when its rows change) would send the old row position back."""
    st.session_state[TABLE_KEY] = {"selection": {"rows": [], "columns": [], "cells": []}}


def filters_ui(table) -> tuple[list[str] | None, list[str], str]:
    left, middle, right = st.columns(3)
    options = sorted(table["decision"].dropna().unique().tolist())
    chosen = left.multiselect("Decision", options, default=options, key=DECISIONS_KEY)
    flags = middle.multiselect("Only rows flagged", list(review.FLAGS), format_func=review.FLAGS.get,
                               key="batch_flags")
    text = right.text_input("File name contains", key="batch_search")
    # With every decision chosen, unreadable rows (no decision) stay in view.
    return (None if set(chosen) == set(options) else chosen), flags, text


def detail_ui(classifier, explainer, name: str, source: Path | bytes | tuple[str, str], row,
              stamp: tuple[int, int] | None = None) -> None:
    """One file's image beside its Grad-CAM for a chosen class. A server file is read again here: if it changed
    since it was scored (``stamp``: its size and modification time then), its image would sit beside another
    film's result, so it is not shown."""
    st.subheader(ui.plain(name))
    if row["error"]:
        st.error(ui.plain(row["error"]))
        return
    if isinstance(source, tuple):  # an upload: its bytes are in the uploader, if it still holds them
        source = uploaded_bytes(source)
        if source is None:
            st.info("This file is no longer in the uploader (removed from it, or emptied when another page or "
                    "another 'Images from' choice was shown): upload it again to see its image and heatmap. Its row "
                    "and the table's figures stand.")
            return
    if stamp is not None and _stamp(source) != stamp:
        st.error("This file changed on the server (or went away) since it was scored: its image now is not the film "
                 "this row's result belongs to. Score the folder again to see it with its own result.")
        return
    if row["not_chest"]:
        st.warning(ui.plain(f"Probably not a frontal chest radiograph: {row['quality_notes']}."), icon="🚫")
    if row.get("reading_notes"):
        st.info(ui.plain(f"What the reader changed in this picture: {row['reading_notes']}."), icon="ℹ️")
    if row.get("unfamiliar"):
        st.warning(report.unfamiliar_warning(row["familiarity"], classifier.card), icon="❔")
    try:
        image = imaging.load(source, name)
    except UnreadableImageError as err:
        st.error(str(err))
        return
    names = list(classifier.card.class_names)
    if st.session_state.get("batch_class_file") != name or "batch_class" not in st.session_state:  # anew
        st.session_state["batch_class_file"] = name
        st.session_state["batch_class"] = row["decision"]
    target = st.selectbox("Explain class", names, key="batch_class",
                          help="The heatmap shows where the model looked for this class; first, the class called.")
    batch = preprocess.model_input(image.pixels, classifier.input_size)
    try:
        _, heatmaps = explainer.gradcam(batch, names.index(target))
    except Exception as err:  # noqa: BLE001 - the table and the other rows stand
        ui.explain_failed(f"Grad-CAM for {target}", err)
        return
    ui.viewer_ui(image.pixels, heatmaps[0], image.values, key="batch", revision=name,
                 titles=(f"{image.info.format} {image.info.width}x{image.info.height}", f"Grad-CAM for {target}"))


def results_ui(classifier, explainer, state: dict) -> None:
    table = state["table"]
    if state.get("what"):  # another folder chosen, or new files dropped, since: the table says whose it is
        st.markdown(f"**Results of {ui.plain(state['what'])}**, scored at {state['when']}. Choose files or a folder "
                    "and score them to replace these results.")
    counts = review.summary(table)
    st.caption(f"{counts['files']} file(s): {counts['positive']} positive, {counts['low_confidence']} low "
               f"confidence, {counts['not_chest']} probably not a chest X-ray, {counts['unfamiliar']} unlike the "
               f"training films, {counts['unreadable']} unreadable.")
    decisions, flags, text = filters_ui(table)
    view = (None if decisions is None else tuple(decisions), tuple(flags), text)
    if st.session_state.get(VIEW_KEY) != view:  # the selection is a row position in the old view: it would now
        st.session_state[VIEW_KEY] = view      # point at another file (another patient's film); start without one
        clear_selection()
    shown = review.filter_table(table, decisions, flags, text)
    event = st.dataframe(shown, column_config=column_config(list(classifier.card.class_names)), hide_index=True,
                         on_select="rerun", selection_mode="single-row", key=TABLE_KEY)
    table = review.export_csv(shown, classifier.card)
    st.download_button(f"Download these {len(shown)} rows as CSV",
                       auth.exported(lambda: table, model=classifier.card.name,
                                     weights_sha256=classifier.card.weights_sha256, source=state.get("origin"),
                                     counts={"rows": len(shown)}),
                       file_name="batch_review.csv", mime="text/csv", key="batch_csv")
    rows = event.selection.rows if event is not None else []
    if not rows or rows[0] >= len(shown):
        st.caption("Select a row to see its image and Grad-CAM.")
        return
    row = shown.iloc[rows[0]]
    detail_ui(classifier, explainer, row["file"], state["sources"][row["file"]], row,
              state.get("stamps", {}).get(row["file"]))


ui.research_banner()
auth.require("batch")
st.title("Batch review")
classifier, explainer, _model_dir = ui.require_model("Choose a working model in the sidebar to score images.")
source = st.radio("Images from", SOURCES if auth.allowed("server_folders") else SOURCES[:2], horizontal=True,
                  key="batch_source")
references = None
if source == SOURCES[2]:
    items, folder = server_folder_ui() or (None, None)
else:
    items, references = upload_ui(directory=source == SOURCES[1]) or (None, None)
    folder = None
if items:
    score_ui(classifier, items, AUDIT_SOURCES[source], folder, references)
state = st.session_state.get(STATE)
if state and state["model"] == ui.model_version(classifier.card):
    results_ui(classifier, explainer, state)
elif state:
    st.info("The model changed since these files were scored; score them again.")
