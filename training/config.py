"""The training run's settings: one dataclass, parsed from flags, saved into the card's recipe."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainConfig:
    """Everything a training run needs; defaults follow the seeds (DenseNet169, 224 px, Adamax 1e-3)."""

    data: list[str]  # dataset folders: DIR/CLASS/** or DIR/{train,val,test}/CLASS/**
    out: str = "models/cxr"  # the model folder written
    name: str = ""  # model name in the card; default: the out folder's name
    class_map: dict[str, str] = field(default_factory=dict)  # folder name -> class
    negative_class: str = "NORMAL"  # called when no positive class reaches its threshold (if present)
    # model
    architecture: str = "densenet169"
    input_size: int = 224
    weights: str = "none"  # none | imagenet | PATH.h5 (backbone weights) | MODEL_DIR (one of ours)
    dropout: float = 0.2
    # optimisation
    epochs: int = 20  # total, including the frozen phase
    # epochs with the backbone frozen, only from pretrained weights; -1 (auto): 0 when the starting model's
    # head is copied (one of ours, same classes: no new head to settle first), else 3
    freeze_epochs: int = -1
    freeze_batchnorm: bool = True  # from pretrained weights: keep BatchNorm in inference mode (off: it trains)
    unfreeze: str = "all"  # all | top:K (last K weighted layers) | top:0.3 (a fraction of them)
    batch_size: int = 32
    optimizer: str = "adamax"  # adam | adamw | adamax
    lr: float = 1e-3
    fine_tune_lr: float = 1e-4
    weight_decay: float = 1e-4  # AdamW only
    # balanced: each class weighs the same; source-class: each (source, class) cell weighs the same
    # (so a small adult collection is not drowned by a large pediatric one); none
    class_weights: str = "balanced"
    patience: int = 5  # EarlyStopping on val_loss, per phase
    lr_patience: int = 2  # ReduceLROnPlateau on val_loss (factor 0.2)
    # augmentation (training only)
    augment: bool = True
    flip: str = "none"  # none | horizontal (mirrors the heart's side: off by default)
    rotation: float = 0.03  # fraction of a full turn (0.03 = about 11 degrees)
    zoom: float = 0.15  # up to 15 % in or out: a random resized crop when zooming in
    shift: float = 0.05
    contrast: float = 0.2
    brightness: float = 0.1
    blur: float = 0.2  # probability-like strength of Gaussian blur (keras RandomGaussianBlur factor)
    sharpen: float = 0.2  # strength of random sharpening (keras RandomSharpness factor; 0 = off)
    gamma: float = 0.25  # gamma drawn log-uniformly in [1/(1+g), 1+g] (detector response curves; 0 = off)
    noise: float = 2.0  # std of additive Gaussian noise in 0..255 units (quantum noise of other detectors; 0 = off)
    # data
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 42
    max_per_class: int = 0  # >0: use at most this many images per (source, class), for smoke runs
    split_manifest: str = ""  # reuse an earlier split.csv instead of splitting
    holdout_source: str = ""  # comma-separated source names kept out of train/val, scored as the external split
    near_duplicate_threshold: float = 0.99  # thumbnail correlation at which two films are one (training.hygiene)
    familiarity_percentile: float = 99.0  # validation percentile of the familiarity distance used as its threshold
    cache_dir: str = ""  # default ~/.cache/cxr_toolkit (or $CXR_CACHE_DIR); "none" disables the cache
    # decision rule, fitted on the validation split
    target_sensitivity: float = 0.95
    threshold_rule: str = "sensitivity"  # sensitivity | argmax
    # hardware
    mixed_precision: str = "auto"  # auto (GPU only) | off | float16 | bfloat16
    distribute: bool = False  # data parallel over all local devices
    resume: bool = False
    # minutes of training (this process) after which no further epoch starts when another epoch as long as
    # the last one would not finish inside them; the run then scores and saves as usual, and --resume
    # continues it (0 = none)
    time_budget: float = 0.0
    verbose: int = -1  # -1: progress bar on a terminal, one line per epoch otherwise
    note: str = ""  # free text kept in the card's recipe: how and where this run was made, what to do next

    def __post_init__(self) -> None:
        self.split = tuple(float(f) for f in self.split)  # type: ignore[assignment]
        if len(self.split) != 3 or min(self.split) < 0 or not abs(sum(self.split) - 1) < 1e-6:
            raise ValueError(f"--split must be three non-negative fractions (train,val,test) summing to 1, got "
                             f"{','.join(f'{f:g}' for f in self.split)}")
        if self.optimizer not in ("adam", "adamw", "adamax"):
            raise ValueError(f"optimizer must be adam, adamw or adamax, got {self.optimizer!r}")
        if self.class_weights not in ("balanced", "source-class", "none"):
            raise ValueError(f"class_weights must be balanced, source-class or none, got {self.class_weights!r}")
        if not 0 < self.near_duplicate_threshold <= 1:
            raise ValueError(f"near_duplicate_threshold must be in (0, 1], got {self.near_duplicate_threshold!r}")
        if not 50 <= self.familiarity_percentile < 100:
            raise ValueError(f"familiarity_percentile must be in [50, 100), got {self.familiarity_percentile!r}")
        if min(self.sharpen, self.gamma, self.noise) < 0:
            raise ValueError("sharpen, gamma and noise must be >= 0")
        if self.flip not in ("none", "horizontal"):
            raise ValueError(f"flip must be none or horizontal, got {self.flip!r}")
        if not 0 < self.target_sensitivity <= 1:  # checked before training: it is used only after the last epoch
            raise ValueError(f"target_sensitivity must be in (0, 1], got {self.target_sensitivity!r} "
                             "(a fraction: 0.95, not 95)")
        if self.threshold_rule not in ("sensitivity", "argmax"):
            raise ValueError(f"threshold_rule must be sensitivity or argmax, got {self.threshold_rule!r}")
        if self.mixed_precision not in ("auto", "off", "float16", "bfloat16"):
            raise ValueError(f"mixed_precision must be auto, off, float16 or bfloat16, got {self.mixed_precision!r}")
        if self.unfreeze != "all":
            unfreeze_top(self.unfreeze)
        if self.epochs < 0 or self.freeze_epochs < -1 or self.batch_size < 1:
            raise ValueError("epochs must be >= 0, freeze_epochs >= 0 (or -1: auto) and batch_size >= 1")

    @property
    def holdout_sources(self) -> list[str]:
        return [s.strip() for s in self.holdout_source.split(",") if s.strip()]

    def with_freeze_epochs(self, head_copied: bool) -> TrainConfig:
        """This config with ``freeze_epochs`` decided: auto (-1) becomes 0 when the head was copied, else 3.

        A frozen phase lets a new head settle before the backbone moves; a copied head has nothing to settle,
        and freezing the backbone under it only spends epochs (a 224 px cxr3 run lost 38 minutes to it).
        """
        if self.freeze_epochs >= 0:
            return self
        return dataclasses.replace(self, freeze_epochs=0 if head_copied else 3)

    @property
    def pretrained(self) -> bool:
        return self.weights.lower() != "none"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["split"] = list(self.split)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """A config from settings (a --config file, a card's recipe): each value of a bool, int or float setting
        must be one (numbers written as text, true/false as text, are read as such); anything else is refused
        with the setting's name ("false" in a file must not count as true)."""
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = set(data) - set(types)
        if unknown:
            raise ValueError(f"unknown training settings: {sorted(unknown)}")
        return cls(**{key: _typed(key, types[key], value) for key, value in data.items()})


def _typed(key: str, kind: str, value: Any) -> Any:
    """``value`` as the setting ``key``'s type when that is bool, int, float or str; ValueError when it is not one."""
    kind = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.strip().lower() in ("true", "yes", "1")
        raise ValueError(f"setting {key!r} must be true or false, got {value!r}")
    if kind in ("int", "float"):
        try:
            number = float(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            number = None
        if number is None or (kind == "int" and number != int(number)):
            raise ValueError(f"setting {key!r} must be {'a whole number' if kind == 'int' else 'a number'}, "
                             f"got {value!r}")
        return int(number) if kind == "int" else number
    if kind == "str" and not isinstance(value, str | None):  # e.g. a JSON list where one text is wanted
        raise ValueError(f"setting {key!r} must be text, got {value!r}"
                         + (" (several sources go in one text, comma-separated)" if key == "holdout_source" else ""))
    return value


def unfreeze_top(unfreeze: str) -> tuple[float, bool]:
    """``top:K`` (a whole number of layers) or ``top:F`` (a fraction 0 < F <= 1, written with a decimal point) as
    (K or F, whether it is a fraction); ValueError for anything else."""
    text = unfreeze.split(":", 1)[1] if unfreeze.startswith("top:") else ""
    try:
        k = float(text)
    except ValueError:
        k = -1.0
    fraction = "." in text or "e" in text.lower()
    if not (k > 0 and (k <= 1 if fraction else k == int(k))):
        raise ValueError(f"unfreeze must be all, top:K (a whole number of layers) or top:F (a fraction "
                         f"0 < F <= 1, with a decimal point), got {unfreeze!r}")
    return k, fraction
