"""The split of the December 2026 cxr3 retraining: ``python -m training.recipes.cxr3_split OUT.csv [CAP]``.

(It reads the split files of the models that were in ``models/`` before that run, at commit 885c04d; both have
been replaced since, so today it would give another split. The run's split as it was is the shipped
``models/densenet169-cxr3/split.csv``: pass that as ``--split-manifest`` to reproduce it.)

Why a recipe and not ``python -m training train``'s own split: the run started from the then shipped
``models/densenet169-cxr3`` (128 px, no NIH films), and the new model is chosen over the old one on
validation films. Those must be films the old model never trained on, so every film keeps the split it
had before:

- ``kermany`` and ``nih_chestxray14``: the split of ``models/densenet169-pneumonia/split.csv`` (NIH by
  patient; Kermany's split is the same in both shipped models);
- ``covid19_radiography``: the split of ``models/densenet169-cxr3/split.csv``;
- ``covid19_image_dataset``: held out whole as the ``external`` split (``--holdout-source``). The old
  cxr3 trained on 198 of its films, so its external figures are reported for all films and apart for
  the films that were in the old model's val/test.

Then the near-duplicate check runs over all of them (``training.hygiene``: the 523 Kermany films in
``covid19_radiography/Normal`` are dropped there and kept in Kermany), and the training films are
capped at CAP per (source, class) (default 1200, drawn with seed 42) so that an epoch at 224 px takes
about 30 minutes on 2 CPU cores; films over the cap are left out of the manifest. Pixels are decoded at
224 px into the training cache, which the training run then reuses.
"""

from __future__ import annotations

import dataclasses
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from training import cache, data, hygiene

DATA = Path("../shared/data")
ROOTS = [DATA / "kermany/train", DATA / "covid19_radiography", DATA / "nih_chestxray14",
         DATA / "covid19_image_dataset/train"]
CLASS_MAP = {"Normal": "NORMAL", "Covid": "COVID-19", "Viral Pneumonia": "PNEUMONIA", "No_findings": "NORMAL",
             "Pneumonia": "PNEUMONIA"}
SPLIT_FROM = {"kermany": "models/densenet169-pneumonia/split.csv",
              "nih_chestxray14": "models/densenet169-pneumonia/split.csv",
              "covid19_radiography": "models/densenet169-cxr3/split.csv"}
HOLDOUT = "covid19_image_dataset"
SIZE = 224


def _old_splits() -> dict[str, str]:
    split_of: dict[str, str] = {}
    for source, path in SPLIT_FROM.items():
        split_of.update({r.key: r.split for r in data.read_manifest(path, ROOTS)
                         if r.source == source and r.split in data.SPLITS})
    return split_of


def build(out: Path, cap: int = 1200, seed: int = 42) -> dict[str, Counter]:
    found = data.scan(ROOTS, CLASS_MAP, known=["NORMAL", "PNEUMONIA", "COVID-19"])
    split_of = _old_splits()
    records, missing = [], []
    for r in found.records:
        if r.source == HOLDOUT:
            records.append(dataclasses.replace(r, split=data.EXTERNAL))
        elif r.key in split_of:
            records.append(dataclasses.replace(r, split=split_of[r.key]))
        else:
            missing.append(r.key)  # a byte-identical copy removed in the old run; deduplicate finds it again
    records, byte_copies = data.deduplicate(records)
    print(f"{len(records)} films, {len(byte_copies)} byte-identical copies, {len(missing)} without an old split")
    decoded = cache.decode(records, SIZE, cache.directory(""))
    kept_idx, near = hygiene.collapse(decoded.records, decoded.images)
    print(f"near-copies dropped: {len(near)}; " + ", ".join(f"{k}: {v}" for k, v in
                                                          hygiene.summary(near, decoded.records).items()))
    kept = [decoded.records[i] for i in kept_idx]
    rng = np.random.default_rng(seed)
    chosen = []
    for cell in sorted({(r.source, r.label) for r in kept}):
        group = [r for r in kept if (r.source, r.label) == cell]
        train = [r for r in group if r.split == "train"]
        if len(train) > cap:
            keep = set(int(i) for i in rng.permutation(len(train))[:cap])
            train = [r for i, r in enumerate(train) if i in keep]
        chosen += train + [r for r in group if r.split != "train"]
    data.write_manifest([*chosen, *byte_copies, *near], out)
    table = {name: Counter((r.source, r.label) for r in chosen if r.split == name)
             for name in (*data.SPLITS, data.EXTERNAL)}
    for name, cells in table.items():
        print(name, sum(cells.values()), dict(sorted(cells.items())))
    return table


if __name__ == "__main__":
    build(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 1200)
