"""PACS worklist: search the DICOMweb archive, classify a study's frontal films, score a whole search as a
batch, and (opt-in, per study) write the results back as DICOM SR + heatmap flagged UNVERIFIED.

Only on when PACS settings exist (secrets ``[pacs]`` or CXR_PACS_* env vars). Nothing read from the PACS is
written to disk: studies, films and results live in this session's memory. Searching/classifying and writing
back are separate functions (``search_ui``/``study_ui`` and ``write_back_ui``) so that each can be gated.
"""

from __future__ import annotations

from datetime import date, timedelta

import pandas as pd
import streamlit as st

import auth
import ui
from cxr_core import dicomweb, imaging, overlay, pacs, report, review
from cxr_core.dicomweb import PacsError

STUDIES, RESULTS, BATCH, SEARCHES = "pacs_studies", "pacs_results", "pacs_batch", "pacs_searches"
AGAIN, AGAIN_FOR, AGAIN_USED = "pacs_again", "pacs_again_study", "pacs_again_used"
NOT_CHEST, NOT_CHEST_USED = "pacs_not_chest", "pacs_not_chest_used"  # write films flagged not a chest too
MODALITY_CHOICES = {"CR, DX or DR": dicomweb.RADIOGRAPHY, "CR": "CR", "DX": "DX", "DR": "DR"}
LIMITS = (100, 250, 500)  # studies a search lists at most (each a row of the PACS's answer: ~1 KB)


def search_ui(client: dicomweb.Client) -> None:
    """The search form; the matching studies are kept in the session."""
    cols = st.columns(5)
    dated = st.checkbox("Only studies in this date range", key="pacs_dated")
    today = date.today()
    start = cols[0].date_input("Study date from", value=today - timedelta(days=30), min_value=date(1900, 1, 1),
                               key="pacs_from", disabled=not dated)
    end = cols[1].date_input("to", value=today, min_value=date(1900, 1, 1), key="pacs_to", disabled=not dated)
    accession = cols[2].text_input("Accession number", key="pacs_accession")
    modality = cols[3].selectbox("Modality", list(MODALITY_CHOICES), key="pacs_modality")
    body = cols[4].text_input("Body part", key="pacs_body", placeholder="e.g. CHEST")
    limit = st.selectbox("List at most", LIMITS, key="pacs_limit", format_func="{} studies".format,
                         help="A search that matches more lists only this many, and says so. With a body part, each "
                              "study found is asked about once more, so a larger list takes longer.")
    if not st.button("Search", type="primary", key="pacs_search"):
        return
    try:
        studies = client.search_studies(date_from=start if dated else None, date_to=end if dated else None,
                                        accession=accession, modality=MODALITY_CHOICES[modality], body_part=body,
                                        limit=limit)
    except PacsError as err:
        st.error(ui.plain(err))
        return
    auth.record("pacs_search", source="pacs", study_uids=[s.study_uid for s in studies],
                counts={"studies": len(studies)})
    st.session_state[STUDIES] = studies
    # A new list: nothing of the old one stays chosen (the chosen position would open another study by itself), and
    # the study picker is a new widget, so a browser cannot hand back the old list's choice for the new list.
    for key in (RESULTS, BATCH, study_key()):
        st.session_state.pop(key, None)
    st.session_state[SEARCHES] = st.session_state.get(SEARCHES, 0) + 1


def study_key() -> str:
    """The study picker's widget key for the current list of studies."""
    return f"pacs_study_{st.session_state.get(SEARCHES, 0)}"


def studies_table(studies: list[dicomweb.Study]) -> pd.DataFrame:
    """Only what a clinician needs to pick a study (no patient name or ID)."""
    return pd.DataFrame({"Accession": [s.accession for s in studies], "Date": [s.date for s in studies],
                         "Description": [s.description for s in studies],
                         "Modality": [s.modalities for s in studies],
                         "Films": [s.films if s.films is not None else pd.NA for s in studies]})


def study_ui(client: dicomweb.Client, classifier, explainer, study: dicomweb.Study) -> pacs.StudyResult | None:
    """Classify the study's frontal films (once per study and model) and show each with its heatmap."""
    key = (study.study_uid, ui.model_version(classifier.card))
    state = st.session_state.get(RESULTS)
    if state is None or state[0] != key:
        reason = auth.refusal("pacs_classify")
        if reason is not None:
            st.error(reason, icon="🔒")
            return None
        with st.spinner("Reading and classifying the study's films..."):
            try:
                result = pacs.classify_study(client, classifier, explainer, study.study_uid)
            except PacsError as err:
                st.error(ui.plain(err))
                return None
        auth.record("pacs_classify", source="pacs", study_uids=[study.study_uid], model=classifier.card.name,
                    weights_sha256=classifier.card.weights_sha256, counts={"films": len(result.classified)})
        st.session_state[RESULTS] = state = (key, result)
    result = state[1]
    for note in result.notes:
        st.info(ui.plain(note))
    for item in result.films:
        film_ui(item, classifier.card)
    return result


def film_ui(item: pacs.FilmResult, card) -> None:
    """One film: why it was skipped or could not be read, or the image, heatmap, decision and warnings."""
    # Everything here that a PACS supplied (series description, view and body-part codes in the label and the
    # skip reasons, error texts quoting them) is shown as plain text: a crafted description must not render as
    # Markdown (emphasis, links, images fetched from elsewhere) next to the model's result.
    st.subheader(ui.plain(item.film.label))
    if item.film.skip:
        st.info(ui.plain(item.film.skip))
        return
    if item.error:
        st.error(ui.plain(item.error))
        return
    result, prediction = item.result, item.result.prediction
    if item.quality is not None and item.quality.probably_not_chest:
        st.warning(ui.plain(report.not_chest_line(item.quality)
                            + " The result below is not meaningful for this film, and is not written back."),
                   icon="🚫")
    for note in imaging.reading_notes(result.image.info):  # what the reader changed (inverted, frames left out)
        st.info(ui.plain(note), icon="ℹ️")
    if prediction.unfamiliar:
        st.warning(report.unfamiliar_warning(prediction.familiarity, card), icon="❔")
    if prediction.low_confidence:
        st.warning(report.low_confidence_line(prediction, card) + " Treat this result as uncertain.", icon="⚠️")
    if called := report.threshold_call_line(prediction, card):
        st.warning(called, icon="⚖️")
    left, right = st.columns([3, 2])
    pictures = left.columns(2)
    # At most MAX_DISPLAY_SIDE a side, as on the Classify page: a 4300 x 4300 film would send ~55 MB of RGB per
    # film, and Streamlit refuses an extreme strip shrunk to 0 px.
    film = overlay.fit(result.image.pixels)
    pictures[0].image(film, clamp=True, width="stretch",
                      caption=f"{result.image.info.width} x {result.image.info.height} px")
    pictures[1].image(overlay.overlay(film, result.heatmap), width="stretch",
                      caption=f"Grad-CAM for {card.class_names[result.class_index]} (red = most weight)")
    colour = "red" if prediction.positive else "blue"
    right.markdown(f"### Decision: :{colour}[{prediction.decision}]")
    right.table(pd.DataFrame({"Class": list(prediction.class_names),
                              "Probability": [f"{p:.4f}" for p in prediction.probabilities]}), hide_index=True)


def _take_again() -> None:
    """The write button's callback, run before the page is drawn again: "write again" counts for this write
    only and is unticked at once (a second press, or a later study, is guarded again)."""
    st.session_state[AGAIN_USED] = bool(st.session_state.get(AGAIN, False))
    st.session_state[AGAIN] = False
    st.session_state[NOT_CHEST_USED] = bool(st.session_state.get(NOT_CHEST, False))
    st.session_state[NOT_CHEST] = False


def write_back_ui(client: dicomweb.Client, card, result: pacs.StudyResult) -> None:
    """Opt-in write-back of this study's results (SR + heatmap image per film), never automatic."""
    if not result.classified or not auth.allowed("pacs_write"):
        return
    st.divider()
    st.markdown("**Write the results back to the PACS** as a DICOM structured report and a heatmap image per "
                "film, in new series of this study, flagged *UNVERIFIED - research use only*.")
    if st.session_state.get(AGAIN_FOR) != result.study_uid:  # another study: both confirmations start unticked
        st.session_state[AGAIN] = st.session_state[NOT_CHEST] = False
        st.session_state[AGAIN_FOR] = result.study_uid
    st.checkbox("Write again even if this model's results are already in the study", key=AGAIN)
    flagged = len(result.classified) - len(result.writable)
    if flagged:  # left out unless confirmed here: the page calls their result not meaningful
        st.checkbox(f"Also write the {flagged} film(s) flagged 'probably not a frontal chest radiograph' (their "
                    "results then carry that caution)", key=NOT_CHEST)
    if not st.button("Write back to the PACS", key="pacs_write", on_click=_take_again):
        return
    again = bool(st.session_state.pop(AGAIN_USED, False))
    include = bool(flagged and st.session_state.pop(NOT_CHEST_USED, False))
    reason = auth.refusal("pacs_write")  # checked again on the server side when the button is pressed
    if reason is not None:
        st.error(reason, icon="🔒")
        return
    audited = {"source": "pacs", "study_uids": [result.study_uid], "model": card.name,
               "weights_sha256": card.weights_sha256}
    try:
        with st.spinner("Storing the results..."):
            stored = pacs.write_back(client, card, result, again=again, include_not_chest=include)
    except PacsError as err:
        if err.sent is not None:  # the objects went out: what the PACS kept (some, or unknown) is on record too
            counts = {"sent": err.sent, **({"objects": err.stored} if err.stored is not None else {"unknown": 1})}
            auth.record("pacs_write", **audited, counts=counts)
        st.error(ui.plain(err))
        return
    auth.record("pacs_write", **audited, counts={"objects": len(stored)})
    left_out = 0 if include else flagged
    already = getattr(stored, "already", 0)
    written = len(result.classified) - left_out - already
    st.success(f"Stored {len(stored)} object(s) in the study: a structured report and a heatmap image for each "
               f"of {written} film(s), flagged UNVERIFIED, with each film's cautions (not a chest, low confidence, "
               "unlike the training films, what the reader changed)."
               + (f" {left_out} film(s) flagged 'probably not a frontal chest radiograph' were not written."
                  if left_out else "")
               + (f" {already} film(s) already had this model's results in the study and were not written again "
                  "(tick 'write again' to add another copy)." if already else ""))


def batch_ui(client: dicomweb.Client, classifier, studies: list[dicomweb.Study]) -> None:
    """Score the frontal films of every study found, with a progress bar; the Batch review table and CSV."""
    if st.button(f"Score all {len(studies)} studies as a batch", key="pacs_batch_run"):
        reason = auth.refusal("pacs_classify")
        if reason is not None:
            st.error(reason, icon="🔒")
            return
        bar = st.progress(0.0, text=f"Reading {len(studies)} studies...")

        def progress(done: int, total: int) -> None:
            bar.progress(done / max(total, 1), text=f"Read {done} of {total} studies")

        try:
            rows, notes = pacs.score_studies(client, classifier, studies, progress=progress)
        except PacsError as err:
            bar.empty()
            st.error(ui.plain(err))
            return
        bar.empty()
        auth.record("pacs_classify", source="pacs", study_uids=[s.study_uid for s in studies],
                    model=classifier.card.name, weights_sha256=classifier.card.weights_sha256,
                    counts={"studies": len(studies), "films": len(rows)})
        table = review.batch_table(rows, classifier.card.class_names, [review.assess_item(r) for r in rows])
        st.session_state[BATCH] = (ui.model_version(classifier.card), table, notes)
    state = st.session_state.get(BATCH)
    if not state or state[0] != ui.model_version(classifier.card):
        return
    _, table, notes = state
    for note in notes:
        st.info(ui.plain(note))
    counts = review.summary(table)
    st.caption(f"{counts['files']} film(s): {counts['positive']} positive, {counts['low_confidence']} low "
               f"confidence, {counts['not_chest']} probably not a chest X-ray, {counts['unreadable']} not read.")
    st.dataframe(table, hide_index=True, key="pacs_batch_table",
                 column_config={review.THUMBNAIL: st.column_config.ImageColumn("Image", width="small")})
    rows = review.export_csv(table, classifier.card)
    st.download_button(f"Download {len(table)} rows as CSV",
                       auth.exported(lambda: rows, model=classifier.card.name,
                                     weights_sha256=classifier.card.weights_sha256, source="pacs",
                                     counts={"rows": len(table)}),
                       file_name="pacs_batch.csv", mime="text/csv", key="pacs_batch_csv")


ui.research_banner()
auth.require("pacs_search")
st.title("PACS worklist")
settings = ui.pacs_settings()
if settings is None:
    st.info("The PACS features are off. Add a [pacs] section to .streamlit/secrets.toml (see "
            ".streamlit/secrets.toml.example) or set CXR_PACS_URL (and CXR_PACS_USER, CXR_PACS_PASSWORD), then "
            "restart the app. To try it, `python -m cxr_core.pacs demo` starts a local archive with sample films.")
    st.stop()
classifier, explainer, _model_dir = ui.require_model("Choose a working model in the sidebar to classify studies.")
st.caption(f"Archive: {settings.host}. Patient names and IDs are not shown; films are read into memory only.")
client = dicomweb.Client(settings)
search_ui(client)
studies = st.session_state.get(STUDIES)
if studies is None:
    st.stop()
if not studies:
    st.warning("No study matches this search. Widen the dates or clear the other fields.")
    st.stop()
if getattr(studies, "truncated", False):
    more = "" if getattr(studies, "limit", 0) >= LIMITS[-1] else f", or list more (up to {LIMITS[-1]})"
    st.warning(f"The PACS has more studies matching this search than the {len(studies)} listed here: these are the "
               "first it answered, in its own order, so they need not be the newest (they are sorted by date here). "
               "Narrow the search (a shorter date range, the accession number, the modality or the body part)"
               f"{more} to see the rest.", icon="✂️")
st.dataframe(studies_table(studies), hide_index=True, key="pacs_studies_table")
tabs = st.tabs(["One study", "Whole search as a batch"])
with tabs[0]:
    labels = pacs.study_labels(studies)
    chosen = st.selectbox("Open a study", range(len(studies)), index=None, key=study_key(),
                          placeholder="Choose a study to classify its frontal films", format_func=labels.__getitem__)
    if chosen is not None:
        result = study_ui(client, classifier, explainer, studies[chosen])
        if result is not None:
            write_back_ui(client, classifier.card, result)
with tabs[1]:
    batch_ui(client, classifier, studies)
