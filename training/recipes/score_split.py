"""Score model folders on one split of a manifest: ``python -m training.recipes.score_split MANIFEST SPLIT DIR...``.

The cxr3 retraining chooses between the old and the new model on the validation films of its manifest
(``training.recipes.cxr3_split``), which the old model never trained on. Prints, per model: n, accuracy,
macro AUC, each source's accuracy and macro AUC, and the mean of the per-source macro AUCs over the
sources that have two classes or more. ``--only-old-split FILE`` keeps the films whose split in that older
manifest is val or test (for a held-out source that an older model trained on in part).
"""

from __future__ import annotations

import argparse

import numpy as np

from cxr_core import models
from training import data, evaluate
from training.recipes.cxr3_split import ROOTS


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest")
    parser.add_argument("split")
    parser.add_argument("models", nargs="+")
    parser.add_argument("--only-old-split", default="")
    args = parser.parse_args(argv)
    rows = [r for r in data.read_manifest(args.manifest, ROOTS) if r.split == args.split]
    if args.only_old_split:
        held = {r.key for r in data.read_manifest(args.only_old_split, ROOTS) if r.split in ("val", "test")}
        rows = [r for r in rows if r.key in held]
    items = [(r.key, r.path) for r in rows]
    for folder in args.models:
        classifier = models.load(folder)
        card = classifier.card
        out = evaluate._read_and_predict(classifier, items, 32, None)
        ok = [(row, p.probabilities) for row, (_, p, err) in zip(rows, out, strict=True) if err is None]
        index = {c: i for i, c in enumerate(card.class_names)}
        y = np.array([index[row.label] for row, _ in ok])
        probs = np.array([p for _, p in ok])
        result = evaluate.score(card, y, probs, [row.source for row, _ in ok])
        print(f"{folder} ({card.input_size} px) on {args.split}: n {len(y)}, accuracy {result['accuracy']:.3f}, "
              f"macro AUC {result['auc']:.3f}")
        aucs = []
        for source, s in result["by_source"].items():
            calls = {c: v.get("called") for c, v in s["per_class"].items()}
            auc = None if s["auc"] is None else round(s["auc"], 3)
            print(f"  {source}: n {s['n']}, accuracy {s['accuracy']:.3f}, AUC {auc}, called {calls}")
            if s["auc"] is not None:
                aucs.append(s["auc"])
        print(f"  mean of per-source macro AUC: {np.mean(aucs):.3f}")


if __name__ == "__main__":
    main()
