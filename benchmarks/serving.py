"""Serving-path figures: raw forward pass, cxr_core's classify path, tf-keras-vis, batch review."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from benchmarks.machine import median_ms
from cxr_core import card as card_lib
from cxr_core import models

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
SHIPPED = REPO / "models" / "densenet169-pneumonia"
JPEG = DATA / "kermany" / "train" / "NORMAL" / "IM-0115-0001.jpeg"
DICOM = DATA / "dicom" / "pydicom-data" / "RG1_J2KI.dcm"
FOLDER = DATA / "kermany" / "train" / "NORMAL"


def model_folder(explicit: str | None = None) -> tuple[Path, str]:
    """The model to measure and where it came from: ``explicit``, the shipped DenseNet169, or a fresh one.

    The targets are stated for DenseNet169 at 224 px, so the shipped model is measured only when it is
    that; otherwise (e.g. a model trained on the CPU at a smaller size) a fresh one is: DenseNet169,
    2 classes, 224 px, random weights, saved with a card to a temp folder. The figures depend on the
    architecture and input size, not on the weights' values.
    """
    if explicit:
        return Path(explicit), "given"
    origin = "random weights (no shipped model found)"
    if (SHIPPED / card_lib.CARD_FILE).is_file():
        shipped = card_lib.read(SHIPPED)
        if (shipped.architecture, shipped.input_size) == ("densenet169", 224):
            return SHIPPED, "shipped"
        origin = (f"random weights (the shipped model is {shipped.architecture} at {shipped.input_size} px; "
                  "the targets are for 224 px)")
    root = tempfile.mkdtemp(prefix="cxr-bench-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)  # about 50 MB of random weights
    folder = Path(root) / "densenet169-random"
    model = models.build("densenet169", 2, 224)
    card = card_lib.ModelCard(
        name="densenet169-random", architecture="densenet169", input_size=224, class_names=["NORMAL", "PNEUMONIA"],
        target_layer=models.ARCHITECTURES["densenet169"].target_layer, negative_class="NORMAL",
        thresholds={"PNEUMONIA": 0.5}, training_data={"note": "random weights, for benchmarks only"},
    )
    models.save(model, card, folder)
    return folder, origin


@contextmanager
def engine_cache(folder: str | Path) -> Iterator[None]:
    """``CXR_ENGINE_CACHE`` set to ``folder`` for the block (converted models go there, not to the user's cache),
    then as it was."""
    previous = os.environ.get("CXR_ENGINE_CACHE")
    os.environ["CXR_ENGINE_CACHE"] = str(folder)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("CXR_ENGINE_CACHE", None)
        else:
            os.environ["CXR_ENGINE_CACHE"] = previous


def load_seconds(folder: Path, engine: str | None = None, precision: str | None = None) -> tuple[float, object, object]:
    """Seconds for ``models.load`` (hash check, build, weights, engine) plus building the Explainer."""
    from cxr_core import explain

    start = time.perf_counter()
    classifier = models.load(folder, engine=engine, precision=precision)
    explainer = explain.Explainer(classifier)
    return time.perf_counter() - start, classifier, explainer


def engines_side_by_side(folder: Path, runs: dict[str, tuple[str, str]], repeat: int, paths: list[Path],
                         batch_size: int) -> dict:
    """Each engine in ``runs`` (key -> (engine, precision)) loaded alone, then timed turn by turn.

    Loading: OpenVINO's first load converts into an empty cache folder (``model_load_s``), the second
    reads the cached model (``model_load_cached_s``). Timing is interleaved, one call of each engine in
    turn, so that load from other processes on a shared machine falls on every engine alike.
    """
    import statistics

    from cxr_core import imaging, pipeline, preprocess

    figures: dict = {}
    loaded: dict = {}
    for key, (engine, precision) in runs.items():
        with tempfile.TemporaryDirectory(prefix="cxr-bench-cache-") as cache, engine_cache(cache):
            load_s, classifier, explainer = load_seconds(folder, engine, precision)
            cached = load_seconds(folder, engine, precision)[0] if engine == "openvino" else None
        figures[key] = {"model_load_s": round(load_s, 2), "precision": classifier.precision,
                        "label": classifier.engine_label,
                        "first_prediction_s": round(warm_up_seconds(classifier, explainer), 2)}
        if cached is not None:
            figures[key]["model_load_cached_s"] = round(cached, 2)
        loaded[key] = (classifier, explainer)

    data = JPEG.read_bytes()
    x = preprocess.model_input(imaging.load(data, JPEG.name).pixels, next(iter(loaded.values()))[0].input_size)
    steps = {"classify_ms_p50": lambda c, e: classify_once(c, e, data, JPEG.name),
             "gradcam_pass_ms_p50": lambda c, e: e.gradcam(x)}
    for figure, step in steps.items():
        times: dict[str, list[float]] = {key: [] for key in loaded}
        for i in range(repeat + 2):  # two warm-up rounds
            for key, (c, e) in loaded.items():
                start = time.perf_counter()
                step(c, e)
                if i >= 2:
                    times[key].append((time.perf_counter() - start) * 1000)
        for key in loaded:
            figures[key][figure] = round(statistics.median(times[key]), 1)

    items = [(p.name, p) for p in paths]
    seconds = dict.fromkeys(loaded, 0.0)
    scored = dict.fromkeys(loaded, 0)
    for c, _ in loaded.values():
        pipeline.classify_many(c, items[:batch_size], batch_size=batch_size)
    for start in range(0, len(items), 2 * batch_size):
        for key, (c, _) in loaded.items():
            t0 = time.perf_counter()
            rows = pipeline.classify_many(c, items[start:start + 2 * batch_size], batch_size=batch_size)
            seconds[key] += time.perf_counter() - t0
            scored[key] += sum(r.prediction is not None for r in rows)
    for key in loaded:
        # A batch whose films were not all scored measured reading and errors, not the engine: no figure.
        figures[key]["batch_scored"] = scored[key]
        figures[key]["batch_images_per_s"] = round(len(items) / seconds[key], 2) if scored[key] == len(items) else None
    return figures


CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_flags() -> dict:
    """The instruction-set flags that decide OpenVINO's speed, and what OpenVINO's CPU plugin reports."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((set(line.split(":", 1)[1].split()) for line in fh if line.startswith("flags")), set())
    except OSError:
        pass
    info: dict = {"flags": [f for f in CPU_FLAGS if f in flags]}
    try:
        import openvino as ov

        core = ov.Core()
        info["openvino_capabilities"] = list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
        info["openvino_default_precision"] = core.get_property("CPU", "INFERENCE_PRECISION_HINT").to_string()
    except ImportError:
        info["openvino_capabilities"] = None
    return info


def warm_up_seconds(classifier, explainer) -> float:
    """Seconds for the first prediction and the first Grad-CAM (graph tracing), after loading."""
    start = time.perf_counter()
    x = np.zeros((1, classifier.input_size, classifier.input_size, 3), np.float32)
    classifier.logits(x)
    explainer.gradcam(x)
    return time.perf_counter() - start


def classify_breakdown(classifier, explainer, path: Path, repeat: int) -> dict[str, float]:
    """Median ms of each step of ``classify_once``: read, preprocess, one Grad-CAM pass, overlay."""
    from cxr_core import imaging, overlay, preprocess

    data = path.read_bytes()
    image = imaging.load(data, path.name)
    x = preprocess.model_input(image.pixels, classifier.input_size)
    _, heatmaps = explainer.gradcam(x)
    steps = {
        "read": lambda: imaging.load(data, path.name),
        "preprocess": lambda: preprocess.model_input(image.pixels, classifier.input_size),
        "gradcam_pass": lambda: explainer.gradcam(x),
        "overlay": lambda: overlay.overlay(image.pixels, heatmaps[0]),
    }
    return {name: round(median_ms(fn, repeat, warmup=2), 2) for name, fn in steps.items()}


def compiled_forward(model):
    """The model's forward pass as one traced ``tf.function`` (inference mode)."""
    import tensorflow as tf

    size = model.input_shape[1]
    spec = [tf.TensorSpec((None, size, size, 3), tf.float32)]
    return tf.function(lambda x: model(x, training=False), input_signature=spec)


def forward_ms(model, repeat: int) -> float:
    """Median ms of the compiled forward pass on one 224 px image."""
    import tensorflow as tf

    fn = compiled_forward(model)
    x = tf.constant(np.random.default_rng(0).uniform(0, 255, (1, *model.input_shape[1:])).astype(np.float32))
    return median_ms(lambda: fn(x).numpy(), repeat, warmup=3)


def engine_forward_ms(classifier, repeat: int) -> float:
    """Median ms of the classifier's own engine's forward pass (logits and feature map) on one film: what
    the classify path costs without reading, the decision, the heatmap and the overlay."""
    x = np.random.default_rng(0).uniform(0, 255, (1, classifier.input_size, classifier.input_size, 3))
    x = x.astype(np.float32)
    return median_ms(lambda: classifier.runner(x), repeat, warmup=3)


def _images_per_s(step, shape: tuple[int, ...], n_images: int, batch_size: int, convert=lambda b: b) -> float:
    """Images per second of ``step`` over preloaded random batches of ``batch_size`` images of ``shape``
    (``convert``: each batch as ``step`` takes it), after one warm-up call."""
    rng = np.random.default_rng(1)
    batches = [convert(rng.uniform(0, 255, (batch_size, *shape)).astype(np.float32))
               for _ in range(max(1, n_images // batch_size))]
    step(batches[0])
    start = time.perf_counter()
    for b in batches:
        step(b)
    return len(batches) * batch_size / (time.perf_counter() - start)


def engine_forward_images_per_s(classifier, n_images: int, batch_size: int) -> float:
    """Images per second of the classifier's own engine over preloaded batches of ``batch_size`` (OpenVINO: on
    its throughput streams, as a batch review runs): the batch path without reading or decisions."""
    size = classifier.input_size
    return _images_per_s(classifier.runner, (size, size, 3), n_images, batch_size)


def forward_images_per_s(model, n_images: int, batch_size: int) -> float:
    """Images per second of the compiled forward pass over preloaded batches of ``batch_size``."""
    import tensorflow as tf

    fn = compiled_forward(model)
    return _images_per_s(lambda b: fn(b).numpy(), tuple(model.input_shape[1:]), n_images, batch_size, tf.constant)


def classify_once(classifier, explainer, data: bytes, name: str) -> np.ndarray:
    """cxr_core's whole path for one upload: read, preprocess, predict + Grad-CAM, overlay."""
    from cxr_core import overlay, pipeline

    result = pipeline.classify(classifier, explainer, data, name)
    return overlay.overlay(result.image.pixels, result.heatmap)


def classify_ms(classifier, explainer, path: Path, repeat: int) -> float:
    data = path.read_bytes()
    return median_ms(lambda: classify_once(classifier, explainer, data, path.name), repeat, warmup=2)


def tfkv_gradcam_ms(classifier, path: Path, repeat: int) -> float:
    """Median ms of tf-keras-vis ``Gradcam`` (built once, default settings) on the same image's model input."""
    from tf_keras_vis.gradcam import Gradcam
    from tf_keras_vis.utils.scores import CategoricalScore

    from cxr_core import imaging, preprocess

    x = preprocess.model_input(imaging.load(path.read_bytes(), path.name).pixels, classifier.input_size)
    gradcam = Gradcam(classifier.model)
    score = CategoricalScore(int(np.argmax(classifier.logits(x)[0])))
    return median_ms(lambda: gradcam(score, x, penultimate_layer=classifier.card.target_layer), repeat, warmup=2)


def batch_images_per_s(classifier, paths: list[Path], batch_size: int) -> tuple[float, int]:
    """Images per second of the batch-review path (``pipeline.classify_many``) and how many scored."""
    from cxr_core import pipeline

    warm = [(p.name, p) for p in paths[:batch_size]]
    pipeline.classify_many(classifier, warm, batch_size=batch_size)
    start = time.perf_counter()
    rows = pipeline.classify_many(classifier, [(p.name, p) for p in paths], batch_size=batch_size)
    seconds = time.perf_counter() - start
    return len(paths) / seconds, sum(r.prediction is not None for r in rows)


def familiarity_ms(classifier, repeat: int) -> float:
    """Median ms that the familiarity check adds to one film's prediction (``Classifier.predictions`` with a
    familiarity model minus without), on the classifier's own feature-map shape.

    A folder without a familiarity model (e.g. the random-weights DenseNet) gets one fitted on random
    features of the right width: the cost depends on the dimensions, not on the values.
    """
    import time

    import numpy as np

    from cxr_core import familiarity, preprocess

    batch = preprocess.to_batch(np.zeros((1, classifier.input_size, classifier.input_size), np.uint8))
    logits, features = classifier.forward(batch)
    fam = classifier.familiarity
    if fam is None:
        rng = np.random.default_rng(0)
        width = features.shape[-1]
        fam = familiarity.calibrate(familiarity.fit(rng.normal(size=(600, width)), rng.integers(0, 2, 600)),
                                    rng.normal(size=(100, width)))
    saved, times = classifier.familiarity, []
    try:
        for _ in range(max(repeat, 5)):
            classifier.familiarity = None
            t0 = time.perf_counter()
            classifier.predictions(logits, features)
            t1 = time.perf_counter()
            classifier.familiarity = fam
            classifier.predictions(logits, features)
            t2 = time.perf_counter()
            times.append(((t2 - t1) - (t1 - t0)) * 1000)
    finally:
        classifier.familiarity = saved
    return float(np.median(times))
