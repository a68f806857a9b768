"""The model a run trains: cxr_core's flat classifier, its initial weights, freezing, augmentation.

What is saved is exactly ``cxr_core.models.build(...)``; augmentation runs in a wrapper model
used only for ``fit``, so serving rebuilds the trained model from its card alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import keras

from cxr_core import card as card_lib
from cxr_core import models
from training.config import TrainConfig

HEAD = ("avg_pool", "head_dropout", "logits")


def is_model_dir(weights: str) -> bool:
    return Path(weights).is_dir() and (Path(weights) / card_lib.CARD_FILE).is_file()


def build_model(config: TrainConfig, class_names: Sequence[str]) -> tuple[keras.Model, list[str]]:
    """The classifier with its initial weights; returns (model, names of layers copied from a model folder).

    ``config.weights``: "none", "imagenet", a Keras backbone weights file, or one of our model
    folders, whose backbone weights are copied layer by layer (by name). Its head is copied too
    when it has exactly ``class_names`` (same classes, same order: training continues that
    model); otherwise the head is rebuilt for the new classes.
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
    return model, copied


def set_phase(model: keras.Model, phase: str, unfreeze: str = "all", pretrained: bool = True) -> None:
    """Set which layers train. ``phase``: "scratch" (all), "frozen" (head only), "fine-tune" (per ``unfreeze``).

    From pretrained weights BatchNorm stays frozen (so in inference mode) in every phase.
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
            k = float(unfreeze.split(":", 1)[1])
            n = round(k * len(candidates)) if k < 1 else int(k)
            chosen = candidates[len(candidates) - n:] if n > 0 else []
        for layer in chosen:
            layer.trainable = True
    if pretrained:
        for layer in model.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False


def augmentation(config: TrainConfig) -> keras.Sequential:
    """Random flips/rotation/zoom/shift/contrast/brightness/blur on 0..255 images; identity at inference."""
    layers: list[keras.layers.Layer] = []
    seed = config.seed
    if config.flip == "horizontal":
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed))
    if config.rotation:
        layers.append(keras.layers.RandomRotation(config.rotation, fill_mode="constant", seed=seed + 1))
    if config.zoom:
        layers.append(keras.layers.RandomZoom(config.zoom, fill_mode="constant", seed=seed + 2))
    if config.shift:
        layers.append(keras.layers.RandomTranslation(config.shift, config.shift, fill_mode="constant", seed=seed + 3))
    if config.contrast:
        layers.append(keras.layers.RandomContrast(config.contrast, value_range=(0, 255), seed=seed + 4))
    if config.brightness:
        layers.append(keras.layers.RandomBrightness(config.brightness, value_range=(0, 255), seed=seed + 5))
    if config.blur:
        layers.append(keras.layers.RandomGaussianBlur(config.blur, kernel_size=3, sigma=1.0,
                                                      value_range=(0, 255), seed=seed + 6))
    return keras.Sequential(layers, name="augmentation")


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
