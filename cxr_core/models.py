"""Building, loading and running the chest X-ray classifiers (Keras 3, any backend).

Every model is one flat functional graph: the input takes float32 (N, S, S, 3) pixels in
[0, 255]; the architecture's own scaling is a layer inside; the backbone's layers sit
directly in the model (a nested backbone breaks Grad-CAM); the head is global average
pooling, dropout and a Dense layer named ``logits`` that outputs *logits* (softmax and the
card's temperature are applied in ``Classifier.predict``).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from cxr_core import card as card_lib
from cxr_core import preprocess
from cxr_core.errors import ModelCardError


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
    "vgg16": Architecture("VGG16", "block5_conv3", (1.0,) * 3, _CAFFE_OFFSET, 32),
    "inceptionv3": Architecture("InceptionV3", "mixed10", (1 / 127.5,) * 3, (-1.0,) * 3, 75),
    # A few thousand parameters, for tests and smoke runs only.
    "tiny": Architecture("tiny", "relu", (1 / 255,) * 3, (0.0,) * 3, 16),
}


def _tiny_backbone(x: keras.KerasTensor) -> keras.KerasTensor:
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
        low_confidence=probs[top] < card.low_confidence,
    )


class Classifier:
    """A loaded model and its card. Safe to share between threads (one call at a time)."""

    def __init__(self, card: card_lib.ModelCard, model: keras.Model, folder: Path | None = None):
        self.card = card
        self.model = model
        self.folder = folder
        self._lock = threading.Lock()

    @property
    def input_size(self) -> int:
        return self.card.input_size

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Raw logits for float32 (N, S, S, 3) input in [0, 255] (compiled forward pass)."""
        with self._lock:
            return np.asarray(self.model.predict_on_batch(batch), dtype=np.float64)

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """Temperature-calibrated probabilities (N, num_classes)."""
        return softmax(self.logits(batch), self.card.temperature)

    def predict(self, batch: np.ndarray) -> list[Prediction]:
        """Predictions for a model-input batch (see cxr_core.preprocess.to_batch)."""
        return [decide(self.card, p) for p in self.probabilities(batch)]

    def predict_pixels(self, images: Sequence[np.ndarray]) -> list[Prediction]:
        """Predictions for float32 HxW images in [0, 1] (as cxr_core.imaging returns)."""
        batch = preprocess.to_batch([preprocess.prepare(p, self.input_size) for p in images])
        return self.predict(batch)


def load_weights(model: keras.Model, path: str | Path) -> None:
    """Load a ``.weights.h5`` file (written under any Keras 3 backend) into ``model``."""
    try:
        model.load_weights(str(path))
    except (ValueError, OSError, KeyError) as exc:
        raise ModelCardError(
            f"the weights in {path} do not fit the model its card describes ({exc}). "
            "Reinstall the model folder."
        ) from exc


def load(folder: str | Path) -> Classifier:
    """Load a model folder: verify the card and weights hash, build, load weights."""
    folder = Path(folder)
    card = card_lib.load(folder)
    try:
        model = build_from_card(card)
    except ValueError as exc:
        raise ModelCardError(f"model '{card.name}': the card describes a model that cannot be built ({exc}).") from exc
    load_weights(model, card_lib.weights_path(folder, card))
    return Classifier(card, model, folder)


def save(model: keras.Model, card: card_lib.ModelCard, folder: str | Path) -> Path:
    """Write weights (no optimizer state) and the card (with the weights' sha256) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_weights(str(folder / card.weights_file))
    return card_lib.save(card, folder)
