"""Dataset folders -> labelled, de-duplicated, patient-level split records (no decoding here).

Layouts: ``DIR/CLASS/**`` or ``DIR/{train,val,test}/CLASS/**``. Folder names become classes
through a class map (``{"Viral Pneumonia": "PNEUMONIA"}``); a folder that maps to no class is
reported and skipped. Decoding and the pixel cache live in ``training.cache``.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cxr_core import csvsafe

SPLITS = ("train", "val", "test")
EXTERNAL = "external"  # a whole source kept out of train and val (--holdout-source), scored on its own
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                  "test": "test", "testing": "test"}
# Kermany names: person1234_bacteria_5678.jpeg, IM-0115-0001.jpeg, NORMAL2-IM-0383-0001.jpeg;
# NIH ChestX-ray14 image ids: 00001280_004.jpeg (the first 8 digits are the patient).
# Kermany (person1234_..., IM-0115-0001, NORMAL2-IM-0383-0001), NIH (00001280_004), and the COVID-19 Image
# Dataset's lettered series of one case (COVID-00003a, COVID-00003b: different films of one patient).
_PATIENT_PATTERNS = (re.compile(r"^(person\d+)_", re.IGNORECASE), re.compile(r"^((?:NORMAL\d*-)?IM-\d+)-\d+"),
                     re.compile(r"^(\d{8})_\d{3}$"), re.compile(r"^(COVID-\d{5})[a-z]$"))
MANIFEST_FIELDS = ("path", "source", "class", "split", "patient", "sha256", "duplicate_of", "duplicate_kind")


@dataclass(frozen=True)
class Record:
    """One image file: where it is, its class, split ("" = not yet split) and patient group."""

    path: Path  # absolute
    rel: str  # relative to its source root, posix
    source: str
    label: str
    split: str = ""
    patient: str = ""
    sha256: str = ""
    duplicate_of: str = ""  # "source/rel" of the copy kept, when this file is a duplicate
    duplicate_kind: str = ""  # "bytes" (identical file), "near" (same film re-encoded; training.hygiene) or
    # "seen" (a val/test/external film that the starting weights trained on, or a copy of one: not held out)

    @property
    def key(self) -> str:
        return f"{self.source}/{self.rel}"


@dataclass
class Scan:
    """What scanning the dataset folders found."""

    records: list[Record]
    unmapped: list[str] = field(default_factory=list)  # "source/folder" skipped: no class
    classes: list[str] = field(default_factory=list)


def parse_class_map(items: Iterable[str]) -> dict[str, str]:
    """``["Viral Pneumonia=PNEUMONIA", ...]`` -> mapping; an empty target (``Other=``) skips the folder."""
    mapping: dict[str, str] = {}
    for item in items:
        item = item.strip()
        if not item or item.startswith("#"):
            continue
        if "=" not in item:
            raise ValueError(f"class map entry {item!r} must look like FOLDER=CLASS")
        folder, cls = (s.strip() for s in item.split("=", 1))
        if not folder:
            raise ValueError(f"class map entry {item!r} names no folder: it must look like FOLDER=CLASS")
        earlier = next((k for k in mapping if k.lower() == folder.lower()), None)  # folders match whatever the case
        if earlier is not None and mapping[earlier] != cls:
            raise ValueError(f"the class map gives folder {folder!r} twice: {earlier}={mapping[earlier]} and "
                             f"{folder}={cls}. Keep one line for it")
        mapping[folder] = cls
    return mapping


def read_class_map(path: str | Path) -> dict[str, str]:
    """A class map file: one ``FOLDER=CLASS`` per line, ``#`` comments."""
    return parse_class_map(Path(path).read_text().splitlines())


def map_folder(folder: str, class_map: dict[str, str] | None, known: Iterable[str] = ()) -> str | None:
    """The class a folder name maps to (case-insensitive), or None when it maps to none.

    Without a map every folder is its own class. With one, a folder not in it still matches a
    target class of the map or a ``known`` class by name (``PNEUMONIA`` -> ``PNEUMONIA``).
    """
    if not class_map:
        return folder
    lowered = {k.lower(): v for k, v in class_map.items()}
    if folder.lower() in lowered:
        return lowered[folder.lower()] or None
    targets = {t.lower(): t for t in [*class_map.values(), *known] if t}
    return targets.get(folder.lower())


def patient_id(filename: str) -> str:
    """The patient a file name encodes, or "".

    Kermany: ``person1234``, ``IM-0115``, ``NORMAL2-IM-0383``; NIH ChestX-ray14: ``00001280``; the COVID-19 Image
    Dataset's lettered films of one case: ``COVID-00003a`` -> ``COVID-00003``. Each form belongs to one
    collection, so the id names the patient whatever folder (source) holds the film: the same collection read
    from two folders (``kermany/train`` and a download's ``chest_xray/test``) has the same patients, and every
    patient check (``separate_patients``, films the starting weights trained on, ``rescore --external``) keys
    on the id alone.
    """
    stem = Path(filename).stem
    for pattern in _PATIENT_PATTERNS:
        match = pattern.match(stem)
        if match:
            return match.group(1)
    return ""


def source_name(root: Path, taken: Sequence[str] = ()) -> str:
    """A short name for a dataset folder: its name, or its parent's when it is called train/val/test."""
    root = root.resolve()
    name = root.parent.name if root.name.lower() in _SPLIT_ALIASES else root.name
    if name not in taken:
        return name
    number = len(taken)
    while f"{name}-{number}" in taken:  # a folder may be called so itself: x, x-2, x gave two sources 'x-2'
        number += 1
    return f"{name}-{number}"


def image_files(folder: Path) -> list[Path]:
    from cxr_core.imaging import is_image_name

    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".") and is_image_name(p.name))


def scan(roots: Sequence[str | Path], class_map: dict[str, str] | None = None, known: Iterable[str] = (),
         taken: Sequence[str] = ()) -> Scan:
    """List every image under the dataset folders with its mapped class and given split (if any); ``taken``:
    source names already in use (a model's own sources, beside which ``rescore --external`` names new ones)."""
    records: list[Record] = []
    unmapped: list[str] = []
    names: list[str] = list(taken)
    spelled: dict[str, str] = {}  # one class per name whatever its case: a/NORMAL and b/Normal are one class
    for root in map(Path, roots):
        if not root.is_dir():
            raise FileNotFoundError(f"dataset folder {root} does not exist")
        source = source_name(root, names)
        names.append(source)
        subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        split_dirs = [d for d in subdirs if d.name.lower() in _SPLIT_ALIASES]
        beside = [d.name for d in subdirs if d not in split_dirs and image_files(d)]
        if split_dirs and beside:  # class folders next to train/val/test: one layout or the other, never both
            raise ValueError(f"{root} holds split folders ({', '.join(d.name for d in split_dirs)}) and, beside them, "
                             f"folders of images ({', '.join(beside[:5])}) that would be left out: put every class "
                             "folder under a split folder, or remove the split folders")
        groups = ([(d, _SPLIT_ALIASES[d.name.lower()]) for d in split_dirs] if split_dirs else [(root, "")])
        # A folder holding only train/ has no given split: it is split like a flat one.
        only_train = bool(split_dirs) and {s for _, s in groups} == {"train"}
        for base, split in groups:
            for folder in sorted(d for d in base.iterdir() if d.is_dir() and not d.name.startswith(".")):
                label = map_folder(folder.name, class_map, known)
                if label is None:
                    unmapped.append(f"{source}/{folder.relative_to(root).as_posix()}")
                    continue
                label = spelled.setdefault(label.lower(), label)  # the first spelling met names the class
                for path in image_files(folder):
                    records.append(Record(path=path.resolve(), rel=path.relative_to(root).as_posix(), source=source,
                                          label=label, split="" if only_train else split,
                                          patient=patient_id(path.name)))
    classes = sorted({r.label for r in records})
    return Scan(records, unmapped, classes)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


_KEEP_RANK = {"train": 0, "": 1, "val": 2, "test": 3, EXTERNAL: 4}


def _hashed(record: Record) -> Record:
    """``record`` with its sha256; unchanged when the file cannot be read (no permission, removed since the scan):
    decoding then lists it in skipped.csv with the reason, instead of the scan ending in a traceback."""
    try:
        return dataclasses.replace(record, sha256=file_sha256(record.path))
    except OSError:
        return record


def deduplicate(records: Sequence[Record]) -> tuple[list[Record], list[Record]]:
    """Hash every file; collapse byte-identical copies to one.

    The copy kept is the one on the training side (train, then unsplit, then val, then test),
    so a file that also sits in a held-out split is removed from the held-out side; among those, one whose
    name carries its patient (a compilation's renamed copy does not), so that the patient's films stay together.
    Returns (records with sha256 set, duplicates with ``duplicate_of`` set).
    """
    hashed = [r if r.sha256 else _hashed(r) for r in records]
    by_hash: dict[str, list[Record]] = defaultdict(list)
    for r in hashed:
        by_hash[r.sha256 or f"unread:{r.key}"].append(r)  # an unreadable file is a copy of nothing
    kept: list[Record] = []
    dropped: list[Record] = []
    for group in by_hash.values():
        group.sort(key=lambda r: (_KEEP_RANK[r.split], r.patient == "", r.source, r.rel))
        kept.append(group[0])
        dropped.extend(dataclasses.replace(r, duplicate_of=group[0].key, duplicate_kind="bytes") for r in group[1:])
    order = {r.key: i for i, r in enumerate(hashed)}
    return sorted(kept, key=lambda r: order[r.key]), sorted(dropped, key=lambda r: order[r.key])


def kept_of(copies: Sequence[Record]) -> dict[str, str]:
    """Each dropped copy's key -> the key of the film finally kept for it: ``duplicate_of`` followed to the end of
    the chain (a byte copy of a film that was itself dropped as a near-copy of another names that film, not the
    one kept)."""
    of = {d.key: d.duplicate_of for d in copies if d.duplicate_of}
    out: dict[str, str] = {}
    for key in of:
        seen = {key}
        target = of[key]
        while target in of and target not in seen:
            seen.add(target)
            target = of[target]
        out[key] = target
    return out


def separate_patients(records: Sequence[Record], copies: Sequence[Record] = ()) -> tuple[list[Record], list[Record]]:
    """Leave out of a later split (val, then test, then external) the films of a patient who has films in an
    earlier one: splits given as folders (``DIR/train``, ``DIR/test``) or by a manifest are kept as they are, so
    the same patient could sit in train and test. ``copies``: the byte and near copies dropped from ``records``
    (``duplicate_of`` naming the copy kept); a patient's film dropped as a copy of a kept film counts in the kept
    film's split (a Kermany test film collapsed into a compilation's unnamed training copy puts its patient in
    train, so the patient's other films leave test). Returns (kept, left out as duplicates of kind "patient")."""
    rank = {"train": 0, "val": 1, "test": 2, EXTERNAL: 3}
    first: dict[tuple[str, str], int] = {}
    for r in records:
        if r.patient and r.split in rank:
            first[r.patient] = min(first.get(r.patient, 9), rank[r.split])
    split_of = {r.key: r.split for r in records}
    kept_key = kept_of(copies)
    for d in copies:
        if d.patient and d.duplicate_kind in ("bytes", "near") and split_of.get(kept_key.get(d.key)) in rank:
            first[d.patient] = min(first.get(d.patient, 9), rank[split_of[kept_key[d.key]]])
    kept, dropped = [], []
    for r in records:
        if r.patient and r.split in rank and rank[r.split] > first[r.patient]:
            dropped.append(dataclasses.replace(r, duplicate_of=f"{r.source}/patient {r.patient}",
                                               duplicate_kind="patient"))
        else:
            kept.append(r)
    return kept, dropped


def split(records: Sequence[Record], fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
          seed: int = 42) -> list[Record]:
    """Assign a split to every record without one, keeping all images of a patient together.

    Given splits are kept. Per source, the unsplit pool is split into the splits that source
    lacks (val and test carved from train when only train was given), stratified by class: whole
    patient groups (a file with no patient id is its own group) are shuffled with ``seed`` and
    each goes to the split furthest below its share.
    """
    if len(fractions) != 3 or min(fractions) < 0 or not abs(sum(fractions) - 1) < 1e-6:
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    out = {r.key: r for r in records}
    by_source: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_source[r.source].append(r)
    for source, recs in sorted(by_source.items()):
        given = {r.split for r in recs if r.split}
        shares = {s: f for s, f in zip(SPLITS, fractions, strict=True) if s not in given or s == "train"}
        pool = [r for r in recs if not r.split or r.split == "train"]
        if not pool or (given >= {"val", "test"}):
            out.update({r.key: dataclasses.replace(r, split=r.split or "train") for r in pool})
            continue
        groups: dict[str, list[Record]] = defaultdict(list)
        for r in pool:
            groups[r.patient or f"file:{r.rel}"].append(r)
        strata: dict[str, list[str]] = defaultdict(list)
        for gid, members in groups.items():
            strata[Counter(m.label for m in members).most_common(1)[0][0]].append(gid)
        total = sum(shares.values())
        for label, gids in sorted(strata.items()):
            rng = np.random.default_rng([seed, *map(ord, f"{source}/{label}")])
            gids = sorted(gids)
            n_stratum = sum(len(groups[g]) for g in gids)
            counts = dict.fromkeys(shares, 0)
            for gid in (gids[i] for i in rng.permutation(len(gids))):
                target = max(shares, key=lambda s: shares[s] / total * n_stratum - counts[s])
                counts[target] += len(groups[gid])
                out.update({m.key: dataclasses.replace(m, split=target) for m in groups[gid]})
    return [out[r.key] for r in records]


def counts(records: Iterable[Record]) -> dict[str, dict[str, dict[str, int]]]:
    """{source: {split: {class: n}}} for the card's training_data."""
    table: dict[str, dict[str, dict[str, int]]] = {}
    for r in records:
        cell = table.setdefault(r.source, {}).setdefault(r.split or "unsplit", {})
        cell[r.label] = cell.get(r.label, 0) + 1
    return table


def write_manifest(records: Iterable[Record], path: str | Path) -> Path:
    """The split as CSV: path (relative to its source root), source, class, split, patient, sha256, duplicate_of,
    duplicate_kind.

    A removed duplicate has split "duplicate", names the copy kept in duplicate_of and says "bytes" or "near".
    """
    path = Path(path)
    # Paths keep their exact bytes (surrogateescape) and are spreadsheet-safe (csvsafe); read_manifest undoes both.
    with path.open("w", newline="", encoding="utf-8", errors="surrogateescape") as fh:
        writer = csv.writer(fh)
        writer.writerow(MANIFEST_FIELDS)
        for r in records:
            split_name = "duplicate" if r.duplicate_of else r.split
            writer.writerow([csvsafe.neutralise(v) for v in
                             (r.rel, r.source, r.label, split_name, r.patient, r.sha256, r.duplicate_of,
                              r.duplicate_kind)])
    return path


def roots_by_source(roots: Sequence[str | Path]) -> dict[str, Path]:
    """Each dataset folder (resolved) under its source name, as a run names the sources of its manifest."""
    root_of: dict[str, Path] = {}
    for root in map(Path, roots):
        root_of[source_name(root, list(root_of))] = root.resolve()
    return root_of


MANIFEST_REQUIRED = ("path", "source", "class", "split")  # patient, sha256, duplicate_of, duplicate_kind optional


def _manifest_rows(path: str | Path) -> list[dict[str, str]]:
    """A manifest's rows with their text as ``write_manifest`` was given it (file-name bytes, formula cells)."""
    with Path(path).open(newline="", encoding="utf-8", errors="surrogateescape") as fh:
        return [{key: csvsafe.restore(value) for key, value in raw.items()} for raw in csv.DictReader(fh)]


@dataclass(frozen=True)
class Trained:
    """What a model folder's weights trained on, from its ``split.csv``: film keys (``source/path``), their
    contents' sha256 (a film found under another folder layout or name), and patients (``patient_id``: another
    film of a patient the weights trained on is not held out from them either, whatever folder holds it)."""

    keys: frozenset[str]
    sha256: frozenset[str]
    patients: frozenset[str]


def trained_films(path: str | Path) -> Trained:
    """What the weights of the model whose ``split.csv`` is ``path`` trained on: its train split; the films
    its own start had trained on (rows of kind "seen", and the films they name), which these weights
    inherit; and the copies of any of those that its run dropped as duplicates (the same film elsewhere)."""
    rows = _manifest_rows(path)
    key = {id(r): f"{r['source']}/{r['path']}" for r in rows}
    trained = {key[id(r)] for r in rows if r["split"] == "train" or r.get("duplicate_kind") == "seen"}
    trained |= {r["duplicate_of"] for r in rows if r.get("duplicate_kind") == "seen" and r.get("duplicate_of")}
    while True:  # copies of trained films, and copies of those
        more = {key[id(r)] for r in rows if r.get("duplicate_of") in trained} - trained
        if not more:
            break
        trained |= more
    chosen = [r for r in rows if key[id(r)] in trained]
    return Trained(keys=frozenset(trained), sha256=frozenset(r["sha256"] for r in chosen if r.get("sha256")),
                   patients=frozenset(r["patient"] for r in chosen if r.get("patient")))


def read_manifest(path: str | Path, roots: Sequence[str | Path]) -> list[Record]:
    """Records from a manifest, resolved against the same dataset folders (by source name)."""
    root_of = roots_by_source(roots)
    names = list(root_of)
    records = []
    rows = _manifest_rows(path)
    missing = [c for c in MANIFEST_REQUIRED if rows and c not in rows[0]]
    if missing:
        raise ValueError(f"manifest {path} has no column {', '.join(missing)}: a split manifest needs "
                         f"{', '.join(MANIFEST_REQUIRED)} (a split.csv written by a run has them all)")
    for row in rows:
        if row["source"] not in root_of:
            raise ValueError(f"manifest {path} names source {row['source']!r}, which is not among {names}")
        copy_of = row.get("duplicate_of") or ""
        patient = row["patient"] if "patient" in row else patient_id(Path(row["path"]).name)  # a hand-written one
        records.append(Record(path=root_of[row["source"]] / row["path"], rel=row["path"], source=row["source"],
                              label=row["class"], split=row["split"], patient=patient or "",
                              sha256=row.get("sha256") or "", duplicate_of=copy_of,
                              duplicate_kind=row.get("duplicate_kind") or ("bytes" if copy_of else "")))
    return records
