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
from cxr_core import csvsafe, evaluation_view, familiarity, metrics, models
from training import build, data, dataset, evaluate, hardware
from training import loop as loop_lib
from training.config import TrainConfig
from training.loop import Loop


def _outputs(both: keras.Model, split: dataset.Split, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits float64 (N, C) and pooled penultimate features float32 (N, D) of a split, in one pass of ``both``
    (``_logits_and_features``: one model for every split, so that its predict function is compiled once)."""
    if not len(split.labels):
        return np.zeros((0, both.output_shape[0][-1])), np.zeros((0, both.output_shape[1][-1]), np.float32)
    logits, features = both.predict(dataset.Batches(split, batch_size), verbose=0)
    return np.asarray(logits, dtype=np.float64), np.asarray(features, dtype=np.float32)


def _logits_and_features(model: keras.Model) -> keras.Model:
    return keras.Model(model.inputs, [model.output, model.get_layer("avg_pool").output], name="logits_and_features")


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


def served_shortfall(card: card_lib.ModelCard, y_val: np.ndarray, probs: np.ndarray, target: float) -> list[str]:
    """What the thresholds give under the served rule (``models.decide``: the most probable class among those over
    their threshold) where it falls short of ``target``: each is fitted one vs rest, so with three or more classes a
    film over its own class's threshold can go to another class that is over its own and more probable."""
    notes = []
    called = evaluation_view.decisions(card, probs)
    for i, name in enumerate(card.class_names):
        if name not in card.thresholds or not (y_val == i).any():
            continue
        mine = y_val == i
        over = probs[mine, i] >= card.thresholds[name]
        alone, served = float(over.mean()), float((called[mine] == i).mean())
        if served < min(alone, target) - 1e-9:
            notes.append(f"{name}: validation sensitivity {alone:.3f} one vs rest at its threshold "
                         f"{card.thresholds[name]:.4f}, {served:.3f} as the app decides ({int(mine.sum())} films; "
                         f"{int((over & (called[mine] != i)).sum())} over their threshold were called another class "
                         "that was over its own and more probable)")
    return notes


def _card(config: TrainConfig, prepared: dataset.Prepared, name: str) -> card_lib.ModelCard:
    negative = config.negative_class if config.negative_class in prepared.classes else None
    limitations = [
        f"Trained on {', '.join(prepared.trained_sources)}; performance elsewhere (other sites, ages, devices) is "
        "unknown.",
        "Thresholds and temperature were fitted on the validation split; re-check them on local data.",
    ]
    if len(prepared.trained_sources) > 1:
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


def score_and_calibrate(model: keras.Model, card: card_lib.ModelCard, config: TrainConfig,
                        prepared: dataset.Prepared, out: Path, log=print) -> dict[str, dict[str, Any]]:
    """Everything after the epochs, on the best weights.

    Fits the temperature and thresholds (val) and the familiarity model (train; threshold on val), scores
    every split, writes ``metrics.json``, ``predictions.csv`` and ``familiarity.npz`` into ``out`` and fills
    the card's temperature, thresholds, familiarity and metrics. Returns the metrics per split.
    """
    classes, train, val = prepared.classes, prepared.splits["train"], prepared.splits["val"]
    log("scoring every split (logits and penultimate features) for calibration, metrics and the familiarity check")
    both = _logits_and_features(model)
    outputs = {n: _outputs(both, sp, config.batch_size) for n, sp in prepared.splits.items()}
    card.temperature = metrics.fit_temperature(outputs["val"][0], val.labels)
    probs = {n: models.softmax(lg, card.temperature) for n, (lg, _) in outputs.items()}
    card.thresholds = fit_thresholds(val.labels, probs["val"], classes, card.negative_class, config, log)
    for note in served_shortfall(card, val.labels, probs["val"], config.target_sensitivity):
        log(f"note: below the target sensitivity {config.target_sensitivity:g} as served: {note}")
    fam = familiarity.calibrate(familiarity.fit(outputs["train"][1], train.labels), outputs["val"][1],
                                config.familiarity_percentile)
    distances = {n: fam.distance(f) for n, (_, f) in outputs.items()}
    familiarity.save(fam, out)
    card.familiarity = {"file": familiarity.FILE, "threshold": fam.threshold,
                        "percentile": config.familiarity_percentile, "layer": "avg_pool",
                        "components": int(fam.components.shape[1]),
                        "method": "class-conditional Gaussians, shared covariance (probabilistic PCA), "
                                  "fitted on the train split; threshold at the validation percentile"}

    def sources(split: dataset.Split) -> list[str]:
        return [r.source for r in split.records]

    scored: dict[str, dict[str, Any]] = {}
    for n, sp in prepared.splits.items():
        if len(sp.labels):
            scored[n] = evaluate.score(card, sp.labels, probs[n], sources(sp))
            scored[n]["familiarity"] = evaluate.familiarity_rates(card, sp.labels, probs[n], distances[n], fam,
                                                                  sources(sp))
    test_metrics, val_metrics, external = scored.get("test"), scored["val"], scored.get(data.EXTERNAL)
    if test_metrics is None:
        log("the test split is empty: no held-out evaluation (metrics.json holds the validation split)")
    held_out = dict(test_metrics or val_metrics)
    held_out.update({"split": "test" if test_metrics else "val", "skipped": prepared.skipped,
                     "unmapped_folders": prepared.unmapped})
    if external is not None:
        held_out[data.EXTERNAL] = {**external, "split": data.EXTERNAL, "sources": prepared.holdout}
    held_out["by_split"] = {n: {k: m[k] for k in ("n", "accuracy", "auc", "by_source", "familiarity")}
                            for n, m in scored.items()}
    (out / "metrics.json").write_text(json.dumps(held_out, indent=1) + "\n")
    frames = [evaluate.predictions_frame(card, [r.rel for r in sp.records], sources(sp), sp.labels, probs[n],
                                         split=n, familiarity=(distances[n], fam.flags(distances[n])))
              for n, sp in prepared.splits.items() if n != "train" and len(sp.labels)]
    csvsafe.to_csv(pd.concat(frames, ignore_index=True), out / "predictions.csv", keep_bytes=True, index=False)

    card.metrics = {**card.metrics, "test": _summary(test_metrics), "val": _summary(val_metrics)}
    if external is not None:
        card.metrics[data.EXTERNAL] = {**_summary(external), "sources": prepared.holdout}
    card.metrics["familiarity"] = {n: m["familiarity"] for n, m in scored.items()}
    for n, m in scored.items():
        f = m["familiarity"]
        log(f"familiarity flags, {n}: {f['flagged']} of {f['n']} ({f['rate']:.1%}); wrong {f['wrong_rate']}, "
            f"right {f['right_rate']}")
    return scored


def run(config: TrainConfig, log=print) -> Path:
    """Train, calibrate, evaluate and save one model; returns the model folder."""
    started = time.perf_counter()
    out = Path(config.out)
    checkpoint = (out / ".ckpt" / "state.json").is_file()
    model = [name for name in (card_lib.CARD_FILE, card_lib.WEIGHTS_FILE) if (out / name).is_file()]
    if model and not checkpoint:  # a shipped model, or one brought back without its checkpoint
        raise FileExistsError(
            f"{out} holds a trained model ({', '.join(model)}) but no checkpoint (.ckpt) to continue from: "
            + ("--resume would start it again from the first epoch and replace it. " if config.resume else
               "training there would replace it. ")
            + f"To train it further, start from it in another folder: --weights {out} --split-manifest "
            f"{out / 'split.csv'} --out NEW_FOLDER")
    if config.resume and not config.split_manifest and (out / "split.csv").is_file():
        config = dataclasses.replace(config, split_manifest=str(out / "split.csv"))
    elif not config.resume and checkpoint:
        raise FileExistsError(f"{out} holds an unfinished or earlier run: pass --resume to continue it, "
                              "or choose another --out")
    name = config.name or out.name
    policy = hardware.set_precision(config.mixed_precision)
    keras.utils.set_random_seed(config.seed)
    trained = loop_lib.read_trained(out) if config.resume else None  # what a checkpoint's weights trained on
    prepared = dataset.prepare(config, out, log, trained=trained)
    classes, train, val, test = prepared.classes, *(prepared.splits[s] for s in ("train", "val", "test"))
    log(f"{name}: {len(train.labels)} train / {len(val.labels)} val / {len(test.labels)} test images, "
        f"classes {classes}")
    weights = dataset.sample_weights(train, len(classes), config.class_weights)
    with hardware.distributed(config.distribute) as distribution:
        model, copied = build.build_model(config, classes)
        if copied:
            head = "its head too (same classes)" if "logits" in copied else f"new head for {classes}"
            head += "".join(f"; {c} copied by class name" for c in copied if c.startswith("logits["))
            log(f"copied {len(copied)} layers from {config.weights}; {head}")
        auto = config.freeze_epochs < 0
        config = config.with_freeze_epochs("logits" in copied)
        if config.pretrained and auto:
            log(f"--freeze-epochs {config.freeze_epochs} (auto: "
                + ("the head is copied, so the whole model trains from the first epoch)" if config.freeze_epochs == 0
                   else "a new head trains alone first, then the backbone is unfrozen)"))
        loop = Loop(model, build.training_model(model, config), config, out, log)
        resumed = config.resume and loop.resume()
        if resumed:
            log(f"resuming after epoch {loop.state['epoch']}")
        if resumed and trained is None:
            log("the checkpoint does not list the films it trained on (written before the list existed): this "
                "run's train split is taken as theirs")
        loop.record_trained(prepared.splits, trained)
        fit = loop.run(dataset.Batches(train, config.batch_size, weights, shuffle=True, seed=config.seed),
                       dataset.Batches(val, config.batch_size), config.verbose)
    keras.mixed_precision.set_global_policy("float32")
    if policy != "float32":
        # Calibrate, score and save what is served: the same weights in a float32 model (the trained model keeps
        # computing in float16/bfloat16, whose outputs differ by up to ~1e-2 from the served model's).
        served = models.build(config.architecture, len(classes), config.input_size, dropout=config.dropout)
        served.set_weights(model.get_weights())
        model = served
    if fit.stopped_by_time_budget:
        log(f"--time-budget {config.time_budget:g} min: stopped after epoch {len(fit.history)} of {config.epochs} "
            f"(the next would have ended past it); scoring the best epoch so far. --resume continues the run")

    card = _card(config, prepared, name)
    if card.negative_class is None and config.negative_class:
        log(f"the negative class {config.negative_class!r} is not one of the classes {prepared.classes}: the model "
            "calls the top class (no decision thresholds); pass --negative-class with the class that means "
            "'no finding'")
    card.metrics = {"best_epoch": fit.best_epoch, "best_val_loss": fit.best_val_loss}
    scored = score_and_calibrate(model, card, config, prepared, out, log)
    held_out = scored.get("test") or scored["val"]
    held_out = {**held_out, "split": "test" if "test" in scored else "val"}
    external = scored.get(data.EXTERNAL)
    wall = time.perf_counter() - started
    card.recipe = {**config.to_dict(), "dropout": config.dropout, "hardware": hardware.describe(),
                   "precision_policy": policy, "distribution": distribution, "epochs_run": len(fit.history),
                   "stopped_by_time_budget": fit.stopped_by_time_budget,
                   "train_seconds": round(fit.train_seconds, 1), "wall_seconds": round(wall, 1),
                   "images_per_second": round(fit.images_seen / fit.train_seconds, 1) if fit.train_seconds else None,
                   "copied_layers": len(copied), "augmentation": build.describe_augmentation(config)}
    models.save(model, card, out)
    auc = held_out.get("auc")
    if external is not None:
        ext_auc = external.get("auc")
        log(f"external ({', '.join(prepared.holdout)}): {external['n']} images, accuracy {external['accuracy']:.3f}, "
            f"AUC {'n/a' if ext_auc is None else f'{ext_auc:.3f}'}")
    log(f"done: {len(fit.history)} epochs, best val_loss {fit.best_val_loss} at epoch {fit.best_epoch}; "
        f"{held_out['split']} accuracy {held_out['accuracy']:.3f}, AUC "
        f"{'n/a' if auc is None else f'{auc:.3f}'}; temperature {card.temperature:.3f}, "
        f"thresholds {card.thresholds or 'top class'}; {wall:.0f} s. Model folder: {out}")
    return out
