"""The audit trail (audit.py): one JSON line per action, with the right user and action and no patient data.

The page tests plant PHI canaries where patient data would come from (DICOM patient tags, file and
folder names, study UIDs) and search the whole audit folder for them.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
from pathlib import Path

import pydicom
import pytest
from conftest import DATA, DICOM
from streamlit.testing.v1 import AppTest
from test_app_classify import CHEST_DICOMS, SECRETS
from test_auth import ACCESS, AUTH, CLINICIAN, REPO, VIEWER

import audit
import auth
from cxr_core import card

STUDY_UID = "1.2.826.0.1.3680043.8.498.99999.424242"
CANARIES = [*SECRETS.values(), "Doe", "PID-424242", "Jane", STUDY_UID, "CANARY-SMITH"]
KEY = b"an operator's secret, 32 characters or more"


def audit_text(folder: Path) -> str:
    return "".join(p.read_text() for p in sorted(folder.glob("audit-*.jsonl")))


def assert_no_canaries(folder: Path) -> None:
    text = audit_text(folder)
    assert text, "no audit lines were written"
    for canary in CANARIES:
        assert canary not in text


def test_record_writes_one_json_line_with_hashed_study_uids(tmp_path):
    log = audit.AuditLog(tmp_path, KEY)
    line = log.record("c@example.test", "pacs-writer", "pacs_write", model="m", weights_sha256="ab" * 32,
                      source="pacs", study_uids=[STUDY_UID], counts={"reports": 1})
    written = audit.read(tmp_path)
    assert written == [line]
    assert line["study_refs"] == [audit.keyed_hash(KEY, STUDY_UID)] != [audit.keyed_hash(b"other", STUDY_UID)]
    assert len(line["study_refs"][0]) == 64 and line["counts"] == {"reports": 1, "studies": 1}
    assert (line["user"], line["role"], line["action"], line["source"]) == ("c@example.test", "pacs-writer",
                                                                            "pacs_write", "pacs")
    log.record("c@example.test", "clinician", "pacs_search", counts={"studies": 3})
    assert [x["action"] for x in audit.read(tmp_path)] == ["pacs_write", "pacs_search"]
    assert len(list(tmp_path.glob("audit-*.jsonl"))) == 1
    assert STUDY_UID not in audit_text(tmp_path)


def test_without_a_key_uids_and_folders_are_only_counted(tmp_path):
    line = audit.AuditLog(tmp_path).record("u", "clinician", "pacs_search", study_uids=[STUDY_UID, "1.2.3"],
                                           folder="/data/CANARY-SMITH")
    assert line["counts"] == {"studies": 2} and "study_refs" not in line and "folder_ref" not in line
    assert_no_canaries(tmp_path)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"action": "read_patient"}, "unknown audit action 'read_patient'"),
    ({"action": "batch", "source": "/data/CANARY-SMITH"}, "unknown audit source"),
    ({"action": "batch", "counts": {"files": "CANARY-SMITH"}}, "must be an integer"),
])
def test_record_refuses_anything_outside_its_schema(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        audit.AuditLog(tmp_path, KEY).record("u", "admin", **kwargs)
    assert not list(tmp_path.glob("*"))


@pytest.fixture()
def env(tmp_path, tiny_model_dir, monkeypatch) -> Path:
    root = tmp_path / "models"
    shutil.copytree(tiny_model_dir, root / tiny_model_dir.name)
    data = tmp_path / "data" / "CANARY-SMITH PID-424242"
    data.mkdir(parents=True)
    for path in sorted((DATA / "kermany/train/NORMAL").glob("*.jpeg"))[:2]:
        shutil.copyfile(path, data / f"Doe_Jane_{path.name}")
    (data / "CANARY-SMITH-broken.png").write_bytes(b"not an image")
    monkeypatch.setenv("CXR_MODELS_DIR", str(root))
    monkeypatch.setenv("CXR_DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.setenv("CXR_AUDIT_DIR", str(tmp_path / "audit"))
    monkeypatch.setenv("CXR_AUDIT_KEY", KEY.decode())
    return tmp_path


def page(script: str, claims: dict) -> AppTest:
    at = AppTest.from_file(str(REPO / script), default_timeout=120)
    at.secrets["auth"], at.secrets["access"] = AUTH, ACCESS
    at.user = {"is_logged_in": True, **claims}
    return at.run()


def test_each_page_action_leaves_one_line_with_the_user_and_no_phi(env):
    weights = card.read(next((env / "models").iterdir())).weights_sha256
    ds = pydicom.dcmread(DICOM / CHEST_DICOMS[-2])
    for tag, value in SECRETS.items():
        setattr(ds, tag, value)
    ds.StudyInstanceUID = STUDY_UID
    buffer = io.BytesIO()
    ds.save_as(buffer)
    at = page("pages/classify.py", VIEWER)
    upload = ("Doe_Jane_PID-424242.dcm", buffer.getvalue(), "application/dicom")
    at.file_uploader(key="classify_upload").set_value(upload).run()
    at.selectbox(key="cam_colormap").set_value(at.selectbox(key="cam_colormap").options[-1]).run()  # a rerun
    assert [e.value for e in at.exception] == []

    at = page("pages/batch.py", CLINICIAN)
    at.radio(key="batch_source").set_value("Folder on the server").run()
    at.selectbox(key="batch_pick").set_value("CANARY-SMITH PID-424242").run()
    at.button(key="batch_score_folder").click().run()
    assert [e.value for e in at.exception] == []

    at = page("pages/batch.py", VIEWER)  # refused: one line saying so
    assert [t.value for t in at.title] == []

    lines = audit.read(env / "audit")
    assert [(x["user"], x["role"], x["action"]) for x in lines] == [
        ("v@example.test", "viewer", "classify"),  # once, although the page ran again
        ("c@example.test", "clinician", "batch"),
        ("v@example.test", "viewer", "refused")]
    classify, batch, refused = lines
    assert classify["weights_sha256"] == batch["weights_sha256"] == weights
    assert classify["source"] == "upload" and classify["counts"]["images"] == 1
    assert batch["source"] == "server_folder" and batch["counts"]["files"] == 3
    assert batch["counts"]["unreadable"] == 1
    # The scored server folder as its keyed hash, as folder evaluation writes it: an auditor with the key can
    # match the lines about one folder; its name (a patient's here) is not in the trail.
    assert batch["folder_ref"] == audit.keyed_hash(KEY, str((env / "data" / "CANARY-SMITH PID-424242").resolve()))
    assert "folder_ref" not in classify
    assert refused["refused"] == "batch"
    assert_no_canaries(env / "audit")


def test_pacs_actions_write_keyed_hashes_not_uids(env, monkeypatch):
    """What the PACS page calls (auth.record with study UIDs), in a signed-in session."""
    script = ("import auth\n"
              f"auth.record('pacs_search', source='pacs', study_uids=[{STUDY_UID!r}, '1.2.3.4'])\n"
              f"auth.record('pacs_write', source='pacs', study_uids=[{STUDY_UID!r}], counts={{'reports': 1}})\n")
    at = AppTest.from_string(script, default_timeout=60)
    at.secrets["auth"], at.secrets["access"] = AUTH, ACCESS
    at.user = {"is_logged_in": True, **CLINICIAN, "roles": ["pacs-writer"]}
    at.run()
    assert [e.value for e in at.exception] == []
    lines = audit.read(env / "audit")
    assert [(x["user"], x["role"], x["action"]) for x in lines] == [
        ("c@example.test", "pacs-writer", "pacs_search"), ("c@example.test", "pacs-writer", "pacs_write")]
    assert lines[0]["study_refs"][0] == lines[1]["study_refs"][0] == audit.keyed_hash(KEY, STUDY_UID)
    assert lines[0]["counts"] == {"studies": 2}
    assert_no_canaries(env / "audit")
    assert all(json.loads(t) for t in audit_text(env / "audit").splitlines())
    assert auth.ACTIONS["pacs_write"] == "pacs-writer"


def test_an_unwritable_audit_folder_is_shown_not_a_crash(tmp_path, monkeypatch):
    blocker = tmp_path / "audit"
    blocker.write_text("a file where the audit folder should be")
    monkeypatch.setenv("CXR_AUDIT_DIR", str(blocker))
    at = AppTest.from_string("import auth\nauth.record('sign_in')\nimport streamlit as st\nst.write('after')",
                             default_timeout=60)
    at.secrets["auth"], at.secrets["access"] = AUTH, ACCESS
    at.user = {"is_logged_in": True, **VIEWER}
    at.run()
    assert [e.value for e in at.exception] == []
    assert f"The audit trail could not be written to {blocker}" in at.error[0].value
    assert at.markdown[0].value == "after"


def test_a_line_that_could_not_be_written_is_tried_again_on_the_next_run(tmp_path, monkeypatch):
    """record_once: while the folder is unwritable every run says so (not only the first), and once it can be
    written the action's line is written, once."""
    blocker = tmp_path / "audit"
    blocker.write_text("a file where the audit folder should be")
    monkeypatch.setenv("CXR_AUDIT_DIR", str(blocker))
    at = AppTest.from_string("import auth\nauth.record_once('marker', 'classify', source='upload', "
                             "counts={'images': 1})", default_timeout=60)
    at.secrets["auth"], at.secrets["access"] = AUTH, ACCESS
    at.user = {"is_logged_in": True, **VIEWER}
    for _ in range(2):
        at.run()
        assert [e.value for e in at.exception] == []
        assert f"The audit trail could not be written to {blocker}" in at.error[0].value
    blocker.unlink()
    at.run()
    at.run()
    assert not at.error and [x["action"] for x in audit.read(blocker)] == ["classify"]


def test_a_new_audit_folder_is_private_and_a_short_write_still_writes_the_whole_line(tmp_path, monkeypatch):
    folder = tmp_path / "new" / "audit"
    log = audit.AuditLog(folder, KEY)
    real_write = os.write
    calls = []

    def short_first(fd, data):
        calls.append(len(data))
        return real_write(fd, bytes(data[:10]) if len(calls) == 1 else data)

    monkeypatch.setattr(os, "write", short_first)
    line = log.record("c@example.test", "clinician", "classify", source="upload", counts={"images": 1})
    monkeypatch.undo()
    log.record("c@example.test", "clinician", "batch", source="upload", counts={"files": 2})
    assert len(calls) == 2 and audit.read(folder)[0] == line
    assert [x["action"] for x in audit.read(folder)] == ["classify", "batch"]
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_a_downloaded_report_or_results_table_is_audited_when_the_file_is_fetched(env, monkeypatch):
    """The export line was written by the button's click (a widget callback), but the browser fetches the file
    from its own URL, which a client may request without the click: a report left the app unaudited. The line
    is written when the file is made now, once per fetch, and a trail that cannot be written lets nothing out."""
    from streamlit.runtime.media_file_manager import MediaFileManager

    made: dict[str, object] = {}
    add_deferred = MediaFileManager.add_deferred

    def keep(self, data, mimetype, coordinates, file_name=None, **kwargs):
        made[file_name] = data  # what the server runs when the browser fetches the file
        return add_deferred(self, data, mimetype, coordinates, file_name=file_name, **kwargs)

    monkeypatch.setattr(MediaFileManager, "add_deferred", keep)
    at = page("pages/classify.py", VIEWER)
    film = sorted((DATA / "kermany/train/NORMAL").glob("*.jpeg"))[0]
    at.file_uploader(key="classify_upload").set_value((film.name, film.read_bytes(), "image/jpeg")).run()
    at = page("pages/batch.py", CLINICIAN)
    at.radio(key="batch_source").set_value("Folder on the server").run()
    at.selectbox(key="batch_pick").set_value("CANARY-SMITH PID-424242").run()
    at.button(key="batch_score_folder").click().run()
    assert [e.value for e in at.exception] == []
    assert "export" not in [x["action"] for x in audit.read(env / "audit")]  # shown, not yet taken
    assert made["cxr-report.pdf"]().startswith(b"%PDF-")  # fetched without a click
    assert made["batch_review.csv"]().startswith("file,")
    lines = [(x["action"], x.get("source"), x.get("counts"), x["user"]) for x in audit.read(env / "audit")]
    assert ("export", "upload", {"reports": 1}, VIEWER["email"]) in lines
    assert ("export", "server_folder", {"rows": 3}, CLINICIAN["email"]) in lines
    assert [line[0] for line in lines].count("export") == 2
    assert_no_canaries(env / "audit")
    (env / "audit").rename(env / "audit-moved")
    (env / "audit").write_text("a file where the audit folder should be")
    assert made["cxr-report.png"]() == b""  # its line cannot be written: no report leaves the app


def test_a_write_that_fails_part_way_leaves_no_half_line(tmp_path, monkeypatch):
    log = audit.AuditLog(tmp_path, KEY)
    first = log.record("c@example.test", "clinician", "classify", source="upload", counts={"images": 1})
    real_write = os.write
    state = {"calls": 0}

    def full_disk(fd, data):
        state["calls"] += 1
        if state["calls"] == 1:
            return real_write(fd, bytes(data[:10]))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(OSError, match="No space left"):
        log.record("c@example.test", "clinician", "batch", source="upload", counts={"files": 2})
    monkeypatch.undo()
    log.record("c@example.test", "clinician", "sign_out")
    assert [x["action"] for x in audit.read(tmp_path)] == ["classify", "sign_out"] and audit.read(tmp_path)[0] == first
