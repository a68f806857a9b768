"""The app shell: app.py navigation, the sidebar model selector and ui.py's helpers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import DATA
from streamlit.testing.v1 import AppTest

import ui
from cxr_core import card

APP = str(Path(__file__).resolve().parents[1] / "app.py")


@pytest.fixture()
def models_root(tmp_path, tiny_model_dir, tiny_model3_dir, monkeypatch) -> Path:
    root = tmp_path / "models"
    for folder in (tiny_model_dir, tiny_model3_dir):
        shutil.copytree(folder, root / folder.name)
    (root / "not-a-model").mkdir()  # no card: not listed
    monkeypatch.setenv("CXR_MODELS_DIR", str(root))
    return root


def test_app_runs_with_navigation_banner_and_model_selector(models_root):
    at = AppTest.from_file(APP, default_timeout=120).run()
    assert [e.value for e in at.exception] == []
    assert at.warning[0].value == card.RESEARCH_USE
    assert at.title[0].value == "Classify a chest radiograph"  # the default page
    selector = at.sidebar.selectbox(key="_model_select")
    assert [Path(o).name for o in selector.options] == ["tiny-cxr3", "tiny-pneumonia"]
    summary = " ".join(m.value for m in at.sidebar.markdown)
    assert "**tiny-cxr3** · version 1" in summary and "`COVID-19`" in summary
    assert "test auc: **0.500**" in summary
    sha = card.read(models_root / "tiny-cxr3").weights_sha256
    assert any(sha[:12] in c.value for c in at.sidebar.caption)
    # The page draws before the model has loaded; once an image needs it, the sidebar names engine and precision.
    film = DATA / "kermany" / "train" / "NORMAL" / "IM-0115-0001.jpeg"
    at.file_uploader(key="classify_upload").set_value((film.name, film.read_bytes(), "image/jpeg")).run()
    assert [e.value for e in at.exception] == []
    assert "Inference: OpenVINO 20" in " ".join(c.value for c in at.sidebar.caption)  # engine and precision


def test_choosing_another_model_updates_summary_and_session(models_root):
    at = AppTest.from_file(APP, default_timeout=120).run()
    at.sidebar.selectbox(key="_model_select").set_value(str(models_root / "tiny-pneumonia")).run()
    assert [e.value for e in at.exception] == []
    summary = " ".join(m.value for m in at.sidebar.markdown)
    assert "**tiny-pneumonia**" in summary and "COVID-19" not in summary
    assert at.session_state[ui.MODEL_KEY] == str(models_root / "tiny-pneumonia")
    assert any("PNEUMONIA ≥ 0.5000" in c.value for c in at.sidebar.caption)


@pytest.mark.parametrize("page", ["pages/classify.py", "pages/batch.py", "pages/metrics.py", "pages/instructor.py"])
def test_every_page_shows_the_research_banner(models_root, page):
    at = AppTest.from_file(str(Path(APP).parent / page), default_timeout=120).run()
    assert [e.value for e in at.exception] == []
    assert at.warning[0].value == card.RESEARCH_USE


@pytest.mark.parametrize(("page", "hint"), [
    ("pages/batch.py", "to score images"), ("pages/metrics.py", "to see its metrics"),
    ("pages/instructor.py", "Choose a working model in the sidebar."), ("pages/pacs.py", "to classify studies")])
def test_a_page_without_a_working_model_says_so_and_stops(tmp_path, monkeypatch, page, hint):
    monkeypatch.setenv("CXR_MODELS_DIR", str(tmp_path / "nothing-here"))
    monkeypatch.setenv("CXR_PACS_URL", "http://127.0.0.1:9/dicom-web")  # settings only: no request is made
    at = AppTest.from_file(str(Path(APP).parent / page), default_timeout=120).run()
    assert [e.value for e in at.exception] == []
    assert "No models found" in at.sidebar.error[0].value
    assert [i.value for i in at.info if i.value.startswith("Choose a working model")] == [i.value for i in at.info]
    assert any(hint in i.value for i in at.info)
    assert not at.file_uploader and not at.button and not at.get("plotly_chart")  # the page stopped there


def test_list_models_and_roots(models_root, monkeypatch, tmp_path):
    assert ui.models_root() == models_root
    assert [p.name for p in ui.list_models()] == ["tiny-cxr3", "tiny-pneumonia"]
    monkeypatch.delenv("CXR_DATA_ROOT", raising=False)
    assert ui.data_root() is None
    monkeypatch.setenv("CXR_DATA_ROOT", str(tmp_path))
    assert ui.data_root() == tmp_path.resolve()
    monkeypatch.delenv("CXR_MODELS_DIR")
    assert ui.models_root() == Path(ui.__file__).resolve().parent / "models"


def test_headline_metrics_flattens_one_level():
    metrics = {"test": {"auc": 0.91, "accuracy": 0.8, "per_class": {"x": 1}}, "n": 10, "ok": True, "name": "x"}
    assert ui.headline_metrics(metrics) == {"test auc": 0.91, "test accuracy": 0.8, "n": 10.0}


def test_model_is_loaded_once_per_process(models_root):
    folder = str(models_root / "tiny-pneumonia")
    version = ui.model_version(card.read(folder))
    first = ui.load_model(folder, version)
    assert ui.load_model(folder, version) is first
    assert first[0].card.name == "tiny-pneumonia" and first[1].classifier is first[0]
    # Rescored (new thresholds in the card, the same weights): loaded afresh, with the new card.
    rescored = card.read(folder)
    rescored.thresholds = {"PNEUMONIA": 0.123}
    card.save(rescored, folder)
    new_version = ui.model_version(card.read(folder))
    assert new_version != version and new_version.split(":")[0] == version.split(":")[0]
    second = ui.load_model(folder, new_version)
    assert second is not first and second[0].card.thresholds == {"PNEUMONIA": 0.123}


def _load_fails_once(monkeypatch, error: Exception) -> list[int]:
    """``models.load`` raises ``error`` on its first call only, with the shared load cache emptied; the calls made."""
    from cxr_core import models

    real, calls = models.load, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(models, "load", flaky)
    ui.start_loading.clear()
    return calls


def test_a_model_load_that_failed_once_is_tried_again_by_the_next_run(models_root, monkeypatch):
    """A failed load (here a MemoryError the first time) is not kept: the next page run, in this session or
    another, loads the model afresh instead of showing the same error until the server restarts."""
    calls = _load_fails_once(monkeypatch, MemoryError("transient: could not allocate"))
    film = DATA / "kermany" / "train" / "NORMAL" / "IM-0115-0001.jpeg"
    at = AppTest.from_file(APP, default_timeout=120).run()
    if not at.sidebar.error:  # the page drew before the load failed: the upload waits for it
        at.file_uploader(key="classify_upload").set_value((film.name, film.read_bytes(), "image/jpeg")).run()
    assert "could not be loaded (MemoryError: transient" in at.sidebar.error[0].value
    assert "tried again when the page reruns" in at.sidebar.error[0].value
    again = AppTest.from_file(APP, default_timeout=120).run()  # another session
    again.file_uploader(key="classify_upload").set_value((film.name, film.read_bytes(), "image/jpeg")).run()
    assert [e.value for e in again.sidebar.error] == [] and len(calls) == 2
    assert "Inference: OpenVINO" in " ".join(c.value for c in again.sidebar.caption)
    ui.start_loading.clear()


def test_a_failed_load_is_forgotten_once_so_that_a_newer_load_is_kept(models_root, monkeypatch):
    """A load that failed with a ModelCardError (a wrapped OSError, weights changed under it) is retried too; and a
    session still holding the failed load does not drop the newer load another session has started since (two
    full loads at once)."""
    from cxr_core.errors import ModelCardError

    calls = _load_fails_once(monkeypatch, ModelCardError("the weights file changed since it was checked"))
    folder = str(models_root / "tiny-pneumonia")
    version = ui.model_version(card.read(folder))
    first = ui.start_loading(folder, version)
    first.warmed.wait(60)
    assert first.failed and ui.wait_for_model(first) is None  # the page says why, and forgets it
    second = ui.start_loading(folder, version)
    assert second is not first
    second.warmed.wait(120)
    assert not second.failed
    assert ui.wait_for_model(first) is None  # another session's rerun, still holding the failed load
    assert ui.start_loading(folder, version) is second and len(calls) == 2
    ui.start_loading.clear()


def test_headline_figures_read_as_counts_and_percentages():
    shown = {k: ui.format_metric(k, v) for k, v in {"test n": 1264.0, "test accuracy": 0.95411, "test auc": 0.99547,
                                                    "test ece": 0.005028, "best_epoch": 7.0}.items()}
    assert shown == {"test n": "1,264", "test accuracy": "95.4%", "test auc": "0.995", "test ece": "0.5%",
                     "best_epoch": "7"}


def test_a_page_run_leaves_keras_global_state_alone(models_root):
    """Streamlit calls keras.backend.clear_session() after each script run when keras is imported; ui turns
    that off (models are built once per process and shared), so Keras state set before a run survives it."""
    from keras.src.backend.common import global_state

    global_state.set_global_attribute("cxr_probe", "kept")
    try:
        at = AppTest.from_file(APP, default_timeout=120).run()
        assert [e.value for e in at.exception] == []
        assert global_state.get_global_attribute("cxr_probe") == "kept"
    finally:
        global_state.set_global_attribute("cxr_probe", None)
