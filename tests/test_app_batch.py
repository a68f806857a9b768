"""The batch review page (AppTest): uploads with bad files, a server folder, refused paths,
filters, the CSV export and one row's Grad-CAM."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import plotly_spec
import pytest
from app_models import BAD_JPEG, labelled_folder
from streamlit.runtime.media_file_manager import MediaFileManager
from streamlit.testing.v1 import AppTest

from cxr_core import imaging, models
from cxr_core.card import RESEARCH_USE

PAGE = str(Path(__file__).resolve().parents[1] / "pages" / "batch.py")


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model_dir):
    models_root = tmp_path_factory.mktemp("models_root")
    shutil.copytree(tiny_model_dir, models_root / tiny_model_dir.name)
    root = tmp_path_factory.mktemp("data_root")
    labelled_folder(root / "eval", per_class=3)
    return models_root, root, models.load(tiny_model_dir)


@pytest.fixture()
def at(env, monkeypatch) -> AppTest:
    models_root, root, _ = env
    monkeypatch.setenv("CXR_MODELS_DIR", str(models_root))
    monkeypatch.setenv("CXR_DATA_ROOT", str(root))
    return AppTest.from_file(PAGE, default_timeout=120).run()


@pytest.fixture()
def uploads(data_dir) -> list[tuple[str, bytes, str]]:
    kermany = data_dir / "kermany" / "train"
    return [
        ("IM-0115-0001.jpeg", (kermany / "NORMAL" / "IM-0115-0001.jpeg").read_bytes(), "image/jpeg"),
        ("966.dcm", (data_dir / "dicom" / "pylibjpeg-data" / "966.dcm").read_bytes(), "application/octet-stream"),
        ("CR-MONO1", (data_dir / "dicom" / "fo-dicom" / "CR-MONO1-10-chest.dcm").read_bytes(),
         "application/octet-stream"),
        ("notes.txt", b"patient notes, not an image", "text/plain"),
        ("dental.dcm", (data_dir / "dicom" / "non_chest" / "CR-ModalitySequenceLUT.dcm").read_bytes(),
         "application/octet-stream"),
        ("broken.jpeg", BAD_JPEG, "image/jpeg"),
    ]


def table(at: AppTest) -> pd.DataFrame:
    return [d for d in at.dataframe if "file" in d.value.columns][0].value


def score_uploads(at: AppTest, uploads) -> AppTest:
    at.file_uploader(key="batch_upload").set_value(uploads).run()
    return at.button(key="batch_score_upload").click().run()


def test_upload_batch_scores_every_good_file_and_lists_bad_ones(at, env, uploads):
    _, _, classifier = env
    assert at.warning[0].value == RESEARCH_USE
    score_uploads(at, uploads)
    assert not at.exception
    rows = table(at).set_index("file")
    assert list(rows.index) == [u[0] for u in uploads]
    errors = rows["error"]
    assert errors["IM-0115-0001.jpeg"] == "" and errors["CR-MONO1"] == "" and errors["dental.dcm"] == ""
    for bad in ("966.dcm", "notes.txt", "broken.jpeg"):
        assert errors[bad] != "" and np.isnan(rows.loc[bad, "p_NORMAL"])
    # The shown probabilities are cxr_core's for the same bytes.
    for name, data, _ in (uploads[0], uploads[2]):
        expected = classifier.predict_pixels([imaging.load(data, name).pixels])[0]
        assert rows.loc[name, "p_PNEUMONIA"] == pytest.approx(expected.probabilities[1], abs=1e-5)
        assert rows.loc[name, "decision"] == expected.decision
    assert rows["not_chest"].to_dict() == {"IM-0115-0001.jpeg": False, "966.dcm": False, "CR-MONO1": False,
                                           "notes.txt": False, "dental.dcm": True, "broken.jpeg": False}
    assert "6 file(s)" in at.caption[0].value and "3 unreadable" in at.caption[0].value
    assert all(str(t).startswith("data:image/png;base64,") for t in rows.loc[["CR-MONO1"], "thumbnail"])


def test_csv_export_matches_the_table(at, uploads, monkeypatch, env):
    saved: list[tuple[object, str | None]] = []
    original = MediaFileManager.add_deferred

    def record(self, data, mimetype, coordinates, file_name=None, **kwargs):
        saved.append((data, file_name))  # made when the browser fetches the file (and audited then)
        return original(self, data, mimetype, coordinates, file_name=file_name, **kwargs)

    monkeypatch.setattr(MediaFileManager, "add_deferred", record)
    score_uploads(at, uploads)
    shown = table(at)
    csv = [data() for data, name in saved if name == "batch_review.csv"][-1]
    exported = pd.read_csv(io.BytesIO(csv if isinstance(csv, bytes) else csv.encode()), keep_default_na=False)
    assert "thumbnail" not in exported.columns and b"base64" not in (csv if isinstance(csv, bytes) else csv.encode())
    assert exported["file"].tolist() == shown["file"].tolist()
    assert exported["decision"].tolist() == shown["decision"].fillna("").tolist()
    good = shown["error"] == ""
    np.testing.assert_allclose(exported.loc[good, "p_PNEUMONIA"].astype(float), shown.loc[good, "p_PNEUMONIA"],
                               atol=1e-6)
    assert exported["error"].tolist() == shown["error"].tolist()
    # A CSV passed on says which model scored it and what it is for (the page's table shows neither).
    from cxr_core.card import RESEARCH_USE

    served = env[2].card
    assert exported["intended_use"].unique().tolist() == [RESEARCH_USE]
    assert exported[["model", "weights_sha256", "card_sha256"]].drop_duplicates().values.tolist() == [
        [served.name, served.weights_sha256, served.card_sha256]]


def test_the_tables_own_csv_button_is_off_so_exports_go_through_the_audited_guarded_one():
    """Streamlit's table toolbar wrote a file named =HYPERLINK(...) as a live formula, the films' thumbnails and no
    audit line: .streamlit/config.toml turns it off, as `streamlit run app.py` from the repository reads it."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    code = ("from streamlit import config; config.get_config_options(force_reparse=True); "
            "print(config.get_option('client.disableDataExport'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "True", out.stderr[-500:]


def test_filters_narrow_the_table(at, uploads):
    score_uploads(at, uploads)
    at.text_input(key="batch_search").set_value(".DCM").run()
    assert table(at)["file"].tolist() == ["966.dcm", "dental.dcm"]
    at.text_input(key="batch_search").set_value("").run()
    at.multiselect(key="batch_flags").set_value(["error"]).run()
    assert table(at)["file"].tolist() == ["966.dcm", "notes.txt", "broken.jpeg"]
    at.multiselect(key="batch_flags").set_value(["not_chest"]).run()
    assert table(at)["file"].tolist() == ["dental.dcm"]


def test_a_filter_change_drops_the_selection_instead_of_moving_it_to_another_file(at, uploads):
    score_uploads(at, uploads)
    at.session_state["batch_table"] = {"selection": {"rows": [2], "columns": [], "cells": []}}
    at.run()
    assert at.subheader[0].value == "CR-MONO1"
    at.multiselect(key="batch_flags").set_value(["error"]).run()  # row 2 of this view is broken.jpeg
    assert table(at)["file"].tolist() == ["966.dcm", "notes.txt", "broken.jpeg"]
    assert not at.exception and not at.subheader
    assert "Select a row to see its image and Grad-CAM." in [c.value for c in at.caption]
    # Cleared by assigning an empty selection (which the browser is sent), not by dropping the key (which it is not).
    assert at.session_state["batch_table"]["selection"]["rows"] == []


def test_uploads_are_not_kept_twice_and_a_film_gone_from_the_uploader_is_said(at, uploads):
    """The session keeps where each upload is (the uploader holds it), not its bytes a second time: 2000 films of
    30 MB would fill the server's memory. Opened after the uploader let it go, a row says so; the table stands."""
    score_uploads(at, uploads)
    assert any(m.value.startswith(f"**Results of {len(uploads)} uploaded file\\(s\\)**") for m in at.markdown)
    sources = at.session_state["batch_results"]["sources"]
    assert len(sources) == len(uploads) and not any(isinstance(v, bytes | bytearray) for v in sources.values())
    at.session_state["batch_table"] = {"selection": {"rows": [2], "columns": [], "cells": []}}
    at.run()
    assert at.subheader[0].value == "CR-MONO1" and len(at.get("plotly_chart")) == 1  # read from the uploader
    at.file_uploader(key="batch_upload").set_value(uploads[:1]).run()  # the film taken out of the uploader
    at.session_state["batch_table"] = {"selection": {"rows": [2], "columns": [], "cells": []}}
    at.run()
    assert not at.exception and at.subheader[0].value == "CR-MONO1"
    assert any("no longer in the uploader" in i.value for i in at.info)
    assert len(at.get("plotly_chart")) == 0 and len(table(at)) == len(uploads)


def test_selecting_a_row_shows_its_image_and_gradcam(at, uploads):
    score_uploads(at, uploads)
    at.session_state["batch_table"] = {"selection": {"rows": [2], "columns": [], "cells": []}}
    at.run()
    assert not at.exception
    assert at.subheader[0].value == "CR-MONO1"
    spec = plotly_spec.viewer(at)  # the same viewer as the Classify page
    assert plotly_spec.titles(spec)[0] == "DICOM 440x440" and plotly_spec.titles(spec)[1].startswith("Grad-CAM for ")
    assert plotly_spec.film(spec).shape == (440, 440) and plotly_spec.right_pane(spec).shape == (440, 440, 3)
    at.session_state["batch_table"] = {"selection": {"rows": [1], "columns": [], "cells": []}}
    at.run()
    assert at.subheader[0].value == "966.dcm" and at.error and "table" not in at.error[0].value.lower()


def test_a_new_batch_is_not_filtered_by_the_old_batchs_decisions(at, uploads):
    score_uploads(at, [uploads[3]])  # only an unreadable file: no decision to choose
    assert at.multiselect(key="batch_decisions").value == [] and len(table(at)) == 1
    score_uploads(at, [uploads[0], uploads[2]])
    assert not at.exception
    assert table(at)["file"].tolist() == ["IM-0115-0001.jpeg", "CR-MONO1"]
    assert set(at.multiselect(key="batch_decisions").value) == set(table(at)["decision"])


def test_explain_class_starts_at_each_rows_called_class(at, uploads):
    score_uploads(at, uploads)
    rows = table(at)
    for i in (0, 2):
        at.session_state["batch_table"] = {"selection": {"rows": [i], "columns": [], "cells": []}}
        at.run()
        assert at.selectbox(key="batch_class").value == rows.loc[i, "decision"]
        other = "NORMAL" if rows.loc[2, "decision"] == "PNEUMONIA" else "PNEUMONIA"
        at.selectbox(key="batch_class").set_value(other).run()  # a choice the next row must not inherit
        assert plotly_spec.titles(plotly_spec.viewer(at))[1] == f"Grad-CAM for {other}"


def test_a_file_name_cannot_put_markdown_on_the_page(at, uploads):
    name = "[see](https://ev.il) ![](https://ev.il/p.png) :red[x].jpeg"
    score_uploads(at, [(name, uploads[0][1], "image/jpeg")])
    at.session_state["batch_table"] = {"selection": {"rows": [0], "columns": [], "cells": []}}
    at.run()
    assert at.subheader[0].value == r"\[see\]\(https\://ev.il\) \!\[\]\(https\://ev.il/p.png\) \:red\[x\].jpeg"


def test_a_data_root_that_is_not_a_folder_is_a_message(env, monkeypatch, tmp_path):
    monkeypatch.setenv("CXR_MODELS_DIR", str(env[0]))
    monkeypatch.setenv("CXR_DATA_ROOT", str(tmp_path / "no-such-root"))
    at = AppTest.from_file(PAGE, default_timeout=120).run()
    at.radio(key="batch_source").set_value("Folder on the server").run()
    assert not at.exception
    assert any("CXR_DATA_ROOT is set to" in e.value and "not a folder" in e.value for e in at.error), at.error


def test_a_folder_upload_without_images_says_so(at, uploads):
    at.radio(key="batch_source").set_value("Upload a folder").run()
    at.file_uploader(key="batch_folder_upload").set_value([uploads[3]]).run()
    assert not at.exception
    assert [w.value for w in at.warning][-1].startswith("No image files (JPEG, PNG, DICOM...) in this folder")
    assert not [b for b in at.button if b.key == "batch_score_upload"]


def test_a_colour_picture_in_a_server_folder_is_flagged_as_in_an_upload(at, env, uploads):
    from PIL import Image

    _, root, _ = env
    grey = Image.open(io.BytesIO(uploads[0][1])).convert("RGB")
    r, g, b = grey.split()
    tinted = io.BytesIO()
    Image.merge("RGB", (r, g.point(lambda v: v // 2), b.point(lambda v: v // 4))).save(tinted, format="JPEG")
    (root / "colour").mkdir(exist_ok=True)
    (root / "colour" / "tinted.jpeg").write_bytes(tinted.getvalue())
    at.radio(key="batch_source").set_value("Folder on the server").run()
    at.selectbox(key="batch_pick").set_value("colour").run()
    at.button(key="batch_score_folder").click().run()
    from_folder = table(at).iloc[0]
    at.radio(key="batch_source").set_value("Upload files").run()
    score_uploads(at, [("tinted.jpeg", tinted.getvalue(), "image/jpeg")])
    from_upload = table(at).iloc[0]
    assert from_upload["not_chest"] and "colour picture" in from_upload["quality_notes"]
    assert from_folder["not_chest"] and from_folder["quality_notes"] == from_upload["quality_notes"]


def test_server_folder_scores_all_good_files_and_lists_the_bad_one(at):
    at.radio(key="batch_source").set_value("Folder on the server").run()
    at.selectbox(key="batch_pick").set_value("eval").run()
    at.button(key="batch_score_folder").click().run()
    assert not at.exception
    # whose table it is stays said when another folder is chosen (the files' names are relative to it)
    at.text_input(key="batch_path").set_value("elsewhere").run()
    assert any(m.value.startswith("**Results of the folder 'eval'**, scored at") for m in at.markdown)
    rows = table(at).set_index("file")
    assert len(rows) == 7
    assert rows.loc["NORMAL/broken.jpeg", "error"] != ""
    assert (rows.drop(index="NORMAL/broken.jpeg")["error"] == "").all()
    assert rows.drop(index="NORMAL/broken.jpeg")["decision"].isin(["NORMAL", "PNEUMONIA"]).all()


def test_a_server_folder_that_cannot_be_read_is_said_not_taken_for_empty(at, env, tmp_path):
    """A sub-folder the app may not read: its files are not scored, and the page says which folder and why (it
    was skipped unsaid); a folder that cannot be read at all is not "no image files"."""
    from scoring_inputs import unreadable

    _, root, _ = env
    shutil.copytree(root / "eval", root / "locked-tree")
    blocked = root / "locked-tree" / "PNEUMONIA"
    at.radio(key="batch_source").set_value("Folder on the server").run()
    at.text_input(key="batch_path").set_value("locked-tree").run()
    try:
        with unreadable(blocked):
            at.button(key="batch_score_folder").click().run()
            assert not at.exception
            (said,) = [w.value for w in at.warning if "could not be read" in w.value]
            assert said.startswith("1 folder(s) could not be read (Permission denied): PNEUMONIA.")
            assert set(table(at)["file"]) == {f"NORMAL/{p.name}" for p in (root / "eval" / "NORMAL").iterdir()}
        with unreadable(root / "locked-tree"):
            at.button(key="batch_score_folder").click().run()
            assert any(w.value.startswith("1 folder(s) could not be read (Permission denied): .") for w in at.warning)
            assert not [w for w in at.warning if w.value.startswith("No image files")]
    finally:
        shutil.rmtree(root / "locked-tree")


@pytest.mark.parametrize("path", ["..", "eval/../../..", "/etc", "missing"])
def test_refused_server_paths_show_the_message(at, path):
    at.radio(key="batch_source").set_value("Folder on the server").run()
    at.text_input(key="batch_path").set_value(path).run()
    at.button(key="batch_score_folder").click().run()
    assert not at.exception
    message = at.error[0].value
    assert ("outside the data root" in message) if path != "missing" else ("does not exist" in message)
    assert "Only folders inside the configured data root" in message
    assert not [d for d in at.dataframe if "file" in d.value.columns]


def test_symlink_out_of_the_root_is_refused(at, env, tmp_path):
    _, root, _ = env
    (tmp_path / "x.jpeg").write_bytes(b"x")
    link = root / "escape"
    link.symlink_to(tmp_path, target_is_directory=True)
    try:
        at.radio(key="batch_source").set_value("Folder on the server").run()
        at.text_input(key="batch_path").set_value("escape").run()
        at.button(key="batch_score_folder").click().run()
        assert "outside the data root" in at.error[0].value
    finally:
        link.unlink()


def test_folder_upload_keeps_image_names_only(at, uploads):
    at.radio(key="batch_source").set_value("Upload a folder").run()
    assert at.file_uploader(key="batch_folder_upload").accept_directory
    at.file_uploader(key="batch_folder_upload").set_value([uploads[0], uploads[2], uploads[3]]).run()
    assert at.button(key="batch_score_upload").label == "Score 2 file(s)"
    at.button(key="batch_score_upload").click().run()
    assert table(at)["file"].tolist() == ["IM-0115-0001.jpeg", "CR-MONO1"]
    assert (table(at)["error"] == "").all()


def test_batch_table_has_the_familiarity_of_each_film(familiar_model_dir, tmp_path, monkeypatch, uploads):
    root = tmp_path / "models"
    shutil.copytree(familiar_model_dir, root / familiar_model_dir.name)
    monkeypatch.setenv("CXR_MODELS_DIR", str(root))
    monkeypatch.delenv("CXR_DATA_ROOT", raising=False)
    classifier = models.load(root / familiar_model_dir.name)
    at = score_uploads(AppTest.from_file(PAGE, default_timeout=120).run(), uploads)
    assert not at.exception
    rows = table(at).set_index("file")
    for name in ("IM-0115-0001.jpeg", "dental.dcm"):
        data = dict((u[0], u[1]) for u in uploads)[name]
        expected = classifier.predict_pixels([imaging.load(data, name).pixels])[0]
        assert rows.loc[name, "familiarity"] == pytest.approx(expected.familiarity, rel=1e-4)
        assert bool(rows.loc[name, "unfamiliar"]) == expected.unfamiliar
    assert np.isnan(rows.loc["notes.txt", "familiarity"]) and not rows.loc["notes.txt", "unfamiliar"]
    # The dental panoramic film is unlike the chest films the check was fitted on.
    assert rows.loc["dental.dcm", "unfamiliar"]
    assert "unlike the training films" in at.caption[0].value or any("unlike the training films" in c.value
                                                                       for c in at.caption)
    # Its row, opened: the warning gives its distance and the threshold it is past, as on the Classify page.
    at.session_state["batch_table"] = {"selection": {"rows": [table(at)["file"].tolist().index("dental.dcm")],
                                                     "columns": [], "cells": []}}
    at.run()
    threshold = classifier.card.familiarity["threshold"]
    (warned,) = [w.value for w in at.warning if w.value.startswith("Unlike the films")]
    assert (f"distance {rows.loc['dental.dcm', 'familiarity']:.4f}, above the threshold {threshold:.4f} fitted on "
            "validation films") in warned


def test_a_failing_gradcam_is_a_message_and_the_table_stays(at, uploads, monkeypatch):
    from cxr_core.explain import Explainer

    score_uploads(at, uploads)

    def broken(self, *args, **kwargs):
        raise RuntimeError("a native library failed")

    monkeypatch.setattr(Explainer, "gradcam", broken)
    at.session_state["batch_table"] = {"selection": {"rows": [2], "columns": [], "cells": []}}
    at.run()
    assert not at.exception and at.subheader[0].value == "CR-MONO1"
    assert "could not be computed (unexpected RuntimeError); the rest of the page stands" in at.error[0].value
    assert len(table(at)) == len(uploads)


def test_more_uploads_than_a_round_takes_are_cut_with_a_warning(at, uploads, monkeypatch):
    import ui

    monkeypatch.setattr(ui, "MAX_BATCH_FILES", 2)
    at.file_uploader(key="batch_upload").set_value(uploads).run()
    assert any(f"{len(uploads)} files chosen: only the first 2 are scored" in w.value for w in at.warning)
    at.button(key="batch_score_upload").click().run()
    assert not at.exception and table(at)["file"].tolist() == [uploads[0][0], uploads[1][0]]


def test_a_server_file_changed_since_scoring_is_not_shown_beside_its_old_result(env, monkeypatch, tmp_path, data_dir):
    """The detail view reads a server file again when its row is clicked: overwritten under the same name (a drop
    folder), another film was shown beside the old row's decision and probabilities."""
    models_root, _, _ = env
    labelled_folder(tmp_path / "drop", per_class=2)
    monkeypatch.setenv("CXR_MODELS_DIR", str(models_root))
    monkeypatch.setenv("CXR_DATA_ROOT", str(tmp_path))
    at = AppTest.from_file(PAGE, default_timeout=120).run()
    at.radio(key="batch_source").set_value("Folder on the server").run()
    at.selectbox(key="batch_pick").set_value("drop").run()
    at.button(key="batch_score_folder").click().run()
    rows = table(at)
    first = next(i for i, e in enumerate(rows["error"]) if e == "")
    at.session_state["batch_table"] = {"selection": {"rows": [first], "columns": [], "cells": []}}
    at.run()
    assert not at.exception and not at.error and plotly_spec.viewer(at) is not None
    other = data_dir / "kermany" / "train" / "PNEUMONIA" / sorted(
        p.name for p in (data_dir / "kermany" / "train" / "PNEUMONIA").iterdir())[-1]
    (tmp_path / "drop" / rows["file"].iloc[first]).write_bytes(other.read_bytes())
    at.run()
    assert not at.exception
    assert [e.value for e in at.error] == [
        "This file changed on the server (or went away) since it was scored: its image now is not the film this "
        "row's result belongs to. Score the folder again to see it with its own result."]
