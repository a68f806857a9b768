"""From dataset folders to cached uint8 arrays per split, and the batches Keras trains on."""

from __future__ import annotations

import csv
import dataclasses
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from cxr_core import card as card_lib
from cxr_core import csvsafe, preprocess
from training import cache, data, hygiene
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
    holdout: list[str] = field(default_factory=list)  # sources scored as the external split
    near_duplicates: dict[str, int] = field(default_factory=dict)  # "dropped source (copy of kept source)" -> n

    @property
    def sources(self) -> list[str]:
        return sorted({r.source for s in self.splits.values() for r in s.records})

    @property
    def trained_sources(self) -> list[str]:
        """The sources of the train split: never a held-out source (scored as the external split only)."""
        train = self.splits.get("train")
        return sorted({r.source for r in train.records}) if train is not None else []

    def summary(self) -> dict[str, Any]:
        """The card's training_data: counts per source, split and class; what was removed."""
        kept = [r for s in self.splits.values() for r in s.records]
        # Copies (bytes, near) removed from a held-out split; films left out because the starting weights saw them
        # or their patient has films in an earlier split are counted apart. A split read from a manifest names every
        # removed copy "duplicate" (whatever split it came from): then the number is not known here.
        from_manifest = any(d.split == "duplicate" for d in self.duplicates)
        near = [d for d in self.duplicates if d.duplicate_kind == "near"]
        seen = [d for d in self.duplicates if d.duplicate_kind == "seen"]
        crossing = [d for d in self.duplicates if d.duplicate_kind == "patient"]
        cross = None if from_manifest else sum(1 for d in self.duplicates
                                               if d.split in HELD_OUT and d.duplicate_kind in ("bytes", "near"))
        return {
            "sources": data.counts(kept),
            "classes": self.classes,
            "images": {name: len(s.records) for name, s in self.splits.items()},
            "duplicates_removed": len(self.duplicates),
            "byte_duplicates_removed": len(self.duplicates) - len(near) - len(seen) - len(crossing),
            "near_duplicates_removed": len(near),
            "seen_by_starting_weights_removed": len(seen),
            "patients_across_splits_removed": len(crossing),
            "near_duplicates_by_source": self.near_duplicates,
            "held_out_duplicates_removed": cross,
            "holdout_sources": self.holdout,
            "skipped_unreadable": len(self.skipped),
            "unmapped_folders": self.unmapped,
            "patient_level_split": True,  # where a source's names carry the patient (below); else each film alone
            "films_with_patient_id": {src: f"{sum(1 for r in kept if r.source == src and r.patient)} of "
                                           f"{sum(1 for r in kept if r.source == src)}" for src in self.sources},
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


def _hold_out(records: list[data.Record], holdout: list[str], from_manifest: bool,
              listed: Sequence[data.Record] = ()) -> list[data.Record]:
    """Mark the records of the held-out sources as the external split (checked, not changed, for a manifest).
    ``listed``: all the manifest's rows, its dropped copies too (a held-out source all of whose films a run left
    out as copies or as its training patients' films is still a source of that split)."""
    if not holdout:
        return records
    present = sorted({r.source for r in [*records, *listed]})
    unknown = [h for h in holdout if h not in present]
    if unknown:
        raise ValueError(f"--holdout-source {', '.join(unknown)}: no such source; the sources are {present}")
    if len(set(present) - set(holdout)) < 1:
        raise ValueError("--holdout-source names every source: nothing would be left to train on")
    if from_manifest:
        wrong = [r.key for r in records if (r.source in holdout) != (r.split == data.EXTERNAL)]
        if wrong:
            raise ValueError(f"the split manifest does not hold out {holdout} as the external split (e.g. {wrong[0]}); "
                             "start a new run without --split-manifest")
        return records
    return [dataclasses.replace(r, split=data.EXTERNAL) if r.source in holdout else r for r in records]


HELD_OUT = ("val", "test", data.EXTERNAL)


def not_seen_by_start(config: TrainConfig, records: list[data.Record], duplicates: list[data.Record], log
                       ) -> tuple[list[int], list[data.Record]]:
    """Leave out of val, test and external the films that the starting weights trained on.

    A run that starts from one of our model folders (``--weights MODEL_DIR``) inherits what that model
    learnt: a film it trained on (``data.trained_films``: its train split and what its own start trained on;
    matched by key or by content), a copy of one (the same bytes, or a near-copy this run found), or another
    film of a patient it trained on is not held out from the new model, so scoring it would inflate the
    figures. Such films are dropped from
    scoring and recorded as duplicates of kind "seen". The check reads the starting folder's
    ``split.csv`` as it is now; a source that this run does not read cannot be checked for copies.
    Returns (indices of ``records`` kept, the dropped records).
    """
    manifest = Path(config.weights, "split.csv")
    if not Path(config.weights, card_lib.CARD_FILE).is_file():
        if config.weights and config.weights not in ("imagenet", "none") and not Path(config.weights).exists():
            log(f"the starting weights' folder {config.weights} is not here (moved, or named as on another machine): "
                "the films they trained on cannot be left out of the held-out splits, whose figures may flatter the "
                "model")
        return list(range(len(records))), []
    if not manifest.is_file():
        log(f"the starting weights' folder {config.weights} has no split.csv: the films they trained on cannot be "
            "left out of this run's val, test and external splits, whose figures may flatter the model")
        return list(range(len(records))), []
    trained = data.trained_films(manifest)
    via: dict[str, str] = {r.key: r.key for r in records if r.key in trained.keys or r.sha256 in trained.sha256}
    kept_key = data.kept_of(duplicates)
    for d in duplicates:  # a kept film whose dropped copy (or a copy of that copy) the starting weights trained on
        if d.key in kept_key and (d.key in trained.keys or d.sha256 in trained.sha256):
            via.setdefault(kept_key[d.key], d.key)
    # Another film of a patient the starting weights trained on: the split is by patient, so it is not held out
    # from them either.
    patient_film = {r.patient: r.key for r in records if r.key in via and r.patient}
    patients = trained.patients | set(patient_film)  # a patient's film trained on under a compilation's name too
    for r in records:
        if r.patient and r.patient in patients and r.key not in via:
            via[r.key] = patient_film.get(r.patient, f"{r.source}/patient {r.patient}")
    dropped_idx = {i: via[r.key] for i, r in enumerate(records) if r.split in HELD_OUT and r.key in via}
    dropped = [dataclasses.replace(records[i], duplicate_of=key, duplicate_kind="seen")
               for i, key in sorted(dropped_idx.items())]
    if dropped:
        by_split = Counter(d.split for d in dropped)
        whose = ("the model's weights (or their start)" if Path(config.weights) == Path(config.out or "")
                 else f"the starting weights ({config.weights})")  # rescore reads the model's own split
        log(f"{whose} trained on {len(dropped)} films of this run's held-out splits, "
            "on copies of them or on their patients' other films: left out of scoring ("
            + ", ".join(f"{name} {by_split[name]}" for name in HELD_OUT if by_split[name]) + ")")
    return [i for i in range(len(records)) if i not in dropped_idx], dropped


def refuse_trained_held_out(trained: list[dict[str, str]], records: list[data.Record], out: Path) -> None:
    """A resumed run's split must hold out none of the films its checkpoint trained on (``trained``: rows of
    ``.ckpt/trained.csv``), no copy of one (by sha256) and no other film of their patients: the weights would be
    scored on them. Raised before anything is written, so the run's own split.csv stays as it was."""
    held = [r for r in records if r.split in HELD_OUT]
    keys, shas = {r.key for r in held}, {r.sha256 for r in held if r.sha256}
    patients = {r.patient for r in held if r.patient}
    leaked = [row for row in trained if row["key"] in keys or (row["sha256"] and row["sha256"] in shas)
              or (row["patient"] and row["patient"] in patients)]
    if leaked:
        raise ValueError(f"the checkpoint in {out / '.ckpt'} trained on {len(leaked)} films that this run's split "
                         f"holds out for validation, test or external scoring (e.g. {leaked[0]['key']}, or a copy or "
                         "another film of its patient): resuming would score films the model trained on. Resume "
                         "with the run's own split (leave out --split-manifest: OUT/split.csv is used), or start a "
                         "new run without --resume")


def prepare(config: TrainConfig, out: Path, log=print, trained: list[dict[str, str]] | None = None) -> Prepared:
    """Scan, de-duplicate (bytes), hold sources out, decode (once, cached), drop near-copies, split; leave out of
    the held-out splits what the starting weights trained on; refuse a split that holds out what a resumed
    checkpoint trained on (``trained``, ``loop.read_trained``).

    Writes ``split.csv`` and ``skipped.csv`` into ``out``.
    """
    cache_dir = cache.directory(config.cache_dir)
    manifest = Path(config.split_manifest) if config.split_manifest else None
    unmapped: list[str] = []
    if manifest is not None:
        listed = data.read_manifest(manifest, config.data)
        records = [r for r in listed if not r.duplicate_of]
        duplicates = [r for r in listed if r.duplicate_of]
        on_disk = {(source, path.relative_to(root).as_posix())
                   for source, root in data.roots_by_source(config.data).items() for path in data.image_files(root)}
        new = len(on_disk - {(r.source, r.rel) for r in listed})
        log(f"the split comes from {manifest.name}: its classes, splits and patients stand (--map, --split, --seed and "
            "--max-per-class do not change them)"
            + (f"; {new} image file(s) under the data folders are not in it and are left out" if new else ""))
    else:
        known = [config.negative_class]
        if Path(config.weights, card_lib.CARD_FILE).is_file():  # fine-tuning: the old classes keep their folders
            known += card_lib.read(config.weights).class_names
        found = data.scan(config.data, config.class_map, known=known)
        unmapped = found.unmapped
        for folder in unmapped:
            shown = csvsafe.safe_text(folder)  # printable whatever its bytes (a surrogate fails print on UTF-8)
            log(f"skipped folder {shown}: it maps to no class (add --map '{shown.split('/')[-1]}=CLASS')")
        held = _hold_out(_limit(found.records, config.max_per_class, config.seed), config.holdout_sources, False)
        records, duplicates = data.deduplicate(held)
    if manifest is not None:
        records = _hold_out(records, config.holdout_sources, True, listed)
        unscored = sum(1 for r in records if r.split == data.EXTERNAL and not config.holdout_sources)
        if unscored:
            log(f"the split manifest marks {unscored} films external; they are not scored without --holdout-source")
    if duplicates and manifest is None:
        held_out = sum(1 for d in duplicates if d.split in HELD_OUT)
        log(f"collapsed {len(duplicates)} byte-identical duplicate files ({held_out} removed from val/test/external)")
    for label in sorted({r.label for r in records}):  # before hours of decoding and training, not at the card
        if problem := card_lib.class_name_problem(label):
            raise ValueError(f"class {csvsafe.safe_text(label)!r}: {problem}")
    log(f"reading {len(records)} images at {config.input_size} px (decoded once, cached in {cache_dir})")
    decoded = cache.decode(records, config.input_size, cache_dir)
    if decoded.cache_note:
        log(f"warning: {decoded.cache_note}")
    for item in decoded.skipped:
        log(f"skipped unreadable file {csvsafe.safe_text(str(item['path']))}: {item['error']}")
    # A manifest's film that cannot be read now (a source missing on this machine, a re-exported file) keeps its
    # row in split.csv as it was: dropped from it, a train film would no longer count as trained on by these
    # weights, and a later run starting from them could hold it out (--weights) or score it (rescore).
    unread_keys = {str(item["path"]) for item in decoded.skipped}
    unread = [r for r in records if r.key in unread_keys] if manifest is not None else []
    if unread:
        by_split = Counter(r.split for r in unread)
        log(f"{len(unread)} films of the split manifest could not be read ("
            + ", ".join(f"{name} {n}" for name, n in sorted(by_split.items()))
            + "): left out of this run, their rows kept in split.csv; the figures are on the films that were read")
    near: dict[str, int] = {}
    records = decoded.records
    if manifest is None:
        kept_idx, dropped = hygiene.collapse(records, decoded.images, config.near_duplicate_threshold)
        near = hygiene.summary(dropped, records)
        log(f"near-duplicates (thumbnail correlation >= {config.near_duplicate_threshold}): dropped {len(dropped)} "
            f"films" + "".join(f"; {k}: {v}" for k, v in near.items()))
        images = decoded.images[kept_idx]
        records = data.split([records[i] for i in kept_idx], config.split, config.seed)
        duplicates = [*duplicates, *dropped]
    else:  # the manifest's split stands; a near-copy of a film in an earlier split is not held out from it
        kept_idx, dropped = hygiene.collapse(records, decoded.images, config.near_duplicate_threshold,
                                             across_splits_only=True)
        if dropped:
            by_split = Counter(d.split for d in dropped)
            log(f"near-duplicates across the manifest's splits (thumbnail correlation >= "
                f"{config.near_duplicate_threshold}): left {len(dropped)} films out of "
                + ", ".join(f"{name} ({n})" for name, n in sorted(by_split.items())))
        images = decoded.images[kept_idx]
        records = [records[i] for i in kept_idx]
        duplicates = [*duplicates, *dropped]
        near = hygiene.summary([d for d in duplicates if d.duplicate_kind == "near"], [*records, *duplicates])
    position = {id(r): i for i, r in enumerate(records)}
    records, crossing = data.separate_patients(records, duplicates)
    if crossing:
        images, duplicates = images[[position[id(r)] for r in records]], [*duplicates, *crossing]
        by_split = Counter(d.split for d in crossing)
        log(f"patients with films in more than one split: left {len(crossing)} of their films out of the later split ("
            + ", ".join(f"{name} {n}" for name, n in sorted(by_split.items())) + ")")
    kept_idx, seen = not_seen_by_start(config, records, duplicates, log)
    if seen:
        images, records, duplicates = images[kept_idx], [records[i] for i in kept_idx], [*duplicates, *seen]
    pixels = {r.key: img for r, img in zip(records, images, strict=True)}
    classes = sorted({r.label for r in records if r.split != data.EXTERNAL})
    if len(classes) < 2:
        raise ValueError(f"need at least two classes to train, found {classes} in {config.data}")
    index = {c: i for i, c in enumerate(classes)}
    strange = sorted({r.label for r in records} - set(classes))
    if strange:
        raise ValueError(f"the held-out sources have classes {strange} that no training source has: "
                         "map or skip those folders (--map FOLDER=CLASS or FOLDER=)")
    splits = {}
    holdout = config.holdout_sources
    for name in (*data.SPLITS, *([data.EXTERNAL] if holdout else [])):
        recs = [r for r in records if r.split == name]
        size = config.input_size
        images = np.stack([pixels[r.key] for r in recs]) if recs else np.zeros((0, size, size), np.uint8)
        splits[name] = Split(recs, images, np.array([index[r.label] for r in recs], dtype=np.int64))
    for name in ("train", "val"):
        if not len(splits[name].records):
            raise ValueError(f"the {name} split is empty: add images or change --split")
    if holdout and not len(splits[data.EXTERNAL].records):
        log(f"warning: no film of the held-out source(s) {', '.join(holdout)} is left to score (every one was a copy "
            "of, or another film of a patient of, a film in train, val or test, or could not be read; split.csv "
            "says which): this run has no external figures")
    untrained = [c for c, i in index.items() if not (splits["train"].labels == i).any()]
    if untrained:  # a class only in val/test (e.g. DIR/test/COVID without DIR/train/COVID): a head it cannot learn
        raise ValueError(f"the train split has no films of {', '.join(untrained)}: add training films of that class, "
                         "or leave its folders out (--map FOLDER=)")
    for name in ("val", "test"):  # a class too small to reach every split (fewer than ~4 patients)
        absent = [c for c, i in index.items() if len(splits[name].records) and not (splits[name].labels == i).any()]
        if absent:
            log(f"the {name} split has no films of {', '.join(absent)}: "
                + ("no decision threshold can be fitted for it, so the model uses the top-class rule, and its "
                   "calibration is not checked" if name == "val" else "its test figures cannot be computed")
                + "; add films of that class (or patients: a patient's films stay in one split)")
    if trained:
        refuse_trained_held_out(trained, records, out)
    out.mkdir(parents=True, exist_ok=True)
    data.write_manifest([*records, *duplicates, *unread], out / "split.csv")
    with (out / "skipped.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "error"])
        writer.writeheader()
        writer.writerows(csvsafe.row(r) for r in decoded.skipped)
    return Prepared(classes, splits, decoded.skipped, duplicates, unmapped, holdout, near)


def class_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Balanced weights n / (C * n_c) per class (1 where a class is absent)."""
    count = np.bincount(labels, minlength=n_classes).astype(np.float64)
    return np.where(count > 0, labels.size / (n_classes * np.maximum(count, 1)), 1.0)


MAX_CELL_WEIGHT = 10.0  # a (source, class) cell, or a class, of a few dozen films must not dominate the loss


def sample_weights(split: Split, n_classes: int, mode: str) -> np.ndarray | None:
    """Per-sample loss weights (N,) float32 with mean 1, or None for ``mode`` "none".

    "balanced": n / (C * n_class) by class. "source-class": every (source, class) cell of the
    split gets the same total weight, n / (K * n_cell) for K cells. Both are capped at ``MAX_CELL_WEIGHT``
    times the mean so that a tiny class or cell is not repeated into overfitting, then rescaled to mean 1.
    """
    if mode == "none":
        return None
    labels = split.labels
    if mode == "balanced":
        w = class_weights(labels, n_classes)[labels]
    elif mode == "source-class":
        cells = [(r.source, int(y)) for r, y in zip(split.records, labels, strict=True)]
        count = Counter(cells)
        w = np.array([len(cells) / (len(count) * count[c]) for c in cells], dtype=np.float64)
    else:
        raise ValueError(f"unknown weighting {mode!r}")
    # Either mode: a class (or cell) of a few films among thousands would get hundreds of times the weight of
    # the others and be repeated into overfitting. Capping lowers the mean, and rescaling to mean 1 would lift
    # the capped films past the cap again: repeat both until the cap holds (a few rounds).
    for _ in range(100):
        if not len(w):
            break
        w = w / w.mean()
        if w.max() <= MAX_CELL_WEIGHT * (1 + 1e-9):
            break
        w = np.minimum(w, MAX_CELL_WEIGHT)
    return (w / w.mean()).astype(np.float32) if len(w) else w.astype(np.float32)


class Batches(keras.utils.PyDataset):
    """Model-input batches (float32 (B, S, S, 3) in [0, 255], int labels, sample weights) from cached pixels.

    ``weights``: per-sample loss weights (N,) aligned with the split (see ``sample_weights``), or None.
    """

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
        return x, y, self.weights[idx].astype(np.float32)

    def on_epoch_end(self) -> None:
        self.epoch += 1
        self.order = self._order()


def label_counts(split: Split, classes: list[str]) -> dict[str, int]:
    c = Counter(split.labels.tolist())
    return {name: int(c.get(i, 0)) for i, name in enumerate(classes)}
