"""The shipped models on OpenVINO f32: TensorFlow's probabilities and decisions, and its Grad-CAM for every class.

A deterministic sample of 64 held-out test images per model (the whole test split is measured by
``python -m benchmarks.engine_agreement``; figures in benchmarks/README.md).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from test_shipped_models import REPO, SHIPPED, SOURCES

from cxr_core import explain, imaging, models, preprocess

SAMPLE = 64


@pytest.fixture(scope="module", params=sorted(SHIPPED))
def served(request) -> tuple[models.Classifier, models.Classifier, pd.DataFrame, np.ndarray]:
    """(OpenVINO classifier, TensorFlow classifier on the same Keras model, sampled test rows, their model inputs)."""
    folder = REPO / "models" / request.param
    ov = models.load(folder, engine="openvino", precision="f32")
    tf = models.Classifier(ov.card, ov.model, folder, engine="tensorflow")
    test = pd.read_csv(folder / "predictions.csv").query("split == 'test'")
    sample = test.sample(SAMPLE, random_state=0)
    batch = preprocess.to_batch([preprocess.prepare(imaging.load(SOURCES[r.source] / r.path).pixels, ov.input_size)
                                 for r in sample.itertuples()])
    return ov, tf, sample, batch


def test_openvino_f32_probabilities_equal_tensorflow_on_the_test_split(served):
    ov, tf, sample, batch = served
    assert (ov.engine, ov.precision) == ("openvino", "f32")
    ov_probs = np.concatenate([ov.probabilities(batch[i:i + 16]) for i in range(0, len(batch), 16)])
    tf_probs = np.concatenate([tf.probabilities(batch[i:i + 16]) for i in range(0, len(batch), 16)])
    np.testing.assert_allclose(ov_probs, tf_probs, atol=1e-5)
    # And both serve what evaluation stored (predictions.csv, computed when the model was trained).
    columns = [f"p_{c}" for c in ov.card.class_names]
    np.testing.assert_allclose(ov_probs, sample[columns].to_numpy(), atol=1e-4)
    assert [models.decide(ov.card, p).decision for p in ov_probs] == sample["predicted_class"].tolist()


def test_openvino_gradcam_equals_compiled_tensorflow_gradcam_for_every_class(served):
    ov, _, _, batch = served
    explainer = explain.Explainer(ov)
    assert ov.head is not None and ov.feature_layer == ov.card.target_layer == "relu"
    images = batch[:4]
    for c in range(ov.card.num_classes):
        _, heatmaps = explainer.gradcam(images, c)
        _, reference = explainer.compiled_gradcam(images, c)
        np.testing.assert_allclose(heatmaps, explain.normalize(reference, ov.input_size), atol=1e-5)
