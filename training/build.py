"""The model a run trains: cxr_core's flat classifier, its initial weights, freezing, augmentation.

What is saved is exactly ``cxr_core.models.build(...)``; augmentation runs in a wrapper model
used only for ``fit``, so serving rebuilds the trained model from its card alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np

from cxr_core import card as card_lib
from cxr_core import models
from training.config import TrainConfig, unfreeze_top

HEAD = ("avg_pool", "head_dropout", "logits")


def is_model_dir(weights: str) -> bool:
    return Path(weights).is_dir() and (Path(weights) / card_lib.CARD_FILE).is_file()


def build_model(config: TrainConfig, class_names: Sequence[str]) -> tuple[keras.Model, list[str]]:
    """The classifier with its initial weights; returns (model, names of layers copied from a model folder).

    ``config.weights``: "none", "imagenet", a Keras backbone weights file, or one of our model
    folders, whose backbone weights are copied layer by layer (by name). Its head is copied too
    when it has exactly ``class_names`` (same classes, same order: training continues that
    model). Otherwise the head is new, but each class the two share keeps its own column of the
    source's Dense layer (matched by name, whatever the order): a 2-class NORMAL/PNEUMONIA model
    starting a 3-class model hands on what it knows of those two classes, and only the new class
    starts from a fresh column. Such a partial copy is listed as ``"logits[NORMAL,PNEUMONIA]"``.
    """
    w, n_classes = config.weights, len(class_names)
    if w.lower() == "none" or is_model_dir(w):
        model = models.build(config.architecture, n_classes, config.input_size, dropout=config.dropout)
    else:
        model = models.build(config.architecture, n_classes, config.input_size,
                             weights="imagenet" if w.lower() == "imagenet" else w, dropout=config.dropout)
    copied: list[str] = []
    if is_model_dir(w):
        source = models.load(w, engine="tensorflow")  # only its Keras weights are used
        if source.card.architecture != config.architecture:
            raise ValueError(f"{w} is a {source.card.architecture} model; cannot start a {config.architecture} from it")
        same_head = list(source.card.class_names) == list(class_names)
        for layer in source.model.layers:
            if (layer.name in HEAD and not same_head) or not layer.weights:
                continue
            model.get_layer(layer.name).set_weights(layer.get_weights())
            copied.append(layer.name)
        shared = [c for c in class_names if c in source.card.class_names]
        if not same_head and shared:
            copied.append(_copy_head_columns(source.model.get_layer("logits"), model.get_layer("logits"),
                                             list(source.card.class_names), list(class_names), shared))
    return model, copied


def _copy_head_columns(source: keras.layers.Layer, target: keras.layers.Layer, source_classes: list[str],
                       target_classes: list[str], shared: list[str]) -> str:
    """Copy the Dense kernel column and bias of each class in ``shared`` from ``source`` to ``target``."""
    kernel, bias = (np.array(w) for w in target.get_weights())
    source_kernel, source_bias = source.get_weights()
    for name in shared:
        i, j = source_classes.index(name), target_classes.index(name)
        kernel[:, j], bias[j] = source_kernel[:, i], source_bias[i]
    target.set_weights([kernel, bias])
    return f"logits[{','.join(shared)}]"


def set_phase(model: keras.Model, phase: str, unfreeze: str = "all", pretrained: bool = True,
              freeze_batchnorm: bool = True) -> None:
    """Set which layers train. ``phase``: "scratch" (all), "frozen" (head only), "fine-tune" (per ``unfreeze``).

    From pretrained weights BatchNorm stays frozen (so in inference mode) in every phase, unless
    ``freeze_batchnorm`` is False: then every BatchNorm layer trains in the fine-tune phase (for
    continuing one of our own chest X-ray models at a new input size or on new sources, whose
    feature statistics move; ImageNet features should keep them frozen).
    """
    weighted = [layer for layer in model.layers if layer.weights and layer.name not in HEAD]
    model.trainable = True
    for layer in model.layers:
        layer.trainable = phase == "scratch" or layer.name in HEAD
    if phase == "fine-tune":
        candidates = [la for la in weighted if not isinstance(la, keras.layers.BatchNormalization)]
        if unfreeze == "all":
            chosen = candidates
        else:
            n = unfreeze_count(unfreeze, len(candidates))
            chosen = candidates[len(candidates) - n:] if n > 0 else []
        for layer in chosen:
            layer.trainable = True
    if pretrained:
        for layer in model.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = phase == "fine-tune" and not freeze_batchnorm


def unfreeze_count(unfreeze: str, layers: int) -> int:
    """How many of ``layers`` weighted layers ``top:K`` trains: K of them (at most all), or with a decimal point
    (``top:0.3``, ``top:1.0``) that fraction of them."""
    k, fraction = unfreeze_top(unfreeze)
    return min(round(k * layers) if fraction else int(k), layers)


class RandomGamma(keras.layers.Layer):
    """Per-image gamma on 0..255 images: ``255 * (x / 255) ** g``, g log-uniform in [1/(1+factor), 1+factor].

    Detectors and their processing differ in their response curve; gamma < 1 brightens the
    mid-tones (lungs look denser), gamma > 1 darkens them. Identity when not training.
    """

    def __init__(self, factor: float, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if factor < 0:
            raise ValueError(f"gamma factor must be >= 0, got {factor}")
        self.factor = float(factor)
        self.seed = seed
        self.generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=None):
        if not training or not self.factor:
            return images
        bound = float(np.log1p(self.factor))
        batch = keras.ops.shape(images)[0]
        log_gamma = keras.random.uniform((batch, 1, 1, 1), -bound, bound, seed=self.generator, dtype=images.dtype)
        x = keras.ops.clip(images / 255.0, 1e-6, 1.0)
        return keras.ops.power(x, keras.ops.exp(log_gamma)) * 255.0

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "factor": self.factor, "seed": self.seed}


class RandomNoise(keras.layers.Layer):
    """Additive Gaussian noise of standard deviation ``stddev`` (0..255 units), clipped to 0..255; training only.

    Stands in for the quantum and electronic noise of other detectors and doses.
    """

    def __init__(self, stddev: float, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if stddev < 0:
            raise ValueError(f"noise stddev must be >= 0, got {stddev}")
        self.stddev = float(stddev)
        self.seed = seed
        self.generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=None):
        if not training or not self.stddev:
            return images
        # One noise field per film, the same in R, G and B: served films are grey (R = G = B), so noise that
        # differed between channels would teach the model on inputs it never meets.
        shape = keras.ops.shape(images)
        # In the images' dtype: under mixed precision they are float16/bfloat16, and float32 noise would not add.
        noise = keras.random.normal((*shape[:-1], 1), stddev=self.stddev, seed=self.generator, dtype=images.dtype)
        return keras.ops.clip(images + noise, 0.0, 255.0)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "stddev": self.stddev, "seed": self.seed}


def augmentation(config: TrainConfig) -> keras.Sequential:
    """Random acquisition shift on 0..255 images; identity at inference.

    Geometry (positioning, field of view): flip (off by default), rotation, zoom (about the
    centre), shift. Exposure and processing: contrast, brightness, gamma.
    Resolution and detector: blur, sharpening, noise. Each is off at 0.
    """
    layers: list[keras.layers.Layer] = []
    seed = config.seed
    # In float32 whatever the precision policy: the images come in as float32, and Keras's blur does not run
    # in float16 on TensorFlow (the model casts its input to the policy's dtype itself).
    f32 = {"dtype": "float32"}
    if config.flip == "horizontal":
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed, **f32))
    if config.rotation:
        layers.append(keras.layers.RandomRotation(config.rotation, fill_mode="constant", seed=seed + 1, **f32))
    if config.zoom:
        layers.append(keras.layers.RandomZoom(config.zoom, fill_mode="constant", seed=seed + 2, **f32))
    if config.shift:
        layers.append(keras.layers.RandomTranslation(config.shift, config.shift, fill_mode="constant", seed=seed + 3,
                                                     **f32))
    if config.contrast:
        layers.append(keras.layers.RandomContrast(config.contrast, value_range=(0, 255), seed=seed + 4, **f32))
    if config.brightness:
        layers.append(keras.layers.RandomBrightness(config.brightness, value_range=(0, 255), seed=seed + 5, **f32))
    if config.blur:
        layers.append(keras.layers.RandomGaussianBlur(config.blur, kernel_size=3, sigma=1.0,
                                                      value_range=(0, 255), seed=seed + 6, **f32))
    if config.gamma:
        layers.append(RandomGamma(config.gamma, seed=seed + 7, name="random_gamma", **f32))
    if config.sharpen:
        # Keras's factor f gives film + (1 - 2f)(smoothed - film): 0.5 leaves the film as it is, below 0.5
        # blurs, above sharpens. A single float s draws f from [0, s], which blurred every film; sharpening
        # by up to s times the film's difference from its 3x3 smoothing is f in [0.5, 0.5 + s/2].
        layers.append(keras.layers.RandomSharpness((0.5, min(1.0, 0.5 + config.sharpen / 2)), value_range=(0, 255),
                                                   seed=seed + 8, **f32))
    if config.noise:
        layers.append(RandomNoise(config.noise, seed=seed + 9, name="random_noise", **f32))
    return keras.Sequential(layers, name="augmentation")


def describe_augmentation(config: TrainConfig) -> dict[str, str]:
    """What each augmentation does in this run, for the card's recipe (empty when augmentation is off)."""
    if not config.augment:
        return {}
    c = config
    text = {
        "flip": "none: the heart stays on its side" if c.flip == "none" else "random horizontal mirror",
        "rotation": f"uniform within +-{c.rotation * 360:.0f} degrees (patient positioning)",
        "zoom": f"uniform zoom in or out by up to {c.zoom:.0%} about the centre (field of view)",
        "shift": f"uniform translation by up to {c.shift:.0%} of each side (collimation, centring)",
        "contrast": f"contrast factor uniform in [{1 - c.contrast:.2f}, {1 + c.contrast:.2f}] (exposure, processing)",
        "brightness": f"brightness shift uniform within +-{c.brightness:.0%} of full range (exposure)",
        "gamma": f"gamma log-uniform in [{1 / (1 + c.gamma):.2f}, {1 + c.gamma:.2f}] (detector response curve)",
        "blur": f"3x3 Gaussian blur on each film with a probability uniform in [0, {c.blur}] (about "
                f"{c.blur / 2:.0%} of films), sigma uniform in (0, 1] per batch (lower resolution, motion)",
        "sharpen": f"sharpening: the film plus up to {min(c.sharpen, 1.0)} times its difference from a 3x3 "
                   "smoothing, uniform per film (edge enhancement of other vendors)",
        "noise": f"additive Gaussian noise, std {c.noise} of 255, the same in the three channels (detector and "
                 "dose noise)",
    }
    active = {"flip": c.flip != "none", "rotation": c.rotation, "zoom": c.zoom, "shift": c.shift,
              "contrast": c.contrast, "brightness": c.brightness, "gamma": c.gamma, "blur": c.blur,
              "sharpen": c.sharpen, "noise": c.noise}
    return {k: v for k, v in text.items() if active[k]}


def training_model(model: keras.Model, config: TrainConfig) -> keras.Model:
    """``model`` behind the augmentation layers (active only while training); shares its weights."""
    if not config.augment:
        return model
    size = config.input_size
    inputs = keras.Input((size, size, 3), name="image", dtype="float32")
    return keras.Model(inputs, model(augmentation(config)(inputs)), name="train_wrapper")


def optimizer(config: TrainConfig, lr: float) -> keras.optimizers.Optimizer:
    if config.optimizer == "adamw":
        return keras.optimizers.AdamW(learning_rate=lr, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return keras.optimizers.Adam(learning_rate=lr)
    return keras.optimizers.Adamax(learning_rate=lr)


def compile_for(train_model: keras.Model, config: TrainConfig, lr: float) -> None:
    train_model.compile(
        optimizer=optimizer(config, lr),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
