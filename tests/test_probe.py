"""cxr_core.probe: occlusion sensitivity, perturbations and the confident-error gallery."""

from __future__ import annotations

import keras
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxr_core import card as card_lib
from cxr_core import models, preprocess, probe

SIZE = 64


@pytest.fixture(scope="module")
def xray(data_dir) -> np.ndarray:
    """A real radiograph as float32 HxW in [0, 1] (read with PIL to keep this test independent of imaging)."""
    path = sorted((data_dir / "kermany" / "train" / "NORMAL").glob("*.jpeg"))[0]
    return np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0


@pytest.fixture(scope="module")
def left_half_classifier() -> models.Classifier:
    """A two-class model whose logits depend only on the left half (columns 0..31) of its 64 px input."""
    keras.utils.set_random_seed(7)
    inputs = keras.Input((SIZE, SIZE, 3), name="image")
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Cropping2D(((0, 0), (0, SIZE // 2)))(x)
    x = keras.layers.Flatten()(x)
    logits = keras.layers.Dense(2, name="logits", kernel_initializer=keras.initializers.RandomNormal(0, 0.05))(x)
    card = card_lib.ModelCard(name="left", architecture="tiny", input_size=SIZE, class_names=["A", "B"],
                              target_layer="relu")
    return models.Classifier(card, keras.Model(inputs, logits))


def test_flip_twice_is_identity(xray):
    once = probe.perturb(xray, "flip", 1)
    assert not np.array_equal(once, xray)
    np.testing.assert_array_equal(once[:, 0], xray[:, -1])
    np.testing.assert_array_equal(probe.perturb(once, "flip", 1), xray)


def test_rotate_90_matches_numpy_and_zero_is_identity():
    img = np.random.default_rng(0).random((32, 32), dtype=np.float32)
    np.testing.assert_allclose(probe.perturb(img, "rotate", 90), np.rot90(img), atol=1e-5)
    np.testing.assert_allclose(probe.perturb(img, "rotate", 0), img, atol=1e-6)


def test_contrast_scales_about_the_mean():
    img = np.linspace(0.3, 0.7, 100, dtype=np.float32).reshape(10, 10)
    np.testing.assert_allclose(probe.perturb(img, "contrast", 1.0), img, atol=1e-6)
    np.testing.assert_allclose(probe.perturb(img, "contrast", 0.0), np.full_like(img, 0.5), atol=1e-6)
    doubled = probe.perturb(img, "contrast", 2.0)
    np.testing.assert_allclose(doubled.std(), 2 * img.std(), rtol=1e-4)
    assert doubled.min() == pytest.approx(0.1, abs=1e-5) and doubled.max() == pytest.approx(0.9, abs=1e-5)


def test_blur_smooths_and_keeps_the_mean(xray):
    blurred = probe.perturb(xray, "blur", 0.02)
    assert blurred.shape == xray.shape and blurred.dtype == np.float32
    assert np.abs(np.diff(blurred, axis=1)).mean() < 0.5 * np.abs(np.diff(xray, axis=1)).mean()
    assert blurred.mean() == pytest.approx(xray.mean(), abs=0.01)
    np.testing.assert_array_equal(probe.perturb(xray, "blur", 0.0), xray)


def test_noise_is_reproducible_with_a_seed():
    img = np.full((200, 200), 0.5, np.float32)
    a, b = probe.perturb(img, "noise", 0.05, seed=3), probe.perturb(img, "noise", 0.05, seed=3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, probe.perturb(img, "noise", 0.05, seed=4))
    assert (a - img).std() == pytest.approx(0.05, rel=0.05)
    assert a.min() >= 0.0 and a.max() <= 1.0


def test_unknown_perturbation_is_refused(xray):
    with pytest.raises(ValueError, match="unknown perturbation 'sharpen'"):
        probe.perturb(xray, "sharpen", 1.0)


def test_occlusion_of_a_left_half_model_is_zero_on_the_right(left_half_classifier, xray):
    img = preprocess.prepare(xray, SIZE)
    heat = probe.occlusion(left_half_classifier, img, class_index=1, patch=8, stride=4)
    assert heat.shape == (SIZE, SIZE) and heat.dtype == np.float32
    # Patches starting at column >= 32 never touch what the model sees; the last straddling patch ends at 35.
    # (atol: a batch of 32 and a batch of 1 round float32 differently.)
    np.testing.assert_allclose(heat[:, 36:], 0.0, atol=1e-5)
    assert np.abs(heat[:, :32]).max() > 1e-3


def test_occlusion_value_is_the_probability_drop(left_half_classifier, xray):
    img = preprocess.prepare(xray, SIZE)
    heat = probe.occlusion(left_half_classifier, img, class_index=0, patch=16, stride=16, fill=0)
    base = left_half_classifier.probabilities(preprocess.to_batch(img))[0, 0]
    occluded = img.copy()
    occluded[16:32, 0:16] = 0
    expected = base - left_half_classifier.probabilities(preprocess.to_batch(occluded))[0, 0]
    np.testing.assert_allclose(heat[16:32, 0:16], expected, atol=1e-6)


def test_perturbation_table_matches_direct_predictions(tiny_model_dir, xray):
    classifier = models.load(tiny_model_dir)
    kinds = (("flip", 1.0), ("noise", 0.05))
    rows = probe.perturbation_table(classifier, xray, kinds, seed=1)
    assert [r["kind"] for r in rows] == ["original", "flip", "noise"]
    direct = classifier.predict_pixels([xray, probe.perturb(xray, "flip", 1), probe.perturb(xray, "noise", 0.05, 1)])
    for row, pred in zip(rows, direct, strict=True):
        assert row["NORMAL"] == pytest.approx(pred.probabilities[0], abs=1e-6)
        assert row["PNEUMONIA"] == pytest.approx(pred.probabilities[1], abs=1e-6)
        assert row["decision"] == pred.decision
    top = int(np.argmax(direct[0].probabilities))
    assert rows[0]["change"] == 0.0
    assert rows[1]["change"] == pytest.approx(direct[1].probabilities[top] - direct[0].probabilities[top], abs=1e-9)


def test_confident_errors_picks_wrong_test_rows_by_confidence(tmp_path):
    df = pd.DataFrame({
        "path": ["a", "b", "c", "d", "e", "f"],
        "true_class": ["NORMAL", "PNEUMONIA", "NORMAL", "PNEUMONIA", "NORMAL", "NORMAL"],
        "p_NORMAL": [0.2, 0.7, 0.9, 0.4, 0.05, 0.1],
        "p_PNEUMONIA": [0.8, 0.3, 0.1, 0.6, 0.95, 0.9],
        "predicted_class": ["PNEUMONIA", "NORMAL", "NORMAL", "PNEUMONIA", "PNEUMONIA", "PNEUMONIA"],
        "split": ["test", "test", "test", "test", "train", "test"],
    })
    errors = probe.confident_errors(df, ["NORMAL", "PNEUMONIA"], k=8)
    assert errors["path"].tolist() == ["f", "a", "b"]
    np.testing.assert_allclose(errors["confidence"], [0.9, 0.8, 0.7])
    assert probe.confident_errors(df, ["NORMAL", "PNEUMONIA"], k=1)["path"].tolist() == ["f"]
    assert probe.confident_errors(df, ["NORMAL", "PNEUMONIA"], split=None)["path"].tolist()[:2] == ["e", "f"]
    assert probe.confident_errors(df[df["path"] == "c"], ["NORMAL", "PNEUMONIA"]).empty
    # Called PNEUMONIA at a low threshold while NORMAL (the truth) was the more probable: its confidence is the
    # called class's 0.3, not the true class's 0.7, so it ranks last.
    # Class names that look like numbers (folders 0 and 1) come back from the CSV as integers.
    from cxr_core import csvsafe

    numbered = df.assign(true_class=df["true_class"].map({"NORMAL": "0", "PNEUMONIA": "1"}),
                         predicted_class=df["predicted_class"].map({"NORMAL": "0", "PNEUMONIA": "1"}))
    numbered.columns = [{"p_NORMAL": "p_0", "p_PNEUMONIA": "p_1"}.get(c, c) for c in numbered.columns]
    csvsafe.to_csv(numbered, tmp_path / "predictions.csv", index=False)
    read_back = csvsafe.read_csv(tmp_path / "predictions.csv")
    assert read_back["true_class"].dtype.kind == "i"  # what made the gallery empty
    assert probe.confident_errors(read_back, ["0", "1"], k=8)["path"].tolist() == ["f", "a", "b"]
    low = df.assign(predicted_class=["PNEUMONIA", "PNEUMONIA", "NORMAL", "PNEUMONIA", "PNEUMONIA", "PNEUMONIA"])
    low.loc[1, "true_class"] = "NORMAL"
    errors = probe.confident_errors(low, ["NORMAL", "PNEUMONIA"])
    assert errors["path"].tolist() == ["f", "a", "b"]
    np.testing.assert_allclose(errors["confidence"], [0.9, 0.8, 0.3])


def test_occlusion_heatmap_keeps_drops_scaled_to_one():
    heat = probe.occlusion_heatmap(np.array([[0.2, -0.1], [0.05, 0.0]], np.float32))
    np.testing.assert_allclose(heat, [[1.0, 0.0], [0.25, 0.0]])
    np.testing.assert_array_equal(probe.occlusion_heatmap(np.full((2, 2), -0.3)), 0.0)
