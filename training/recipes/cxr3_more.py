"""More training films for the shipped cxr3: ``python -m training.recipes.cxr3_more OUT.csv [CAP]``.

The shipped ``models/densenet169-cxr3`` trained on at most 1200 films per (source, class), so 1265 of
COVID-19 Radiography's COVID films and 1583 of its normals (after the 523 Kermany copies) were never in its
manifest. This recipe keeps every row of the shipped ``split.csv`` as it is (its val, test and external films
stay what they were, so the continued model is judged on films neither model trained on) and adds films that
the manifest does not name, as ``train``, for the sources in ``ADD``, up to CAP training films per (source,
class) (default 2000, drawn with seed 42). A film is added only if it is no byte copy and no near-copy
(``training.hygiene``'s thumbnail correlation) of any film of the manifest, of whatever split, nor of another
added film. Pixels are decoded at 224 px into the training cache, which the training run then reuses.
"""

from __future__ import annotations

import dataclasses
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from training import cache, data, hygiene
from training.recipes.cxr3_split import CLASS_MAP, ROOTS, SIZE

MANIFEST = Path("models/densenet169-cxr3/split.csv")
ADD = ("covid19_radiography",)


def build(out: Path, cap: int = 2000, seed: int = 42, manifest: Path = MANIFEST,
          roots: list[Path] = ROOTS, add: tuple[str, ...] = ADD, cache_dir: str = "") -> Counter:
    """Write the manifest with the added films; returns the added films per (source, class)."""
    listed = data.read_manifest(manifest, roots)
    named = {r.key for r in listed}
    hashes = {r.sha256 for r in listed if r.sha256}
    found = data.scan(roots, CLASS_MAP, known=["NORMAL", "PNEUMONIA", "COVID-19"])
    fresh = [dataclasses.replace(data._hashed(r), split="train") for r in found.records
             if r.source in add and r.key not in named]
    fresh = [r for r in fresh if r.sha256 and r.sha256 not in hashes]  # byte copies of listed films out
    fresh, _copies = data.deduplicate(fresh)
    kept = [r for r in listed if not r.duplicate_of]
    decoded = cache.decode([*kept, *fresh], SIZE, cache.directory(cache_dir))
    is_new = np.array([r.key not in named for r in decoded.records])
    thumbs = hygiene.thumbnails(decoded.images)
    groups = hygiene.groups(len(decoded.records), hygiene.similar_pairs(thumbs, hygiene.THRESHOLD))
    dropped: set[int] = set()
    for members in groups:
        members = sorted(members)
        old = [i for i in members if not is_new[i]]
        new = [i for i in members if is_new[i]]
        dropped.update(new if old else new[1:])  # a copy of a listed film, or a second copy among the new ones
    added = [r for i, r in enumerate(decoded.records) if is_new[i] and i not in dropped]
    rng = np.random.default_rng(seed)
    chosen = []
    train_now = Counter((r.source, r.label) for r in kept if r.split == "train")
    for cell in sorted({(r.source, r.label) for r in added}):
        group = [r for r in added if (r.source, r.label) == cell]
        room = max(cap - train_now[cell], 0)
        order = rng.permutation(len(group))[:room]
        chosen += [group[int(i)] for i in sorted(order)]
    data.write_manifest([*listed, *chosen], out)
    counts = Counter((r.source, r.label) for r in chosen)
    print(f"{len(fresh)} films not in {manifest}; {len(dropped)} near-copies of listed or added films left out; "
          f"{len(chosen)} added as train: " + ", ".join(f"{s}/{c} {n}" for (s, c), n in sorted(counts.items())))
    return counts


if __name__ == "__main__":
    build(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 2000)
