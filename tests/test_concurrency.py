"""Several users at once, and many images in a row: one model in memory, the same answers, no leak.

Browser sessions are AppTest instances of the classify page driven from separate threads in
this process, so they share the process-wide ``st.cache_resource`` model exactly as sessions
of one ``streamlit run`` server do. Memory is VmRSS from /proc/self/status.
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

from cxr_core import explain, imaging, models, overlay, pipeline, quality

REPO = Path(__file__).resolve().parents[1]
SESSIONS = 4
LEAK_BOUND_MB = 50
PAGE_UPLOADS, PAGE_WARM = 100, 40  # the page caches 32 results, so the level is reached by upload 40


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
    ui.load_model.clear()
    barrier = threading.Barrier(SESSIONS)

    def session(i: int) -> tuple[str, list[str], list[float], list[str]]:
        name, data = images[i * 37]
        at = AppTest.from_file(str(REPO / "pages" / "classify.py"), default_timeout=180)
        barrier.wait()  # every session starts (and asks for the model) at the same moment
        at.run()
        at.file_uploader(key="classify_upload").set_value((name, data, "image/jpeg")).run()
        decisions = [m.value for m in at.markdown if m.value.startswith("### Decision:")]
        table = [t.value for t in at.table if "Probability" in t.value.columns]
        shown = table[0]["Probability"].astype(float).tolist() if table else []
        return name, decisions, shown, [e.value for e in at.exception] + [e.value for e in at.error]

    with ThreadPoolExecutor(max_workers=SESSIONS) as pool:
        results = list(pool.map(session, range(SESSIONS)))
    reference = original(folder)
    for name, decisions, shown, problems in results:
        assert not problems, (name, problems)
        expected = reference.predict_pixels([imaging.load(dict(images)[name], name).pixels])[0]
        assert len(decisions) == 1 and expected.decision in decisions[0], (name, decisions)
        assert shown == pytest.approx(expected.probabilities, abs=1e-4), name
    assert len(loads) == 1, f"the model was loaded {len(loads)} times for {SESSIONS} concurrent sessions"
    del reference
    assert len(_live_classifiers(folder)) == 1
    ui.load_model.clear()


def test_memory_does_not_grow_over_200_classifications(served, images):
    """The page's path (read, predict + Grad-CAM, quality check, overlay) 200 times on one Explainer."""
    classifier, explainer = served

    def page_path(name: str, data: bytes) -> np.ndarray:
        result = pipeline.classify(classifier, explainer, data, name)
        quality.assess(result.image, data)
        return overlay.overlay(result.image.pixels, result.heatmap)

    samples = []
    for i, (name, data) in enumerate(images, start=1):
        assert page_path(name, data).dtype == np.uint8
        if i in (20, 50, 100, 150, 200):
            gc.collect()
            samples.append(rss_mb())
    growth = samples[-1] - samples[0]
    print(f"RSS at images 20, 50, 100, 150, 200: {[round(s, 1) for s in samples]} MiB")
    assert growth <= LEAK_BOUND_MB, f"RSS grew {growth:.1f} MiB from image 20 to 200: {samples}"


def test_page_memory_does_not_grow_over_many_uploads(tiny_model_dir, tmp_path, images, monkeypatch):
    """One browser session uploading image after image: the page's caches are bounded, so RSS levels off."""
    shutil.copytree(tiny_model_dir, tmp_path / "models" / "page-model")
    monkeypatch.setenv("CXR_MODELS_DIR", str(tmp_path / "models"))
    at = AppTest.from_file(str(REPO / "pages" / "classify.py"), default_timeout=180).run()
    samples = []
    for i, (name, data) in enumerate(images[:PAGE_UPLOADS], start=1):
        at.file_uploader(key="classify_upload").set_value((name, data, "image/jpeg")).run()
        assert not at.exception and any(m.value.startswith("### Decision:") for m in at.markdown), name
        if i in (PAGE_WARM, PAGE_UPLOADS // 2, PAGE_UPLOADS):
            gc.collect()
            samples.append(rss_mb())
    growth = samples[-1] - samples[0]
    print(f"RSS at uploads {PAGE_WARM}, {PAGE_UPLOADS // 2}, {PAGE_UPLOADS}: {[round(s, 1) for s in samples]} MiB")
    assert growth <= LEAK_BOUND_MB, f"RSS grew {growth:.1f} MiB from upload {PAGE_WARM} to {PAGE_UPLOADS}: {samples}"
