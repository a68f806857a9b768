"""Model metrics: how good the selected model is on its held-out split, or on a labelled folder."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

import auth
import ui
from cxr_core import card as card_lib
from cxr_core import csvsafe, metrics, paths
from cxr_core import evaluation_view as ev


def fmt(value: float | None, digits: int = 3) -> str:
    """A figure for the page, never rounded to certainty (``evaluation_view.figure``)."""
    return "n/a" if value is None or pd.isna(value) else ev.figure(value, digits)


def figures(table: pd.DataFrame, na_rep: str = "n/a"):
    """``table`` styled with its float cells as figures (``fmt``), the others as they are."""
    return table.style.format(fmt, subset=list(table.select_dtypes("float").columns), na_rep=na_rep)


def _percent(value: float | None) -> str:
    return "n/a" if value is None or pd.isna(value) else ev.figure(value, percent=True)


def headline_ui(y, probs, card: card_lib.ModelCard) -> None:
    result = metrics.evaluate(y, probs, card.class_names, ev.decisions(card, probs))
    cols = st.columns(4)
    cols[0].metric("Images", result["n"])
    cols[1].metric("Accuracy (card's rule)", fmt(result["accuracy"]))
    cols[2].metric("AUC", fmt(result["auc"]), help="Two classes: AUC of the second class; else the macro mean.")
    cols[3].metric("ECE", fmt(result["ece"]), help="Expected calibration error of the top-class confidence.")


def roc_ui(y, probs, class_names: list[str], key: str) -> None:
    st.subheader("ROC curve per class")
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line={"dash": "dot", "color": "grey"},
                             name="chance", hoverinfo="skip"))
    for name, curve in metrics.roc_curves(y, probs, class_names).items():
        if curve["auc"] is None:
            st.caption(f"{name}: no ROC curve (this set lacks positives or negatives of {name}).")
            continue
        fig.add_trace(go.Scatter(x=curve["fpr"], y=curve["tpr"], mode="lines",
                                 name=f"{name} (AUC {fmt(curve['auc'])})"))
    fig.update_layout(xaxis_title="False positive rate (1 - specificity)",
                      yaxis_title="True positive rate (sensitivity)", height=420, margin={"t": 20},
                      legend={"x": 0.55, "y": 0.05})
    st.plotly_chart(fig, key=f"{key}_roc")


def confusion_figure(counts, labels: list[str], title: str, normalised: bool) -> go.Figure:
    values = ev.row_normalised(counts) if normalised else counts
    fig = px.imshow(values, x=labels, y=labels, text_auto=not normalised, color_continuous_scale="Blues",
                    labels={"x": "Called", "y": "True", "color": "fraction" if normalised else "images"},
                    zmin=0, zmax=1 if normalised else None)
    if normalised:  # 1 missed of 2500 reads 0.0004 and 0.9996, not 0.00 and 1.00
        fig.update_traces(text=ev.fraction_texts(counts), texttemplate="%{text}")
    fig.update_layout(title=title, height=360, margin={"t": 40})
    return fig


def threshold_ui(y, probs, card: card_lib.ModelCard, key: str) -> None:
    st.subheader("Operating point")
    names = list(card.class_names)
    positives = list(card.thresholds) or [c for c in names if c != card.negative_class] or names
    binary = len(names) == 2
    positive = positives[0] if binary else st.selectbox("Positive class (one against the rest)", positives,
                                                         key=f"{key}_positive")
    default = float(card.thresholds.get(positive, 0.5))
    ruled = not binary and bool(card.thresholds)  # the card's rule decides among several classes
    if binary:
        rule = f"{positive} is called when its probability is at or above the threshold."
    elif ruled:
        rule = (f"Under the card's rule: {positive} is called when its probability reaches this threshold and no other "
                "class that reaches its own threshold is more probable.")
    else:
        rule = (f"One against the rest: {positive} counted as called when its probability reaches the threshold. This "
                "card calls the most probable class; the threshold is not part of its rule.")
    card_value = f" The card's threshold is {default:.4f}." if positive in card.thresholds else ""
    # A keyed slider keeps its value while its bounds stay the same: another positive class or another model
    # would be shown at the previous one's threshold under this one's label. Start it again at the card's value.
    # Also when the slider's own state is gone (Streamlit drops it when another page was shown): it would start at 0.
    shown_for, slider_key = f"{key}_threshold_for", f"{key}_threshold"
    if (st.session_state.get(shown_for) != (card.name, ui.model_version(card), positive)
            or slider_key not in st.session_state):
        st.session_state[shown_for] = (card.name, ui.model_version(card), positive)
        st.session_state[slider_key] = default
    # Four decimals, as the card's threshold is given: at two, the card's 0.3460 read "0.35", and a film between the
    # two changed the counts under the same label.
    threshold = st.slider(f"Threshold on P({ui.plain(positive)})", 0.0, 1.0, step=0.001, format="%.4f",
                          key=slider_key, help=ui.plain(rule + card_value))
    negative = card.negative_class if binary and card.negative_class else None
    c = names.index(positive)
    called = ev.decisions(card, probs, {positive: threshold}) == c if ruled else None
    point = ev.operating_point(y, probs, names, positive, threshold, negative_label=negative, called=called)
    cols = st.columns(4)
    cols[0].metric("Sensitivity", fmt(point.rates["sensitivity"]), help="TP / (TP + FN)")
    cols[1].metric("Specificity", fmt(point.rates["specificity"]), help="TN / (TN + FP)")
    cols[2].metric("PPV", fmt(point.rates["ppv"]), help="TP / (TP + FP), at this set's prevalence")
    cols[3].metric("NPV", fmt(point.rates["npv"]), help="TN / (TN + FN), at this set's prevalence")
    labels = list(point.labels)
    left, right = st.columns(2)
    left.plotly_chart(confusion_figure(point.counts, labels, "Counts", False), key=f"{key}_cm_counts")
    right.plotly_chart(confusion_figure(point.counts, labels, "Row-normalised (fraction of each true class)", True),
                       key=f"{key}_cm_norm")
    if not binary:
        decided = ev.decisions(card, probs, {positive: threshold}) if ruled else ev.decisions(card, probs)
        title = ("All classes under the card's rule at this threshold" if ruled
                 else "All classes under the card's rule (the most probable class)")
        full = metrics.confusion(y, decided, len(names))
        st.plotly_chart(confusion_figure(full, names, title, False), key=f"{key}_cm_full")


def report_ui(y, probs, card: card_lib.ModelCard, key: str) -> None:
    st.subheader("Classification report")
    st.caption("Per-class one-against-the-rest results under the card's decision rule; AUC from the probabilities.")
    st.dataframe(figures(ev.report_table(y, probs, card.class_names, ev.decisions(card, probs)), na_rep=""),
                 key=f"{key}_report")


def calibration_ui(y, probs, key: str) -> None:
    bins, ece = ev.calibration_table(y, probs)
    st.subheader(f"Calibration (ECE {fmt(ece)})")
    st.caption("How often the top class is right against how confident the model was, in 10 confidence bins. "
               "A calibrated model lies on the diagonal.")
    filled = bins[bins["count"] > 0]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line={"dash": "dot", "color": "grey"},
                             name="perfect calibration"))
    fig.add_trace(go.Scatter(x=filled["confidence"], y=filled["accuracy"], mode="lines+markers", name="model",
                             text=[f"{n} images" for n in filled["count"]], marker={"size": 9}))
    fig.update_layout(xaxis_title="Mean confidence", yaxis_title="Accuracy", height=380, margin={"t": 20},
                      xaxis_range=[0, 1], yaxis_range=[0, 1.02])
    st.plotly_chart(fig, key=f"{key}_calibration")


def per_source_ui(predictions: pd.DataFrame, card: card_lib.ModelCard, split: str | None, key: str) -> None:
    table = ev.per_source(predictions, card, split)
    if len(table) > 1:
        st.subheader("Per data source")
        st.caption("A model trained on several sources can learn the source instead of the disease; "
                   "compare these rows.")
        st.dataframe(figures(table), key=f"{key}_sources")


def evaluation_ui(predictions: pd.DataFrame, card: card_lib.ModelCard, split: str | None, key: str) -> None:
    """Every chart for one set of predictions (the held-out split or an evaluated folder)."""
    try:
        y, probs, _ = ev.labelled(predictions, card.class_names, split)
    except ValueError as err:
        st.error(f"These predictions cannot be shown for this model: {ui.plain(err)}. If they belong to an earlier "
                 "version of this model, score it again (`python -m training rescore MODEL_DIR`); for a folder, "
                 "evaluate it again.")
        return
    if len(y) == 0:
        st.info("No labelled predictions of this model's classes to show.")
        return
    headline_ui(y, probs, card)
    roc_ui(y, probs, list(card.class_names), key)
    threshold_ui(y, probs, card, key)
    report_ui(y, probs, card, key)
    calibration_ui(y, probs, key)
    per_source_ui(predictions, card, split, key)


PERCENT_COLUMNS = ("accuracy", "AUC", "unfamiliar", "unfamiliar when right", "unfamiliar when wrong",
                   "source unfamiliar")


def splits_ui(metrics_json: dict) -> None:
    comparison = ev.split_comparison(metrics_json)
    if comparison.empty:
        return
    st.subheader("Splits side by side")
    st.caption("test: held-out patients of the training sources; external: whole sources kept out of training "
               "(the better guide to other hospitals); val: used to choose the epoch, thresholds, temperature and "
               "the familiarity threshold; train: what the model learned from. 'Unfamiliar' is the share of films "
               "the familiarity check flags as unlike the training films: a useful check flags far more of the "
               "films the model gets wrong than of those it gets right.")
    percent = {c: _percent for c in PERCENT_COLUMNS if c in comparison.columns and c != "AUC"}
    st.dataframe(comparison.style.format({**percent, "AUC": fmt}, na_rep="n/a"), key="split_comparison")
    detail = ev.per_source_per_class(metrics_json)
    if not detail.empty:
        st.subheader("Per split, source and class")
        st.caption("accuracy: the share of that class's films called that class (its sensitivity); AUC: that class "
                   "against the others within the source, where the source has both.")
        percent = {c: _percent for c in PERCENT_COLUMNS if c in detail.columns and c != "AUC"}
        st.dataframe(detail.style.format({**percent, "AUC": fmt}, na_rep="n/a"), key="per_source_per_class")


def history_ui(history: pd.DataFrame) -> None:
    st.subheader("Training curves")
    x = "epoch" if "epoch" in history.columns else None
    groups = ev.curve_groups(history)
    cols = st.columns(max(1, min(len(groups), 3)))
    for i, (name, columns) in enumerate(groups.items()):
        fig = px.line(history, x=x, y=columns, markers=True, title=name)
        fig.update_layout(height=300, margin={"t": 40}, legend_title_text="")
        cols[i % len(cols)].plotly_chart(fig, key=f"history_{name}")


def data_ui(card: card_lib.ModelCard, split: pd.DataFrame | None) -> None:
    st.subheader("Data the model was trained and tested on")
    if card.training_data:
        st.json(card.training_data, expanded=False)
    if split is not None:
        try:
            st.dataframe(ev.data_summary(split))
        except ValueError as err:
            st.warning(str(err))
        facts = ev.split_facts(split)
        level = ""
        if "patients" in facts:
            level = (" (split at patient level)" if facts["images with a patient id"] == facts["images"] else
                     f" (split at patient level for the {facts['images with a patient id']} images whose names carry "
                     "a patient id; each other image is its own group, so two films of one patient among them "
                     "could sit in different splits)")
        st.caption(" · ".join(f"{k}: {v}" for k, v in facts.items()) + level)


def held_out_ui(folder: Path, card: card_lib.ModelCard) -> None:
    found = ev.read_evaluation(folder)
    if found.missing:
        st.info("Some evaluation files are missing from this model folder, so parts of this page are empty:\n\n"
                + "\n".join(f"- {m}" for m in found.missing))
    if found.metrics:
        splits_ui(found.metrics)
    if found.predictions is not None:
        splits = ev.splits(found.predictions)
        split = st.selectbox("Split", splits, key="held_out_split") if splits else None
        evaluation_ui(found.predictions, card, split, key="held_out")
    elif found.metrics:
        st.json(found.metrics, expanded=False)
    if found.history is not None:
        history_ui(found.history)
    data_ui(card, found.split)


def unmatched_note(folders: list[str], class_map: dict[str, str] | None, classes: list[str]) -> str:
    """What a folder evaluation left out and why, '' when nothing: folders that name none of the model's classes,
    or that the class map sends to a class the model does not have (a typo: Covid=COVID). Folders the map leaves
    out on purpose (``Other=``) are not named."""
    mapped = {k.lower(): v for k, v in (class_map or {}).items()}
    skipped = [f for f in folders if mapped.get(f.lower()) != ""]
    if not skipped:
        return ""
    said = [f"'{ui.plain(f)}'" + (f" (mapped to '{ui.plain(mapped[f.lower()])}')" if mapped.get(f.lower()) else "")
            for f in skipped]
    return (f"{len(skipped)} folder(s) here were not evaluated: {', '.join(said)} name none of the model's classes "
            f"({', '.join(ui.plain(c) for c in classes)}), so the figures above leave their films out. Map each in the "
            "class map (FOLDER=CLASS, a class of the model), or FOLDER= to leave it out on purpose.")


def folder_evaluation_ui(classifier, card: card_lib.ModelCard) -> None:
    st.header("Evaluate on a labelled folder")
    refused = auth.refusal("evaluate")
    if refused:
        st.info(refused, icon="🔒")
        return
    root = ui.data_root()
    if root is None:
        st.info("Set the environment variable CXR_DATA_ROOT to a folder on the server to evaluate on "
                "labelled folders under it (one sub-folder per class).")
        return
    choices = [""] + paths.subfolders(root)
    picked = st.selectbox("Folder under the data root", choices, key="eval_pick",
                          format_func=lambda p: csvsafe.safe_text(p) or "(choose a folder)")  # any bytes
    typed = st.text_input("or type a path relative to the data root", key="eval_path")
    class_map_text = st.text_area("Class map (optional): one FOLDER=CLASS per line", key="eval_class_map",
                                  placeholder="Normal=NORMAL\nViral Pneumonia=PNEUMONIA")
    if st.button("Evaluate", key="eval_run", type="primary"):
        from training import data, evaluate

        try:
            folder = paths.resolve_under(root, typed or picked)
            class_map = data.parse_class_map(class_map_text.splitlines()) or None
        except ValueError as err:
            st.error(ui.plain(err))
            return
        if not folder.is_dir():
            st.error(f"'{ui.plain(typed or picked)}' is not a folder under the data root. Choose the folder "
                     "that holds the class folders (e.g. NORMAL/, PNEUMONIA/).")
            return
        links = paths.escaping_links(folder, root)
        if links:
            st.error(f"'{ui.plain(typed or picked)}' contains symlinks that lead outside the data root "
                     f"({ui.plain(', '.join(p.name for p in links[:5]))}). Remove them or choose another folder.")
            return
        bar = st.progress(0.0, text="Scoring images...")
        try:
            result = evaluate.evaluate_folder(classifier, folder, class_map,
                                              progress=lambda done, total: bar.progress(done / total,
                                                                                        text=f"{done}/{total} images"))
        except ValueError as err:
            st.error(ui.plain(err))
            return
        except OSError as err:  # a folder that went away or cannot be listed while it was read
            st.error(f"The folder could not be read ({type(err).__name__}: {err.strerror}). Check that it exists and "
                     "that the app may read it, then evaluate again.")
            return
        auth.record("evaluate", model=card.name, weights_sha256=card.weights_sha256, source="server_folder",
                    folder=str(folder), counts={"images": len(result.predictions), "unreadable": len(result.skipped)})
        st.session_state["folder_evaluation"] = (str(folder), ui.model_version(card), result, class_map)
    stored = st.session_state.get("folder_evaluation")
    if stored and stored[1] == ui.model_version(card):
        folder, _, result, class_map = stored
        st.success(f"Evaluated {len(result.predictions)} images under {ui.plain(folder)}.")
        if note := unmatched_note(result.metrics.get("unmatched_folders") or [], class_map, card.class_names):
            st.warning(note, icon="⚠️")
        if result.metrics.get("familiarity"):
            st.info(ev.familiarity_sentence(result.metrics["familiarity"])
                    + " A useful check flags far more of the films the model gets wrong than of those it gets right.")
        from training.evaluate import overlap_sentence

        if overlap := overlap_sentence(result.metrics.get("training_overlap")):
            st.warning(overlap, icon="⚠️")
        if result.skipped:
            st.warning(f"{len(result.skipped)} file(s) could not be read and were skipped:")
            st.dataframe(pd.DataFrame(result.skipped), hide_index=True)
        evaluation_ui(result.predictions, card, None, key="folder")


ui.research_banner()
auth.require("metrics")
st.title("Model metrics")
classifier, _explainer, model_dir = ui.require_model("Choose a working model in the sidebar to see its metrics.")
model_card = classifier.card
st.header(f"Held-out results of {model_card.name}")
held_out_ui(Path(model_dir), model_card)
folder_evaluation_ui(classifier, model_card)
