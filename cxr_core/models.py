"""Building, loading and running the chest X-ray classifiers (Keras 3, any backend).

Every model is one flat functional graph: the input takes float32 (N, S, S, 3) pixels in
[0, 255]; the architecture's own scaling is a layer inside; the backbone's layers sit
directly in the model (a nested backbone breaks Grad-CAM); the head is global average
pooling, dropout and a Dense layer named ``logits`` that outputs *logits* (softmax and the
card's temperature are applied in ``Classifier.predict``). A ``Classifier`` runs the model on the
engine that ``cxr_core.engine`` chooses (OpenVINO where installed, else TensorFlow).
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cxr_core import card as card_lib
from cxr_core import engine as engine_lib
from cxr_core import familiarity as fam_lib
from cxr_core import preprocess
from cxr_core.errors import ModelCardError

if TYPE_CHECKING:  # imported where used: a model served from the engine cache needs no Keras (no TensorFlow)
    import keras


@dataclass(frozen=True)
class Architecture:
    """How to build one backbone and where Grad-CAM looks in it."""

    factory: str  # attribute of keras.applications, or "tiny"
    target_layer: str  # the final convolutional feature map
    scale: tuple[float, ...]  # per-channel multiplier applied to 0..255 pixels
    offset: tuple[float, ...]  # per-channel offset added after scaling
    min_size: int


def _torch_norm() -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    return tuple(1 / (255 * s) for s in std), tuple(-m / s for m, s in zip(mean, std, strict=True))


_TORCH_SCALE, _TORCH_OFFSET = _torch_norm()
_CAFFE_OFFSET = (-103.939, -116.779, -123.68)  # grayscale: channel order does not matter

ARCHITECTURES: dict[str, Architecture] = {
    "densenet169": Architecture("DenseNet169", "relu", _TORCH_SCALE, _TORCH_OFFSET, 32),
    "densenet121": Architecture("DenseNet121", "relu", _TORCH_SCALE, _TORCH_OFFSET, 32),
    "resnet50": Architecture("ResNet50", "conv5_block3_out", (1.0,) * 3, _CAFFE_OFFSET, 32),
    # block5_pool, not block5_conv3: the head's global average pool reads it, so CAM from the forward pass and the
    # familiarity model (both on the pooled features) fit; with block5_conv3 a trained VGG16 could not be loaded.
    "vgg16": Architecture("VGG16", "block5_pool", (1.0,) * 3, _CAFFE_OFFSET, 32),
    "inceptionv3": Architecture("InceptionV3", "mixed10", (1 / 127.5,) * 3, (-1.0,) * 3, 75),
    # A few thousand parameters, for tests and smoke runs only.
    "tiny": Architecture("tiny", "relu", (1 / 255,) * 3, (0.0,) * 3, 16),
}


def _tiny_backbone(x: keras.KerasTensor) -> keras.KerasTensor:
    import keras

    for i, filters in enumerate((8, 16)):
        x = keras.layers.Conv2D(filters, 3, strides=2, padding="same", use_bias=False, name=f"tiny_conv{i}")(x)
        x = keras.layers.BatchNormalization(name=f"tiny_bn{i}")(x)
        x = keras.layers.Activation("relu", name="relu" if i == 1 else f"tiny_relu{i}")(x)
    return x


def build(
    architecture: str,
    num_classes: int,
    input_size: int,
    weights: str | Path | None = None,
    dropout: float = 0.2,
) -> keras.Model:
    """Build a flat classifier: float32 (N, S, S, 3) in [0, 255] -> logits (N, num_classes).

    ``weights``: None (random init), "imagenet" (Keras download; needs internet) or the path
    of a Keras application weights file without top, loaded into the backbone.
    """
    import keras

    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; choose one of {sorted(ARCHITECTURES)}")
    arch = ARCHITECTURES[architecture]
    if input_size < arch.min_size:
        raise ValueError(f"{architecture} needs input_size >= {arch.min_size}, got {input_size}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    inputs = keras.Input((input_size, input_size, 3), name="image", dtype="float32")
    x = keras.layers.Rescaling(list(arch.scale), list(arch.offset), name="input_scaling")(inputs)
    if arch.factory == "tiny":
        if weights is not None:
            raise ValueError("the tiny test architecture has no pretrained weights")
        features = _tiny_backbone(x)
    else:
        factory = getattr(keras.applications, arch.factory)
        backbone = factory(include_top=False, weights=None if weights is None else str(weights), input_tensor=x)
        features = backbone.output
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(features)
    x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    logits = keras.layers.Dense(num_classes, name="logits", dtype="float32")(x)
    return keras.Model(inputs, logits, name=f"{architecture}_{num_classes}cls")


def build_from_card(card: card_lib.ModelCard) -> keras.Model:
    """The untrained model that a card describes."""
    return build(card.architecture, card.num_classes, card.input_size, weights=None,
                 dropout=float(card.recipe.get("dropout", 0.2)))


@dataclass(frozen=True)
class Prediction:
    """One image's result: calibrated probabilities in the card's class order and the decision."""

    class_names: tuple[str, ...]
    probabilities: tuple[float, ...]
    top_class: str
    top_probability: float
    decision: str
    positive: bool
    low_confidence: bool
    # The familiarity check (cxr_core.familiarity): distance of the film's penultimate features from
    # the training films', and whether it is past the threshold fitted on validation ("unlike the films
    # this model was trained on"). None when the model folder has no familiarity model.
    familiarity: float | None = None
    unfamiliar: bool | None = None

    def as_dict(self) -> dict[str, float]:
        return dict(zip(self.class_names, self.probabilities, strict=True))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of logits / temperature, float64 for stability."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def decide(card: card_lib.ModelCard, probabilities: Sequence[float]) -> Prediction:
    """Apply the card's thresholds to calibrated probabilities.

    Among the classes whose probability reaches their threshold, the most probable is
    called; if none does, the card's negative class. Without thresholds: the top class.
    """
    probs = tuple(float(p) for p in probabilities)
    if not all(np.isfinite(probs)):  # a broken model or engine: argmax of NaN is 0, and no threshold is reached
        raise ValueError("the model's output is not a number (NaN or infinite probabilities), so no decision can be "
                         "made: the model or its inference engine is broken")
    names = tuple(card.class_names)
    top = int(np.argmax(probs))
    if card.thresholds:
        called = [i for i, n in enumerate(names) if n in card.thresholds and probs[i] >= card.thresholds[n]]
        if called:
            decision = names[max(called, key=lambda i: probs[i])]
        else:
            decision = card.negative_class or names[top]
    else:
        decision = names[top]
    return Prediction(
        class_names=names,
        probabilities=probs,
        top_class=names[top],
        top_probability=probs[top],
        decision=decision,
        positive=card.negative_class is not None and decision != card.negative_class,
        low_confidence=not probs[top] >= card.low_confidence,
    )


def _feature_map_layer(model: keras.Model, layer: str) -> str | None:
    """``layer`` when the model has it and it outputs a 2-D feature map (N, h, w, K); else None."""
    try:
        shape = model.get_layer(layer).output.shape
    except ValueError:
        return None
    return layer if len(shape) == 4 else None


def head_weights(model: keras.Model, layer: str | None) -> np.ndarray | None:
    """The Dense kernel float32 (K, C) when the head is ``layer`` -> GlobalAveragePooling2D -> Dropout* ->
    linear Dense (the model's only output); None for any other head.

    For such a head the gradient of logit c with respect to the feature map is ``W[:, c] / (h * w)`` at
    every position, so Grad-CAM at ``layer`` equals CAM from the features and ``W`` (cxr_core.explain).
    """
    import keras

    if layer is None or len(model.outputs) != 1:
        return None
    dense = model.outputs[0]._keras_history.operation
    if not isinstance(dense, keras.layers.Dense) or dense.activation is not keras.activations.linear:
        return None
    node = dense.input._keras_history.operation
    while isinstance(node, keras.layers.Dropout):
        node = node.input._keras_history.operation
    if not isinstance(node, keras.layers.GlobalAveragePooling2D) or node.keepdims \
            or node.data_format != "channels_last" or node.input is not model.get_layer(layer).output:
        return None
    return np.asarray(keras.ops.convert_to_numpy(dense.kernel), dtype=np.float32)


class Classifier:
    """A loaded model, its card and the engine that runs it. Safe to share between threads (one call at a time).

    ``engine``/``precision``: see ``cxr_core.engine.choose`` (None: env CXR_ENGINE / CXR_PRECISION, then
    OpenVINO f32 where installed). ``cache_key``: ``cache_key(card)`` of a card whose weights were verified
    (``load`` passes it), so the converted OpenVINO model can be cached. ``model`` (Keras) stays available for
    the explanations that need gradients. ``runner`` + ``build``: a runner served from the engine cache
    (``engine.cached``) and how to build the Keras model, which then happens on the first use of ``model``.
    """

    def __init__(self, card: card_lib.ModelCard, model: keras.Model | None, folder: Path | None = None, *,
                 engine: str | None = None, precision: str | None = None, cache_key: str | None = None,
                 familiarity: fam_lib.Familiarity | None = None, runner: engine_lib.OpenVINORunner | None = None,
                 build: Callable[[], keras.Model] | None = None):
        self.card = card
        self.folder = folder
        self._model = model
        self._build = build
        self._model_lock = threading.Lock()
        if runner is not None:
            if model is None and build is None:
                raise ValueError("a cached runner needs the model or a way to build it")
            self.feature_layer, self.head = runner.side.feature_layer, runner.side.head
            self.feature_shape = runner.side.feature_shape
            self.runner: engine_lib.Runner = runner
        else:
            if model is None:
                raise ValueError("a model is needed (or a cached runner and a way to build the model)")
            self.feature_layer = _feature_map_layer(model, card.target_layer)
            self.head = head_weights(model, self.feature_layer)
            self.feature_shape = (tuple(model.get_layer(self.feature_layer).output.shape[1:])
                                  if self.feature_layer else None)
            self.runner = engine_lib.create(model, self.feature_layer, engine, precision, cache_key, self.head)
        if familiarity is not None and (self.head is None or familiarity.dim != self.head.shape[0]):
            raise ModelCardError(f"model '{card.name}': its familiarity model does not fit the model's features "
                                 "(another architecture or head). Reinstall the model folder.")
        self.familiarity = familiarity
        self._lock = threading.Lock()

    @property
    def model(self) -> keras.Model:
        """The Keras model (gradients, other layers); built and its weights loaded on first use when served
        from the engine cache (seconds: TensorFlow is imported then)."""
        if self._model is None:
            with self._model_lock:
                if self._model is None:
                    assert self._build is not None
                    self._model = self._build()
        return self._model

    @property
    def model_built(self) -> bool:
        """Whether the Keras model is in memory (False while served from the engine cache alone)."""
        return self._model is not None

    @property
    def input_size(self) -> int:
        return self.card.input_size

    @property
    def engine(self) -> str:
        """The engine that runs the forward pass: "tensorflow" or "openvino"."""
        return self.runner.name

    @property
    def precision(self) -> str:
        """The engine's inference precision: "f32" or "bf16"."""
        return self.runner.precision

    @property
    def engine_label(self) -> str:
        """One line for people, e.g. "OpenVINO 2026.4.1 · f32"."""
        return self.runner.label

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        batch = np.asarray(batch, dtype=np.float32)
        size = self.input_size
        if batch.ndim != 4 or batch.shape[1:] != (size, size, 3):
            raise ValueError(f"expected a batch of shape (N, {size}, {size}, 3), got {batch.shape}")
        if len(batch) == 0:
            return np.zeros((0, self.card.num_classes)), None
        with self._lock:
            logits, features = self.runner(batch)
        return np.asarray(logits, dtype=np.float64), features

    def forward(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One forward pass: logits float64 (N, C) and the card's target-layer feature map float32 (N, h, w, K).

        Input: float32 (N, S, S, 3) in [0, 255]. When ``head`` is not None (GAP + Dense), the features'
        spatial mean ``features.mean(axis=(1, 2))`` is the pooled penultimate vector (N, K), and CAM from
        ``features`` and ``head`` is Grad-CAM. Raises ValueError when the card's target layer is not a
        feature map of the model.
        """
        logits, features = self._run(batch)
        if self.feature_layer is None:
            raise ValueError(f"the card's target layer {self.card.target_layer!r} is not a feature map of the model")
        if features is None:  # empty batch
            features = np.zeros((0, *self.feature_shape), np.float32)
        return logits, features

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Raw logits float64 (N, C) for float32 (N, S, S, 3) input in [0, 255] (the engine's forward pass)."""
        return self._run(batch)[0]

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """Temperature-calibrated probabilities (N, num_classes)."""
        return softmax(self.logits(batch), self.card.temperature)

    def predictions(self, logits: np.ndarray, features: np.ndarray | None = None) -> list[Prediction]:
        """Decisions for logits (N, C); with the target-layer features (N, h, w, K) of the same pass and a
        familiarity model in the folder, each carries its familiarity distance and flag (cxr_core.familiarity)."""
        out = [decide(self.card, p) for p in softmax(logits, self.card.temperature)]
        if self.familiarity is None or features is None or self.head is None:
            return out
        distances = self.familiarity.distance(np.asarray(features).mean(axis=(1, 2), dtype=np.float64))
        flags = self.familiarity.flags(distances)
        return [dataclasses.replace(p, familiarity=float(d), unfamiliar=bool(f))
                for p, d, f in zip(out, distances, flags, strict=True)]

    def predict(self, batch: np.ndarray) -> list[Prediction]:
        """Predictions for a model-input batch (see cxr_core.preprocess.to_batch), familiarity included."""
        if self.familiarity is None or self.head is None:
            return self.predictions(self.logits(batch))
        return self.predictions(*self.forward(batch))

    def predict_pixels(self, images: Sequence[np.ndarray]) -> list[Prediction]:
        """Predictions for float32 HxW images in [0, 1] (as cxr_core.imaging returns)."""
        batch = preprocess.to_batch([preprocess.prepare(p, self.input_size) for p in images])
        return self.predict(batch)


def load_weights(model: keras.Model, path: str | Path, shown: str | Path | None = None) -> None:
    """Load a ``.weights.h5`` file (written under any Keras 3 backend) into ``model``; errors name ``shown``."""
    try:
        model.load_weights(str(path))
    except (ValueError, OSError, KeyError) as exc:
        raise ModelCardError(
            f"the weights in {shown or path} do not fit the model its card describes ({exc}). "
            "Reinstall the model folder."
        ) from exc


def load_checked_weights(model: keras.Model, card: card_lib.ModelCard, path: Path) -> None:
    """Load the weights file's bytes only if they are still the ones the card's sha256 names.

    ``card_lib.load`` hashed the file; Keras reads it again later (seconds after, or at the first explanation that
    needs gradients). The bytes are read once, checked, and loaded from a private copy, so a file replaced in
    between (a reinstall) can neither serve other weights under this card's hash nor enter the engine cache.
    """
    import hashlib
    import tempfile

    data = Path(path).read_bytes()
    if hashlib.sha256(data).hexdigest() != card.weights_sha256:
        raise ModelCardError(f"model '{card.name}': its weights file changed since it was checked (it no longer "
                             "matches its model card's sha256). Reload the page, or reinstall the model folder.")
    with tempfile.TemporaryDirectory(prefix="cxr-weights-") as tmp:
        private = Path(tmp) / Path(path).name
        private.write_bytes(data)
        load_weights(model, private, shown=path)


def cache_key(card: card_lib.ModelCard) -> str:
    """What names a model exactly for the engine cache: the weights' sha256, the card fields that build it, and
    the code that builds it from them (the architecture's scaling constants, Keras's version)."""
    from importlib.metadata import version

    return json.dumps(["cxr-model", card.weights_sha256, card.architecture, card.input_size,
                       list(card.class_names), card.target_layer, repr(ARCHITECTURES.get(card.architecture)),
                       version("keras")])


def _familiarity(card: card_lib.ModelCard, folder: Path) -> fam_lib.Familiarity | None:
    if not card.familiarity:
        return None
    try:  # card_lib.load has checked the file's sha256
        fam = fam_lib.load(card_lib.familiarity_path(folder, card))
    except (OSError, ValueError, KeyError, MemoryError) as exc:  # MemoryError: an array header declaring terabytes
        raise ModelCardError(f"model '{card.name}': its familiarity file cannot be read "
                             f"({'it declares arrays too large for memory' if isinstance(exc, MemoryError) else exc}). "
                             "Reinstall the model folder.") from exc
    if not np.isclose(fam.threshold, float(card.familiarity["threshold"]), rtol=1e-9, atol=0):
        raise ModelCardError(f"model '{card.name}': its familiarity file's threshold differs from its card's. "
                             "Reinstall the model folder.")
    return fam


def load(folder: str | Path, engine: str | None = None, precision: str | None = None) -> Classifier:
    """Load a model folder: verify the card and weights hash, build, load weights, prepare the engine.

    ``engine``/``precision``: see ``cxr_core.engine.choose`` (None: env, then OpenVINO where installed, at f32, or
    at bf16 on a BF16 CPU for a model whose card records bf16 agreement: ``engine.default_precision``).
    When OpenVINO is the engine and its cache holds this model (converted at an earlier load), the
    forward pass is served from the cache at once and the Keras model is built on first use of
    ``Classifier.model`` (an explanation that needs gradients): no TensorFlow on the way to a prediction.
    """
    folder = Path(folder)
    card = card_lib.load(folder)
    fam = _familiarity(card, folder)
    key = cache_key(card)
    unasked = (precision or os.environ.get("CXR_PRECISION") or "auto").strip().lower() == "auto"  # the default
    precision = engine_lib.default_precision(precision, card)  # bf16 only for a model whose agreement is on record

    def build_model() -> keras.Model:
        try:
            model = build_from_card(card)
        except (ValueError, TypeError) as exc:  # TypeError: a forged recipe value of another type (dropout: [0.2])
            raise ModelCardError(f"model '{card.name}': the card describes a model that cannot be built "
                                 f"({exc}).") from exc
        load_checked_weights(model, card, card_lib.weights_path(folder, card))
        return model

    runner = engine_lib.cached(key, engine, precision)
    if runner is not None and runner.classes != len(card.class_names):
        runner = None  # an entry whose graph gives another number of logits than the card's classes: convert
    if runner is not None:
        classifier = Classifier(card, None, folder, runner=runner, build=build_model, familiarity=fam)
    else:
        classifier = Classifier(card, build_model(), folder, engine=engine, precision=precision, cache_key=key,
                                familiarity=fam)
    elsewhere = engine_lib.bf16_elsewhere_note(card) if unasked and precision == "f32" else ""
    if elsewhere and classifier.runner.name == "openvino" and engine_lib.bf16_supported():
        # bf16 agreement on record for another kind of CPU only: the sidebar says why this BF16 CPU serves f32
        classifier.runner.note = "; ".join(n for n in (classifier.runner.note, elsewhere) if n)
    return classifier


def save(model: keras.Model, card: card_lib.ModelCard, folder: str | Path) -> Path:
    """Write weights (no optimizer state) and the card (with the weights' sha256) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_weights(str(folder / card.weights_file))
    return card_lib.save(card, folder)
