"""The bad-input corpus (tests/badinput.py) through every door: the reader, the serving pipeline,
the classify page and the batch page (AppTest).

Each good file must give a correct result (right size, format, frames, the pixels of the
picture it holds, lungs dark), each bad one the one clear ``UnreadableImageError`` with its
message, and neither may stop the page or the batch from working on the next file.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from badinput import Case, corpus, correlation
from streamlit.testing.v1 import AppTest

from cxr_core import imaging, models, pipeline
from cxr_core.errors import UnreadableImageError

REPO = Path(__file__).resolve().parents[1]
CORPUS = corpus()
GOOD = [c for c in CORPUS if c.ok]
BAD = [c for c in CORPUS if not c.ok]
ACTIONS = ("retry", "export", "upload")  # every message tells the clinician what to do


def _ids(cases: list[Case]) -> list[str]:
    return [c.name for c in cases]


def test_corpus_covers_the_issue():
    """The corpus holds every kind of input the issue lists, good and bad."""
    names = {c.name for c in CORPUS}
    assert {"empty.png", "truncated.jpg", "truncated.png", "notes.png", "report.png", "viewer.html", "bomb.png",
            "chest16.png", "chest_cmyk.jpg", "chest_exif6.jpg", "chest.gif", "chest.tif", "chest.bmp",
            "chest.webp", "nopixels.dcm", "rgb.dcm", "multiframe.dcm", "bigendian.dcm", "deflated.dcm",
            "IM000001", "966.dcm", "dental.dcm", "large.jpg"} <= names
    assert len(GOOD) >= 15 and len(BAD) >= 9


@pytest.mark.parametrize("case", GOOD, ids=_ids(GOOD))
def test_good_input_reads_correctly(case: Case):
    start = time.perf_counter()
    image = imaging.load(case.data, case.name)
    seconds = time.perf_counter() - start
    pixels, info = image.pixels, image.info
    assert pixels.dtype == np.float32 and pixels.shape == case.size
    assert 0.0 <= pixels.min() and pixels.max() <= 1.0 and pixels.std() > 0.05
    assert (info.format, info.height, info.width, info.frames) == (case.format, *case.size, case.frames)
    if case.reference is not None:
        # The very picture that was encoded, the right way up and not inverted (lungs dark).
        assert correlation(pixels, case.reference) > 0.98
    assert seconds < 10


@pytest.mark.parametrize("case", BAD, ids=_ids(BAD))
def test_bad_input_gives_the_one_clear_error(case: Case):
    start = time.perf_counter()
    with pytest.raises(UnreadableImageError) as err:
        imaging.load(case.data, case.name)
    message = str(err.value)
    assert case.fragment in message.lower()
    assert any(word in message.lower() for word in ACTIONS), message
    assert case.name not in message  # file names can carry patient names
    assert time.perf_counter() - start < 10  # the 40000x40000 PNG is refused from its header, not decoded


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    from cxr_core import explain

    classifier = models.load(tiny_model_dir)
    return classifier, explain.Explainer(classifier)


def test_pipeline_classify_handles_the_whole_corpus(served):
    classifier, explainer = served
    for case in CORPUS:
        if not case.ok:
            with pytest.raises(UnreadableImageError, match="(?i)" + case.fragment):
                pipeline.classify(classifier, explainer, case.data, case.name)
            continue
        result = pipeline.classify(classifier, explainer, case.data, case.name)
        expected = classifier.predict_pixels([imaging.load(case.data, case.name).pixels])[0]
        assert result.prediction.probabilities == pytest.approx(expected.probabilities, abs=1e-5), case.name
        assert result.heatmap.shape == (64, 64) and 0 <= result.heatmap.min() and result.heatmap.max() <= 1


def test_classify_many_scores_every_good_file_and_lists_every_bad_one(served):
    classifier, _ = served
    progress: list[tuple[int, int]] = []
    rows = pipeline.classify_many(classifier, [(c.name, c.data) for c in CORPUS], batch_size=4,
                                  progress=lambda done, total: progress.append((done, total)))
    assert [r.name for r in rows] == [c.name for c in CORPUS]
    for case, row in zip(CORPUS, rows, strict=True):
        if case.ok:
            assert row.error is None and row.prediction is not None, (case.name, row.error)
            expected = classifier.predict_pixels([imaging.load(case.data, case.name).pixels])[0]
            assert row.prediction.probabilities == pytest.approx(expected.probabilities, abs=1e-5)
            assert row.info.format == case.format
        else:
            assert row.prediction is None and case.fragment in row.error.lower(), (case.name, row.error)
    assert progress[-1] == (len(CORPUS), len(CORPUS))


@pytest.fixture(scope="module")
def models_root(tmp_path_factory, tiny_model_dir) -> Path:
    root = tmp_path_factory.mktemp("models_root")
    shutil.copytree(tiny_model_dir, root / tiny_model_dir.name)
    return root


def _page(name: str, models_root: Path, monkeypatch) -> AppTest:
    monkeypatch.setenv("CXR_MODELS_DIR", str(models_root))
    monkeypatch.delenv("CXR_DATA_ROOT", raising=False)
    return AppTest.from_file(str(REPO / "pages" / name), default_timeout=180).run()


def _interleaved() -> list[Case]:
    """Good and bad cases alternating, so each bad upload is followed by a good one in the same session."""
    out: list[Case] = []
    for i in range(max(len(GOOD), len(BAD))):
        out += ([GOOD[i]] if i < len(GOOD) else []) + ([BAD[i]] if i < len(BAD) else [])
    return out


def test_classify_page_shows_a_result_or_the_clear_error_for_each_upload(models_root, tiny_model_dir,
                                                                         served, monkeypatch):
    classifier, _ = served
    at = _page("classify.py", models_root, monkeypatch)
    assert not at.exception
    for case in _interleaved():
        at.file_uploader(key="classify_upload").set_value((case.name, case.data, "application/octet-stream")).run()
        assert not at.exception, (case.name, [e.value for e in at.exception])
        errors = [e.value for e in at.main.error]
        decisions = [m.value for m in at.markdown if m.value.startswith("### Decision:")]
        if case.ok:
            assert not errors and len(decisions) == 1, (case.name, errors)
            expected = classifier.predict_pixels([imaging.load(case.data, case.name).pixels])[0]
            assert expected.decision in decisions[0]
            probabilities = [t.value for t in at.table if "Probability" in t.value.columns][0]
            shown = probabilities["Probability"].astype(float).tolist()
            assert shown == pytest.approx(expected.probabilities, abs=1e-4), case.name
        else:
            assert len(errors) == 1 and case.fragment in errors[0].lower(), (case.name, errors)
            assert not decisions


def test_batch_page_scores_the_whole_corpus_upload(models_root, served, monkeypatch):
    classifier, _ = served
    at = _page("batch.py", models_root, monkeypatch)
    at.file_uploader(key="batch_upload").set_value([(c.name, c.data, "application/octet-stream") for c in CORPUS])
    at.run()
    at.button(key="batch_score_upload").click().run()
    assert not at.exception, [e.value for e in at.exception]
    table = [d.value for d in at.dataframe if "file" in d.value.columns][0].set_index("file")
    assert list(table.index) == [c.name for c in CORPUS]
    for case in CORPUS:
        row = table.loc[case.name]
        if case.ok:
            assert row["error"] in ("", None) and row["decision"] in classifier.card.class_names, case.name
            expected = classifier.predict_pixels([imaging.load(case.data, case.name).pixels])[0]
            assert row["p_PNEUMONIA"] == pytest.approx(expected.probabilities[1], abs=1e-5)
        else:
            assert case.fragment in row["error"].lower() and np.isnan(row["p_PNEUMONIA"]), case.name
    summary = [c.value for c in at.caption if "unreadable" in c.value][0]
    assert f"{len(CORPUS)} file(s)" in summary and f"{len(BAD)} unreadable" in summary
