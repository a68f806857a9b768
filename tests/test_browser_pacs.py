"""End to end: the PACS worklist in `streamlit run app.py`, driven by Debian's Chromium, against a real Orthanc.

Search, open a study, see its films' heatmaps, write the results back; the SR is then found in Orthanc.
"""

from __future__ import annotations

import os

import pydicom
import pytest
from pacs_server import DICOM, NEEDLES, loaded_orthanc
from test_browser import CHROMIUM, TIMEOUT_MS, _save_screenshot, app_server

from cxr_core import dicom_results

pytestmark = pytest.mark.browser
RG1 = DICOM / "pydicom-data" / "RG1_J2KI.dcm"  # study "exam Number", two CR films


@pytest.fixture()
def server(tmp_path, tiny_model_dir):
    with loaded_orthanc() as (orthanc, client):
        s = orthanc.settings
        env = {**os.environ, "CXR_MODELS_DIR": str(tiny_model_dir.parent), "TF_CPP_MIN_LOG_LEVEL": "2",
               "CXR_PACS_URL": s.url, "CXR_PACS_USER": s.username, "CXR_PACS_PASSWORD": s.password}
        with app_server(env, tmp_path / "streamlit.log") as url:
            yield url, client, orthanc


def test_pacs_search_open_heatmap_and_write_back_in_chromium(server, tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium), as .ci/run does")
    from playwright.sync_api import expect, sync_playwright

    url, client, orthanc = server
    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1200})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url)
            page.get_by_role("link", name="PACS worklist").click()
            expect(page.get_by_role("heading", name="PACS worklist")).to_be_visible()
            page.get_by_role("button", name="Search").click()
            expect(page.locator("[data-testid='stDataFrame']").first).to_be_visible()
            page.locator("[data-testid='stSelectbox']").filter(has_text="Open a study").click()
            page.get_by_role("option", name="exam Number · 2004-08-26 · THORAX").click()
            heatmaps = page.locator("[data-testid='stImage']").filter(has_text="Grad-CAM for")
            expect(heatmaps).to_have_count(2)  # one per film of the study
            expect(heatmaps.first.locator("img")).to_have_js_property("complete", True)
            expect(page.get_by_role("heading", name="Decision:").first).to_be_visible()
            _save_screenshot(page, tmp_path, "pacs.png")
            page.get_by_role("button", name="Write back to the PACS").click()
            expect(page.get_by_text("Stored 4 object(s) in the study")).to_be_visible()
        finally:
            browser.close()
    study = str(pydicom.dcmread(RG1, stop_before_pixels=True).StudyInstanceUID)
    ours = [i for i in client.instances(study) if i.series_description.startswith(dicom_results.RESULT_PREFIX)]
    assert sorted(i.series_description.rsplit(" ", 1)[1] for i in ours) == ["SR", "SR", "heatmap", "heatmap"]
    said = (tmp_path / "streamlit.log").read_text(errors="replace") + orthanc.output()
    assert [needle for needle in NEEDLES if needle in said] == []  # the canary patient stays in the PACS
