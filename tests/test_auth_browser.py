"""Sign-in end to end: a real OpenID Connect provider, `streamlit run app.py` with [auth], Debian's Chromium.

The provider is the certified `oidc-provider` npm package (tests/oidc/provider.js, installed by
`npm ci` in tests/oidc, as .ci/run does) on 127.0.0.1 with one client and two users: a viewer (role
from the app's allow-list for the user's group) and a clinician (role from the `roles` claim). The app
reads a secrets file generated here (`--secrets.files`), never the repository's .streamlit/secrets.toml.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import subprocess
import time
import urllib.parse
from pathlib import Path

import pytest
from conftest import DATA
from test_browser import CHROMIUM, REPO, TIMEOUT_MS, _free_port, _save_screenshot, app_server, stop

import audit
from cxr_core import card

pytestmark = pytest.mark.browser

OIDC = REPO / "tests" / "oidc"
VIEWER = ("viewer@example.test", "viewer-pass", "Vera Viewer")
CLINICIAN = ("clinician@example.test", "clinician-pass", "Colin Clinician")
XRAY = DATA / "kermany/train/NORMAL/IM-0115-0001.jpeg"
PAGE_URLS = ["", "classify", "batch", "metrics", "instructor", "no-such-page"]
PAGE_TITLES = ["Classify a chest radiograph", "Batch review", "Model metrics", "Instructor: how the model sees"]


@pytest.fixture(scope="module")
def provider(tmp_path_factory):
    """(issuer, client secret, app port): the provider, already told the app's redirect URI."""
    node = shutil.which("node")
    if node is None or not (OIDC / "node_modules" / "oidc-provider").is_dir():
        pytest.fail("the test OpenID provider is not installed: run `npm ci` in tests/oidc (.ci/run does)")
    port, app_port, client_secret = _free_port(), _free_port(), secrets.token_hex(16)
    log = tmp_path_factory.mktemp("oidc") / "provider.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([node, "provider.js", str(port), f"http://127.0.0.1:{app_port}/oauth2callback",
                                 client_secret], cwd=OIDC, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while "READY" not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the OpenID provider did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}", client_secret, app_port
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def app(provider, tmp_path_factory, tiny_model_dir):
    """(url, audit folder, cookie secret): the app behind the provider, with a data root and an audit folder."""
    issuer, client_secret, port = provider
    tmp = tmp_path_factory.mktemp("authapp")
    models_root = tmp / "models"
    shutil.copytree(tiny_model_dir, models_root / tiny_model_dir.name)
    (tmp / "data").mkdir()
    cookie_secret = secrets.token_hex(32)
    secrets_file = tmp / "secrets.toml"
    secrets_file.write_text(f"""
[auth]
redirect_uri = "http://127.0.0.1:{port}/oauth2callback"
cookie_secret = "{cookie_secret}"
client_id = "cxr-app"
client_secret = "{client_secret}"
server_metadata_url = "{issuer}/.well-known/openid-configuration"
client_kwargs = {{ scope = "openid email profile groups", code_challenge_method = "S256", prompt = "login" }}

[access]
viewer = ["group:cxr-teaching"]

[audit]
dir = "{tmp / 'audit'}"
hmac_key = "{secrets.token_hex(16)}"
""")
    env = {**os.environ, "CXR_MODELS_DIR": str(models_root), "CXR_DATA_ROOT": str(tmp / "data"),
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("CXR_AUDIT_DIR", None)
    with app_server(env, tmp / "streamlit.log", "--secrets.files", str(secrets_file), port=port) as url:
        yield url, tmp / "audit", cookie_secret


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium), as .ci/run does")
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            yield chromium
        finally:
            chromium.close()


def _new_page(browser):
    """A fresh browser context (no cookies) that may reach only this machine."""
    context = browser.new_context(viewport={"width": 1300, "height": 900})

    def local_only(route):
        host = urllib.parse.urlsplit(route.request.url).hostname
        route.continue_() if host in ("127.0.0.1", "localhost") else route.abort()

    context.route("**/*", local_only)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    return context, page


def _expect_sign_in_screen_only(page) -> None:
    from playwright.sync_api import expect

    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    expect(page.get_by_text("Research and teaching use only").first).to_be_visible()
    expect(page.get_by_role("button", name="Sign in")).to_be_visible()
    for title in PAGE_TITLES:
        expect(page.get_by_role("heading", name=title)).to_have_count(0)
    expect(page.locator("[data-testid='stSidebarNav']")).to_have_count(0)
    expect(page.locator("[data-testid='stFileUploader']")).to_have_count(0)


def _sign_in(page, url: str, who: tuple[str, str, str]) -> None:
    from playwright.sync_api import expect

    page.goto(url)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url("**/interaction/**")  # the provider's own login form
    page.locator("input[name=login]").fill(who[0])
    page.locator("input[name=password]").fill(who[1])
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_text(f"Signed in as {who[2]}")).to_be_visible()


def _nav_links(page) -> list[str]:
    from playwright.sync_api import expect

    nav = page.locator("[data-testid='stSidebarNav'] a")
    expect(nav.first).to_be_visible()
    return sorted(t.strip().splitlines()[-1] for t in nav.all_inner_texts())  # the title, after the icon


def _serializer(secret: str):
    """How Streamlit signs its identity cookie (itsdangerous, salted with the cookie's name)."""
    from itsdangerous import URLSafeTimedSerializer

    return URLSafeTimedSerializer(secret, salt="_streamlit_user")


def test_unauthenticated_visits_see_only_the_sign_in_screen(app, browser, tmp_path):
    url, _, _ = app
    context, page = _new_page(browser)
    try:
        for path in PAGE_URLS:
            page.goto(f"{url}/{path}")
            _expect_sign_in_screen_only(page)
        _save_screenshot(page, tmp_path, "auth_sign_in.png")
    finally:
        context.close()


def test_viewer_sees_viewer_pages_only_and_signs_out(app, browser, tmp_path):
    from playwright.sync_api import expect

    url, audit_dir, _ = app
    context, page = _new_page(browser)
    try:
        _sign_in(page, url, VIEWER)
        expect(page.get_by_text("role: viewer")).to_be_visible()
        assert _nav_links(page) == ["Classify", "Instructor", "Model metrics"]
        expect(page.get_by_role("heading", name="Classify a chest radiograph")).to_be_visible()
        # no model choice for a viewer
        expect(page.locator("[data-testid='stSidebar'] [data-testid='stSelectbox']")).to_have_count(0)
        page.locator("[data-testid='stFileUploader'] input[type='file']").set_input_files(str(XRAY))
        expect(page.get_by_role("button", name="Download report (PNG)")).to_be_visible()

        page.goto(f"{url}/batch")  # a clinician page by direct URL: refused by the page itself, and audited
        expect(page.get_by_text("Your role (viewer) does not allow")).to_be_visible()
        expect(page.get_by_role("heading", name="Batch review")).to_have_count(0)
        expect(page.get_by_text("Folder on the server")).to_have_count(0)
        expect(page.locator("[data-testid='stFileUploader']")).to_have_count(0)
        assert _nav_links(page) == ["Classify", "Instructor", "Model metrics"]  # still not in the navigation
        _save_screenshot(page, tmp_path, "auth_viewer_direct_url.png")

        page.get_by_role("button", name="Sign out").click()
        page.get_by_role("button", name="Yes, sign me out").click()  # the provider ends its session too
        _expect_sign_in_screen_only(page)
        assert not [c for c in context.cookies() if c["name"].startswith("_streamlit_user")]
        page.goto(f"{url}/instructor")
        _expect_sign_in_screen_only(page)
    finally:
        context.close()
    lines = [(line["user"], line["role"], line["action"]) for line in audit.read(audit_dir)]
    assert ("viewer@example.test", "viewer", "sign_in") in lines
    assert ("viewer@example.test", "viewer", "sign_out") in lines
    refused = [line for line in audit.read(audit_dir) if line["action"] == "refused"]
    assert [(r["user"], r["refused"]) for r in refused] == [("viewer@example.test", "batch")]
    classified = [line for line in audit.read(audit_dir) if line["action"] == "classify"]
    assert len(classified) == 1 and classified[0]["user"] == "viewer@example.test"
    assert classified[0]["weights_sha256"] == card.read(next((audit_dir.parent / "models").iterdir())).weights_sha256
    assert XRAY.name not in "".join(p.read_text() for p in audit_dir.glob("*.jsonl"))


def test_clinician_gets_batch_review_and_tampered_cookies_are_refused(app, browser):
    from playwright.sync_api import expect

    url, audit_dir, cookie_secret = app
    context, page = _new_page(browser)
    try:
        _sign_in(page, url, CLINICIAN)
        expect(page.get_by_text("role: clinician")).to_be_visible()
        assert _nav_links(page) == ["Batch review", "Classify", "Instructor", "Model metrics", "PACS worklist"]
        page.goto(f"{url}/batch")
        expect(page.get_by_role("heading", name="Batch review")).to_be_visible()
        expect(page.get_by_text("Folder on the server")).to_be_visible()

        real = next(c for c in context.cookies() if c["name"] == "_streamlit_user")
        claims = json.loads(_serializer(cookie_secret).loads(real["value"]))
        _, stamp, signature = real["value"].rsplit(".", 2)
        assert claims["email"] == CLINICIAN[0] and claims["roles"] == ["clinician"]
        forged_claims = {**claims, "email": "someone.else@example.test", "roles": ["admin"]}
        swapped = base64.urlsafe_b64encode(json.dumps(json.dumps(forged_claims)).encode()).decode().rstrip("=")
        for value in (f"{swapped}.{stamp}.{signature}",  # the real signature over other claims
                      _serializer("not-the-" + cookie_secret).dumps(json.dumps(forged_claims)),  # a wrong secret
                      real["value"][:-4] + ("AAAA" if not real["value"].endswith("AAAA") else "BBBB")):
            context.clear_cookies()
            context.add_cookies([{**real, "value": value}])
            page.goto(f"{url}/batch")
            _expect_sign_in_screen_only(page)
    finally:
        context.close()
    users = {line["user"] for line in audit.read(audit_dir)}
    assert "someone.else@example.test" not in users
    assert ("clinician@example.test", "clinician", "sign_in") in [(x["user"], x["role"], x["action"])
                                                                  for x in audit.read(audit_dir)]
