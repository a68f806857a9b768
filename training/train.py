"""One training run: data -> model -> epochs -> calibration on val -> test evaluation -> model folder.

``run(config)`` writes into ``config.out``: ``model.weights.h5`` (no optimizer state),
``model_card.json``, ``history.csv``, ``split.csv``, ``skipped.csv``, ``metrics.json`` and
``predictions.csv`` (the test split; val rows too), and keeps its checkpoint in ``.ckpt/``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd

from cxr_core import card as card_lib
from cxr_core import csvsafe, metrics, models
from training import build, dataset, evaluate, hardware
from training.config import TrainConfig
from training.loop import Loop


def _logits(model: keras.Model, split: dataset.Split, batch_size: int) -> np.ndarray:
    n_classes = model.output_shape[-1]
    if not len(split.labels):
        return np.zeros((0, n_classes))
    return np.asarray(model.predict(dataset.Batches(split, batch_size), verbose=0), dtype=np.float64)


def fit_thresholds(y_val: np.ndarray, probs: np.ndarray, classes: list[str], negative: str | None,
                   config: TrainConfig, log=print) -> dict[str, float]:
    """Per positive class, the highest threshold reaching the target sensitivity (one vs rest) on val.

    Empty (top-class rule) when asked for, without a negative class, or when a positive class has
    no validation images of both kinds (a class without a threshold could never be called).
    """
    if config.threshold_rule == "argmax" or negative is None:
        return {}
    thresholds = {}
    for i, name in enumerate(classes):
        if name == negative:
            continue
        y_bin = (y_val == i).astype(int)
        if y_bin.min() == y_bin.max():
            log(f"validation split lacks positives or negatives of {name}: using the top-class rule")
            return {}
        thresholds[name] = metrics.threshold_for_sensitivity(y_bin, probs[:, i], config.target_sensitivity)
    return thresholds


def _card(config: TrainConfig, prepared: dataset.Prepared, name: str) -> card_lib.ModelCard:
    negative = config.negative_class if config.negative_class in prepared.classes else None
    limitations = [
        f"Trained on {', '.join(prepared.sources)}; performance elsewhere (other sites, ages, devices) is unknown.",
        "Thresholds and temperature were fitted on the validation split; re-check them on local data.",
    ]
    if len(prepared.sources) > 1:
        limitations.append("Classes come from different sources: the model may learn the source instead of the "
                           "disease (see metrics.by_source).")
    return card_lib.ModelCard(
        name=name, architecture=config.architecture, input_size=config.input_size, class_names=prepared.classes,
        target_layer=models.ARCHITECTURES[config.architecture].target_layer, negative_class=negative,
        training_data=prepared.summary(), limitations=limitations,
    )


def _summary(m: dict[str, Any] | None) -> dict[str, Any] | None:
    if m is None:
        return None
    return {k: m[k] for k in ("n", "accuracy", "auc", "ece", "per_class", "confusion_matrix", "by_source") if k in m}


def run(config: TrainConfig, log=print) -> Path:
    """Train, calibrate, evaluate and save one model; returns the model folder."""
    started = time.perf_counter()
    out = Path(config.out)
    if config.resume and not config.split_manifest and (out / "split.csv").is_file():
        config = dataclasses.replace(config, split_manifest=str(out / "split.csv"))
    elif not config.resume and (out / ".ckpt" / "state.json").is_file():
        raise FileExistsError(f"{out} holds an unfinished or earlier run: pass --resume to continue it, "
                              "or choose another --out")
    name = config.name or out.name
    policy = hardware.set_precision(config.mixed_precision)
    keras.utils.set_random_seed(config.seed)
    prepared = dataset.prepare(config, out, log)
    classes, train, val, test = prepared.classes, *(prepared.splits[s] for s in ("train", "val", "test"))
    log(f"{name}: {len(train.labels)} train / {len(val.labels)} val / {len(test.labels)} test images, "
        f"classes {classes}")
    weights = dataset.class_weights(train.labels, len(classes)) if config.class_weights == "balanced" else None
    with hardware.distributed(config.distribute) as distribution:
        model, copied = build.build_model(config, classes)
        if copied:
            head = "its head too (same classes)" if "logits" in copied else f"new head for {classes}"
            log(f"copied {len(copied)} layers from {config.weights}; {head}")
        loop = Loop(model, build.training_model(model, config), config, out)
        if config.resume and loop.resume():
            log(f"resuming after epoch {loop.state['epoch']}")
        fit = loop.run(dataset.Batches(train, config.batch_size, weights, shuffle=True, seed=config.seed),
                       dataset.Batches(val, config.batch_size), config.verbose)
    keras.mixed_precision.set_global_policy("float32")

    card = _card(config, prepared, name)
    val_logits = _logits(model, val, config.batch_size)
    card.temperature = metrics.fit_temperature(val_logits, val.labels)
    val_probs = models.softmax(val_logits, card.temperature)
    card.thresholds = fit_thresholds(val.labels, val_probs, classes, card.negative_class, config, log)
    test_probs = models.softmax(_logits(model, test, config.batch_size), card.temperature)

    def sources(split: dataset.Split) -> list[str]:
        return [r.source for r in split.records]

    val_metrics = evaluate.score(card, val.labels, val_probs, sources(val))
    test_metrics = evaluate.score(card, test.labels, test_probs, sources(test)) if len(test.labels) else None
    if test_metrics is None:
        log("the test split is empty: no held-out evaluation (metrics.json holds the validation split)")
    held_out = test_metrics or val_metrics
    held_out.update({"split": "test" if test_metrics else "val", "skipped": prepared.skipped,
                     "unmapped_folders": prepared.unmapped})
    (out / "metrics.json").write_text(json.dumps(held_out, indent=1) + "\n")
    frames = [evaluate.predictions_frame(card, [r.rel for r in s.records], sources(s), s.labels, p, split=n)
              for n, s, p in (("test", test, test_probs), ("val", val, val_probs)) if len(s.labels)]
    csvsafe.to_csv(pd.concat(frames, ignore_index=True), out / "predictions.csv", keep_bytes=True, index=False)

    wall = time.perf_counter() - started
    card.metrics = {"test": _summary(test_metrics), "val": _summary(val_metrics),
                    "best_epoch": fit.best_epoch, "best_val_loss": fit.best_val_loss}
    card.recipe = {**config.to_dict(), "dropout": config.dropout, "hardware": hardware.describe(),
                   "precision_policy": policy, "distribution": distribution, "epochs_run": len(fit.history),
                   "train_seconds": round(fit.train_seconds, 1), "wall_seconds": round(wall, 1),
                   "images_per_second": round(fit.images_seen / fit.train_seconds, 1) if fit.train_seconds else None,
                   "copied_layers": len(copied)}
    models.save(model, card, out)
    auc = held_out.get("auc")
    log(f"done: {len(fit.history)} epochs, best val_loss {fit.best_val_loss} at epoch {fit.best_epoch}; "
        f"{held_out['split']} accuracy {held_out['accuracy']:.3f}, AUC "
        f"{'n/a' if auc is None else f'{auc:.3f}'}; temperature {card.temperature:.3f}, "
        f"thresholds {card.thresholds or 'top class'}; {wall:.0f} s. Model folder: {out}")
    return out
