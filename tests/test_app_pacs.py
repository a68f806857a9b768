"""The PACS worklist page (AppTest) against a real Orthanc: search, classify a study, batch, write back; PHI.

The films carry canary patient names and IDs (tests/pacs_server.py); the classify and batch runs happen while
TMPDIR points at an empty folder and every log record is captured (test_phi's ``isolated`` fixture), then
the logs, Orthanc's output, written files and the page are searched for the canaries.
"""

from __future__ import annotations

import re
from datetime import date
from pathlib import Path

import pydicom
import pytest
from pacs_server import CANARY, DX_J2K, NEEDLES, loaded_orthanc, local_canary_bytes
from streamlit.testing.v1 import AppTest
from test_phi import REPO, isolated, page_text, written_files  # noqa: F401 - isolated is a fixture

from cxr_core import dicom_results, dicomweb, models, pipeline
from cxr_core.explain import Explainer

PAGE = str(Path(__file__).resolve().parents[1] / "pages" / "pacs.py")


@pytest.fixture(scope="module")
def orthanc():
    with loaded_orthanc() as (server, client):
        yield server, client


def page(settings: dict | None) -> AppTest:
    at = AppTest.from_file(PAGE, default_timeout=60)
    if settings is not None:
        at.secrets["pacs"] = settings
    return at.run()


def study_picker(at: AppTest):
    """The 'Open a study' selectbox (its key changes with every search)."""
    (picker,) = [box for box in at.selectbox if box.label == "Open a study"]
    return picker


def shown(element) -> str:
    """An element's text as the reader sees it: the page escapes Markdown in everything a PACS or file supplied."""
    return re.sub(r"\\(.)", r"\1", element.value)


def secrets_of(server) -> dict:
    s = server.settings
    return {"url": s.url, "username": s.username, "password": s.password}


def test_page_is_off_without_pacs_settings(monkeypatch, tiny_model_dir):
    monkeypatch.delenv("CXR_PACS_URL", raising=False)
    at = page(None)
    assert [e.value for e in at.exception] == []
    assert "The PACS features are off" in at.info[0].value and "secrets.toml.example" in at.info[0].value


def test_search_classify_batch_and_write_back(orthanc, isolated, capfd, tiny_model_dir):  # noqa: F811
    server, client = orthanc
    at = page(secrets_of(server))
    assert [e.value for e in at.exception] == []
    at.checkbox(key="pacs_dated").check().run()
    at.date_input(key="pacs_from").set_value(date(2004, 8, 31))
    at.date_input(key="pacs_to").set_value(date(2004, 8, 31))
    at.selectbox(key="pacs_modality").set_value("DX").run()
    at.button(key="pacs_search").click().run()
    table = at.dataframe[0].value
    assert list(table.columns) == ["Accession", "Date", "Description", "Modality", "Films"]
    assert table.to_dict("records") == [{"Accession": "", "Date": "2004-08-31", "Description": "", "Modality": "DX",
                                         "Films": 1}]
    study_picker(at).set_value(0).run()
    assert [e.value for e in at.exception] == [] and [e.value for e in at.error] == []
    shown = dict(zip(at.table[0].value["Class"], at.table[0].value["Probability"], strict=True))
    classifier = models.load(tiny_model_dir)  # the page serves a copy of it
    direct = pipeline.classify(classifier, Explainer(classifier), local_canary_bytes(DX_J2K), DX_J2K.name)
    assert shown == {n: f"{p:.4f}" for n, p in direct.prediction.as_dict().items()}
    assert any(f"Decision: :{c}[{direct.prediction.decision}]" in m.value for m in at.markdown for c in ("red", "blue"))
    assert f"Grad-CAM for {direct.prediction.decision}" in page_text(at)

    at.button(key="pacs_batch_run").click().run()
    batch = at.dataframe[1].value
    assert len(batch) == 1 and batch["top_probability"].iloc[0] == pytest.approx(direct.prediction.top_probability)

    # This DX film is stored upside down: flagged 'probably not a frontal chest radiograph' (said, with 'not written
    # back'), so the write leaves it out unless that is confirmed; confirmed, its results carry the caution.
    assert any("not written back" in w.value for w in at.warning)
    at.button(key="pacs_write").click().run()
    assert "Nothing to write back" in at.error[0].value and not at.success
    at.checkbox(key="pacs_not_chest").check()
    at.button(key="pacs_write").click().run()
    assert "Stored 2 object(s) in the study" in at.success[0].value
    assert at.checkbox(key="pacs_not_chest").value is False  # counted for that write only
    study_uid = str(pydicom.dcmread(DX_J2K, stop_before_pixels=True).StudyInstanceUID)
    ours = [i for i in client.instances(study_uid) if i.series_description.startswith("UNVERIFIED AI")]
    (sr,) = [client.retrieve_dataset(i) for i in ours if i.series_description.endswith(" SR")]
    values = dicom_results.read_report(sr)
    assert {n: f"{p:.4f}" for n, p in values.probabilities.items()} == shown
    assert values.decision == direct.prediction.decision and str(sr.PatientName) == CANARY["PatientName"]
    assert values.cautions[0].startswith("Probably not a frontal chest radiograph: it looks upside down")
    at.checkbox(key="pacs_not_chest").check()
    at.button(key="pacs_write").click().run()
    assert "already in the PACS for every film to write" in at.error[0].value
    first_key = study_picker(at).key
    at.button(key="pacs_search").click().run()  # a new search opens no study by itself
    assert study_picker(at).value is None and len(at.table) == 0 and not at.exception
    assert study_picker(at).key != first_key  # a new widget: a browser cannot hand back the old list's choice

    # PHI: the canaries are in Orthanc (the positive control) but nowhere this app wrote or said.
    assert CANARY["PatientID"] == sr.PatientID
    out, err = capfd.readouterr()
    places = {"log": isolated["log"].getvalue(), "stdout": out, "stderr": err, "orthanc": server.output(),
              "page": page_text(at)}
    for path in written_files([isolated["tmp"], REPO, Path.home() / ".streamlit"], isolated["start"]):
        places[str(path)] = path.read_bytes().decode("latin-1")
    leaks = [f"{needle} in {where}" for where, text in places.items() for needle in NEEDLES if needle in text]
    assert leaks == []


def test_bad_settings_and_a_server_that_is_down(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("CXR_MODELS_DIR", str(tiny_model_dir.parent))
    at = page({"url": "ftp://127.0.0.1/dicom-web"})
    assert "must be an http:// or https:// address" in at.error[0].value
    at = page({"url": "http://127.0.0.1:9/dicom-web", "timeout": 3})
    at.button(key="pacs_search").click().run()
    assert [e.value for e in at.exception] == []
    assert "cannot be reached (server down or unreachable)" in shown(at.error[0])


def signed_in_study(server, roles: list[str], audit_dir: Path) -> AppTest:
    """The page with sign-in on (a user holding ``roles``), an audit folder and key, the first DX study opened."""
    at = AppTest.from_file(PAGE, default_timeout=60)
    at.secrets["pacs"] = secrets_of(server)
    at.secrets["auth"] = {"redirect_uri": "http://127.0.0.1:9/oauth2callback", "cookie_secret": "x" * 32,
                          "client_id": "cxr-app", "client_secret": "s",
                          "server_metadata_url": "http://127.0.0.1:9/.well-known/openid-configuration"}
    at.secrets["audit"] = {"hmac_key": "k" * 32, "dir": str(audit_dir)}
    at.user = {"is_logged_in": True, "email": "someone@example.test", "email_verified": True, "name": "Someone",
               "roles": roles}
    at.run()
    assert [e.value for e in at.exception] == []
    at.selectbox(key="pacs_modality").set_value("DX").run()
    at.button(key="pacs_search").click().run()
    study_picker(at).set_value(0).run()
    assert [e.value for e in at.exception] == [] and [e.value for e in at.error] == []
    return at


@pytest.mark.parametrize(("roles", "writes"), [(["clinician"], False), (["pacs-writer"], True)])
def test_write_back_is_offered_only_to_pacs_writers(orthanc, tiny_model_dir, tmp_path, monkeypatch, roles, writes):
    """With sign-in on, a clinician searches and classifies but is not offered write-back; a pacs-writer is.
    The search, the classification and (for the writer) the write-back each leave an audit line without UIDs."""
    import audit

    server, _ = orthanc
    monkeypatch.setenv("CXR_MODELS_DIR", str(tiny_model_dir.parent))
    at = signed_in_study(server, roles, tmp_path / "audit")
    assert at.table[0].value is not None  # classified
    offered = [b for b in at.button if b.key == "pacs_write"]
    assert bool(offered) == writes
    if writes:
        # An earlier test of this module may have written this study's results already: write again.
        at.checkbox(key="pacs_again").check()
        at.checkbox(key="pacs_not_chest").check()  # the study's one film is flagged (stored upside down)
        at.button(key="pacs_write").click().run()
        assert [e.value for e in at.exception] == [] and [e.value for e in at.error] == []
        assert "Stored 2 object(s) in the study" in at.success[0].value
        assert at.checkbox(key="pacs_again").value is False  # "write again" counted for that write only
    lines = audit.read(tmp_path / "audit")
    assert [line["action"] for line in lines] == ["pacs_search", "pacs_classify"] + (["pacs_write"] if writes else [])
    assert {line["user"] for line in lines} == {"someone@example.test"}
    key = b"k" * 32
    uids = [s.study_uid for s in at.session_state["pacs_studies"]]
    chosen = uids[0]
    assert lines[0]["study_refs"] == [audit.keyed_hash(key, u) for u in uids]
    assert lines[1]["study_refs"] == [audit.keyed_hash(key, chosen)]
    if writes:
        written = lines[2]
        assert written["study_refs"] == [audit.keyed_hash(key, chosen)]
        assert written["counts"] == {"objects": 2, "studies": 1}  # an SR and a heatmap for the study's one film
        assert (written["source"], written["role"]) == ("pacs", "pacs-writer")
    text = "".join(p.read_text() for p in (tmp_path / "audit").iterdir())
    assert uids and not [u for u in uids if u in text]  # study UIDs appear only as keyed hashes


def test_a_cut_search_says_so_and_write_again_is_unticked_for_another_study(orthanc, tiny_model_dir, monkeypatch):
    """More studies than the search's limit: the page says the list was cut, that the listed ones need not be the
    newest, and to narrow the search or list more (the limit the user chose reaches the PACS query). "Write again",
    ticked for one study, is unticked when another study is opened."""
    server, _ = orthanc
    monkeypatch.setenv("CXR_MODELS_DIR", str(tiny_model_dir.parent))
    search = dicomweb.Client.search_studies
    limit = {"value": 1}
    asked: list[int] = []
    monkeypatch.setattr(dicomweb.Client, "search_studies", lambda self, **kwargs: asked.append(kwargs["limit"]) or
                        search(self, **{**kwargs, "limit": limit["value"]}))
    at = page(secrets_of(server))
    at.selectbox(key="pacs_modality").set_value("DX").run()
    at.selectbox(key="pacs_limit").set_value(250).run()
    at.button(key="pacs_search").click().run()
    assert [e.value for e in at.exception] == [] and len(at.dataframe[0].value) == 1 and asked == [250]
    (cut,) = [w.value for w in at.warning if "listed" in w.value]
    assert "more studies matching this search than the 1 listed" in cut and "Narrow the search" in cut
    assert "need not be the newest" in cut and "list more (up to 500)" in cut
    limit["value"] = 100
    at.button(key="pacs_search").click().run()
    assert len(at.dataframe[0].value) == 2 and not [w for w in at.warning if "listed" in w.value]  # nothing cut
    study_picker(at).set_value(0).run()
    at.checkbox(key="pacs_again").check().run()
    assert at.checkbox(key="pacs_again").value is True
    study_picker(at).set_value(1).run()
    assert [e.value for e in at.exception] == [] and at.table  # the other study, classified
    assert at.checkbox(key="pacs_again").value is False


def test_a_write_back_the_pacs_refuses_is_still_audited(tiny_model_dir, tmp_path, monkeypatch):
    """The objects went out and the PACS kept none of them (its filter drops results): the page says so, and the audit
    trail has the attempt with what was sent and kept; the one action that changes the hospital's records is never
    missing from it."""
    from pacs_server import REFUSE_RESULTS

    import audit
    from cxr_core.orthanc import LocalOrthanc

    monkeypatch.setenv("CXR_MODELS_DIR", str(tiny_model_dir.parent))
    with LocalOrthanc(lua=REFUSE_RESULTS) as refusing:
        dicomweb.Client(refusing.settings).store([pydicom.dcmread(DX_J2K)])
        at = signed_in_study(refusing, ["pacs-writer"], tmp_path / "audit")
        at.checkbox(key="pacs_not_chest").check()
        at.button(key="pacs_write").click().run()
    assert [e.value for e in at.exception] == [] and not at.success
    assert "did not keep 2 of 2 object(s) it was sent" in shown(at.error[0])
    lines = audit.read(tmp_path / "audit")
    assert [line["action"] for line in lines] == ["pacs_search", "pacs_classify", "pacs_write"]
    assert lines[2]["counts"] == {"sent": 2, "objects": 0, "studies": 1}


def test_the_study_view_sends_films_at_most_display_size(orthanc, tiny_model_dir, monkeypatch):
    """The film and its overlay go to the browser through overlay.fit, as on the Classify page (a 4300 x 4300 film
    would be ~55 MB of RGB per film); here the display limit is set to 32 px so that the test's films exceed it."""
    import io

    from PIL import Image
    from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage

    from cxr_core import overlay

    server, _ = orthanc
    monkeypatch.setenv("CXR_MODELS_DIR", str(tiny_model_dir.parent))
    monkeypatch.setattr(overlay.fit, "__defaults__", (32,))
    sent: list[bytes] = []
    original = MemoryMediaFileStorage.load_and_get_id

    def record(self, path_or_data, mimetype, kind, filename=None):
        if isinstance(path_or_data, bytes) and mimetype.startswith("image/"):
            sent.append(path_or_data)
        return original(self, path_or_data, mimetype, kind, filename)

    monkeypatch.setattr(MemoryMediaFileStorage, "load_and_get_id", record)
    at = page(secrets_of(server))
    at.selectbox(key="pacs_modality").set_value("DX").run()
    at.button(key="pacs_search").click().run()
    study_picker(at).set_value(0).run()
    assert not at.exception and len(sent) >= 2
    assert max(max(Image.open(io.BytesIO(b)).size) for b in sent) == 32


def test_text_from_the_pacs_is_shown_as_plain_text_not_markdown(orthanc, tiny_model_dir, monkeypatch):
    """A series description imported from a CD can hold Markdown: bold 'findings', a link, an image that the
    browser would fetch from elsewhere. The film's heading shows it as typed, with nothing rendered."""
    from pacs_server import new_study

    server, client = orthanc
    monkeypatch.setenv("CXR_MODELS_DIR", str(tiny_model_dir.parent))
    hostile = "**AI: NO PNEUMONIA** ![x](http://127.0.0.1:9/t.png) [ok](javascript:alert(1))"
    ds = new_study(DX_J2K, "HOSTILE-1")
    ds.SeriesDescription, ds.StudyDate = hostile, "19990101"
    client.store([ds])
    at = page(secrets_of(server))
    at.checkbox(key="pacs_dated").check().run()
    at.date_input(key="pacs_from").set_value(date(1999, 1, 1))
    at.date_input(key="pacs_to").set_value(date(1999, 1, 1))
    at.button(key="pacs_search").click().run()
    study_picker(at).set_value(0).run()
    assert [e.value for e in at.exception] == []
    (heading,) = [h for h in at.subheader if "NO PNEUMONIA" in h.value]
    assert hostile in shown(heading) and "\\*\\*AI" in heading.value and "\\!\\[x\\]" in heading.value
