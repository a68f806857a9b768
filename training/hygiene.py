"""Near-duplicate hygiene: films that are copies of each other after resizing or re-encoding.

Byte-level de-duplication (``training.data.deduplicate``) misses a film that a redistributor
re-encoded: 523 of the 4000 ``covid19_radiography/Normal`` films here are Kermany films saved
again at another size and quality. A near-copy on both sides of a split inflates the held-out
figures, and a copy filed under another collection's label teaches the model the wrong source.

The test: every film becomes a 32x32 thumbnail, centred and scaled to unit norm; two films
whose thumbnails correlate at ``>= THRESHOLD`` (Pearson) are near-copies. On the real data the
Kermany copies correlate at >= 0.995 with their originals, while different Kermany children reach
0.955-0.973. The COVID-19 Image Dataset's posterized copies of COVID-19 Radiography films correlate
at only 0.96-0.99: this check misses some of them, and no single threshold catches them without
merging different children (training/README.md, "Near-copies").

A group of near-copies (connected through such pairs) keeps one film: the one from the
collection the film comes from (its file name carries that collection's patient id, e.g.
Kermany's ``person1234_...`` or NIH's ``00001280_004``, while a compilation renames it
``Normal-123.png``), then the one on the training side, then by name. The others are dropped
and recorded with ``duplicate_of`` and ``duplicate_kind="near"``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import cv2
import numpy as np

from training.data import Record

THUMBNAIL = 32  # pixels: enough to tell films apart, small enough to compare 15k films in seconds
THRESHOLD = 0.99  # Pearson correlation of thumbnails at or above which two films are one film
_BLOCK = 2048  # rows per block of the similarity matrix (2048 x N float32: ~120 MB at N = 15k)
_KEEP_RANK = {"train": 0, "": 1, "val": 2, "test": 3, "external": 4}


def thumbnails(images: np.ndarray, size: int = THUMBNAIL) -> np.ndarray:
    """uint8 (N, S, S) films -> float32 (N, size*size) thumbnails, each centred with unit norm.

    A flat film (all one value) becomes the zero vector, which correlates with nothing.
    """
    images = np.asarray(images)
    if images.ndim != 3:
        raise ValueError(f"expected uint8 images (N, S, S), got shape {images.shape}")
    out = np.zeros((len(images), size * size), np.float32)
    for i, img in enumerate(images):
        small = cv2.resize(img.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA).ravel()
        small -= small.mean()
        norm = float(np.linalg.norm(small))
        if norm > 1e-6:
            out[i] = small / norm
    return out


def similar_pairs(vectors: np.ndarray, threshold: float = THRESHOLD) -> np.ndarray:
    """Index pairs (i, j), i < j, whose vectors' dot product (correlation) is ``>= threshold``; int (P, 2)."""
    n = len(vectors)
    found: list[np.ndarray] = []
    for start in range(0, n, _BLOCK):
        block = vectors[start:start + _BLOCK] @ vectors.T
        rows, cols = np.nonzero(block >= threshold)
        rows = rows + start
        keep = rows < cols
        found.append(np.stack([rows[keep], cols[keep]], axis=1))
    return np.concatenate(found) if found else np.zeros((0, 2), np.int64)


def groups(n: int, pairs: np.ndarray) -> list[list[int]]:
    """Connected components of size >= 2 of the graph on ``n`` nodes with edges ``pairs``, each sorted."""
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs.tolist():
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    members: dict[int, list[int]] = {}
    for i in range(n):
        members.setdefault(find(i), []).append(i)
    return [m for m in members.values() if len(m) > 1]


def _keep_key(record: Record, split_first: bool = False) -> tuple:
    origin, split = record.patient == "", _KEEP_RANK.get(record.split, 1)
    return (split, origin, record.source, record.rel) if split_first else (origin, split, record.source, record.rel)


def collapse(records: Sequence[Record], images: np.ndarray, threshold: float = THRESHOLD, split_first: bool = False,
             across_splits_only: bool = False) -> tuple[list[int], list[Record]]:
    """Find near-copies among ``records`` (pixels ``images``, uint8 (N, S, S), same order).

    Returns (indices of the records kept, in order; the dropped records with ``duplicate_of``
    naming the copy kept and ``duplicate_kind`` "near").

    ``split_first``: the copy kept is the one on the training side whatever its name says, so that a
    film already split (a held-out film, or the split of a manifest) never outranks a training copy.
    ``across_splits_only``: for records already split (a manifest): drop only the copies that sit in a
    later split than another copy of their group (train, then val, test, external); copies within one
    split stay as the manifest has them.
    """
    if len(records) != len(images):
        raise ValueError(f"{len(records)} records but {len(images)} images")
    found = groups(len(records), similar_pairs(thumbnails(images), threshold))
    split_first = split_first or across_splits_only
    dropped_idx: dict[int, str] = {}
    for members in found:
        members = sorted(members, key=lambda i: _keep_key(records[i], split_first))
        kept = records[members[0]]
        first = _KEEP_RANK.get(kept.split, 1)
        dropped_idx.update({i: kept.key for i in members[1:]
                            if not across_splits_only or _KEEP_RANK.get(records[i].split, 1) > first})
    kept_idx = [i for i in range(len(records)) if i not in dropped_idx]
    dropped = [dataclasses.replace(records[i], duplicate_of=key, duplicate_kind="near")
               for i, key in sorted(dropped_idx.items())]
    return kept_idx, dropped


def summary(dropped: Sequence[Record], records: Sequence[Record]) -> dict[str, int]:
    """Counts for the card and the log: near-copies dropped, per ``dropped source <- kept source`` pair."""
    source_of = {r.key: r.source for r in records}
    table: dict[str, int] = {}
    for d in dropped:
        key = f"{d.source} (copy of {source_of.get(d.duplicate_of, d.duplicate_of.split('/')[0])})"
        table[key] = table.get(key, 0) + 1
    return dict(sorted(table.items()))
