"""From dataset folders to cached uint8 arrays per split, and the batches Keras trains on."""

from __future__ import annotations

import csv
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from cxr_core import card as card_lib
from cxr_core import csvsafe, preprocess
from training import cache, data
from training.config import TrainConfig


@dataclass
class Split:
    """One split: its records and their pixels uint8 (N, S, S), labels int (N,)."""

    records: list[data.Record]
    images: np.ndarray
    labels: np.ndarray


@dataclass
class Prepared:
    """The data a run trains, calibrates and tests on, and what was left out and why."""

    classes: list[str]
    splits: dict[str, Split]
    skipped: list[dict[str, str]] = field(default_factory=list)
    duplicates: list[data.Record] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)

    @property
    def sources(self) -> list[str]:
        return sorted({r.source for s in self.splits.values() for r in s.records})

    def summary(self) -> dict[str, Any]:
        """The card's training_data: counts per source, split and class; what was removed."""
        kept = [r for s in self.splits.values() for r in s.records]
        cross = [d for d in self.duplicates if d.split and d.split != "train"]
        return {
            "sources": data.counts(kept),
            "classes": self.classes,
            "images": {name: len(s.records) for name, s in self.splits.items()},
            "duplicates_removed": len(self.duplicates),
            "held_out_duplicates_removed": len(cross),
            "skipped_unreadable": len(self.skipped),
            "unmapped_folders": self.unmapped,
            "patient_level_split": True,
        }


def _limit(records: list[data.Record], per_class: int, seed: int) -> list[data.Record]:
    if per_class <= 0:
        return records
    rng = np.random.default_rng(seed)
    chosen: list[data.Record] = []
    for key in sorted({(r.source, r.label) for r in records}):
        group = [r for r in records if (r.source, r.label) == key]
        idx = sorted(rng.permutation(len(group))[:per_class])
        chosen.extend(group[i] for i in idx)
    return chosen


def prepare(config: TrainConfig, out: Path, log=print) -> Prepared:
    """Scan, de-duplicate, decode (once, cached), split; write ``split.csv`` and ``skipped.csv`` into ``out``."""
    cache_dir = None if config.cache_dir == "none" else Path(config.cache_dir or cache.DEFAULT_CACHE)
    manifest = Path(config.split_manifest) if config.split_manifest else None
    unmapped: list[str] = []
    if manifest is not None:
        listed = data.read_manifest(manifest, config.data)
        records = [r for r in listed if not r.duplicate_of]
        duplicates = [r for r in listed if r.duplicate_of]
    else:
        known = [config.negative_class]
        if Path(config.weights, card_lib.CARD_FILE).is_file():  # fine-tuning: the old classes keep their folders
            known += card_lib.read(config.weights).class_names
        found = data.scan(config.data, config.class_map, known=known)
        unmapped = found.unmapped
        for folder in unmapped:
            log(f"skipped folder {folder}: it maps to no class (add --map '{folder.split('/')[-1]}=CLASS')")
        records, duplicates = data.deduplicate(_limit(found.records, config.max_per_class, config.seed))
    if duplicates:
        held_out = sum(1 for d in duplicates if d.split in ("val", "test"))
        log(f"collapsed {len(duplicates)} byte-identical duplicate files ({held_out} removed from val/test)")
    log(f"reading {len(records)} images at {config.input_size} px (decoded once, cached in {cache_dir})")
    decoded = cache.decode(records, config.input_size, cache_dir)
    for item in decoded.skipped:
        log(f"skipped unreadable file {item['path']}: {item['error']}")
    pixels = {r.key: img for r, img in zip(decoded.records, decoded.images, strict=True)}
    records = decoded.records if manifest is not None else data.split(decoded.records, config.split, config.seed)
    classes = sorted({r.label for r in records})
    if len(classes) < 2:
        raise ValueError(f"need at least two classes to train, found {classes} in {config.data}")
    index = {c: i for i, c in enumerate(classes)}
    splits = {}
    for name in data.SPLITS:
        recs = [r for r in records if r.split == name]
        size = config.input_size
        images = np.stack([pixels[r.key] for r in recs]) if recs else np.zeros((0, size, size), np.uint8)
        splits[name] = Split(recs, images, np.array([index[r.label] for r in recs], dtype=np.int64))
    for name in ("train", "val"):
        if not len(splits[name].records):
            raise ValueError(f"the {name} split is empty: add images or change --split")
    out.mkdir(parents=True, exist_ok=True)
    data.write_manifest([*records, *duplicates], out / "split.csv")
    with (out / "skipped.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "error"])
        writer.writeheader()
        writer.writerows(csvsafe.row(r) for r in decoded.skipped)
    return Prepared(classes, splits, decoded.skipped, duplicates, unmapped)


def class_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Balanced weights n / (C * n_c) per class (1 where a class is absent)."""
    count = np.bincount(labels, minlength=n_classes).astype(np.float64)
    return np.where(count > 0, labels.size / (n_classes * np.maximum(count, 1)), 1.0)


class Batches(keras.utils.PyDataset):
    """Model-input batches (float32 (B, S, S, 3) in [0, 255], int labels, sample weights) from cached pixels."""

    def __init__(self, split: Split, batch_size: int, weights: np.ndarray | None = None,
                 shuffle: bool = False, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.split, self.batch_size, self.weights, self.shuffle, self.seed = split, batch_size, weights, shuffle, seed
        self.epoch = 0
        self.order = self._order()

    def _order(self) -> np.ndarray:
        n = len(self.split.labels)
        return np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n)

    def __len__(self) -> int:
        return math.ceil(len(self.split.labels) / self.batch_size)

    def __getitem__(self, i: int):
        idx = np.sort(self.order[i * self.batch_size:(i + 1) * self.batch_size])
        x = preprocess.to_batch(self.split.images[idx])
        y = self.split.labels[idx]
        if self.weights is None:
            return x, y
        return x, y, self.weights[y].astype(np.float32)

    def on_epoch_end(self) -> None:
        self.epoch += 1
        self.order = self._order()


def label_counts(split: Split, classes: list[str]) -> dict[str, int]:
    c = Counter(split.labels.tolist())
    return {name: int(c.get(i, 0)) for i, name in enumerate(classes)}
