"""Cold start of the app: ``streamlit run app.py`` until the classify page is shown in a browser, then
the first upload's result and a switch of explanation method, as a clinician meets them."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-dev-shm-usage"]
# The classify page is "served" when its uploader is on screen and the sidebar shows the model card.
READY_SELECTORS = ('[data-testid="stFileUploader"]', 'text=Weights sha256')
UPLOAD = REPO.parent / "shared" / "data" / "kermany" / "train" / "NORMAL" / "IM-0115-0001.jpeg"
PICK_S = 5.0  # seconds a clinician takes to pick a file after the page shows (the clock then starts)
# True once the viewer's heatmap pane (a plotly figure with an image trace) has a title starting with the text.
VIEWER_SHOWS = """prefix => [...document.querySelectorAll('.js-plotly-plot')].some(gd =>
    (gd.data || []).some(t => t.type === 'image') &&
    ((gd.layout && gd.layout.annotations) || []).some(a => (a.text || '').startsWith(prefix)))"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(models_dir: Path, port: int, env: dict[str, str] | None = None,
                 log: Path | None = None) -> subprocess.Popen:
    """``streamlit run app.py`` on 127.0.0.1:port serving the models under ``models_dir`` (headless).

    Its output goes to ``log`` (readable while it runs) when given, else to a pipe that ``stop`` reads.
    """
    cmd = [sys.executable, "-m", "streamlit", "run", str(REPO / "app.py"), "--server.address", "127.0.0.1",
           "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
           "--server.fileWatcherType", "none"]
    full_env = {**os.environ, "CXR_MODELS_DIR": str(models_dir), "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    if log is None:
        return subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=out, stderr=subprocess.STDOUT)
    proc.log_path = log  # type: ignore[attr-defined]
    return proc


def wait_healthy(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"streamlit did not answer on port {port} within {timeout:.0f} s")


def stop(proc: subprocess.Popen) -> str:
    """Terminate the server and return what it printed."""
    proc.terminate()
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    log = getattr(proc, "log_path", None)
    return log.read_text(errors="replace") if log is not None else out.decode(errors="replace")


def first_render(model: Path, timeout: float = 300.0) -> dict[str, object]:
    """Seconds from spawning the server to the health endpoint answering and to the classify page shown,
    then to the first upload's result and a change of method; for the first start after install (empty
    OpenVINO cache) and for the usual start.

    The app serves the folder of models that holds ``model`` with ``model`` as its default (the one a
    clinician is shown first), so the figures are that model's and not the first by name beside it.
    Chromium (Playwright, headless) is started before the clock so only the app's time counts;
    without Playwright or Chromium, only the health endpoint is timed (``app_server_up_s``): the page
    itself is not drawn until a browser connects, so ``app_first_render_s`` is not measured then.
    """
    models_dir, default = model.parent, {"CXR_DEFAULT_MODEL": model.name}
    port = free_port()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is None or not Path(CHROMIUM).exists():
        start = time.perf_counter()
        proc = start_server(models_dir, port, env=default)
        try:
            wait_healthy(port, timeout)
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30).read()
            seconds = time.perf_counter() - start
        finally:
            stop(proc)
        return {"app_server_up_s": round(seconds, 2), "app_first_render_s": None,
                "app_render_method": "HTTP health endpoint + page HTML only (no browser available: the page "
                                     "is not drawn, so app_first_render_s is not measured)"}
    import tempfile

    # First a start whose OpenVINO cache is empty (the first start after install: the model is converted),
    # then the usual start, whose cache that one filled (the figures the targets are about).
    with tempfile.TemporaryDirectory(prefix="cxr-bench-app-cache-") as cache:
        first = _start_and_use(sync_playwright, models_dir, {"CXR_ENGINE_CACHE": cache, **default}, timeout)
        usual = _start_and_use(sync_playwright, models_dir, {"CXR_ENGINE_CACHE": cache, **default}, timeout)
    return {"app_server_up_s": usual["up"], "app_first_render_s": usual["render"],
            "app_model_load_s": usual["load"], "app_warm_up_s": usual["warm"],
            "first_upload_result_s": usual["first_upload"], "method_switch_s": usual["switch"],
            "app_first_start": {"app_first_render_s": first["render"], "app_model_load_s": first["load"],
                                "first_upload_result_s": first["first_upload"], "method_switch_s": first["switch"],
                                "note": "the first start after install: empty OpenVINO cache, model converted"},
            "app_render_method": "Playwright + headless Chromium (1500x1100) until the uploader and model card are "
                                 f"shown; then, after {PICK_S:.0f} s to pick a file, one real JPEG uploaded until "
                                 "its decision and heatmap show; then Grad-CAM++ chosen until its heatmap shows. "
                                 "Second start of the server (its OpenVINO cache filled by the first, "
                                 "in app_first_start)",
            "app_log_errors": first["errors"] + usual["errors"]}


def _start_and_use(sync_playwright, models_dir: Path, env: dict[str, str], timeout: float) -> dict:
    """One cold server start driven by Chromium: seconds to health, to the page shown, the model's load and
    warm-up (from the server's log), the first upload's result and the switch to Grad-CAM++."""
    port = free_port()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 1100})
        start = time.perf_counter()
        proc = start_server(models_dir, port, env=env)
        try:
            wait_healthy(port, timeout)
            up = time.perf_counter() - start
            page.goto(f"http://127.0.0.1:{port}/", timeout=timeout * 1000)
            for selector in READY_SELECTORS:
                page.wait_for_selector(selector, timeout=timeout * 1000)
            seconds = time.perf_counter() - start
            first_upload, switch = first_result(page, timeout)
        finally:
            browser.close()
            log = stop(proc)
    errors = [line for line in log.splitlines() if "Traceback" in line or "Error" in line]
    warm = re.search(r"warm-up of .* done in ([0-9.]+) s", log)
    load = re.search(r"model .* loaded in ([0-9.]+) s", log)
    return {"up": round(up, 2), "render": round(seconds, 2), "first_upload": round(first_upload, 2),
            "switch": round(switch, 2), "warm": float(warm.group(1)) if warm else None,
            "load": float(load.group(1)) if load else None, "errors": errors[:5]}


def first_result(page, timeout: float) -> tuple[float, float]:
    """Seconds from setting the first file until its decision and viewer show, and from choosing
    Grad-CAM++ until its heatmap shows (on a page whose uploader is already on screen)."""
    page.wait_for_timeout(PICK_S * 1000)
    start = time.perf_counter()
    page.set_input_files('[data-testid="stFileUploader"] input[type="file"]',
                         files=[{"name": UPLOAD.name, "mimeType": "image/jpeg", "buffer": UPLOAD.read_bytes()}])
    page.wait_for_selector('h3:has-text("Decision:")', timeout=timeout * 1000)
    page.wait_for_function(VIEWER_SHOWS, arg="Grad-CAM for", timeout=timeout * 1000)
    first_upload = time.perf_counter() - start
    wait_idle(page, timeout)
    page.locator('[data-testid="stSelectbox"]').filter(has_text="Explanation method").click()
    start = time.perf_counter()
    page.get_by_role("option", name="Grad-CAM++").click()
    page.wait_for_function(VIEWER_SHOWS, arg="Grad-CAM++ for", timeout=timeout * 1000)
    return first_upload, time.perf_counter() - start


def server_rss_mb(pid: int) -> float:
    """Resident memory (VmRSS) of process ``pid`` in MiB."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def upload(page, name: str, data: bytes, mime: str = "application/octet-stream", timeout: float = 120.0,
           settled: bool = False) -> None:
    """Put one file in the page's (first) uploader and wait until the script run it started has finished.

    A file set while the uploader is being redrawn can be dropped by the page (its chip never shows):
    then it is set again, up to three times within ``timeout``. ``settled``: the page is known to be idle
    (the previous ``upload`` waited for it and nothing has happened since), so the first wait is skipped.
    """
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    if not settled:
        wait_idle(page, timeout)
    chip = f'[data-testid="stFileChipName"]:text-is("{name}")'
    for attempt in range(3):
        page.set_input_files('[data-testid="stFileUploader"] input[type="file"]',
                             files=[{"name": name, "mimeType": mime, "buffer": data}])
        try:
            page.wait_for_selector(chip, timeout=timeout * 1000 / 3)
            break
        except PlaywrightTimeout:
            if attempt == 2:
                raise
    wait_idle(page, timeout)


def wait_idle(page, timeout: float = 120.0, settle: float = 0.4) -> None:
    """Wait until the app's script has been 'notRunning' for ``settle`` seconds (the rerun finished)."""
    idle = '[data-testid="stApp"][data-test-script-state="notRunning"]'
    deadline = time.monotonic() + timeout
    quiet_since = None
    while time.monotonic() < deadline:
        if page.locator(idle).count() == 0:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= settle:
            return
        page.wait_for_timeout(50)
    raise TimeoutError(f"the page was still running after {timeout:.0f} s")
