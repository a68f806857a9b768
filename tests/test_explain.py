"""cxr_core.explain: compiled Grad-CAM against tf-keras-vis, every method, layers and validation."""

from __future__ import annotations

import threading

import keras
import numpy as np
import pytest

from cxr_core import card, explain, models

SIZE = 64


def _perturb(model: keras.Model, seed: int, scale: float) -> None:
    """Move every variable off its initial value so BatchNorm and biases matter."""
    rng = np.random.default_rng(seed)
    for var in model.weights:
        value = np.asarray(var.numpy())
        if "moving_variance" in var.path:
            value = value * rng.uniform(0.5, 1.5, value.shape)
        else:
            value = value + rng.normal(0, scale, value.shape)
        var.assign(value.astype(value.dtype))


def _classifier(architecture: str, classes: list[str], seed: int) -> models.Classifier:
    keras.utils.set_random_seed(seed)
    model = models.build(architecture, len(classes), SIZE)
    _perturb(model, seed, 0.05)
    c = card.ModelCard(name=f"test-{architecture}", architecture=architecture, input_size=SIZE, class_names=classes,
                       target_layer=models.ARCHITECTURES[architecture].target_layer, negative_class=classes[0])
    return models.Classifier(c, model)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir) -> explain.Explainer:
    return explain.Explainer(models.load(tiny_model_dir))


@pytest.fixture(scope="module")
def tiny3(tiny_model3_dir) -> explain.Explainer:
    return explain.Explainer(models.load(tiny_model3_dir))


@pytest.fixture(scope="module")
def densenet() -> explain.Explainer:
    """A real DenseNet121 graph at 64 px with perturbed random weights."""
    return explain.Explainer(_classifier("densenet121", ["NORMAL", "PNEUMONIA"], seed=3))


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Four noisy bright-blob inputs, float32 (4, 64, 64, 3) in [0, 255]."""
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    out = []
    for _ in range(4):
        cy, cx = rng.uniform(0.2, 0.8, 2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.02)
        gray = np.clip(0.3 + 0.6 * blob + rng.normal(0, 0.25, blob.shape), 0, 1) * 255
        out.append(np.repeat(gray[..., None], 3, axis=-1))
    return np.asarray(out, dtype=np.float32)


@pytest.fixture(params=["tiny", "tiny3"])
def explainer(request) -> explain.Explainer:
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("n", [1, 4])
def test_gradcam_heatmaps_and_probabilities(explainer, images, n):
    batch = images[:n]
    probs, heatmaps = explainer.gradcam(batch)
    assert heatmaps.shape == (n, SIZE, SIZE) and heatmaps.dtype == np.float32
    assert heatmaps.min() >= 0.0 and heatmaps.max() <= 1.0
    assert np.allclose(heatmaps.max(axis=(1, 2)), 1.0)  # non-constant maps are stretched to [0, 1]
    np.testing.assert_allclose(probs, explainer.classifier.probabilities(batch), atol=1e-5)


def test_gradcam_probabilities_use_the_card_temperature(tiny_model_dir, images):
    classifier = models.load(tiny_model_dir)
    classifier.card.temperature = 2.5
    probs, _ = explain.Explainer(classifier).gradcam(images)
    logits = classifier.logits(images)
    np.testing.assert_allclose(probs, models.softmax(logits / 2.5), atol=1e-5)
    assert not np.allclose(probs, models.softmax(logits), atol=1e-3)


def test_gradcam_for_every_class_and_per_image_classes(tiny3, images):
    logits, _ = tiny3.raw_gradcam(images)
    maps = {c: tiny3.raw_gradcam(images, class_index=c)[1] for c in range(3)}
    assert not np.allclose(maps[0], maps[1]) and not np.allclose(maps[1], maps[2])
    # None means each image's own top class.
    top = np.argmax(logits, axis=1)
    _, default = tiny3.raw_gradcam(images)
    np.testing.assert_allclose(default, np.stack([maps[c][i] for i, c in enumerate(top)]), rtol=1e-5, atol=1e-6)
    # One class per image, and the batch result equals each image on its own.
    chosen = [2, 0, 1, 2]
    _, mixed = tiny3.raw_gradcam(images, class_index=chosen)
    for i, c in enumerate(chosen):
        np.testing.assert_allclose(mixed[i], maps[c][i], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(mixed[i], tiny3.raw_gradcam(images[i : i + 1], c)[1][0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("which", "layer"),
    [("tiny", "relu"), ("tiny", "tiny_relu0"),
     pytest.param("densenet", "relu", marks=pytest.mark.slow),
     pytest.param("densenet", "conv3_block12_concat", marks=pytest.mark.slow)],
)
def test_raw_gradcam_equals_tf_keras_vis(request, images, which, layer):
    from tf_keras_vis.gradcam import Gradcam
    from tf_keras_vis.utils.scores import CategoricalScore

    ex: explain.Explainer = request.getfixturevalue(which)
    classes = [1, 0, 1, 0]
    _, ours = ex.raw_gradcam(images, class_index=classes, layer=layer)
    # Like with like: both apply ReLU to the weighted sum (tf-keras-vis's default activation_modifier)
    # and neither resizes nor normalises. seek_penultimate_conv_layer=False keeps the named layer;
    # otherwise tf-keras-vis walks back to the last Conv2D (a bottleneck conv on DenseNet).
    theirs = Gradcam(ex.model, clone=True)(CategoricalScore(classes), images, penultimate_layer=layer,
                                           seek_penultimate_conv_layer=False, expand_cam=False, normalize_cam=False)
    theirs = np.asarray(theirs)
    assert ours.shape == theirs.shape == (4, *ex.model.get_layer(layer).output.shape[1:3])
    assert theirs.max() > 0 and np.count_nonzero(theirs) > theirs.size // 4  # a real, non-trivial map
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5 * float(np.abs(theirs).max()))
    # The same pass, post-processed: a heatmap at the input size whatever the layer's resolution.
    probs, heatmaps = ex.gradcam(images, class_index=classes, layer=layer)
    assert heatmaps.shape == (4, SIZE, SIZE) and heatmaps.min() == 0.0 and heatmaps.max() == 1.0
    np.testing.assert_allclose(probs, ex.classifier.probabilities(images), atol=1e-5)


def test_gradcam_is_traced_once(tiny3, images):
    tiny3.warm_up()
    tiny3.warm_up("tiny_relu0")
    for n, c in [(1, None), (4, 2), (2, 0), (3, [0, 1, 2])]:
        tiny3.gradcam(images[:n], class_index=c)
        tiny3.gradcam(images[:n], class_index=c, layer="tiny_relu0")
    # The target layer's Grad-CAM is CAM from the engine's forward pass: no TensorFlow graph at all.
    assert "relu" not in tiny3._gradcam_fns
    assert tiny3._gradcam_fn("tiny_relu0").experimental_get_tracing_count() == 1


def test_gradcam_from_many_threads_matches_one_thread(tiny, images):
    expected = tiny.gradcam(images)[1]
    results: list[np.ndarray] = []

    def work() -> None:
        results.append(tiny.gradcam(images)[1])

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4
    for r in results:
        np.testing.assert_allclose(r, expected, atol=1e-6)


@pytest.mark.parametrize("method", explain.METHODS)
@pytest.mark.parametrize("class_index", [None, 1])
def test_every_method_gives_a_unit_heatmap(tiny, images, method, class_index):
    result = tiny.explain(images[:1], method, class_index)
    assert result.heatmap.shape == (SIZE, SIZE) and result.heatmap.dtype == np.float32
    assert result.heatmap.min() == 0.0 and result.heatmap.max() == pytest.approx(1.0)
    assert result.heatmap.std() > 0.05
    top = int(np.argmax(tiny.classifier.logits(images[:1])[0]))
    assert result.class_index == (top if class_index is None else class_index)
    assert result.method == method
    assert result.layer == (None if method == "smoothgrad" else "relu")


@pytest.mark.parametrize("method", ["gradcam++", "layercam"])
@pytest.mark.parametrize("which", ["tiny", "tiny3", pytest.param("densenet", marks=pytest.mark.slow)])
def test_one_pass_gradcam_plus_plus_and_layercam_equal_tf_keras_vis(request, monkeypatch, images, which, method):
    """At the target layer of a GAP + Dense head both come from the forward pass, no tf-keras-vis call."""
    ex: explain.Explainer = request.getfixturevalue(which)
    cases = [(i, c) for i in range(len(images)) for c in range(ex.num_classes)]

    def no_tf_keras_vis(*args, **kwargs):
        raise AssertionError("tf-keras-vis called on the one-pass path")

    monkeypatch.setattr(ex, "tf_keras_vis", no_tf_keras_vis)
    ours = {(i, c): ex.explain(images[i : i + 1], method, c) for i, c in cases}
    monkeypatch.undo()
    for i, c in cases:
        assert (ours[i, c].method, ours[i, c].class_index, ours[i, c].layer) == (method, c, ex.target_layer)
        theirs = explain.normalize(ex.tf_keras_vis(images[i : i + 1], method, c, ex.target_layer), ex.size)[0]
        assert theirs.max() == pytest.approx(1.0) and np.count_nonzero(theirs) > theirs.size // 4
        np.testing.assert_allclose(ours[i, c].heatmap, theirs, atol=1e-4)
    # Not Grad-CAM: the negative weights are left out, so somewhere the maps differ visibly.
    differ = [np.abs(ours[k].heatmap - ex.explain(images[k[0] : k[0] + 1], "gradcam", k[1]).heatmap).max()
              for k in cases]
    assert max(differ) > 0.05


def test_other_layers_use_tf_keras_vis(tiny, images):
    ours = tiny.explain(images[:1], "gradcam++", 1, layer="tiny_relu0")
    theirs = explain.normalize(tiny.tf_keras_vis(images[:1], "gradcam++", 1, "tiny_relu0"), tiny.size)[0]
    np.testing.assert_array_equal(ours.heatmap, theirs)
    assert ours.layer == "tiny_relu0"


def test_gradcam_at_another_layer_explains_the_serving_engine_s_top_class(tiny_model3_dir, images, monkeypatch):
    """At a layer other than the card's, the map comes from TensorFlow's gradient and the prediction from the serving
    engine: where the two engines' top classes differ (bf16, two nearly tied classes) the map must be of the class
    the prediction names, not of TensorFlow's top class. Here the engine is made to disagree outright."""
    explainer = explain.Explainer(models.load(tiny_model3_dir))
    classifier = explainer.classifier
    batch = images[:2]
    tf_top = np.argmax(classifier.model.predict_on_batch(batch), axis=-1)
    engine_top = (tf_top + 1) % 3  # another class on top for each film

    def disagreeing(b):
        out = []
        for k in engine_top:
            probs = np.full(3, 0.1)
            probs[k] = 0.8
            out.append(models.decide(classifier.card, probs))
        return out

    monkeypatch.setattr(classifier, "predict", disagreeing)
    predictions, heatmaps = explainer.gradcam_predictions(batch, None, "tiny_relu0")
    assert [p.class_names.index(p.top_class) for p in predictions] == engine_top.tolist()
    for i, k in enumerate(engine_top):
        np.testing.assert_allclose(heatmaps[i], explainer.gradcam(batch[i:i + 1], int(k), "tiny_relu0")[1][0],
                                   atol=1e-6)
        assert np.abs(heatmaps[i] - explainer.gradcam(batch[i:i + 1], int(tf_top[i]), "tiny_relu0")[1][0]).max() > 1e-3


def test_explain_gradcam_equals_gradcam(tiny, images):
    _, heatmaps = tiny.gradcam(images[:1], class_index=1)
    np.testing.assert_array_equal(tiny.explain(images[:1], "gradcam", 1).heatmap, heatmaps[0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "gradcam+++"}, "gradcam\\+\\+\\+"),
        ({"layer": "no_such_layer"}, "no_such_layer"),
        ({"layer": "logits"}, "logits"),
        ({"class_index": 2}, "class_index 2"),
        ({"class_index": -1}, "class_index -1"),
        ({"class_index": 1.0}, "1.0"),
    ],
)
def test_bad_arguments_raise_value_error(tiny, images, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny.explain(images[:1], **{"method": "gradcam", **kwargs})
    if "method" not in kwargs:
        with pytest.raises(ValueError, match=message):
            tiny.gradcam(images, **kwargs)


def test_bad_batches_raise_value_error(tiny, images):
    with pytest.raises(ValueError, match="32, 32"):
        tiny.gradcam(images[:, :32, :32])
    with pytest.raises(ValueError, match="one image"):
        tiny.explain(images, "gradcam")
    with pytest.raises(ValueError, match="3 class indices"):
        tiny.gradcam(images, class_index=[0, 1, 0])


def test_tiny_layer_choices_and_intermediate_layer(tiny, images):
    assert tiny.layer_choices() == ["tiny_relu0", "relu"]
    result = tiny.explain(images[:1], "layercam", layer="tiny_relu0")
    assert result.heatmap.shape == (SIZE, SIZE) and result.layer == "tiny_relu0"


@pytest.mark.slow
def test_densenet169_layer_choices():
    model = models.build("densenet169", 2, SIZE)
    c = card.ModelCard(name="dn169", architecture="densenet169", input_size=SIZE, class_names=["A", "B"],
                       target_layer="relu")
    choices = explain.Explainer(models.Classifier(c, model)).layer_choices()
    # DenseNet169's blocks have 6, 12, 32 and 32 layers; each block ends in a concatenation.
    assert choices == ["conv2_block6_concat", "conv3_block12_concat", "conv4_block32_concat",
                       "conv5_block32_concat", "relu"]
    assert [model.get_layer(n).output.shape[1] for n in choices] == [16, 8, 4, 2, 2]


def test_normalize_resizes_and_stretches():
    maps = np.array([[[0.0, 2.0], [4.0, 8.0]], [[3.0, 3.0], [3.0, 3.0]]], np.float32)
    out = explain.normalize(maps, 4)
    assert out.shape == (2, 4, 4) and out.dtype == np.float32
    assert out[0].min() == 0.0 and out[0].max() == 1.0
    assert out[0, 0, 0] == 0.0 and out[0, 3, 3] == 1.0
    np.testing.assert_array_equal(out[1], 0.0)  # a flat map carries no location: all zeros
    # An overflowed map (NaN or inf) was turned into that same blank map, or into NaN: it is an error instead.
    for bad in (np.nan, np.inf):
        broken = maps.copy()
        broken[0, 0, 0] = bad
        with pytest.raises(ValueError, match="non-finite values"):
            explain.normalize(broken, 4)
