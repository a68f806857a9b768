"""cxr_core.models: flat graphs for every architecture, save/load, decisions, cross-backend weights."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import DATA
from PIL import Image

from cxr_core import card, models, preprocess
from cxr_core.errors import ModelCardError

REPO = Path(__file__).resolve().parents[1]
SIZES = {"inceptionv3": 75}

# What each backbone's ImageNet weights expect; the model's "input_scaling" layer must do the same.
REFERENCE_PREPROCESS = {
    "densenet169": keras.applications.densenet.preprocess_input,
    "densenet121": keras.applications.densenet.preprocess_input,
    "resnet50": keras.applications.resnet50.preprocess_input,
    "vgg16": keras.applications.vgg16.preprocess_input,
    "inceptionv3": keras.applications.inception_v3.preprocess_input,
    "tiny": lambda x: x / 255.0,
}


@pytest.mark.parametrize("architecture", sorted(models.ARCHITECTURES))
def test_every_architecture_builds_flat(architecture):
    size = SIZES.get(architecture, 32)
    model = models.build(architecture, 3, size)
    assert not [layer.name for layer in model.layers if isinstance(layer, keras.Model)]  # no nested backbone
    assert model.input.shape == (None, size, size, 3) and model.inputs[0].name == "image"
    target = model.get_layer(models.ARCHITECTURES[architecture].target_layer)
    assert len(target.output.shape) == 4 and target.output.shape[-1] >= 16
    # The head's average pool reads the target layer: CAM from the forward pass and the familiarity model (fitted
    # on the pooled features by every training run) need that, or a trained model cannot be loaded (VGG16 was).
    head = models.head_weights(model, target.name)
    assert head is not None and head.shape == (target.output.shape[-1], 3)
    # Grad-CAM needs the feature map and the logits from one graph; a nested backbone fails here.
    grad_model = keras.Model(model.input, [target.output, model.output])
    logits_layer = model.get_layer("logits")
    assert model.output is logits_layer.output
    assert logits_layer.units == 3 and logits_layer.activation is keras.activations.linear
    x = np.stack([np.zeros((size, size, 3)), np.full((size, size, 3), 255.0)]).astype(np.float32)
    features, logits = grad_model(x, training=False)
    assert tuple(logits.shape) == (2, 3) and tuple(features.shape)[0] == 2
    assert np.all(np.isfinite(np.asarray(logits)))
    # Scaling lives inside the model and matches the backbone's own preprocess_input.
    grey = np.stack([np.linspace(0, 255, size * size).reshape(size, size)] * 3, axis=-1)[None].astype(np.float32)
    scaled = np.asarray(model.get_layer("input_scaling")(grey))
    reference = np.asarray(REFERENCE_PREPROCESS[architecture](grey.copy()))
    np.testing.assert_allclose(scaled, reference, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(architecture="densenet201", num_classes=2, input_size=64), "unknown architecture"),
        (dict(architecture="tiny", num_classes=1, input_size=64), "num_classes"),
        (dict(architecture="tiny", num_classes=2, input_size=8), "input_size >= 16"),
        (dict(architecture="inceptionv3", num_classes=2, input_size=74), "input_size >= 75"),
        (dict(architecture="tiny", num_classes=2, input_size=32, weights="imagenet"), "no pretrained weights"),
    ],
    ids=["architecture", "num-classes", "size", "inception-size", "tiny-weights"],
)
def test_bad_build_arguments_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        models.build(**kwargs)


def _tiny_card(name: str = "t", classes=("NORMAL", "PNEUMONIA"), size: int = 32, **kw) -> card.ModelCard:
    return card.ModelCard(name=name, architecture="tiny", input_size=size, class_names=list(classes),
                          target_layer="relu", **kw)


def _perturbed_tiny(num_classes: int, size: int, seed: int) -> keras.Model:
    """A tiny model whose every variable (BatchNorm statistics included) is drawn from numpy's ``seed``.

    Not keras.utils.set_random_seed: under JAX it imports TensorFlow, which would hide the check below.
    """
    model = models.build("tiny", num_classes, size)
    rng = np.random.default_rng(seed)
    for var in model.weights:
        shape = tuple(var.shape)
        value = rng.uniform(0.5, 1.5, shape) if "moving_variance" in var.path else rng.normal(0, 0.3, shape)
        var.assign(value.astype(np.float32))
    return model


def _fixed_input(size: int, n: int = 3) -> np.ndarray:
    return (np.arange(n * size * size * 3).reshape(n, size, size, 3) * 37 % 256).astype(np.float32)


def test_save_and_load_give_identical_logits(tmp_path):
    model = _perturbed_tiny(3, 32, seed=3)
    c = _tiny_card(classes=("NORMAL", "PNEUMONIA", "COVID-19"), recipe={"dropout": 0.5})
    models.save(model, c, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {card.CARD_FILE, card.WEIGHTS_FILE}
    loaded = models.load(tmp_path)
    x = _fixed_input(32)
    expected = np.asarray(model.predict_on_batch(x))
    assert np.abs(expected).max() > 0.1  # non-trivial logits, so equality means something
    np.testing.assert_allclose(loaded.logits(x), expected, atol=1e-6)
    assert loaded.card.weights_sha256 == card.sha256_of(tmp_path / card.WEIGHTS_FILE)
    assert loaded.model.get_layer("head_dropout").rate == 0.5  # the recipe's dropout is rebuilt


def test_weights_that_do_not_fit_the_card(tmp_path):
    models.save(_perturbed_tiny(2, 32, seed=1), _tiny_card(), tmp_path)
    # A card written again consistently (card.save: weights hash still right, its own hash too) for
    # other weights: the shapes are wrong.
    edited = dataclasses.replace(card.read(tmp_path), class_names=["NORMAL", "PNEUMONIA", "COVID-19"])
    card.save(edited, tmp_path)
    with pytest.raises(ModelCardError, match="do not fit the model"):
        models.load(tmp_path)
    card.save(dataclasses.replace(edited, architecture="alexnet"), tmp_path)
    with pytest.raises(ModelCardError, match="cannot be built"):
        models.load(tmp_path)
    # A recipe value of another type (a list for the dropout rate): the same clear refusal, not a TypeError.
    card.save(dataclasses.replace(edited, class_names=["NORMAL", "PNEUMONIA"], recipe={"dropout": [0.2]}), tmp_path)
    with pytest.raises(ModelCardError, match="cannot be built"):
        models.load(tmp_path, engine="tensorflow")


def test_softmax_with_temperature():
    logits = np.array([[0.0, np.log(3.0)], [2.0, 0.0], [1000.0, 0.0]])
    p1 = models.softmax(logits)
    np.testing.assert_allclose(p1[0], [0.25, 0.75])
    np.testing.assert_allclose(p1[2], [1.0, 0.0])  # large logits stay finite
    p2 = models.softmax(logits, 2.0)
    np.testing.assert_allclose(p2[0], [1 / (1 + np.sqrt(3)), np.sqrt(3) / (1 + np.sqrt(3))])
    np.testing.assert_allclose(p2[1], models.softmax(np.array([1.0, 0.0])))
    np.testing.assert_allclose(p2.sum(axis=1), 1.0)
    assert np.all(p2[:2].max(axis=1) < p1[:2].max(axis=1))  # T = 2 flattens


CARD3 = _tiny_card(classes=("NORMAL", "PNEUMONIA", "COVID-19"), negative_class="NORMAL",
                   thresholds={"PNEUMONIA": 0.3, "COVID-19": 0.4}, low_confidence=0.6)


@pytest.mark.parametrize(
    ("probs", "decision", "top", "positive", "low"),
    [
        ((0.5, 0.35, 0.15), "PNEUMONIA", "NORMAL", True, True),  # below the top class, above its threshold
        ((0.2, 0.35, 0.45), "COVID-19", "COVID-19", True, True),  # both reach: the more probable is called
        ((0.62, 0.25, 0.13), "NORMAL", "NORMAL", False, False),  # none reaches: the negative class
        ((0.4, 0.3, 0.3), "PNEUMONIA", "NORMAL", True, True),  # thresholds are inclusive
        ((0.05, 0.55, 0.4), "PNEUMONIA", "PNEUMONIA", True, True),
        ((0.1, 0.2, 0.7), "COVID-19", "COVID-19", True, False),
    ],
)
def test_decide_with_thresholds(probs, decision, top, positive, low):
    pred = models.decide(CARD3, probs)
    assert (pred.decision, pred.top_class, pred.positive, pred.low_confidence) == (decision, top, positive, low)
    assert pred.top_probability == max(probs) and pred.probabilities == probs
    assert pred.as_dict() == dict(zip(CARD3.class_names, probs, strict=True))


def test_decide_without_thresholds_or_negative_class():
    plain = _tiny_card(classes=("NORMAL", "PNEUMONIA", "COVID-19"))
    pred = models.decide(plain, [0.2, 0.5, 0.3])
    assert (pred.decision, pred.positive, pred.low_confidence) == ("PNEUMONIA", False, True)
    with_negative = dataclasses.replace(plain, negative_class="NORMAL")
    assert models.decide(with_negative, [0.2, 0.7, 0.1]).positive is True
    assert models.decide(with_negative, [0.7, 0.2, 0.1]).positive is False
    # Thresholds without a negative class: nothing reaches -> the top class.
    no_negative = dataclasses.replace(plain, thresholds={"COVID-19": 0.9})
    assert models.decide(no_negative, [0.2, 0.5, 0.3]).decision == "PNEUMONIA"


def _real_pixels() -> list[np.ndarray]:
    paths = [DATA / "kermany/train/NORMAL/IM-0115-0001.jpeg", DATA / "covid19_image_dataset/train/Covid/01.jpeg"]
    out = []
    for path in paths:
        with Image.open(path) as im:
            out.append(np.asarray(im.convert("L"), dtype=np.float32) / 255.0)
    return out


def test_classifier_predictions_follow_the_card(tiny_model3_dir, data_dir):
    clf = models.load(tiny_model3_dir)
    pixels = _real_pixels()
    assert pixels[0].shape != pixels[1].shape
    batch = preprocess.to_batch([preprocess.prepare(p, clf.input_size) for p in pixels])
    assert clf.predict_pixels(pixels) == clf.predict(batch)
    logits = clf.logits(batch)
    assert logits.shape == (2, 3) and np.abs(logits).max() > 0.01
    np.testing.assert_allclose(clf.probabilities(batch), models.softmax(logits, clf.card.temperature))
    assert clf.predict(batch) == [models.decide(clf.card, p) for p in models.softmax(logits)]
    hot = models.Classifier(dataclasses.replace(clf.card, temperature=2.0), clf.model)
    np.testing.assert_allclose(hot.probabilities(batch), models.softmax(logits / 2.0), atol=1e-12)


_JAX_SCRIPT = """
import json, sys
import keras, numpy as np
from cxr_core import card, metrics, models, preprocess
sys.path.insert(0, "tests")
from test_models import _fixed_input, _perturbed_tiny, _tiny_card
model = _perturbed_tiny(2, 32, seed=11)
models.save(model, _tiny_card(name="made-under-jax"), sys.argv[1])
logits = np.asarray(model.predict_on_batch(_fixed_input(32))).tolist()
print(json.dumps({"backend": keras.backend.backend(), "tensorflow": "tensorflow" in sys.modules, "logits": logits}))
"""


def test_weights_written_under_jax_load_under_tensorflow(tmp_path):
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", _JAX_SCRIPT, str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    made = json.loads(done.stdout.strip().splitlines()[-1])
    assert made["backend"] == "jax"
    assert made["tensorflow"] is False  # card, models, preprocess and metrics train without TensorFlow
    assert keras.backend.backend() == "tensorflow"
    loaded = models.load(tmp_path)
    assert loaded.card.name == "made-under-jax"
    expected = np.array(made["logits"])
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(loaded.logits(_fixed_input(32)), expected, atol=1e-5)


def test_non_finite_probabilities_are_no_result():
    """A broken model's NaN output used to read as a confident NORMAL (NaN < 0.6 is False), then as a low-confidence
    NORMAL (argmax of NaN is the first class, no threshold is reached): it is no decision at all."""
    for probs in [(float("nan"),) * 3, (0.2, float("inf"), 0.1)]:
        with pytest.raises(ValueError, match="not a number .* no decision can be made"):
            models.decide(CARD3, probs)
    assert models.decide(CARD3, (0.2, 0.5, 0.3)).decision in CARD3.class_names
