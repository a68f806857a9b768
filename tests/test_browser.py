"""End to end: `streamlit run app.py` driven by Debian's Chromium through Playwright.

Uploads a real X-ray on the Classify page, waits for the heatmap, checks the shown
probabilities equal cxr_core's for that file, saves a screenshot, then scores a small folder
on the Batch review page. Needs /usr/bin/chromium (`.ci/run` installs it with apt-get).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import DATA

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
XRAY = DATA / "kermany/train/NORMAL/IM-0115-0001.jpeg"
BATCH = [DATA / "kermany/train/NORMAL/IM-0117-0001.jpeg", DATA / "kermany/train/PNEUMONIA/person1_bacteria_1.jpeg"]
TIMEOUT_MS = 180_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_serving(url: str, server: subprocess.Popen, log: Path, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"streamlit exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.read().strip() == b"ok":
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"streamlit did not serve {url} within {seconds} s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    """Stop a server process started by a test: terminate, then kill if it lingers."""
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def app_server(env: dict[str, str], log: Path, *args: str, port: int | None = None) -> Iterator[str]:
    """``streamlit run app.py`` on 127.0.0.1 (a free port unless given) with ``env``, its output in ``log``;
    yields the URL once it serves and stops it afterwards. ``args``: more ``streamlit run`` options."""
    port = port or _free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(REPO / "app.py"), "--server.address", "127.0.0.1",
             "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false", *args],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_serving(url, proc, log)
        yield url
    finally:
        stop(proc)


@pytest.fixture()
def server(tmp_path, tiny_model_dir):
    models_root = tmp_path / "models"
    shutil.copytree(tiny_model_dir, models_root / tiny_model_dir.name)
    data_root = tmp_path / "data"
    data_root.mkdir()
    for path in BATCH:
        shutil.copyfile(path, data_root / path.name)
    (data_root / "broken.png").write_bytes(b"not an image at all")
    env = {**os.environ, "CXR_MODELS_DIR": str(models_root), "CXR_DATA_ROOT": str(data_root),
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    with app_server(env, tmp_path / "streamlit.log") as url:
        yield url, models_root / tiny_model_dir.name


def _save_screenshot(page, tmp_path: Path, name: str) -> Path:
    shot = tmp_path / name
    page.screenshot(path=str(shot), full_page=True)
    if os.environ.get("CXR_ARTIFACTS"):
        artifacts = REPO / "test-artifacts"
        artifacts.mkdir(exist_ok=True)
        shutil.copyfile(shot, artifacts / name)
    return shot


AXES = "gd => ['xaxis', 'xaxis2', 'yaxis', 'yaxis2'].map(a => gd._fullLayout[a].range.slice())"


def _zoom_moves_both_panes(page, viewer) -> None:
    """Drag a box on the film: the film's and the heatmap's axes both narrow to the same ranges."""
    x, x2, y, y2 = before = viewer.evaluate(AXES)
    assert x == x2 and y == y2
    viewer.scroll_into_view_if_needed()  # below the decision and probabilities
    box = viewer.locator('.nsewdrag[data-subplot="xy"]').bounding_box()
    page.mouse.move(box["x"] + 0.3 * box["width"], box["y"] + 0.3 * box["height"])
    page.mouse.down()
    page.mouse.move(box["x"] + 0.6 * box["width"], box["y"] + 0.55 * box["height"], steps=8)
    page.mouse.up()
    page.wait_for_function(f"([gd, before]) => JSON.stringify(({AXES})(gd)) !== JSON.stringify(before)",
                           arg=[viewer.element_handle(), before])
    x, x2, y, y2 = viewer.evaluate(AXES)
    assert x == pytest.approx(x2) and y == pytest.approx(y2)  # the heatmap pane followed the film
    assert abs(x[1] - x[0]) < 0.6 * abs(before[0][1] - before[0][0])  # and both zoomed in
    assert abs(y[1] - y[0]) < 0.6 * abs(before[2][1] - before[2][0])


def test_classify_and_batch_in_chromium(server, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium), as .ci/run does")
    from playwright.sync_api import expect, sync_playwright

    from cxr_core import models, pipeline
    from cxr_core.explain import Explainer

    url, model_dir = server
    expect.set_options(timeout=TIMEOUT_MS)  # the first run imports TensorFlow and loads the model
    classifier = models.load(model_dir)
    expected = pipeline.classify(classifier, Explainer(classifier), XRAY.read_bytes(), XRAY.name).prediction

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url)
            expect(page.get_by_text("Classify a chest radiograph")).to_be_visible()
            expect(page.get_by_text("Research and teaching use only").first).to_be_visible()
            # While no file is chosen, an empty Plotly chart is drawn hidden, so that Plotly's code is loaded
            # before the first upload (ui.preload_viewer); nothing of it shows.
            preload = page.locator(".st-key-cxr_viewer_preload .js-plotly-plot")
            expect(preload).to_have_count(1)
            expect(preload).to_be_hidden()
            expect(page.locator(".js-plotly-plot:visible")).to_have_count(0)
            page.locator("[data-testid='stFileUploader'] input[type='file']").set_input_files(str(XRAY))

            viewer = page.locator(".js-plotly-plot").filter(has=page.locator(".heatmaplayer"))
            expect(viewer).to_have_count(1)  # the film beside its heatmap, in one figure
            _zoom_moves_both_panes(page, viewer)

            table = page.locator("[data-testid='stTable'] table").first
            expect(table).to_contain_text("Probability")
            shown = {}
            for row in table.locator("tbody tr").all():
                cells = [c.strip() for c in row.locator("td, th").all_inner_texts()]
                shown[cells[0]] = cells[1]
            assert shown == {n: f"{p:.4f}" for n, p in zip(expected.class_names, expected.probabilities,
                                                             strict=True)}
            expect(page.get_by_role("heading", name=f"Decision: {expected.decision}")).to_be_visible()
            expect(page.get_by_role("button", name="Download report (PNG)")).to_be_visible()
            _save_screenshot(page, tmp_path, "classify.png")

            page.get_by_role("link", name="Batch review").click()
            expect(page.get_by_role("heading", name="Batch review")).to_be_visible()
            page.get_by_text("Folder on the server").click()
            page.get_by_role("button", name="Score folder").click()
            expect(page.get_by_text("3 file(s): ")).to_be_visible()
            expect(page.get_by_text("1 unreadable")).to_be_visible()
            expect(page.locator("[data-testid='stDataFrame']")).to_be_visible()
            _save_screenshot(page, tmp_path, "batch.png")
        finally:
            browser.close()
