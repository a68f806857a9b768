"""The epochs: phases (frozen backbone, then fine-tuning), a checkpoint each epoch, ``--resume``.

``OUT/.ckpt/`` holds ``last-N.weights.h5`` (model after the last completed epoch N),
``optimizer-N.npz`` (optimizer variables), ``best-M.weights.h5`` (lowest val_loss, epoch M) and
``state.json`` (epoch, phase, history, callback state, the files above, and a fingerprint of the
validation split that the best epoch was measured on), and ``trained.csv`` (the films the weights trained on: a
resumed run refuses a split that holds any of them out). An epoch's files are written first and
``state.json`` last, replacing the old one in one step: a run killed at any moment resumes from a
consistent epoch. (Checkpoints from before kept ``last.weights.h5``, ``optimizer.npz`` and
``best.weights.h5``; they still resume.) Keras 3 APIs only: any backend.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from cxr_core import csvsafe
from training import build
from training.config import TrainConfig
from training.dataset import Batches

TRAINED_FILE = "trained.csv"  # in .ckpt: the films the checkpoint's weights trained on (key, source, sha256, patient)
HISTORY_FIELDS = ("epoch", "phase", "loss", "accuracy", "val_loss", "val_accuracy", "lr", "seconds")


@dataclass
class FitResult:
    history: list[dict[str, Any]]
    best_epoch: int  # 1-based; 0 when no epoch ran
    best_val_loss: float | None
    train_seconds: float
    images_seen: int
    stopped_by_time_budget: bool = False


def phases(config: TrainConfig) -> list[tuple[str, int, float]]:
    """(phase, last epoch, learning rate): frozen then fine-tune from pretrained weights, else scratch."""
    if not config.pretrained:
        return [("scratch", config.epochs, config.lr)]
    if config.freeze_epochs < 0:
        raise ValueError("freeze_epochs is auto (-1): decide it first (TrainConfig.with_freeze_epochs)")
    frozen = min(config.freeze_epochs, config.epochs)
    return [("frozen", frozen, config.lr), ("fine-tune", config.epochs, config.fine_tune_lr)]


def val_fingerprint(batches: Batches) -> str:
    """sha256 of the validation films and labels: val_loss is only comparable on the same films."""
    digest = hashlib.sha256()
    for record, label in zip(batches.split.records, batches.split.labels, strict=True):
        digest.update(f"{record.source}/{record.rel}\t{int(label)}\n".encode())
    return digest.hexdigest()


def read_trained(out: Path) -> list[dict[str, str]] | None:
    """The films the checkpoint in ``out/.ckpt`` trained on (rows: key, source, sha256, patient), or None when
    there is no checkpoint or it predates the list. ``dataset.prepare`` refuses a split that holds any out."""
    ckpt = out / ".ckpt"
    if not (ckpt / "state.json").is_file() or not (ckpt / TRAINED_FILE).is_file():
        return None
    with (ckpt / TRAINED_FILE).open(newline="", encoding="utf-8", errors="surrogateescape") as fh:
        return list(csv.DictReader(fh))


def _inner(optimizer: keras.optimizers.Optimizer) -> keras.optimizers.Optimizer:
    """The optimizer whose state the checkpoint keeps: inside a float16 run's LossScaleOptimizer, the wrapped
    one (its loss scale re-adapts in a few steps), so that a run can resume on a machine of another precision."""
    return getattr(optimizer, "inner_optimizer", optimizer)


def _atomic_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def write_history(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(csvsafe.row(r) for r in rows)


class _EarlyStopping(keras.callbacks.EarlyStopping):
    def __init__(self, restore: dict | None, **kwargs):
        super().__init__(**kwargs)
        self.restore = restore

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self.restore:
            self.wait, self.best = self.restore["wait"], self.restore["best"]

    def state(self) -> dict:
        return {"wait": int(self.wait), "best": None if self.best is None else float(self.best)}


class _ReduceLR(keras.callbacks.ReduceLROnPlateau):
    def __init__(self, restore: dict | None, **kwargs):
        super().__init__(**kwargs)
        self.restore = restore

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self.restore:
            self.wait, self.cooldown_counter = self.restore["wait"], self.restore["cooldown"]
            self.best = np.inf if self.restore["best"] is None else self.restore["best"]

    def state(self) -> dict:
        return {"wait": int(self.wait), "cooldown": int(self.cooldown_counter),
                "best": None if np.isinf(self.best) else float(self.best)}


class _TimeBudget(keras.callbacks.Callback):
    """Stops before an epoch that the last one's duration says would end past ``minutes``.

    The last epoch, not the mean: the first epoch of a process also pays for compiling (minutes under JAX on
    a GPU, against seconds for the epochs after it), which the mean would carry into every later forecast.
    (After the first epoch the forecast is that epoch, compile included: a budget should leave room for it.)

    Unlike early stopping the phase is not done: ``--resume`` continues it (``Loop.budget_hit``).
    """

    def __init__(self, loop: Loop, minutes: float):
        super().__init__()
        self.loop, self.budget = loop, minutes * 60

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        now = time.perf_counter()
        seconds, last = now - self.loop.run_started, now - self.started
        more = epoch + 1 < self.loop.config.epochs  # the run's last epoch ends it anyway
        if self.budget > 0 and more and seconds + last > self.budget:
            self.loop.budget_hit = True
            self.model.stop_training = True


class _Checkpoint(keras.callbacks.Callback):
    """Saves the run's full state after every epoch; must come after the other callbacks."""

    def __init__(self, loop: Loop, phase: str, early: _EarlyStopping, plateau: _ReduceLR):
        super().__init__()
        self.loop, self.phase, self.early, self.plateau = loop, phase, early, plateau

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()
        self.lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        seconds = time.perf_counter() - self.started
        row = {"epoch": epoch + 1, "phase": self.phase, "lr": self.lr, "seconds": round(seconds, 3)}
        row.update({k: float(logs[k]) for k in ("loss", "accuracy", "val_loss", "val_accuracy") if k in logs})
        # Early stopping ends the phase for good; the time budget only pauses it (--resume continues).
        early_stopped = epoch > 0 and self.early.stopped_epoch == epoch
        stopped = bool(self.model.stop_training) and (early_stopped or not self.loop.budget_hit)
        self.loop.end_epoch(row, seconds, stopped=stopped,
                            callbacks={"early": self.early.state(), "plateau": self.plateau.state()})


# What a resumed run must share with its checkpoint (what decides how the model trains; "pretrained" too), and what
# may change with the machine (a GPU resumes a CPU run with bigger batches).
RESUME_FIXED = ("architecture", "input_size", "dropout", "freeze_epochs", "freeze_batchnorm", "unfreeze", "optimizer",
                "lr", "fine_tune_lr", "weight_decay", "class_weights", "augment", "flip", "rotation", "zoom", "shift",
                "contrast", "brightness", "blur", "sharpen", "gamma", "noise", "threshold_rule",
                "target_sensitivity")
RESUME_MAY_CHANGE = ("batch_size", "mixed_precision", "distribute")


class Loop:
    """Runs the phases of one training run and keeps its checkpoint in ``out/.ckpt``."""

    def __init__(self, model: keras.Model, train_model: keras.Model, config: TrainConfig, out: Path, log=print):
        self.model, self.train_model, self.config, self.out, self.log = model, train_model, config, out, log
        self.ckpt = out / ".ckpt"
        self.state: dict[str, Any] = {"epoch": 0, "history": [], "done": [], "best": None, "best_epoch": 0,
                                      "phase": None, "callbacks": None, "lr": None, "train_seconds": 0.0,
                                      "images_seen": 0}
        # when this process began training and from which epoch, for --time-budget (a resumed run starts a
        # new budget), and whether the budget ended it
        self.run_started, self.first_epoch, self.budget_hit = 0.0, 0, False

    def resume(self) -> bool:
        """Load the checkpoint if there is one; True when the run continues from it. Refuses (ValueError) a command
        whose settings differ from the checkpoint's in what decides how the model trains (``RESUME_FIXED``); says
        which machine-dependent ones changed (``RESUME_MAY_CHANGE``)."""
        path = self.ckpt / "state.json"
        if not path.is_file():
            return False
        self.state = json.loads(path.read_text())
        self._check_settings(self.state.get("settings"))
        self.model.load_weights(str(self.ckpt / self.files()["last"]))
        return True

    def _settings(self) -> dict[str, Any]:
        values = self.config.to_dict()
        return {**{k: values[k] for k in (*RESUME_FIXED, *RESUME_MAY_CHANGE)}, "pretrained": self.config.pretrained}

    def _check_settings(self, saved: dict[str, Any] | None) -> None:
        if saved is None:
            self.log("the checkpoint does not record its settings (written before they were kept): this command's "
                     "are taken as theirs")
            return
        now = self._settings()
        differ = [k for k in (*RESUME_FIXED, "pretrained") if k in saved and saved[k] != now[k]]
        if differ:
            raise ValueError("--resume: this command trains differently from the checkpoint in "
                             + ", ".join(f"{k} ({saved[k]!r} there, {now[k]!r} here)" for k in differ)
                             + ". Resume with the run's own settings (only --epochs, --time-budget, --batch-size, "
                             "the data and cache paths, --mixed-precision, --distribute, --verbose and --note may "
                             "change), or start a new run in another --out, from this run's model folder as "
                             "--weights")
        changed = [k for k in RESUME_MAY_CHANGE if k in saved and saved[k] != now[k]]
        if changed:
            self.log("resuming with " + ", ".join(f"{k} {now[k]!r} (was {saved[k]!r})" for k in changed))

    def end_epoch(self, row: dict[str, Any], seconds: float, stopped: bool, callbacks: dict) -> None:
        s = self.state
        epoch = row["epoch"]
        s["epoch"] = epoch
        s["history"].append(row)
        s["train_seconds"] += seconds
        s["images_seen"] += self.n_train
        s["callbacks"] = callbacks
        s["lr"] = float(keras.ops.convert_to_numpy(self.train_model.optimizer.learning_rate))
        files = self.files()
        val = row.get("val_loss")
        if val is not None and np.isfinite(val) and (s["best"] is None or val < s["best"]):
            s["best"], s["best_epoch"] = val, epoch
            files["best"] = f"best-{epoch}.weights.h5"
            self.model.save_weights(str(self.ckpt / files["best"]))
        if stopped:
            s["done"].append(s["phase"])
        files["last"] = f"last-{epoch}.weights.h5"
        self.model.save_weights(str(self.ckpt / files["last"]))
        files["optimizer"] = f"optimizer-{epoch}.npz"
        s["settings"] = self._settings()
        variables = _inner(self.train_model.optimizer).variables
        np.savez(self.ckpt / files["optimizer"], *[keras.ops.convert_to_numpy(v) for v in variables])
        s["files"] = files
        _atomic_json(self.ckpt / "state.json", s)  # the epoch counts from here on
        for path in self.ckpt.iterdir():  # what no epoch refers to any more
            if path.name not in (*files.values(), "state.json", TRAINED_FILE):
                path.unlink()
        write_history(s["history"], self.out / "history.csv")

    def record_trained(self, splits: dict[str, Any], earlier: list[dict[str, str]] | None) -> None:
        """Write ``.ckpt/trained.csv``: ``earlier`` (``read_trained``; None when the checkpoint has no list) and
        this run's train films, which the weights now train on too."""
        self.ckpt.mkdir(parents=True, exist_ok=True)
        merged = {row["key"]: row for row in earlier or []}
        for r in splits["train"].records:
            merged.setdefault(r.key, {"key": r.key, "source": r.source, "sha256": r.sha256, "patient": r.patient})
        path = self.ckpt / TRAINED_FILE
        tmp = path.with_suffix(".tmp")
        with tmp.open("w", newline="", encoding="utf-8", errors="surrogateescape") as fh:
            writer = csv.DictWriter(fh, fieldnames=["key", "source", "sha256", "patient"])
            writer.writeheader()
            writer.writerows(merged.values())
        os.replace(tmp, path)

    def files(self) -> dict[str, str]:
        """The checkpoint's files (names in ``.ckpt``) that ``state.json`` refers to."""
        files = self.state.get("files")
        if files is not None:
            return dict(files)
        old = {"last": "last.weights.h5", "optimizer": "optimizer.npz"}  # a checkpoint from before the names
        return {**old, "best": "best.weights.h5"} if (self.ckpt / "best.weights.h5").is_file() else old

    def _rebase_best(self, val: Batches) -> None:
        """Re-measure the best epoch's weights when the validation split is not the one they were measured on.

        A resumed run can meet another validation split (films moved or left out since, e.g. by the check of
        what the starting weights saw); the best val_loss so far, and the callbacks' own best, would then come
        from other films, and an epoch could win or lose against a number it cannot be compared with.
        """
        s, fingerprint = self.state, val_fingerprint(val)
        if s.get("val_split") == fingerprint:
            return
        s["val_split"] = fingerprint
        files = self.files()
        if s["best"] is None or "best" not in files:
            return
        self.model.load_weights(str(self.ckpt / files["best"]))
        build.compile_for(self.train_model, self.config, s["lr"] or self.config.lr)
        loss = float(self.train_model.evaluate(val, verbose=0, return_dict=True)["loss"])
        self.model.load_weights(str(self.ckpt / files["last"]))
        self.log(f"the validation split ({len(val.split.labels)} films) is not the one the checkpoint's best epoch "
                 f"({s['best_epoch']}) was measured on: its weights re-measured on this one, val_loss "
                 f"{s['best']:.4f} -> {loss:.4f} (history.csv's earlier val_loss rows are on the old split)")
        # The callbacks' best is the same epoch's (re-measured) or another's of this phase (unknown now: the
        # next epoch starts their comparison afresh; their patience counters are kept).
        for state in (s["callbacks"] or {}).values():
            if state.get("best") is not None:
                state["best"] = loss if state["best"] == s["best"] else None
        s["best"] = loss
        _atomic_json(self.ckpt / "state.json", s)

    def _restore_optimizer(self) -> None:
        opt = _inner(self.train_model.optimizer)
        opt.build(self.train_model.trainable_variables)
        with np.load(self.ckpt / self.files()["optimizer"]) as saved:
            values = [saved[f"arr_{i}"] for i in range(len(saved.files))]
        if len(values) != len(opt.variables):
            raise ValueError("the checkpoint's optimizer state does not fit this model; start without --resume")
        for var, value in zip(opt.variables, values, strict=True):
            var.assign(value)

    def run(self, train: Batches, val: Batches, verbose: int) -> FitResult:
        """Train the remaining epochs of every phase; the model ends with the best val_loss weights."""
        self.ckpt.mkdir(parents=True, exist_ok=True)
        self.n_train = len(train.split.labels)
        if verbose < 0:
            verbose = 1 if sys.stdout.isatty() else 2
        self._rebase_best(val)
        self.run_started, self.first_epoch = time.perf_counter(), self.state["epoch"]
        for phase, last_epoch, lr in phases(self.config):
            s = self.state
            if phase in s["done"] or s["epoch"] >= last_epoch:
                continue
            continuing = s["phase"] == phase and s["epoch"] > 0
            if not continuing:
                s["phase"], s["callbacks"], s["lr"] = phase, None, lr
            build.set_phase(self.model, phase, self.config.unfreeze, self.config.pretrained,
                            self.config.freeze_batchnorm)
            build.compile_for(self.train_model, self.config, s["lr"])
            if continuing:
                self._restore_optimizer()
            restore = s["callbacks"] or {}
            early = _EarlyStopping(restore.get("early"), monitor="val_loss", patience=self.config.patience)
            plateau = _ReduceLR(restore.get("plateau"), monitor="val_loss", factor=0.2,
                                patience=self.config.lr_patience, min_lr=1e-7)
            train.epoch = s["epoch"]
            train.order = train._order()
            budget = _TimeBudget(self, self.config.time_budget)
            self.train_model.fit(train, validation_data=val, initial_epoch=s["epoch"], epochs=last_epoch,
                                 callbacks=[early, plateau, budget, _Checkpoint(self, phase, early, plateau)],
                                 verbose=verbose)
            if self.budget_hit:
                break  # out of time: scored and saved as it stands; --resume continues this phase
            if s["epoch"] < last_epoch and phase != "frozen":
                break  # early stopping ends the run
        best = self.files().get("best")
        if best is not None and (self.ckpt / best).is_file():
            self.model.load_weights(str(self.ckpt / best))
        s = self.state
        return FitResult(s["history"], s["best_epoch"], s["best"], s["train_seconds"], s["images_seen"],
                         self.budget_hit)
