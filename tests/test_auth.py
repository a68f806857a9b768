"""Roles and local mode (auth.py): the role table, claims to roles, and each page's own server-side check.

The pages run through AppTest with ``at.secrets`` holding an [auth] section and ``at.user`` the
claims Streamlit would have read from the provider's ID token; the sign-in itself against a real
provider is in test_auth_browser.py.
"""

from __future__ import annotations

import re
import shutil
import time
import tomllib
from pathlib import Path

import pytest
from conftest import DATA
from streamlit import config
from streamlit.testing.v1 import AppTest

import auth
import ui
from cxr_core import card

REPO = Path(__file__).resolve().parents[1]
PAGES = {"classify": "pages/classify.py", "batch": "pages/batch.py", "metrics": "pages/metrics.py",
         "instructor": "pages/instructor.py", "pacs": "pages/pacs.py"}
TITLES = {"classify": "Classify a chest radiograph", "batch": "Batch review", "metrics": "Model metrics",
          "instructor": "Instructor: how the model sees", "pacs": "PACS worklist"}
AUTH = {"redirect_uri": "http://127.0.0.1:9/oauth2callback", "cookie_secret": "x" * 32, "client_id": "cxr-app",
        "client_secret": "s", "server_metadata_url": "http://127.0.0.1:9/.well-known/openid-configuration"}
ACCESS = {"viewer": ["group:cxr-teaching"], "clinician": ["group:radiology"], "admin": ["Boss@Example.test"]}
VIEWER = {"email": "v@example.test", "email_verified": True, "name": "Vera", "groups": ["cxr-teaching"]}
CLINICIAN = {"email": "c@example.test", "email_verified": True, "name": "Colin", "roles": ["clinician"]}
ADMIN = {"email": "boss@example.test", "email_verified": True, "name": "Boss"}


@pytest.fixture()
def models_root(tmp_path, tiny_model_dir, tiny_model3_dir, monkeypatch) -> Path:
    root = tmp_path / "models"
    for folder in (tiny_model_dir, tiny_model3_dir):
        shutil.copytree(folder, root / folder.name)
    data = tmp_path / "data"
    (data / "NORMAL").mkdir(parents=True)
    monkeypatch.setenv("CXR_MODELS_DIR", str(root))
    monkeypatch.setenv("CXR_DATA_ROOT", str(data))
    monkeypatch.delenv("CXR_AUDIT_DIR", raising=False)
    monkeypatch.delenv("CXR_DEFAULT_MODEL", raising=False)
    return root


@pytest.fixture()
def address():
    """Set server.address for the test (AppTest reads options in this process), restore it after."""
    before = config.get_option("server.address")
    yield lambda value: config.set_option("server.address", value)
    config.set_option("server.address", before)


def signed_in(script: str, claims: dict | None) -> AppTest:
    """An AppTest of ``script`` with sign-in configured and ``claims`` signed in (None: nobody)."""
    at = AppTest.from_file(str(REPO / script), default_timeout=120)
    at.secrets["auth"] = AUTH
    at.secrets["access"] = ACCESS
    at.user = {"is_logged_in": False} if claims is None else {"is_logged_in": True, **claims}
    return at.run()


def texts(at: AppTest, kind: str) -> list[str]:
    return [e.value for e in getattr(at, kind)]


# --- the role table and the claims ---

@pytest.mark.parametrize(("claims", "role"), [
    ({"email": "a@x.org", "groups": ["cxr-teaching"]}, "viewer"),
    ({"email": "a@x.org", "groups": "radiology"}, "clinician"),  # a claim may be one string
    ({"email": "a@x.org", "groups": ["cxr-teaching", "radiology"]}, "clinician"),  # the highest wins
    ({"email": "a@x.org", "roles": ["pacs-writer"], "groups": ["cxr-teaching"]}, "pacs-writer"),
    ({"email": "BOSS@example.test", "email_verified": True}, "admin"),  # e-mail matched without case
    ({"email": "boss@example.test"}, None),  # a provider that does not say it verified the address: not trusted
    ({"email": "boss@example.test", "email_verified": "true"}, "admin"),
    ({"email": "boss@example.test", "email_verified": False}, None),  # an unverified address earns nothing
    ({"email": "boss@example.test", "email_verified": "false"}, None),  # also when the claim is a string
    ({"email": "boss@example.test", "email_verified": True}, "admin"),
    ({"email": "a@x.org", "roles": ["superuser"], "groups": ["radiology-other"]}, None),
    ({"sub": "123"}, None),
])
def test_role_for_claims_and_allow_lists(claims, role):
    assert auth.role_for(claims, ACCESS) == role


def test_unverified_addresses_count_only_where_the_operator_trusts_them():
    """Entra ID sends no email_verified: its e-mails earn roles only with trust_unverified_email = true."""
    trusting = {**ACCESS, "trust_unverified_email": True}
    assert auth.role_for({"email": "boss@example.test"}, trusting) == "admin"
    assert auth.role_for({"email": "boss@example.test", "email_verified": False}, trusting) is None


def test_an_unverified_address_is_not_the_users_name_in_the_audit(models_root, tmp_path, monkeypatch):
    """Someone whose role comes from a group, at a provider that lets users type any address: the audit and
    the sidebar name them by the provider's subject id, not by the (someone else's) address they typed."""
    import audit

    monkeypatch.setenv("CXR_AUDIT_DIR", str(tmp_path / "audit"))
    claims = {"email": "boss@example.test", "email_verified": False, "sub": "attacker-sub", "groups": ["radiology"]}
    at = signed_in("app.py", claims)
    assert texts(at, "exception") == []
    assert any("(sub:attacker-sub) · role: **clinician**" in m.value for m in at.sidebar.markdown)
    assert [(line["user"], line["role"]) for line in audit.read(tmp_path / "audit")] == [("sub:attacker-sub",
                                                                                         "clinician")]


def test_a_sign_in_older_than_the_session_limit_signs_in_again(models_root):
    """The cookie keeps the token's roles for 30 days: past max_session_hours (default 12) of its iat the user
    signs in again, so a role taken away at the provider ends with the day."""
    import time

    old = signed_in(PAGES["batch"], {**CLINICIAN, "iat": int(time.time()) - 13 * 3600})
    assert texts(old, "exception") == [] and texts(old, "title") == ["Sign in"]
    assert any("older than 12 hours" in i.value for i in old.info)
    assert len(old.radio) == 0  # nothing of the page
    fresh = signed_in(PAGES["batch"], {**CLINICIAN, "iat": int(time.time()) - 3600})
    assert texts(fresh, "title") == ["Batch review"]
    assert auth.session_expired({"iat": 1000.0}, {"max_session_hours": 1}, now=1000.0 + 3601)
    assert not auth.session_expired({"iat": 1000.0}, {"max_session_hours": 1}, now=1000.0 + 3599)


def test_a_page_off_the_navigation_refuses_a_direct_visit_and_audits_it(models_root, tmp_path, monkeypatch):
    """A viewer sent to the batch page (its address typed or bookmarked): the page's own check refuses it and
    the attempt is in the audit (unregistered, it was only Streamlit's "Page not found", with no trace)."""
    import audit

    monkeypatch.setenv("CXR_AUDIT_DIR", str(tmp_path / "audit"))
    at = signed_in("app.py", VIEWER)
    at.switch_page("pages/batch.py").run()
    assert texts(at, "exception") == [] and "Batch review" not in texts(at, "title")
    assert any("Your role (viewer) does not allow" in e.value for e in at.error)
    assert len(at.radio) == len(at.file_uploader) == 0
    refused = [line for line in audit.read(tmp_path / "audit") if line["action"] == "refused"]
    assert [(r["user"], r["refused"]) for r in refused] == [("v@example.test", "batch")]


def test_role_claim_names_and_wildcard_are_configurable():
    access = {"roles_claim": "app_roles", "groups_claim": "memberOf", "viewer": ["*"], "pacs-writer": ["group:pw"]}
    assert auth.role_for({"email": "x@y.z"}, access) == "viewer"
    assert auth.role_for({"memberOf": ["pw"]}, access) == "pacs-writer"
    assert auth.role_for({"app_roles": ["admin"], "roles": []}, access) == "admin"
    assert auth.role_for({"roles": ["admin"]}, access) == "viewer"  # not the configured claim


@pytest.mark.parametrize("role", auth.ROLES)
def test_each_role_allows_exactly_its_actions(role):
    user = auth.User(id="u@x", name="u", role=role)
    allowed = {a for a in auth.ACTIONS if auth.refusal_for(a, user, auth_on=True, address="0.0.0.0") is None}
    expected = {"viewer": {"classify", "instructor", "metrics", "held_out_films"},
                "clinician": {"classify", "instructor", "metrics", "held_out_films", "batch", "server_folders",
                              "pacs_search", "pacs_classify"}}
    expected["pacs-writer"] = expected["clinician"] | {"pacs_write"}
    expected["admin"] = set(auth.ACTIONS)
    assert allowed == expected[role]


def test_no_role_and_nobody_are_refused_everything():
    nobody = [auth.refusal_for(a, None, auth_on=True, address="127.0.0.1") for a in auth.ACTIONS]
    assert nobody == ["Sign in to use this app."] * len(auth.ACTIONS)
    no_role = auth.User(id="n@x", name="n", role=None)
    assert all("no role" in auth.refusal_for(a, no_role, auth_on=True, address="127.0.0.1") for a in auth.ACTIONS)
    with pytest.raises(ValueError, match="unknown action 'delete_everything'"):
        auth.refusal_for("delete_everything", no_role, auth_on=True, address="127.0.0.1")


@pytest.mark.parametrize(("address", "beyond"), [
    ("127.0.0.1", False), ("127.0.0.2", False), ("localhost", False), ("::1", False), ("[::1]", False),
    ("0.0.0.0", True), ("", True), (None, True), ("10.1.2.3", True), ("::", True), ("cxr.hospital.example", True),
])
def test_beyond_loopback(address, beyond):
    assert auth.beyond_loopback(address) is beyond


def test_local_mode_refuses_only_server_features_off_loopback():
    local = auth.LOCAL_USER
    assert all(auth.refusal_for(a, local, auth_on=False, address="127.0.0.1") is None for a in auth.ACTIONS)
    refused = {a for a in auth.ACTIONS if auth.refusal_for(a, local, auth_on=False, address="0.0.0.0")}
    assert refused == auth.SERVER_ACTIONS == {"server_folders", "held_out_films", "evaluate", "pacs_search",
                                              "pacs_classify", "pacs_write"}
    assert "listens on 0.0.0.0 without sign-in" in auth.refusal_for("evaluate", local, auth_on=False,
                                                                    address="0.0.0.0")


# --- the pages, each checking for itself ---

@pytest.mark.parametrize("page", ["app.py", *PAGES.values()])
def test_signed_out_every_page_shows_only_the_sign_in_screen(models_root, page):
    at = signed_in(page, None)
    assert texts(at, "exception") == []
    assert texts(at, "warning") == [card.RESEARCH_USE]
    assert texts(at, "title") == ["Sign in"]
    assert [b.label for b in at.button] == ["Sign in"]
    assert len(at.selectbox) == len(at.file_uploader) == len(at.radio) == 0
    assert len(at.sidebar.selectbox) == len(at.sidebar.markdown) == len(at.sidebar.button) == 0


@pytest.mark.parametrize(("claims", "page", "served"), [
    (VIEWER, "classify", True), (VIEWER, "instructor", True), (VIEWER, "metrics", True), (VIEWER, "batch", False),
    (CLINICIAN, "batch", True), ({"email": "nobody@example.test"}, "classify", False),
    (VIEWER, "pacs", False), (CLINICIAN, "pacs", True),
])
def test_a_page_refuses_a_role_below_it_by_itself(models_root, claims, page, served):
    at = signed_in(PAGES[page], claims)  # the page file run directly: as a direct URL or crafted rerun would
    assert texts(at, "exception") == []
    if served:
        assert texts(at, "title") == [TITLES[page]]
    else:
        assert texts(at, "title") == []
        assert len(at.error) == 1 and ("does not allow" in at.error[0].value or "no role" in at.error[0].value)
        assert len(at.selectbox) == len(at.file_uploader) == len(at.button) == 0


def test_viewer_gets_the_default_model_whatever_the_session_says(models_root, monkeypatch):
    monkeypatch.setenv("CXR_DEFAULT_MODEL", "tiny-pneumonia")
    at = AppTest.from_file(str(REPO / PAGES["classify"]), default_timeout=120)
    at.secrets["auth"], at.secrets["access"] = AUTH, ACCESS
    at.user = {"is_logged_in": True, **VIEWER}
    at.session_state[ui.MODEL_KEY] = str(models_root / "tiny-cxr3")  # a crafted choice
    at.run()
    assert texts(at, "exception") == []
    assert len(at.sidebar.selectbox) == 0
    assert at.session_state[ui.MODEL_KEY] == str(models_root / "tiny-pneumonia")
    assert any("**tiny-pneumonia** (choosing another model needs the admin role)" in c.value
               for c in at.sidebar.caption)


def test_clinician_batch_offers_server_folders_but_not_evaluation(models_root):
    at = signed_in(PAGES["batch"], CLINICIAN)
    assert at.radio(key="batch_source").options == ["Upload files", "Upload a folder", "Folder on the server"]
    at = signed_in(PAGES["metrics"], CLINICIAN)
    assert texts(at, "exception") == []
    assert any("does not allow evaluating a model on a server folder" in i.value for i in at.info)
    assert len(at.text_input) == 0  # no folder path box


def test_admin_chooses_models_and_evaluates(models_root, tmp_path, monkeypatch):
    import audit

    key = "an operator's audit key, 32 characters or more"
    monkeypatch.setenv("CXR_AUDIT_DIR", str(tmp_path / "audit"))
    monkeypatch.setenv("CXR_AUDIT_KEY", key)
    data = tmp_path / "data"  # the fixture's data root, with two real films in its NORMAL folder
    for film in sorted((DATA / "kermany" / "train" / "NORMAL").glob("*.jpeg"))[:2]:
        shutil.copyfile(film, data / "NORMAL" / film.name)
    at = signed_in(PAGES["metrics"], ADMIN)
    assert texts(at, "exception") == []
    assert at.text_input(key="eval_path") is not None
    at.sidebar.selectbox(key="_model_select").set_value(str(models_root / "tiny-pneumonia")).run()
    at.text_input(key="eval_path").set_value(".")
    at.button(key="eval_run").click().run()
    assert texts(at, "exception") == [] and texts(at, "error") == []
    assert any("Evaluated 2 images under" in s for s in texts(at, "success"))

    lines = audit.read(tmp_path / "audit")
    weights = card.read(models_root / "tiny-pneumonia").weights_sha256
    assert [(x["user"], x["role"], x["action"], x["model"], x["weights_sha256"]) for x in lines] == [
        ("boss@example.test", "admin", "model_change", "tiny-pneumonia", weights),
        ("boss@example.test", "admin", "evaluate", "tiny-pneumonia", weights)]
    evaluate = lines[1]
    assert evaluate["source"] == "server_folder"
    assert evaluate["counts"] == {"images": 2, "unreadable": 0}
    # The folder as its keyed hash (of the resolved path, as audit.py writes it), never its path.
    assert evaluate["folder_ref"] == audit.keyed_hash(key.encode(), str(data.resolve()))
    assert str(data) not in "".join(p.read_text() for p in (tmp_path / "audit").iterdir())


def test_app_navigation_and_sidebar_per_user(models_root):
    at = signed_in("app.py", VIEWER)
    assert texts(at, "exception") == []
    assert texts(at, "title") == [TITLES["classify"]]
    assert any("Signed in as **Vera** (v@example.test) · role: **viewer**" in m.value for m in at.sidebar.markdown)
    assert [b.label for b in at.sidebar.button] == ["Sign out"]
    nobody = signed_in("app.py", {"email": "nobody@example.test"})
    assert texts(nobody, "title") == ["No access"]
    assert "no role in this app" in nobody.error[0].value


def test_local_mode_on_loopback_works_as_before(models_root, address):
    address("127.0.0.1")
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120).run()
    assert texts(at, "exception") == []
    assert [i.value for i in at.sidebar.info] == [auth.LOCAL_NOTE]
    assert len(at.sidebar.error) == 0
    assert at.sidebar.selectbox(key="_model_select") is not None
    batch = AppTest.from_file(str(REPO / PAGES["batch"]), default_timeout=120).run()
    assert batch.radio(key="batch_source").options[-1] == "Folder on the server"


def test_local_mode_off_loopback_refuses_server_folders_and_says_why(models_root, address):
    address("0.0.0.0")
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120).run()
    assert texts(at, "exception") == []
    assert "listens on 0.0.0.0 without sign-in" in at.sidebar.error[0].value
    batch = AppTest.from_file(str(REPO / PAGES["batch"]), default_timeout=120).run()
    assert batch.radio(key="batch_source").options == ["Upload files", "Upload a folder"]
    metrics = AppTest.from_file(str(REPO / PAGES["metrics"]), default_timeout=120).run()
    assert any("listens on 0.0.0.0" in i.value for i in metrics.info)
    assert len(metrics.text_input) == 0
    instructor = AppTest.from_file(str(REPO / PAGES["instructor"]), default_timeout=120).run()
    assert instructor.radio(key="instructor_source").options == ["Upload an image"]
    # Nor the gallery of the held-out split's errors (films on the server): the reason instead of images.
    assert texts(instructor, "exception") == [] and len(instructor.get("imgs")) == 0
    assert any("held-out split's films too" in i.value for i in instructor.info)


@pytest.fixture()
def secrets_file(tmp_path, monkeypatch):
    """Point Streamlit at one secrets file of the test's (a fresh st.secrets reads it); restore after.

    st.user reads the module's own secrets singleton, which caches what it parsed: it is cleared on both sides.
    """
    import streamlit
    from streamlit.runtime.secrets import Secrets, secrets_singleton

    before = config.get_option("secrets.files")
    path = tmp_path / "secrets.toml"
    config.set_option("secrets.files", [str(path)])
    secrets_singleton._reset()
    monkeypatch.setattr(streamlit, "secrets", Secrets())
    yield path
    config.set_option("secrets.files", before)
    secrets_singleton._reset()


@pytest.mark.parametrize("broken", ['[auth]\nclient_id = "cxr-app"\n[access]\nadmin = ["a@example.test"\n',
                                    "[auth]\nredirect_uri = \n"])
def test_a_secrets_file_that_cannot_be_read_closes_the_app_instead_of_opening_local_mode(
        models_root, secrets_file, broken, address):
    """A TOML error in secrets.toml (a typo, a half-saved file) must not turn sign-in off: everyone would be an
    admin of the local mode behind the hospital's proxy."""
    address("127.0.0.1")
    secrets_file.write_text(broken)
    for script in ("app.py", PAGES["batch"], PAGES["pacs"]):
        at = AppTest.from_file(str(REPO / script), default_timeout=120).run()
        assert texts(at, "exception") == []
        assert any(f"The secrets file {secrets_file} exists but could not be read" in e.value for e in at.error)
        assert texts(at, "title") == [] and len(at.sidebar.selectbox) == 0, script  # nothing of the app
        assert auth.LOCAL_NOTE not in [i.value for i in at.sidebar.info]
    with pytest.raises(auth.SecretsUnreadable):
        auth.secrets_section("auth")


@pytest.mark.parametrize(("content", "said"), [
    ("[Auth]\n" + "".join(f'{k} = "{v}"\n' for k, v in AUTH.items()) + '[access]\nadmin = ["a@example.test"]\n',
     "has [Auth], [access] but no [auth] section"),
    ("[oauth]\nclient_id = \"cxr-app\"\n", "has [oauth] but no [auth] section"),
    ('[auth]\n# client_id = "cxr-app"\n[access]\nviewer = ["*"]\n',
     "The [auth] section of .streamlit/secrets.toml is empty"),
    ('[access]\nviewer = ["*"]\n', "has [access] but no [auth] section"),
    ('[audit]\ndirectory = "/var/log/cxr-app"\n', "Unknown setting(s) directory in the [audit] section"),
    ('[audit]\ndir = 5\n', "dir in the [audit] section of .streamlit/secrets.toml must be text"),
])
def test_sign_in_meant_but_missing_or_a_wrong_audit_setting_closes_the_app(models_root, secrets_file, content, said,
                                                                            address):
    """Local mode is for a machine of one's own: a misspelt or empty [auth] (or [access] roles with no [auth]) made
    every visitor behind the hospital's proxy, the app on 127.0.0.1, an admin; a misspelt [audit] key turned the
    trail off with a grey caption. Each closes the app and says what to fix."""
    address("127.0.0.1")
    secrets_file.write_text(content)
    for script in ("app.py", PAGES["batch"]):
        at = AppTest.from_file(str(REPO / script), default_timeout=120).run()
        assert texts(at, "exception") == []
        assert any(said in e.value for e in at.error), (script, texts(at, "error"))
        assert texts(at, "title") == [] and auth.LOCAL_NOTE not in [i.value for i in at.sidebar.info], script


def _without_sections(toml: str, names: set[str]) -> str:
    kept, keep = [], True
    for line in toml.splitlines():
        header = re.match(r"^\[(\w+)\]", line)
        keep = header is None and keep or header is not None and header.group(1) not in names
        if keep:
            kept.append(line)
    return "\n".join(kept) + "\n"


@pytest.mark.parametrize("audit_dir", ["audit", ""])
def test_local_mode_with_an_audit_folder_and_pacs_settings_still_runs(models_root, secrets_file, address, tmp_path,
                                                                       audit_dir):
    """What the README allows on a machine of one's own: the example without its [auth], [access] and [audit]
    sections (its [pacs] filled), or with an [audit] dir (empty: the trail is off, as before)."""
    address("127.0.0.1")
    example = (REPO / ".streamlit" / "secrets.toml.example").read_text()
    secrets_file.write_text(_without_sections(example, {"auth", "access", "audit"}))
    assert set(tomllib.loads(secrets_file.read_text())) == {"pacs"}
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120).run()
    assert texts(at, "exception") == [] and texts(at, "error") == []
    assert texts(at, "title") == [TITLES["classify"]] and [i.value for i in at.sidebar.info] == [auth.LOCAL_NOTE]
    folder = str(tmp_path / audit_dir) if audit_dir else ""
    secrets_file.write_text(f'[audit]\ndir = "{folder}"\n[pacs]\nurl = "http://127.0.0.1:9/dicom-web"\n')
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120).run()
    assert texts(at, "exception") == [] and texts(at, "error") == []
    assert texts(at, "title") == [TITLES["classify"]] and [i.value for i in at.sidebar.info] == [auth.LOCAL_NOTE]


def test_no_secrets_file_is_local_mode_and_a_readable_one_signs_in(models_root, secrets_file, address):
    address("127.0.0.1")
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120).run()  # the file does not exist
    assert texts(at, "title") == [TITLES["classify"]] and [i.value for i in at.sidebar.info] == [auth.LOCAL_NOTE]
    secrets_file.write_text("[auth]\n" + "".join(f'{k} = "{v}"\n' for k, v in AUTH.items()))
    signed_out = AppTest.from_file(str(REPO / "app.py"), default_timeout=120).run()
    assert texts(signed_out, "exception") == [] and texts(signed_out, "title") == ["Sign in"]


@pytest.mark.parametrize("secret", ["CHANGE-ME", "change-me-please-0123456789abcdef0123", "short-secret"])
def test_a_placeholder_or_short_cookie_secret_closes_the_app(models_root, secret):
    """The cookie carries the user's roles, signed with cookie_secret: the example's placeholder would let anyone
    forge an admin session."""
    for script in ("app.py", PAGES["classify"]):
        at = AppTest.from_file(str(REPO / script), default_timeout=120)
        at.secrets["auth"], at.secrets["access"] = {**AUTH, "cookie_secret": secret}, ACCESS
        at.user = {"is_logged_in": True, **ADMIN}
        at.run()
        assert texts(at, "exception") == [] and texts(at, "title") == []
        assert any("cookie_secret" in e.value and "placeholder" in e.value for e in at.error), script


@pytest.mark.parametrize(("setting", "said"), [
    ({"max_session_hours": "12h"}, "max_session_hours in the [access] section of .streamlit/secrets.toml is '12h'"),
    ({"max_session_hours": 0}, "max_session_hours in the [access] section of .streamlit/secrets.toml is 0"),
    ({"max_session_hours": True}, "is True: it must be a number of hours"),
    ({"viewer": 5}, "viewer in the [access] section of .streamlit/secrets.toml must be a list of entries"),
    ({"clinician": ["group:radiology", 7]}, "clinician in the [access] section"),
    ({"groups_claim": ["groups"]}, "groups_claim in the [access] section"),
    ({"trust_unverified_email": "yes"}, "trust_unverified_email in the [access] section"),
    ({"pacs_writer": ["group:radiology-reporting"]}, "Unknown setting(s) pacs_writer in the [access] section"),
])
def test_wrong_access_settings_close_the_app_with_what_to_fix(models_root, setting, said):
    """A wrong [access] value used to fail on every page with a traceback ("12h"), send every user back to the
    sign-in screen for ever (0), or give no one a role (a misspelt role): each is said, naming the setting."""
    import tomllib

    example = tomllib.loads((REPO / ".streamlit" / "secrets.toml.example").read_text())
    assert auth.access_problem(example["access"]) is None and auth.access_problem(ACCESS) is None
    assert auth.access_problem({**ACCESS, "max_session_hours": 12.5, "trust_unverified_email": False,
                                "roles_claim": "roles", "pacs-writer": "group:reporting"}) is None
    assert said in auth.access_problem({**ACCESS, **setting})
    for script in ("app.py", PAGES["classify"]):
        at = AppTest.from_file(str(REPO / script), default_timeout=120)
        at.secrets["auth"], at.secrets["access"] = AUTH, {**ACCESS, **setting}
        at.user = {"is_logged_in": True, "iat": time.time(), **ADMIN}
        at.run()
        assert texts(at, "exception") == [] and texts(at, "title") == [], script
        assert any(said in e.value for e in at.error), (script, texts(at, "error"))


def test_an_audit_trail_without_a_key_says_it_cannot_name_studies(models_root, tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_AUDIT_DIR", str(tmp_path / "audit"))
    monkeypatch.delenv("CXR_AUDIT_KEY", raising=False)
    at = signed_in("app.py", VIEWER)
    assert any("cannot name them: set [audit] hmac_key" in c.value for c in at.sidebar.caption)
    monkeypatch.setenv("CXR_AUDIT_KEY", "k" * 40)
    at = signed_in("app.py", VIEWER)
    assert not any("hmac_key" in c.value for c in at.sidebar.caption) and not at.sidebar.warning
    # The example's placeholder (or a short key) is not used: whoever reads the files could hash guessed UIDs.
    for weak in ("CHANGE-ME-another-long-random-string", "k" * 31):
        monkeypatch.setenv("CXR_AUDIT_KEY", weak)
        assert auth.audit_key() is None
        at = signed_in("app.py", VIEWER)
        assert any("placeholder or shorter than 32" in w.value for w in at.sidebar.warning), weak


def test_sign_in_is_audited_once_per_sign_in_not_per_tab_or_reload(models_root, tmp_path, monkeypatch):
    """A reload or a second tab is a new Streamlit session of the same sign-in (the same ID token's sub and iat):
    one sign_in line; signing in again (a new token) is another."""
    import time

    import audit

    monkeypatch.setenv("CXR_AUDIT_DIR", str(tmp_path / "audit"))
    issued = int(time.time()) - 60
    for _ in range(2):  # the first tab, then a reload
        assert texts(signed_in("app.py", {**CLINICIAN, "sub": "sub-1", "iat": issued}), "exception") == []
    signed_in("app.py", {**CLINICIAN, "sub": "sub-1", "iat": issued + 30})  # signed out and in again
    actions = [line["action"] for line in audit.read(tmp_path / "audit")]
    assert actions.count("sign_in") == 2


def test_a_sign_in_line_that_could_not_be_written_is_written_on_the_next_run(tmp_path, monkeypatch):
    import time

    import audit

    blocker = tmp_path / "audit"
    blocker.write_text("a file where the audit folder should be")
    monkeypatch.setenv("CXR_AUDIT_DIR", str(blocker))
    at = AppTest.from_string("import auth\nauth.sidebar_ui()", default_timeout=60)
    at.secrets["auth"], at.secrets["access"] = AUTH, ACCESS
    at.user = {"is_logged_in": True, **CLINICIAN, "sub": "sub-2", "iat": int(time.time()) - 60}
    at.run()
    assert texts(at, "exception") == [] and any("The audit trail could not be written" in e.value for e in at.error)
    blocker.unlink()
    at.run()
    at.run()
    assert [line["action"] for line in audit.read(blocker)] == ["sign_in"]
