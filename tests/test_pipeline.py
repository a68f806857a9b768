"""cxr_core.pipeline: real JPEG and DICOM through the serving path; batches that survive bad files."""

from __future__ import annotations

import time

import numpy as np
import pytest
from conftest import DATA, DICOM

from cxr_core import explain, imaging, models, pipeline, preprocess
from cxr_core.errors import UnreadableImageError

JPEG = DATA / "kermany" / "train" / "PNEUMONIA" / "person1000_bacteria_2931.jpeg"
SIIM = DICOM / "torchxrayvision" / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
FAKE_MONO1 = DICOM / "torchxrayvision" / "Fake_MONOHR1.dcm"


@pytest.fixture(scope="module")
def classifier(tiny_model_dir) -> models.Classifier:
    return models.load(tiny_model_dir)


@pytest.fixture(scope="module")
def explainer(classifier) -> explain.Explainer:
    return explain.Explainer(classifier)


def _assert_same(a: models.Prediction, b: models.Prediction) -> None:
    np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-5)
    assert (a.decision, a.top_class, a.positive) == (b.decision, b.top_class, b.positive)


@pytest.mark.parametrize("path", [JPEG, SIIM], ids=["kermany-jpeg", "siim-dicom"])
def test_classify_real_file_matches_the_classifier(data_dir, classifier, explainer, path):
    result = pipeline.classify(classifier, explainer, path)
    expected = classifier.predict_pixels([imaging.load(path).pixels])[0]
    _assert_same(result.prediction, expected)
    assert result.heatmap.shape == (64, 64) and result.heatmap.dtype == np.float32
    assert result.heatmap.min() == 0.0 and result.heatmap.max() == 1.0
    assert result.class_index == list(expected.class_names).index(expected.decision)
    assert result.method == "gradcam"
    assert result.image.pixels.shape == (result.image.info.height, result.image.info.width)


@pytest.mark.parametrize("method", ["gradcam", "layercam"])
def test_the_heatmap_first_shown_explains_the_class_called_not_the_top_class(data_dir, tiny_model_dir, tmp_path,
                                                                             method):
    """At a card's thresholds the class called can be the less probable one: the heatmap shown with the decision
    (class_index None) is that class's, as the page, the report and the PACS write-back title it."""
    import shutil

    from cxr_core import card as card_lib

    folder = tmp_path / "called"
    shutil.copytree(tiny_model_dir, folder)
    top = models.load(folder).predict_pixels([imaging.load(JPEG).pixels])[0].top_class
    card = card_lib.load(folder)
    card.thresholds = {"PNEUMONIA": 0.999999 if top == "PNEUMONIA" else 1e-9}  # calls the other class
    card_lib.save(card, folder)
    classifier = models.load(folder)
    explainer = explain.Explainer(classifier)
    result = pipeline.classify(classifier, explainer, JPEG, method=method)
    assert result.prediction.top_class == top and result.prediction.decision != top
    called = ["NORMAL", "PNEUMONIA"].index(result.prediction.decision)
    assert result.class_index == called
    batch = preprocess.model_input(result.image.pixels, classifier.input_size)
    np.testing.assert_allclose(result.heatmap, explainer.explain(batch, method, called).heatmap, atol=1e-6)
    assert not np.allclose(result.heatmap, explainer.explain(batch, method, 1 - called).heatmap, atol=1e-3)


def test_classify_from_bytes_equals_from_path(data_dir, classifier, explainer):
    from_path = pipeline.classify(classifier, explainer, SIIM)
    from_bytes = pipeline.classify(classifier, explainer, SIIM.read_bytes(), filename="upload.dcm")
    assert from_bytes.image.info.format == "DICOM"
    np.testing.assert_array_equal(from_bytes.image.pixels, from_path.image.pixels)
    np.testing.assert_array_equal(from_bytes.heatmap, from_path.heatmap)


@pytest.mark.parametrize("method", ["layercam", "smoothgrad"])
def test_classify_with_other_methods(data_dir, classifier, explainer, method):
    result = pipeline.classify(classifier, explainer, JPEG, method=method, class_index=0)
    _assert_same(result.prediction, classifier.predict_pixels([imaging.load(JPEG).pixels])[0])
    assert result.class_index == 0 and result.method == method
    assert result.heatmap.shape == (64, 64) and result.heatmap.max() == 1.0


def test_classify_window_changes_the_dicom_input(data_dir, classifier, explainer):
    default = pipeline.classify(classifier, explainer, SIIM)
    narrow = pipeline.classify(classifier, explainer, SIIM, window=(128.0, 40.0))
    assert narrow.image.info.window_source == "caller"
    assert not np.allclose(narrow.image.pixels, default.image.pixels)


def test_classify_unreadable_file_raises_the_one_error(tmp_path, classifier, explainer):
    with pytest.raises(UnreadableImageError):
        pipeline.classify(classifier, explainer, b"", filename="empty.png")
    with pytest.raises(ValueError, match="gradcam\\+\\+\\+"):
        pipeline.classify(classifier, explainer, JPEG, method="gradcam+++")
    with pytest.raises(ValueError, match="conv9"):
        pipeline.classify(classifier, explainer, JPEG, layer="conv9")


def test_classify_at_an_intermediate_layer(data_dir, classifier, explainer):
    final = pipeline.classify(classifier, explainer, JPEG)
    early = pipeline.classify(classifier, explainer, JPEG, layer="tiny_relu0")
    assert early.heatmap.shape == (64, 64) and not np.allclose(early.heatmap, final.heatmap)
    _assert_same(early.prediction, final.prediction)


def test_classify_many_keeps_order_and_isolates_bad_files(data_dir, classifier):
    jpegs = sorted((DATA / "kermany" / "train" / "NORMAL").glob("*.jpeg"))[:3]
    items = [
        (jpegs[0].name, jpegs[0]),
        ("empty.png", b""),
        (SIIM.name, SIIM.read_bytes()),
        ("notes.png", b"Patient looked well today.\n"),
        (jpegs[1].name, jpegs[1]),
        (FAKE_MONO1.name, FAKE_MONO1),
        (jpegs[2].name, jpegs[2].read_bytes()),
    ]
    calls: list[tuple[int, int]] = []
    rows = pipeline.classify_many(classifier, items, batch_size=3, progress=lambda *args: calls.append(args))
    assert [r.name for r in rows] == [name for name, _ in items]
    assert [r.error is not None for r in rows] == [False, True, False, True, False, False, False]
    assert calls == [(3, 7), (6, 7), (7, 7)]
    for row, (name, source) in zip(rows, items, strict=True):
        if row.error is not None:
            assert row.prediction is None and row.info is None and row.thumbnail is None
            assert row.error  # the reader's message for a clinician, not an empty string
            continue
        _assert_same(row.prediction, classifier.predict_pixels([imaging.load(source, name).pixels])[0])
        assert row.thumbnail.dtype == np.uint8 and max(row.thumbnail.shape) == 96
        assert row.info.width > 0
    assert rows[2].info.format == "DICOM" and rows[0].info.format == "JPEG"
    assert "empty" in rows[1].error and "text file" in rows[3].error  # imaging's own words reach the row
    # Fake_MONOHR1 is the SIIM image inverted: its thumbnail is the photographic negative.
    assert np.abs(rows[5].thumbnail.astype(int) + rows[2].thumbnail.astype(int) - 255).max() <= 1


def test_classify_many_from_a_generator_and_all_bad(classifier):
    rows = pipeline.classify_many(classifier, ((f"bad{i}.png", b"x") for i in range(5)), batch_size=2)
    assert [r.name for r in rows] == [f"bad{i}.png" for i in range(5)]
    assert all(r.prediction is None and r.error for r in rows)
    assert pipeline.classify_many(classifier, []) == []
    with pytest.raises(ValueError, match="batch_size"):
        pipeline.classify_many(classifier, [], batch_size=0)


class _SlowClassifier:
    """Stands in for a model: each batch takes ``delay`` seconds, like a real forward pass."""

    input_size = 16

    def __init__(self, inner: models.Classifier, delay: float):
        self.inner, self.delay = inner, delay

    def predict(self, batch: np.ndarray) -> list[models.Prediction]:
        time.sleep(self.delay)
        return [models.decide(self.inner.card, (0.5, 0.5))] * len(batch)


def test_classify_many_reads_the_next_batch_while_predicting(monkeypatch, classifier):
    delay, batches = 0.15, 4
    real_load = imaging.load

    def slow_load(source, filename=None, **kwargs):
        time.sleep(delay / 4)  # four files per batch: reading a batch takes as long as predicting it
        return real_load(source, filename, **kwargs)

    monkeypatch.setattr(pipeline.imaging, "load", slow_load)
    png = (DATA / "kermany" / "train" / "NORMAL" / "IM-0115-0001.jpeg").read_bytes()
    start = time.perf_counter()
    rows = pipeline.classify_many(_SlowClassifier(classifier, delay), [(f"{i}.jpeg", png) for i in range(4 * batches)],
                                  batch_size=4)
    elapsed = time.perf_counter() - start
    assert len(rows) == 16 and all(r.prediction is not None for r in rows)
    serial = 2 * delay * batches  # 1.2 s if reading and predicting took turns
    assert elapsed < 0.8 * serial, f"{elapsed:.2f} s: reading did not overlap prediction"
