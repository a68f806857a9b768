"""cxr_core.engine: the engine choice, OpenVINO == TensorFlow on one forward pass, CAM == Grad-CAM, fallbacks."""

from __future__ import annotations

import dataclasses
import shutil

import keras
import numpy as np
import pytest

from cxr_core import card, engine, explain, models, ov_graph
from cxr_core.errors import ModelCardError

SIZE = 64


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Four random model inputs, float32 (4, 64, 64, 3) in [0, 255]."""
    return np.random.default_rng(5).uniform(0, 255, (4, SIZE, SIZE, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def pair(tiny_model3_dir) -> tuple[models.Classifier, models.Classifier]:
    """The three-class tiny model on OpenVINO (the default here) and on TensorFlow."""
    ov = models.load(tiny_model3_dir)
    return ov, models.Classifier(ov.card, ov.model, engine="tensorflow")


def test_openvino_is_the_default_where_installed_and_runs_f32(pair):
    ov, tf = pair
    assert engine.openvino_available()
    assert (ov.engine, ov.precision, tf.engine, tf.precision) == ("openvino", "f32", "tensorflow", "f32")
    assert ov.engine_label.startswith("OpenVINO 20") and ov.engine_label.endswith("· f32")
    assert tf.engine_label.startswith("TensorFlow 2.")


def test_one_forward_pass_gives_the_same_logits_and_features_on_both_engines(pair, images):
    ov, tf = pair
    ov_logits, ov_features = ov.forward(images)
    tf_logits, tf_features = tf.forward(images)
    reference = keras.Model(ov.model.inputs, [ov.model.output, ov.model.get_layer("relu").output])
    ref_logits, ref_features = (np.asarray(a) for a in reference(images, training=False))
    assert ov_logits.dtype == np.float64 and ov_features.dtype == np.float32
    assert ov_logits.shape == (4, 3) and ov_features.shape == ref_features.shape == (4, 16, 16, 16)
    np.testing.assert_allclose(tf_logits, ref_logits, atol=1e-6)
    np.testing.assert_allclose(ov_logits, ref_logits, atol=1e-5)
    np.testing.assert_allclose(ov_features, ref_features, atol=1e-5)
    np.testing.assert_allclose(ov.probabilities(images), tf.probabilities(images), atol=1e-6)
    # The features' spatial mean is the pooled penultimate vector (what the familiarity check reads).
    pooled = keras.Model(ov.model.inputs, ov.model.get_layer("avg_pool").output)(images, training=False)
    np.testing.assert_allclose(ov_features.mean(axis=(1, 2)), np.asarray(pooled), atol=1e-5)


@pytest.mark.parametrize("which", ["openvino", "tensorflow"])
def test_gradcam_from_the_forward_pass_equals_compiled_gradcam_for_every_class(pair, images, which):
    classifier = pair[0] if which == "openvino" else pair[1]
    assert classifier.head is not None and classifier.head.shape == (16, 3)
    explainer = explain.Explainer(classifier)
    non_trivial = 0
    for c in [None, 0, 1, 2]:
        logits, maps = explainer.raw_gradcam(images, c)
        ref_logits, ref_maps = explainer.compiled_gradcam(images, c)
        assert maps.shape == (4, 16, 16)
        non_trivial += int((ref_maps.max(axis=(1, 2)) > 0).sum())
        np.testing.assert_allclose(logits, ref_logits, atol=1e-5)
        np.testing.assert_allclose(maps, ref_maps, atol=1e-5 * max(float(ref_maps.max()), 1e-3))
        np.testing.assert_allclose(explain.normalize(maps, SIZE), explain.normalize(ref_maps, SIZE), atol=1e-5)
    assert non_trivial >= 8  # most maps are not all zero (a class the image argues against can be)
    # Per-image classes too, and the top class when None.
    _, mixed = explainer.raw_gradcam(images, [2, 0, 1, 0])
    np.testing.assert_allclose(mixed, explainer.compiled_gradcam(images, [2, 0, 1, 0])[1], atol=1e-5 * mixed.max())


def _other_head_classifier(kind: str) -> models.Classifier:
    """A two-class model with a ``relu`` feature map but a head that is not GAP + linear Dense."""
    keras.utils.set_random_seed(11)
    inputs = keras.Input((SIZE, SIZE, 3), name="image")
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(8, 3, strides=4, padding="same")(x)
    features = keras.layers.Activation("relu", name="relu")(x)
    if kind == "max":
        x = keras.layers.GlobalMaxPooling2D()(features)
    elif kind == "hidden":
        x = keras.layers.Dense(6, activation="relu")(keras.layers.GlobalAveragePooling2D()(features))
    else:
        x = keras.layers.Flatten()(features)
    logits = keras.layers.Dense(2, name="logits")(x)
    c = card.ModelCard(name=f"head-{kind}", architecture="tiny", input_size=SIZE, class_names=["A", "B"],
                       target_layer="relu")
    return models.Classifier(c, keras.Model(inputs, logits))


@pytest.mark.parametrize("kind", ["max", "hidden", "flatten"])
def test_another_head_falls_back_to_compiled_gradcam(kind, images):
    classifier = _other_head_classifier(kind)
    assert classifier.head is None and classifier.engine == "openvino"  # the engine still predicts
    if kind != "hidden":  # layers the graph writer does not know: ov.convert_model converted the model
        with pytest.raises(ov_graph.Unsupported, match="GlobalMaxPooling2D|Flatten"):
            ov_graph.write(classifier.model, "relu")
    explainer = explain.Explainer(classifier)
    _, maps = explainer.raw_gradcam(images, 1)
    assert "relu" in explainer._gradcam_fns  # TensorFlow's gradient made the map
    ref_logits, ref_maps = explainer.compiled_gradcam(images, 1)
    np.testing.assert_array_equal(maps, ref_maps)
    assert ref_maps.max() > 0
    np.testing.assert_allclose(classifier.logits(images), ref_logits, atol=1e-5)


def test_choose_reads_the_environment_and_rejects_unknown_names(monkeypatch):
    monkeypatch.setenv("CXR_ENGINE", "tensorflow")
    monkeypatch.setenv("CXR_PRECISION", "bf16")
    assert engine.choose() == engine.Choice("tensorflow", "f32", "bf16 runs on OpenVINO only; using f32")
    assert engine.choose("openvino", "f32") == engine.Choice("openvino", "f32")
    bf16 = engine.bf16_supported()
    assert engine.choose("openvino").precision == ("bf16" if bf16 else "f32")
    assert engine.choose("openvino", "auto") == engine.Choice("openvino", "bf16" if bf16 else "f32")
    monkeypatch.delenv("CXR_ENGINE")
    monkeypatch.delenv("CXR_PRECISION")
    assert engine.choose() == engine.Choice("openvino", "f32")
    with pytest.raises(ValueError, match="unknown engine 'onnx'"):
        engine.choose("onnx")
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        engine.choose(None, "fp8")


def test_bf16_runs_where_the_cpu_supports_it(tiny_model3_dir, images, pair):
    bf16 = models.load(tiny_model3_dir, engine="openvino", precision="bf16")
    assert bf16.precision == ("bf16" if engine.bf16_supported() else "f32")
    assert bf16.engine_label.endswith(f"· {bf16.precision}")
    np.testing.assert_allclose(bf16.probabilities(images), pair[1].probabilities(images), atol=0.05)


def test_bf16_is_the_default_only_for_a_model_whose_agreement_is_on_record(tiny_model3_dir, tmp_path, monkeypatch):
    """Issue 14: bf16 where the CPU supports it, unless it missed the bounds. A card that records bf16 agreement
    within the bounds for its own weights and decision rule defaults to ``auto`` (bf16 on a BF16 CPU); no record, a
    record that missed, or a card rescored since (another rule) stays at f32; the argument and env win. (This CPU
    is taken to be an AVX-512 BF16 one; the records are measured on such a CPU.)"""
    from benchmarks import engine_agreement

    folder = tmp_path / "m"
    shutil.copytree(tiny_model3_dir, folder)
    monkeypatch.delenv("CXR_PRECISION", raising=False)
    monkeypatch.setattr(engine, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_bf16"}))
    cpu = {"flags": ["avx2", "avx512f", "avx512_bf16"]}
    real_record = engine_agreement.record
    monkeypatch.setattr(engine_agreement, "record", lambda f, figures, c=cpu: real_record(f, figures, c))
    asked: list[str | None] = []
    choose = engine.choose
    monkeypatch.setattr(engine, "choose", lambda e=None, p=None: asked.append(p) or choose(e, p))

    def default() -> str:
        asked.clear()
        models.load(folder)
        return asked[0]

    assert default() == "f32" and engine.default_precision(None, card.read(folder)) == "f32"
    figures = {"n": 100, "openvino_f32": {"auc": 0.9}, "openvino_bf16": {
        "precision": "bf16", "decisions_equal": 0.996, "single_film_decisions_equal": 0.998,
        "familiarity_flags_equal": 1.0, "auc": 0.8995,
        "auc_minus_f32": -0.0005, "max_abs_diff_vs_tensorflow": 0.01}}
    assert engine_agreement.record(folder, figures)["passes"] is True
    assert engine.bf16_verified(card.read(folder)) and default() == "auto"
    monkeypatch.setattr(engine, "bf16_supported", lambda: True)
    assert choose("openvino", "auto") == engine.Choice("openvino", "bf16")
    monkeypatch.setenv("CXR_PRECISION", "f32")  # the operator's override wins
    assert default() == "f32"
    monkeypatch.delenv("CXR_PRECISION")
    assert engine.default_precision("f32", card.read(folder)) == "f32"
    rescored = card.read(folder)  # new thresholds: the record was of another rule
    rescored.thresholds = {"COVID-19": 0.5}
    card.save(rescored, folder)
    assert not engine.bf16_verified(card.read(folder)) and default() == "f32"
    monkeypatch.setenv("CXR_PRECISION", "auto")  # the default spelt out is checked the same: no bf16 unverified
    assert default() == "f32" and engine.default_precision("auto", card.read(folder)) == "f32"
    monkeypatch.delenv("CXR_PRECISION")
    missed = {**figures, "openvino_bf16": {**figures["openvino_bf16"], "decisions_equal": 0.99}}
    assert engine_agreement.record(folder, missed)["passes"] is False and default() == "f32"
    alone = {**figures, "openvino_bf16": {**figures["openvino_bf16"], "single_film_decisions_equal": 0.99}}
    assert engine_agreement.record(folder, alone)["passes"] is False and default() == "f32"  # the Classify path
    flags_moved = {**figures, "openvino_bf16": {**figures["openvino_bf16"], "familiarity_flags_equal": 0.99}}
    assert engine_agreement.record(folder, flags_moved)["passes"] is False and default() == "f32"
    assert engine_agreement.record(folder, figures)["passes"] is True and default() == "auto"
    monkeypatch.setitem(engine.BF16_BOUNDS, "decisions_equal", 0.999)  # tightened since the record was written
    assert not engine.bf16_verified(card.read(folder)) and default() == "f32"
    monkeypatch.setitem(engine.BF16_BOUNDS, "decisions_equal", 0.995)
    negative = card.read(folder)  # another negative class is another decision rule
    negative.negative_class = "COVID-19"
    card.save(negative, folder)
    assert default() == "f32"
    with pytest.raises(ValueError, match="no bf16 figures"):
        engine_agreement.record(folder, {**figures, "openvino_bf16": {**figures["openvino_bf16"], "precision": "f32"}})


def test_a_bf16_record_counts_only_on_the_kind_of_cpu_it_was_measured_on(tiny_model3_dir, tmp_path, monkeypatch):
    """AMX and AVX-512 BF16 kernels sum in another order: an agreement measured on one kind of CPU does not make bf16
    the default on the other. Each kind keeps its own record (recording on one leaves the other's), a CPU of the
    other kind (or with neither listed) serves f32, and on a BF16 CPU the sidebar's note says why."""
    from benchmarks import engine_agreement

    folder = tmp_path / "m"
    shutil.copytree(tiny_model3_dir, folder)
    monkeypatch.delenv("CXR_PRECISION", raising=False)
    figures = {"n": 100, "openvino_f32": {"auc": 0.9}, "openvino_bf16": {
        "precision": "bf16", "decisions_equal": 0.996, "single_film_decisions_equal": 0.998,
        "familiarity_flags_equal": 1.0, "auc": 0.8995, "auc_minus_f32": -0.0005, "max_abs_diff_vs_tensorflow": 0.01}}
    avx512, amx = frozenset({"avx512f", "avx512_bf16"}), frozenset({"avx512f", "avx512_bf16", "amx_tile", "amx_bf16"})
    assert engine.bf16_kind(avx512) == "avx512_bf16" and engine.bf16_kind(amx) == "amx_bf16"
    assert engine.bf16_kind({"avx2"}) is None and engine.bf16_kind(None) is None
    assert engine.bf16_kind(5) is None and engine.bf16_kind("avx512_bf16") is None  # a damaged record: no kind
    with pytest.raises(ValueError, match="neither amx_bf16 nor avx512_bf16"):
        engine_agreement.record(folder, figures, {"flags": ["avx2"]})
    assert engine_agreement.record(folder, figures, {"flags": sorted(avx512)})["passes"] is True
    measured = card.read(folder)
    assert set(measured.metrics["engine_agreement"]) == {"bf16"}
    assert engine.bf16_verified(measured, avx512) and not engine.bf16_verified(measured, amx)
    assert not engine.bf16_verified(measured, {"avx2"}) and not engine.bf16_verified(measured, set())
    assert engine.bf16_elsewhere_note(measured, avx512) == ""
    note = engine.bf16_elsewhere_note(measured, amx)
    assert "AVX-512 BF16 (no AMX)" in note and "not on this kind (AMX)" in note and "--record" in note
    assert "cannot be read here" in engine.bf16_elsewhere_note(measured, set())  # no /proc/cpuinfo (not Linux)
    damaged = card.read(folder)  # a record whose figures no float holds, or whose flags are not a list: absent
    damaged.metrics["engine_agreement"]["bf16"]["decisions_equal"] = 10 ** 400
    assert not engine.bf16_verified(damaged, avx512)
    damaged.metrics["engine_agreement"]["bf16"]["cpu"] = {"flags": 5}
    assert not engine.bf16_verified(damaged, avx512) and engine.bf16_elsewhere_note(damaged, amx) == ""
    mislabelled = card.read(folder)  # a record from before the kinds, measured on an AMX Xeon, under "bf16"
    mislabelled.metrics["engine_agreement"]["bf16"]["cpu"] = {"flags": sorted(amx)}
    assert not engine.bf16_verified(mislabelled, avx512) and not engine.bf16_verified(mislabelled, amx)

    monkeypatch.setattr(engine, "cpu_flags", lambda: amx)  # an AMX Xeon: f32 by default, and the sidebar says why
    monkeypatch.setattr(engine, "bf16_supported", lambda: True)
    assert engine.default_precision(None, measured) == "f32"
    served = models.load(folder, engine="openvino")
    assert served.precision == "f32" and served.runner.note == note
    assert models.load(folder, engine="openvino", precision="f32").runner.note == ""  # asked for: nothing to explain
    monkeypatch.setenv("CXR_PRECISION", "auto")  # the default spelt out: the same note
    assert models.load(folder, engine="openvino").runner.note == note
    monkeypatch.delenv("CXR_PRECISION")
    # measured on the AMX CPU too: its own record, beside the first; bf16 is its default only once it passes there
    missed = {**figures, "openvino_bf16": {**figures["openvino_bf16"], "decisions_equal": 0.99}}
    assert engine_agreement.record(folder, missed, {"flags": sorted(amx)})["passes"] is False
    assert engine.default_precision(None, card.read(folder)) == "f32"
    assert models.load(folder, engine="openvino").runner.note == note  # the AVX-512 record still holds there
    assert engine_agreement.record(folder, figures, {"flags": sorted(amx)})["passes"] is True
    both = card.read(folder)
    assert set(both.metrics["engine_agreement"]) == {"bf16", "bf16_amx"}
    assert engine.default_precision(None, both) == "auto" and engine.bf16_verified(both, avx512)
    assert engine.bf16_elsewhere_note(both, amx) == ""


def test_converted_model_is_cached_outside_the_model_folder(tiny_model_dir, tmp_path, monkeypatch, images):
    monkeypatch.setenv("CXR_ENGINE_CACHE", str(tmp_path / "cache"))
    before = sorted(p.name for p in tiny_model_dir.iterdir())
    first = models.load(tiny_model_dir)
    second = models.load(tiny_model_dir)
    assert (first.runner.source, second.runner.source) == ("converted", "cache")
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".bin", ".npz", ".xml"]
    np.testing.assert_array_equal(first.logits(images), second.logits(images))
    assert sorted(p.name for p in tiny_model_dir.iterdir()) == before
    # A damaged cache entry (model or side file) is converted again; 'off' writes nothing.
    for pattern in ("*.xml", "*.npz"):
        for path in (tmp_path / "cache").glob(pattern):
            path.write_text("damaged")
        again = models.load(tiny_model_dir)
        assert again.runner.source == "converted" and again.model_built
        np.testing.assert_array_equal(again.logits(images), first.logits(images))
        assert models.load(tiny_model_dir).runner.source == "cache"
    monkeypatch.setenv("CXR_ENGINE_CACHE", "off")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert models.load(tiny_model_dir).runner.source == "converted" and not (tmp_path / "home").exists()


def test_a_cache_entry_whose_weights_changed_is_converted_again_not_served(tiny_model3_dir, tmp_path, monkeypatch,
                                                                           images):
    """The .bin changed in place (same size, other weights: a flipped bit, another user's file in a shared
    cache folder) is not served under the card's verified hash: the entry's hashes no longer match."""
    monkeypatch.setenv("CXR_ENGINE_CACHE", str(tmp_path / "cache"))
    first = models.load(tiny_model3_dir)
    assert first.runner.source == "converted"
    (weights,) = (tmp_path / "cache").glob("*.bin")
    data = bytearray(weights.read_bytes())
    floats = np.frombuffer(data, np.float32)
    big = int(np.argmax(np.abs(floats) * np.isfinite(floats)))  # a large weight, so that the change shows
    floats_view = np.ndarray(floats.shape, np.float32, buffer=data)
    floats_view[big] *= -3.0
    weights.write_bytes(bytes(data))
    # Without the hash check OpenVINO would serve it (the control: the altered graph gives other logits).
    import openvino as ov

    (xml,) = (tmp_path / "cache").glob("*.xml")
    altered = ov.Core().compile_model(ov.Core().read_model(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    changed = np.asarray(altered.create_infer_request().infer([images[:1]])[0])
    assert np.abs(changed - first.logits(images[:1])).max() > 1e-3
    assert engine.cached(models.cache_key(first.card), "openvino", "f32") is None
    again = models.load(tiny_model3_dir)
    assert again.runner.source == "converted"
    np.testing.assert_array_equal(again.logits(images), first.logits(images))
    assert models.load(tiny_model3_dir).runner.source == "cache"


def test_a_damaged_side_file_is_converted_again_and_a_shared_cache_folder_is_not_used(tiny_model3_dir, tmp_path,
                                                                                      monkeypatch, images):
    """A side file that is no zip any more (a bad CRC) raised BadZipFile past the cache, so every start served
    TensorFlow (or failed with CXR_ENGINE=openvino). A cache folder others may write in is not used at all: an
    entry there could be anyone's graph under this model's name."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("CXR_ENGINE_CACHE", str(cache))
    first = models.load(tiny_model3_dir)
    (side,) = cache.glob("*.npz")
    data = bytearray(side.read_bytes())
    data[len(data) // 2] ^= 0xFF
    side.write_bytes(bytes(data))
    again = models.load(tiny_model3_dir)
    assert again.engine == "openvino" and again.runner.source == "converted" and not again.runner.note
    np.testing.assert_array_equal(again.logits(images), first.logits(images))
    assert models.load(tiny_model3_dir, engine="openvino").runner.source == "cache"  # rewritten, served again
    cache.chmod(0o777)
    shared = models.load(tiny_model3_dir)
    assert shared.engine == "openvino" and shared.runner.source == "converted"
    # said where the engine is named (each start converts again), not left for the operator to guess
    assert shared.runner.note == (f"engine cache not used: others may write in the folder {cache} (mode 777): "
                                  f"chmod 700 {cache}, or choose another with CXR_ENGINE_CACHE")
    assert engine.cached(models.cache_key(first.card), "openvino", "f32") is None
    cache.chmod(0o700)
    assert models.load(tiny_model3_dir).runner.source == "cache"
    fresh = tmp_path / "new-cache"
    monkeypatch.setenv("CXR_ENGINE_CACHE", str(fresh))
    models.load(tiny_model3_dir)
    assert fresh.stat().st_mode & 0o777 == 0o700


def test_the_cache_keeps_the_most_recently_used_models_and_clears_what_a_killed_conversion_left(
        tiny_model3_dir, tmp_path, monkeypatch, images):
    """Every new weights version (or OpenVINO release) added an entry (~50 MB for DenseNet169) for good: a
    cache the user had to clear by hand. It keeps the CXR_ENGINE_CACHE_KEEP most recently used ones (a
    cache hit counts as a use), and removes what a killed conversion left once it is an hour old."""
    import os
    import time

    tf = models.load(tiny_model3_dir, engine="tensorflow")
    cache = tmp_path / "cache"
    monkeypatch.setenv("CXR_ENGINE_CACHE", str(cache))
    monkeypatch.setenv("CXR_ENGINE_CACHE_KEEP", "2")

    def runner(key: str) -> engine.OpenVINORunner:
        return engine.create(tf.model, tf.card.target_layer, "openvino", "f32", cache_key=key)

    def entries() -> set[str]:
        return {p.name for p in cache.glob("*.xml")}

    cache.mkdir(mode=0o700)
    for name in ("orphan.bin", "orphan.npz", "fresh.bin"):
        (cache / name).write_bytes(b"half an entry")
    (cache / "tmpkilled").mkdir()
    hour_ago = time.time() - 2 * 3600
    for name in ("orphan.bin", "orphan.npz", "tmpkilled"):
        os.utime(cache / name, (hour_ago, hour_ago))
    first = runner("a")
    assert first.source == "converted" and len(entries()) == 1
    assert sorted(p.name for p in cache.iterdir() if p.stem not in {x[:-4] for x in entries()}) == ["fresh.bin"]
    a = entries()
    time.sleep(0.05)
    runner("b")
    b = entries() - a
    time.sleep(0.05)
    assert runner("a").source == "cache"  # a used again: now b is the least recently used
    time.sleep(0.05)
    runner("c")
    assert len(entries()) == 2 and a <= entries() and not b & entries()
    assert not list(cache.glob(f"{next(iter(b))[:-4]}.*"))  # its .bin and .npz went with it
    again = runner("b")
    assert again.source == "converted"
    np.testing.assert_array_equal(again(images[:1])[0], first(images[:1])[0])
    monkeypatch.setenv("CXR_ENGINE_CACHE_KEEP", "not a number")
    assert engine.cache_keep() == engine.CACHE_KEEP


def test_the_cache_key_changes_with_the_code_that_builds_the_model(tiny_model3_dir, monkeypatch):
    """The scaling constants live in the code, not in the weights: changed, the cached graph is not served."""
    loaded = card.load(tiny_model3_dir)
    before = models.cache_key(loaded)
    tiny = models.ARCHITECTURES["tiny"]
    monkeypatch.setitem(models.ARCHITECTURES, "tiny", dataclasses.replace(tiny, scale=(2 / 255,) * 3))
    assert models.cache_key(loaded) != before


def test_a_graph_that_cannot_be_served_is_never_cached(tiny_model_dir, tmp_path, monkeypatch, images):
    """A converted graph without the outputs the runner needs (here: no feature map) is refused at load, is
    not written to the cache (every later start would read and refuse it again), and auto serves TensorFlow."""
    monkeypatch.setenv("CXR_ENGINE_CACHE", str(tmp_path / "cache"))
    real_write = ov_graph.write
    monkeypatch.setattr(ov_graph, "write", lambda model, feature_layer=None: real_write(model, None))
    served = models.load(tiny_model_dir)
    assert served.engine == "tensorflow" and "feature map" in served.runner.note
    assert not list((tmp_path / "cache").glob("*.xml"))
    with pytest.raises(ValueError, match="feature map"):
        models.load(tiny_model_dir, engine="openvino")
    monkeypatch.setattr(ov_graph, "write", real_write)
    assert models.load(tiny_model_dir).engine == "openvino"


def test_a_cached_model_serves_without_keras_and_builds_it_on_first_need(tiny_model3_dir, tmp_path, monkeypatch,
                                                                        images):
    monkeypatch.setenv("CXR_ENGINE_CACHE", str(tmp_path / "cache"))
    full = models.load(tiny_model3_dir)
    fast = models.load(tiny_model3_dir)
    assert (full.runner.source, full.model_built) == ("converted", True)
    assert (fast.runner.source, fast.model_built) == ("cache", False)
    assert (fast.feature_layer, fast.feature_shape) == (full.feature_layer, full.feature_shape)
    np.testing.assert_array_equal(fast.head, full.head)
    np.testing.assert_array_equal(fast.logits(images), full.logits(images))
    assert fast.predict(images) == full.predict(images)
    ex_fast, ex_full = explain.Explainer(fast), explain.Explainer(full)
    for method in explain.ONE_PASS_METHODS:
        for c in range(3):
            np.testing.assert_array_equal(ex_fast.explain(images[:1], method, c).heatmap,
                                          ex_full.explain(images[:1], method, c).heatmap)
    assert not fast.model_built  # none of that needed the Keras model
    assert [ex_fast.one_pass(m) for m in explain.METHODS] == [m in explain.ONE_PASS_METHODS for m in explain.METHODS]
    assert not ex_fast.one_pass("gradcam", "tiny_relu0") and not fast.model_built
    assert fast.forward(images[:0])[1].shape == (0, *full.feature_shape)
    # A method that needs gradients builds it, with the folder's weights.
    smooth = ex_fast.explain(images[:1], "smoothgrad", 1)
    assert fast.model_built and smooth.heatmap.shape == (SIZE, SIZE)
    np.testing.assert_allclose(np.asarray(fast.model(images)), full.logits(images), rtol=1e-4, atol=1e-4)
    # TensorFlow asked for: the Keras model, never the cache.
    assert models.load(tiny_model3_dir, engine="tensorflow").model_built


def test_a_cached_model_predicts_in_a_process_without_tensorflow(tiny_model3_dir, tmp_path):
    import subprocess
    import sys

    code = ("import sys, numpy as np\n"
            "from cxr_core import explain, models\n"
            f"c = models.load({str(tiny_model3_dir)!r})\n"
            "x = np.full((1, c.input_size, c.input_size, 3), 128, np.float32)\n"
            "p, h = explain.Explainer(c).gradcam_predictions(x)\n"
            "print(c.runner.source, 'tensorflow' in sys.modules, 'keras' in sys.modules, p[0].decision, h.shape)\n")
    env = {**__import__("os").environ, "CXR_ENGINE_CACHE": str(tmp_path / "cache")}
    lines = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                            cwd=str(models.__file__).rsplit("/cxr_core/", 1)[0]).stdout.split()
             for _ in range(2)]
    decision = models.load(tiny_model3_dir).predict(np.full((1, SIZE, SIZE, 3), 128, np.float32))[0].decision
    assert lines[0][:3] == ["converted", "True", "True"]
    assert lines[1][:3] == ["cache", "False", "False"]  # neither Keras nor TensorFlow imported
    assert lines[0][3] == lines[1][3] == decision


def test_auto_falls_back_to_tensorflow_when_openvino_fails(tiny_model_dir, monkeypatch, images):
    reference = models.load(tiny_model_dir, engine="tensorflow")

    def broken(*args, **kwargs):
        raise RuntimeError("unsupported operation")

    monkeypatch.setattr(engine, "OpenVINORunner", broken)
    fallback = models.load(tiny_model_dir)
    assert fallback.engine == "tensorflow" and "OpenVINO could not run this model" in fallback.runner.note
    np.testing.assert_array_equal(fallback.logits(images), reference.logits(images))
    with pytest.raises(RuntimeError, match="unsupported operation"):
        models.load(tiny_model_dir, engine="openvino")


def test_forward_checks_its_input(pair):
    ov, _ = pair
    with pytest.raises(ValueError, match=r"expected a batch of shape \(N, 64, 64, 3\), got \(1, 32, 32, 3\)"):
        ov.forward(np.zeros((1, 32, 32, 3), np.float32))
    logits, features = ov.forward(np.zeros((0, SIZE, SIZE, 3), np.float32))
    assert logits.shape == (0, 3) and features.shape == (0, 16, 16, 16)


def test_training_evaluate_runs_on_the_engine_asked_for(tiny_model_dir, tmp_path, capsys):
    import pandas as pd
    from app_models import labelled_folder

    from training.__main__ import main

    images = labelled_folder(tmp_path / "images", per_class=3, bad=False)
    frames = {}
    for name in ("tensorflow", "openvino"):
        out = tmp_path / name
        assert main(["evaluate", str(tiny_model_dir), str(images), "--out", str(out), "--engine", name]) == 0
        frames[name] = pd.read_csv(tmp_path / name / "predictions.csv")
    printed = capsys.readouterr().out
    assert "inference: TensorFlow 2." in printed and "inference: OpenVINO 20" in printed
    columns = ["p_NORMAL", "p_PNEUMONIA"]
    assert len(frames["openvino"]) == 6 and frames["openvino"]["path"].tolist() == frames["tensorflow"]["path"].tolist()
    np.testing.assert_allclose(frames["openvino"][columns], frames["tensorflow"][columns], atol=1e-5)


def test_prepare_converts_each_model_once_and_reports_bad_folders(tiny_model_dir, tiny_model3_dir, tmp_path,
                                                                   monkeypatch, capsys):
    import shutil

    from cxr_core import prepare

    monkeypatch.setenv("CXR_ENGINE_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "models"
    for folder in (tiny_model_dir, tiny_model3_dir):
        shutil.copytree(folder, root / folder.name)
    assert prepare.main([str(root)]) == 0
    first = capsys.readouterr().out.splitlines()
    assert [line.split(":")[1].split("(")[0].strip() for line in first] == ["converted", "converted"]
    assert len(list((tmp_path / "cache").glob("*.xml"))) == 2
    assert models.load(root / tiny_model_dir.name).runner.source == "cache"  # what the app's start finds
    # A damaged folder is reported, the others still prepared (already, this time).
    (root / "broken").mkdir()
    (root / "broken" / card.CARD_FILE).write_text("{not json")
    assert prepare.main([str(root)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("broken: cannot be loaded")
    assert [line.split(":")[1].split("(")[0].strip() for line in lines[1:]] == ["already prepared"] * 2
    assert prepare.main([str(tmp_path / "none")]) == 1
    # A cache folder that is not used (others may write in it) is said, and prepare fails: every start would convert.
    shutil.rmtree(root / "broken")
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o775)
    shared.chmod(0o775)
    monkeypatch.setenv("CXR_ENGINE_CACHE", str(shared))
    capsys.readouterr()
    assert prepare.main([str(root)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert all(": converted but NOT cached: others may write in the folder" in line for line in lines)
    assert not list(shared.glob("*.xml"))
    for off in ("off", "0", "False", "no", "none"):  # no folder named so appears where it runs
        monkeypatch.setenv("CXR_ENGINE_CACHE", off)
        assert engine.cache_dir() is None, off
    monkeypatch.setenv("CXR_ENGINE_CACHE", "~/cxr-cache")
    assert engine.cache_dir() == root.home() / "cxr-cache"


@pytest.mark.parametrize("architecture", sorted(models.ARCHITECTURES))
def test_the_written_openvino_graph_equals_keras_on_every_architecture(architecture):
    """ov_graph writes each architecture we build; BatchNorm statistics, BatchNorm offsets and every bias are
    randomised (they start at zero), so that the folding and a dropped bias or offset count."""
    import openvino as ov

    arch = models.ARCHITECTURES[architecture]
    size = max(arch.min_size, 64 if architecture != "tiny" else 32)
    keras.utils.set_random_seed(3)
    model = models.build(architecture, 3, size)
    rng = np.random.default_rng(4)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(rng.normal(0, 0.2, layer.moving_mean.shape))
            layer.moving_variance.assign(rng.uniform(0.3, 2.0, layer.moving_variance.shape))
            if layer.scale:
                layer.gamma.assign(rng.uniform(0.5, 1.5, layer.gamma.shape))
            if layer.center:
                layer.beta.assign(rng.normal(0, 0.2, layer.beta.shape))
        elif getattr(layer, "use_bias", False):  # Conv2D and Dense
            layer.bias.assign(rng.normal(0, 0.2, layer.bias.shape))
    x = rng.uniform(0, 255, (2, size, size, 3)).astype(np.float32)
    x[1] = np.linspace(0, 255, size, dtype=np.float32)[None, :, None]  # a ramp: unlike noise even after pooling
    reference = keras.Model(model.inputs, [model.output, model.get_layer(arch.target_layer).output])
    ref_logits, ref_features = (np.asarray(a) for a in reference.predict_on_batch(x))
    compiled = ov.Core().compile_model(ov_graph.write(model, arch.target_layer), "CPU",
                                       {"INFERENCE_PRECISION_HINT": "f32"})
    out = compiled.create_infer_request().infer([x])
    logits, features = np.asarray(out[0]), np.asarray(out[1])
    assert logits.shape == ref_logits.shape and features.shape == ref_features.shape
    # float32 sums in another order: VGG16's 13 plain convolutions differ by up to 3.8e-6 (scale ~1.3) on an
    # AVX2-only AMD EPYC, 2e-6 on AVX-512. A wrong fold, padding or transpose is off by the features' own size.
    tol = 1e-5 * max(1.0, float(np.abs(ref_features).max()))
    np.testing.assert_allclose(features, ref_features, atol=tol)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5 * max(1.0, float(np.abs(ref_logits).max())))
    # The two images' features differ by far more than the tolerance: the comparison is not vacuous.
    assert np.abs(ref_features[0] - ref_features[1]).max() > 100 * tol


def _odd_models() -> dict[str, keras.Model]:
    """Models ov_graph must not write as if they were ours: each would come out wrong (or broken)."""
    keras.utils.set_random_seed(7)
    inputs = keras.Input((32, 32, 3))
    shifted = inputs + (-127.5)  # keras.ops' Add, with a constant operand: not the Add layer
    conv = keras.layers.Conv2D(4, 3, name="features")
    head = keras.layers.Dense(2)
    pooled = keras.layers.GlobalAveragePooling2D()
    odd = {"ops_add": keras.Model(inputs, head(pooled(conv(shifted))))}
    inputs = keras.Input((32, 32, 3))
    features = keras.layers.Conv2D(4, 3, name="features")(inputs)
    normed = keras.layers.BatchNormalization()(keras.layers.GlobalAveragePooling2D()(features))  # rank 2
    odd["bn_head"] = keras.Model(inputs, keras.layers.Dense(2)(normed))
    for model in odd.values():
        for layer in model.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.beta.assign(np.full(layer.beta.shape, 0.5, np.float32))
                layer.moving_variance.assign(np.full(layer.moving_variance.shape, 4.0, np.float32))
    return odd


@pytest.mark.parametrize("kind", ["ops_add", "bn_head"])
def test_what_the_graph_writer_does_not_know_is_converted_another_way(kind, tmp_path, monkeypatch):
    """An operation named like a layer it writes, or a layer on an input of another rank, is refused
    (``Unsupported``), and the engine's other converter serves it equal to Keras (it used to be written: a
    dropped constant, 14.9 off; a (1, 4, 1, 3) output; or an engine that could not start)."""
    monkeypatch.setenv("CXR_ENGINE_CACHE", str(tmp_path))
    model = _odd_models()[kind]
    with pytest.raises(ov_graph.Unsupported):
        ov_graph.write(model, "features")
    runner = engine.create(model, "features", "openvino", "f32", cache_key=f"odd-{kind}")
    x = np.random.default_rng(8).uniform(0, 255, (1, 32, 32, 3)).astype(np.float32)
    logits, features = runner(x)
    reference = np.asarray(model.predict_on_batch(x))
    assert logits.shape == reference.shape == (1, 2) and features.shape == (1, 30, 30, 4)
    np.testing.assert_allclose(logits, reference, atol=1e-4 * max(1.0, float(np.abs(reference).max())))


def test_our_models_are_written_without_convert_model(tiny_model3_dir, tmp_path, monkeypatch, images):
    """The load-time conversion is the fast graph writer, not ov.convert_model (13-19 s for DenseNet169)."""
    import openvino as ov

    def refuse(*args, **kwargs):
        raise AssertionError("ov.convert_model was called")

    monkeypatch.setenv("CXR_ENGINE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ov, "convert_model", refuse)
    written = models.load(tiny_model3_dir)
    assert written.engine == "openvino" and written.runner.source == "converted" and not written.runner.note
    reference = models.load(tiny_model3_dir, engine="tensorflow")
    np.testing.assert_allclose(written.logits(images), reference.logits(images), atol=1e-5)


def test_a_batch_runs_film_by_film_on_the_throughput_streams(tiny_model3_dir, images):
    """Batches go to a THROUGHPUT compilation, one film per request: same numbers, in input order."""
    runner = models.load(tiny_model3_dir).runner
    assert runner.name == "openvino" and runner._requests is None
    one_by_one = [runner(images[i:i + 1]) for i in range(len(images))]  # one film: the latency request
    assert runner._requests is None
    logits, features = runner(images)
    assert runner._requests is not None and len(runner._requests) >= 2
    np.testing.assert_allclose(logits, np.concatenate([o[0] for o in one_by_one]), atol=1e-6)
    np.testing.assert_allclose(features, np.concatenate([o[1] for o in one_by_one]), atol=1e-6)
    assert np.abs(logits[0] - logits[1]).max() > 1e-4  # distinct films, so the order below is tested
    reversed_logits, reversed_features = runner(images[::-1])
    np.testing.assert_allclose(reversed_logits, logits[::-1], atol=1e-6)
    np.testing.assert_allclose(reversed_features, features[::-1], atol=1e-6)
    # More films than requests: each request takes several films in turn, still in input order.
    order = np.random.default_rng(0).integers(0, len(images), 3 * len(runner._requests) + 1)
    many_logits, many_features = runner(images[order])
    np.testing.assert_allclose(many_logits, logits[order], atol=1e-6)
    np.testing.assert_allclose(many_features, features[order], atol=1e-6)


def test_a_failed_cache_write_still_serves_on_openvino(tiny_model_dir, tmp_path, monkeypatch, images):
    """OpenVINO reports a failed write (a full disk) as RuntimeError: the model still loads, only uncached."""
    import openvino as ov

    def full_disk(*args, **kwargs):
        raise RuntimeError("basic_ios::clear: iostream error")

    monkeypatch.setenv("CXR_ENGINE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ov, "save_model", full_disk)
    served = models.load(tiny_model_dir, engine="openvino")
    assert served.runner.source == "converted" and served.engine_label.startswith("OpenVINO")
    np.testing.assert_allclose(served.logits(images), models.load(tiny_model_dir, engine="tensorflow").logits(images),
                               atol=1e-5)
    assert not list((tmp_path / "cache").glob("*.xml"))


def test_weights_replaced_after_the_check_are_refused_not_served(tiny_model3_dir, tmp_path, monkeypatch, images):
    """The card's sha256 is checked at load; a weights file swapped before Keras reads it (a reinstall racing a
    start, or before the first gradient explanation of a cache-served model) must not be served under that hash,
    nor enter the engine cache."""
    from conftest import _train_tiny

    from cxr_core import card as card_lib

    monkeypatch.setenv("CXR_ENGINE_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    shutil.copytree(tiny_model3_dir, folder)
    other = _train_tiny(tmp_path / "other", ["NORMAL", "PNEUMONIA", "COVID-19"], 64, 9)
    checked = card_lib.load

    def swap_after_check(path):  # the check passes, then the file changes
        card = checked(path)
        shutil.copyfile(card_lib.weights_path(other, card_lib.read(other)), card_lib.weights_path(folder, card))
        return card

    monkeypatch.setattr(card_lib, "load", swap_after_check)
    with pytest.raises(ModelCardError, match="changed since it was checked"):
        models.load(folder, engine="openvino")
    assert not list((tmp_path / "cache").glob("*.xml"))
