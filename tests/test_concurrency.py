"""Several users at once, and many images in a row: one model in memory, the same answers, no leak.

Simultaneous sessions are threads of this process asking the page's ``st.cache_resource`` loader
for the model, as the session threads of one ``streamlit run`` server do, and Chromium sessions of
a real server (browser tests). Memory is VmRSS from /proc/self/status.
"""

from __future__ import annotations

import gc
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from cxr_core import card as card_lib
from cxr_core import explain, imaging, models, overlay, pipeline, quality

REPO = Path(__file__).resolve().parents[1]
SESSIONS = 4
LEAK_BOUND_MB = 50
# 20 uploads after 10 of warm-up: a leak of 2.5 MiB per upload passes the bound; a film's full-size pixels kept
# (a Kermany film, about 1500 x 1200, is 7 MiB as float32) would pass it three times over. 45 uploads cost CI 25 s more.
SERVER_UPLOADS, SERVER_WARM = 30, 10


def rss_mb() -> float:
    """This process's resident memory in MiB (VmRSS)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


@pytest.fixture(scope="module")
def images(data_dir) -> list[tuple[str, bytes]]:
    """200 real radiographs as uploads: Kermany NORMAL and PNEUMONIA, and COVID-19 Radiography images."""
    folders = [data_dir / "kermany" / "train" / "NORMAL", data_dir / "kermany" / "train" / "PNEUMONIA",
               data_dir / "covid19_radiography" / "COVID"]
    paths = [p for folder in folders for p in sorted(folder.iterdir())[:67] if imaging.is_image_name(p.name)]
    assert len(paths) >= 200
    return [(p.name, p.read_bytes()) for p in paths[:200]]


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    classifier = models.load(tiny_model_dir)
    return classifier, explain.Explainer(classifier)


def test_threads_sharing_one_model_get_the_serial_answers(served, images):
    """8 threads x 12 images on one Classifier and one Explainer give exactly the one-at-a-time results."""
    classifier, explainer = served
    work = images[:96]
    serial = [pipeline.classify(classifier, explainer, data, name) for name, data in work]
    with ThreadPoolExecutor(max_workers=8) as pool:
        parallel = list(pool.map(lambda item: pipeline.classify(classifier, explainer, item[1], item[0]), work))
    for (name, _), one, many in zip(work, serial, parallel, strict=True):
        assert many.prediction.probabilities == pytest.approx(one.prediction.probabilities, abs=1e-6), name
        np.testing.assert_allclose(many.heatmap, one.heatmap, atol=1e-5, err_msg=name)


def _live_classifiers(folder: Path) -> list[models.Classifier]:
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, models.Classifier) and Path(o.folder) == folder]


def test_concurrent_sessions_share_one_cached_model(tiny_model_dir, tmp_path, images, monkeypatch):
    """Sessions asking for the model at the same moment get one loaded model; page sessions then reuse it.

    The simultaneous part calls the page's cached loader from threads (as a server's session threads
    do). AppTest sessions are then run one after another: AppTest swaps a process-global mock Runtime
    in and out around every run, so AppTest runs in parallel threads corrupt each other. Real
    simultaneous page sessions are the browser test below.
    """
    import ui

    root = tmp_path / "models"
    folder = Path(shutil.copytree(tiny_model_dir, root / "shared-model"))
    monkeypatch.setenv("CXR_MODELS_DIR", str(root))
    loads: list[int] = []
    original = models.load

    def counting_load(path):
        loads.append(threading.get_ident())
        return original(path)

    monkeypatch.setattr(models, "load", counting_load)
    ui.start_loading.clear()
    version = ui.model_version(card_lib.read(folder))  # what the pages key the load on
    barrier = threading.Barrier(SESSIONS)

    def ask() -> tuple:
        barrier.wait()  # every session asks for the model at the same moment
        return ui.load_model(str(folder), version)

    with ThreadPoolExecutor(max_workers=SESSIONS) as pool:
        shared = list(pool.map(lambda _: ask(), range(SESSIONS)))
    assert len(loads) == 1, f"the model was loaded {len(loads)} times for {SESSIONS} simultaneous sessions"
    assert all(pair is shared[0] for pair in shared)

    reference = original(folder)
    for i in range(SESSIONS):
        name, data = images[i * 37]
        at = AppTest.from_file(str(REPO / "pages" / "classify.py"), default_timeout=180).run()
        at.file_uploader(key="classify_upload").set_value((name, data, "image/jpeg")).run()
        assert not at.exception and not at.error, (name, [e.value for e in [*at.exception, *at.error]])
        decisions = [m.value for m in at.markdown if m.value.startswith("### Decision:")]
        table = [t.value for t in at.table if "Probability" in t.value.columns]
        expected = reference.predict_pixels([imaging.load(data, name).pixels])[0]
        assert len(decisions) == 1 and expected.decision in decisions[0], (name, decisions)
        assert table[0]["Probability"].astype(float).tolist() == pytest.approx(expected.probabilities, abs=1e-4)
    assert len(loads) == 1, f"the page sessions loaded the model again ({len(loads)} loads)"
    del reference, shared
    assert len(_live_classifiers(folder)) == 1
    ui.start_loading.clear()


def test_two_models_loading_at_once_take_turns(tiny_model_dir, tiny_model3_dir, tmp_path):
    """Two model folders asked for at the same moment (two users choosing different models, or a page whose
    model still warms up while the next loads) load and warm up one after the other, never at once: Keras
    builds and traces are not safe across threads (a load beside another's warm-up failed now and then in CI).
    Both loads still succeed and serve their own model."""
    import ui

    folders = [Path(shutil.copytree(d, tmp_path / d.name)) for d in (tiny_model_dir, tiny_model3_dir)]
    loads = [ui.ModelLoad(str(f), card_lib.load(f)) for f in folders]
    for load in loads:
        load.start()
    for load in loads:
        assert load.warmed.wait(timeout=300)
    assert not any(load.failed for load in loads), [load._error for load in loads]
    first, second = sorted((load.turn for load in loads), key=lambda turn: turn[0])
    assert second[0] >= first[1], f"the loads overlapped: {first} and {second}"
    assert [len(load.result()[0].card.class_names) for load in loads] == [2, 3]


def test_memory_does_not_grow_over_120_classifications(served, images):
    """The page's path (read, predict + Grad-CAM, quality check, overlay) 120 times on one Explainer: after 20 of
    warm-up, a leak of 0.5 MiB per film (one film's pixels or overlay kept) passes the bound."""
    classifier, explainer = served

    def page_path(name: str, data: bytes) -> np.ndarray:
        result = pipeline.classify(classifier, explainer, data, name)
        quality.assess(result.image, data)
        return overlay.overlay(result.image.pixels, result.heatmap)

    samples = []
    for i, (name, data) in enumerate(images[:120], start=1):
        assert page_path(name, data).dtype == np.uint8
        if i in (20, 50, 90, 120):
            gc.collect()
            samples.append(rss_mb())
    growth = samples[-1] - samples[0]
    print(f"RSS at images 20, 50, 90, 120: {[round(s, 1) for s in samples]} MiB")
    assert growth <= LEAK_BOUND_MB, f"RSS grew {growth:.1f} MiB from image 20 to 120: {samples}"


@pytest.mark.slow
def test_page_memory_does_not_grow_over_120_uploads(tiny_model_dir, tmp_path, images, monkeypatch):
    """One browser session (AppTest) uploading 120 images: RSS after 120 within the bound of after 20,
    and no earlier run's page globals (their report arguments) still alive.

    Each run is followed by the full garbage collection that the server's runner makes after a run
    (``runner.postScriptGC``, on by default) and AppTest's runner leaves out. ui keeps Streamlit from
    making a second one through ``keras.backend.clear_session()``, which AppTest did make."""
    shutil.copytree(tiny_model_dir, tmp_path / "models" / "page-model")
    monkeypatch.setenv("CXR_MODELS_DIR", str(tmp_path / "models"))
    at = AppTest.from_file(str(REPO / "pages" / "classify.py"), default_timeout=180).run()
    try:
        samples, alive = _upload_all(at, images)
    finally:
        gc.unfreeze()
    print(f"page RSS by upload: {samples}; report argument dicts alive: {alive}")
    assert samples[120] - samples[20] <= LEAK_BOUND_MB, f"RSS grew from upload 20 to 120: {samples}"
    assert max(alive.values()) <= 2, f"earlier runs' page globals are still alive: {alive}"


def _upload_all(at, images) -> tuple[dict[int, float], dict[int, int]]:
    """RSS (MiB) and the number of report argument dicts alive, after uploads 20, 70 and 120."""
    samples, alive = {}, {}
    for i, (name, data) in enumerate(images[:120], start=1):
        at.file_uploader(key="classify_upload").set_value((name, data, "image/jpeg")).run()
        assert not at.exception and any(m.value.startswith("### Decision:") for m in at.markdown), name
        gc.collect()  # what the server's runner does after each run (runner.postScriptGC); AppTest's does not
        if i == 1:
            # What exists after the first upload (TensorFlow, the model, the page's modules) is not what this
            # test watches: frozen, the collections after each later run scan only what those runs made
            # (the same result, a quarter of the time with TensorFlow in memory).
            gc.freeze()
        if i in (20, 70, 120):
            samples[i] = rss_mb()
            alive[i] = sum(1 for o in gc.get_objects()
                           if isinstance(o, dict) and "overlay_rgb" in o and "explained_class" in o)
    return samples, alive


@pytest.fixture()
def server(tiny_model_dir, tmp_path):
    """``streamlit run app.py`` on 127.0.0.1 serving the tiny model, and Chromium (Playwright) to drive it."""
    from playwright.sync_api import sync_playwright

    from benchmarks.app_render import CHROMIUM, CHROMIUM_ARGS, free_port, start_server, stop, wait_healthy

    shutil.copytree(tiny_model_dir, tmp_path / "models" / "served")
    port = free_port()
    log = {"path": tmp_path / "server.log"}
    proc = start_server(tmp_path / "models", port, env={"TMPDIR": str(tmp_path)}, log=log["path"])
    try:
        wait_healthy(port, 120)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            yield {"url": f"http://127.0.0.1:{port}/", "browser": browser, "pid": proc.pid, "log": log}
            browser.close()
    finally:
        log["text"] = stop(proc)
        assert "Traceback" not in log["text"], log["text"][-3000:]


def _open_classify(browser, url: str):
    page = browser.new_page()
    page.goto(url)
    page.wait_for_selector('[data-testid="stFileUploader"]', timeout=120_000)
    return page


def _decision(page) -> str:
    return page.locator('h3:has-text("Decision:")').inner_text(timeout=60_000)


@pytest.mark.browser
@pytest.mark.slow
def test_browser_sessions_classify_at_once_on_one_server(server, tiny_model_dir, images):
    """Four Chromium sessions open a cold server and upload at once, while the model is still loading
    and warming up; each sees its own image's decision, and the server loaded and warmed the model once."""
    from benchmarks.app_render import wait_idle

    reference = models.load(tiny_model_dir)
    pages = [server["browser"].new_page() for _ in range(SESSIONS)]
    for page in pages:  # no waiting: the sessions' first runs overlap
        page.goto(server["url"], wait_until="commit")
    for page in pages:  # the uploader shows before the model has loaded
        page.wait_for_selector('[data-testid="stFileUploader"]', timeout=120_000)
    log = server["log"]["path"]
    chosen = [images[i * 41] for i in range(SESSIONS)]
    for page, (name, data) in zip(pages, chosen, strict=True):  # no waiting: the server runs them together
        page.set_input_files('[data-testid="stFileUploader"] input[type="file"]',
                             files=[{"name": name, "mimeType": "image/jpeg", "buffer": data}])
    for page, (name, data) in zip(pages, chosen, strict=True):
        page.wait_for_selector('h3:has-text("Decision:")', timeout=120_000)
        wait_idle(page)
        expected = reference.predict_pixels([imaging.load(data, name).pixels])[0]
        assert _decision(page).strip() == f"Decision: {expected.decision}", name
        assert page.locator('[data-testid="stException"]').count() == 0
    text = log.read_text()
    print([line for line in text.splitlines() if line.startswith("cxr:")])
    assert text.count(f"cxr: model {tiny_model_dir.name} loaded") == 1, text[-2000:]
    assert text.count(f"cxr: warm-up of {tiny_model_dir.name} done") == 1, text[-2000:]


@pytest.mark.browser
@pytest.mark.slow
def test_server_memory_levels_off_over_many_uploads(server, images):
    """One session uploads image after image; the server's RSS after the last upload is within the bound of its
    RSS after the warm-up uploads."""
    from benchmarks.app_render import server_rss_mb, upload

    page = _open_classify(server["browser"], server["url"])
    samples = {}
    for i, (name, data) in enumerate(images[:SERVER_UPLOADS], start=1):
        upload(page, name, data, "image/jpeg", settled=i > 1)  # the last upload waited for the page
        page.wait_for_selector('h3:has-text("Decision:")', timeout=60_000)
        assert page.locator('[data-testid="stException"]').count() == 0, name
        if i in (SERVER_WARM, SERVER_UPLOADS // 2, SERVER_UPLOADS):
            samples[i] = server_rss_mb(server["pid"])
    print(f"server RSS by upload: {samples}")
    growth = samples[SERVER_UPLOADS] - samples[SERVER_WARM]
    assert growth <= LEAK_BOUND_MB, f"server RSS grew {growth:.1f} MiB: {samples}"


def test_ast_parses_of_streamlit_and_autograph_are_serialised():
    """Python 3.11's AST constructor keeps its depth counter per interpreter (CPython gh-106905), so a page
    parse racing the warm-up's autograph parse raised 'AST constructor recursion depth mismatch' in CI.
    ``ui`` puts one lock around ``ast.parse``: with it held, both parsers wait, and go on once it is free."""
    import ast

    import gast
    from streamlit.runtime.scriptrunner import magic

    import ui

    assert ui is not None and getattr(ast.parse, "cxr_serialised", False)
    parsers = {"streamlit page": lambda: magic.add_magic("x = 1\nx\n", "page.py"),
               "autograph": lambda: gast.parse("def f(y):\n    return y + 1\n")}
    for name, parse in parsers.items():
        done = threading.Event()
        worker = threading.Thread(target=lambda parse=parse, done=done: (parse(), done.set()))
        with ast.parse.cxr_lock:  # another thread is parsing
            worker.start()
            assert not done.wait(0.3), f"the {name} parse did not wait for the lock"
        assert done.wait(10), f"the {name} parse did not go on once the lock was free"
        worker.join()
