"""Score a model on labelled images: ``metrics.json`` and ``predictions.csv``.

Used after training (the test split) and by ``python -m training evaluate MODEL_DIR DATA_DIR``
(every image under ``DATA_DIR/<class folder>/``, folder names matched to the card's classes
case-insensitively after the class map).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr_core import csvsafe, imaging, metrics, preprocess
from cxr_core.card import ModelCard
from cxr_core.errors import UnreadableImageError
from cxr_core.models import Classifier, decide
from training import data


@dataclass
class Evaluation:
    """Metrics (JSON-ready), one prediction row per scored image, and the files that could not be read."""

    metrics: dict[str, Any]
    predictions: pd.DataFrame
    skipped: list[dict[str, str]] = field(default_factory=list)


def score(card: ModelCard, y_true: np.ndarray, probs: np.ndarray, sources: Sequence[str] | None = None) -> dict:
    """cxr_core.metrics.evaluate under the card's decision rule, ROC curves, and a per-source breakdown."""
    classes = list(card.class_names)
    index = {c: i for i, c in enumerate(classes)}
    decided = np.array([index[decide(card, p).decision] for p in probs], dtype=int)
    result = metrics.evaluate(y_true, probs, classes, decided)
    result["roc"] = metrics.roc_curves(y_true, probs, classes)
    result["decision_rule"] = {"thresholds": dict(card.thresholds), "negative_class": card.negative_class,
                               "temperature": card.temperature}
    if sources is not None and len(sources):
        result["by_source"] = by_source(classes, y_true, probs, decided, sources)
    return result


def by_source(classes: Sequence[str], y_true: np.ndarray, probs: np.ndarray, decided: np.ndarray,
              sources: Sequence[str]) -> dict[str, Any]:
    """Per source: n, accuracy, macro AUC, and per class present: n, accuracy (= sensitivity: the share of that
    class's films called that class), AUC one-vs-rest (None unless the source has films of that class and others),
    and how many of the class's films were called each class."""
    src = np.asarray(sources)
    out: dict[str, Any] = {}
    for name in sorted(set(src.tolist())):
        m = src == name
        sub = metrics.evaluate(y_true[m], probs[m], classes, decided[m])
        per_class = {}
        for i, c in enumerate(classes):
            mine = y_true[m] == i
            if not mine.any():
                continue
            per_class[c] = {"n": int(mine.sum()), "accuracy": sub["per_class"][c]["sensitivity"],
                            "sensitivity": sub["per_class"][c]["sensitivity"],
                            "auc": sub["per_class"][c].get("auc"),
                            "called": {d: int((decided[m][mine] == j).sum()) for j, d in enumerate(classes)}}
        out[name] = {"n": sub["n"], "accuracy": sub["accuracy"], "auc": sub["auc"], "per_class": per_class}
    return out


def familiarity_rates(card: ModelCard, y_true: np.ndarray, probs: np.ndarray, distances: np.ndarray,
                      model: Any, sources: Sequence[str]) -> dict[str, Any]:
    """Familiarity flag rates of one split: overall, per source, and among the films the model got right and wrong.

    A useful check flags far more of the wrong films than of the right ones (``wrong_rate`` vs ``right_rate``).
    """
    from cxr_core import familiarity

    flags = model.flags(distances)
    index = {c: i for i, c in enumerate(card.class_names)}
    right = np.array([index[decide(card, p).decision] == y for p, y in zip(probs, y_true, strict=True)], dtype=bool)
    out = familiarity.rates(flags, list(sources))
    out["threshold"] = float(model.threshold)
    out["distance_median"] = float(np.median(distances)) if len(distances) else None
    out["right"], out["wrong"] = int(right.sum()), int((~right).sum())
    out["flagged_right"], out["flagged_wrong"] = int(flags[right].sum()), int(flags[~right].sum())
    out["right_rate"] = float(flags[right].mean()) if right.any() else None
    out["wrong_rate"] = float(flags[~right].mean()) if (~right).any() else None
    return out


def predictions_frame(card: ModelCard, paths: Sequence[str], sources: Sequence[str], y_true: np.ndarray,
                      probs: np.ndarray, split: str,
                      familiarity: tuple[np.ndarray, np.ndarray] | None = None) -> pd.DataFrame:
    """path, source, true_class, p_<CLASS> per class in card order, predicted_class (card's rule), split;
    and ``familiarity`` (distance) and ``unfamiliar`` (flag) when given."""
    classes = list(card.class_names)
    frame = pd.DataFrame({"path": list(paths), "source": list(sources),
                          "true_class": [classes[i] for i in y_true]})
    for i, c in enumerate(classes):
        frame[f"p_{c}"] = probs[:, i] if len(probs) else []
    frame["predicted_class"] = [decide(card, p).decision for p in probs]
    frame["split"] = split
    if familiarity is not None:
        frame["familiarity"], frame["unfamiliar"] = familiarity[0], familiarity[1]
    return frame


def _items(data_dir: Path, classes: Sequence[str], class_map: dict[str, str] | None) -> tuple[list, list[str]]:
    """(path, class index) for every image under a class folder; and the folders that match no class."""
    lowered = {c.lower(): i for i, c in enumerate(classes)}
    items, unmatched = [], []
    for folder in sorted(d for d in data_dir.iterdir() if d.is_dir() and not d.name.startswith(".")):
        target = data.map_folder(folder.name, class_map, classes)
        if target is None or target.lower() not in lowered:
            unmatched.append(folder.name)
            continue
        items.extend((p, lowered[target.lower()]) for p in data.image_files(folder))
    return items, unmatched


def _read_and_predict(classifier: Classifier, items: list[tuple[str, Path]], batch_size: int,
                      progress: Callable[[int, int], None] | None) -> list[tuple[str, Any, str | None]]:
    """(name, ``Prediction`` or None, error or None) per item, through the serving path: calibrated probabilities,
    decision and, for a model with a familiarity check, each film's familiarity distance and flag.

    ``cxr_core.pipeline.classify_many`` where it imports (it needs TensorFlow for explanations); the
    same reading and prediction batch by batch otherwise (training under JAX or PyTorch).
    """
    try:
        from cxr_core.pipeline import classify_many
    except ImportError:
        classify_many = None
    if classify_many is not None:
        rows = classify_many(classifier, items, batch_size=batch_size, progress=progress)
        return [(r.name, r.prediction, r.error) for r in rows]
    out: list[tuple[str, Any, str | None]] = []
    for start in range(0, len(items), batch_size):
        images, names = [], []
        for name, path in items[start:start + batch_size]:
            try:
                images.append(preprocess.prepare(imaging.load(path, path.name).pixels, classifier.input_size))
                names.append(name)
            except UnreadableImageError as exc:
                out.append((name, None, str(exc)))
        if images:
            out.extend((n, p, None) for n, p in zip(names, classifier.predict(
                preprocess.to_batch(images)), strict=True))
        if progress is not None:
            progress(min(start + batch_size, len(items)), len(items))
    return out


# What each film of a model's split.csv was to the model, as an evaluation names it (column ``model_split``).
MADE_WITH = {"train": "train", "val": "validation", "seen": "its start's"}


# An evaluated film that is not one of the split's films but another film of a patient whose films made the model:
# the split is by patient, so it is no more held out (Kermany's official test folder shares patients with its train).
PATIENT = "patient:"


def split_roles(model_dir: str | Path | None) -> dict[str, str] | str:
    """sha256 of a film's bytes -> its split in the model's ``split.csv`` (train, val, test, external; "seen" for a
    film its starting weights trained on); a near-copy the run dropped takes the split of the film it copies.
    Why it cannot be read, instead, as a sentence (no folder, no ``split.csv``: a model trained before it was
    written, or elsewhere; an empty one; one without the columns)."""
    rows = _row_roles(model_dir)
    return rows if isinstance(rows, str) else _sha256_roles(rows)


def _sha256_roles(rows: list[tuple[dict[str, str], str]]) -> dict[str, str]:
    roles: dict[str, str] = {}
    for r, role in rows:
        if r["sha256"] and role:
            roles.setdefault(r["sha256"], role)
    return roles


def _patient_roles(rows: list[tuple[dict[str, str], str]]) -> dict[str, str]:
    """Patient id -> what that patient's films were to the model (train, then its start's, then val), for the
    patients whose films made it: the ``patient`` column, else the id in the film's name (``data.patient_id``)."""
    order = {"train": 0, "seen": 1, "val": 2}
    out: dict[str, str] = {}
    for r, role in rows:
        patient = r.get("patient") or data.patient_id(Path(r["path"]).name)
        if patient and role in order and order[role] < order.get(out.get(patient, ""), 9):
            out[patient] = role
    return out


def _row_roles(model_dir: str | Path | None) -> list[tuple[dict[str, str], str]] | str:
    """Each row of the model's ``split.csv`` with its role (``split_roles``), or why it cannot be read."""
    if model_dir is None:
        return "the model has no folder to compare with"
    try:
        rows = data._manifest_rows(Path(model_dir) / "split.csv")
    except FileNotFoundError:
        return "the model folder has no split.csv to compare with"
    except (OSError, UnicodeError, csv.Error) as exc:
        return f"the model folder's split.csv cannot be read ({type(exc).__name__})"
    if not rows:
        return "the model folder's split.csv lists no films"
    missing = sorted({"sha256", "split", "source", "path"} - set(rows[0]))
    if missing:
        return f"the model folder's split.csv has no {', '.join(missing)} column (written by an older version)"
    by_key = {f"{r['source']}/{r['path']}": r for r in rows}

    def role_of(row: dict[str, str]) -> str:
        """A row's split; a dropped copy's is the split of the film it copies, followed to the end of the chain
        (a near-copy of a film its start trained on is "seen" too)."""
        visited: set[str] = set()
        while row["split"] == "duplicate":
            if row.get("duplicate_kind") == "seen":
                return "seen"
            key = row.get("duplicate_of", "")
            if key in visited or key not in by_key:
                return ""
            visited.add(key)
            row = by_key[key]
        return row["split"]

    return [(r, role_of(r)) for r in rows]


def training_overlap(model_dir: str | Path | None, files: dict[str, Path]) -> tuple[dict[str, Any], dict[str, str]]:
    """Which evaluated films (name -> path) are, byte for byte, films of the model's own split, and in which split;
    and which are other films of patients whose films made it (role ``patient:train``, ``patient:val``...).

    Returns the summary for ``metrics.json`` (``checked``; ``by_split`` counts; ``made_with``: the films used to
    make the model, train + validation + its start's; ``patients``: other films of those films' patients) and
    name -> role for the films found. Figures on films a model was made with flatter it: evaluate on films it
    never saw.
    """
    rows = _row_roles(model_dir)  # split.csv, read once for both
    if isinstance(rows, str):
        return {"checked": False, "why": rows}, {}
    roles, patients = _sha256_roles(rows), _patient_roles(rows)
    found: dict[str, str] = {}
    for name, path in files.items():
        try:
            digest = data.file_sha256(path)
        except OSError:
            continue  # read for scoring a moment ago; gone now: nothing to compare
        if digest in roles:
            found[name] = roles[digest]
        elif (patient := data.patient_id(Path(name).name)) in patients:
            found[name] = PATIENT + patients[patient]
    by_split: dict[str, int] = {}
    for role in found.values():
        by_split[role] = by_split.get(role, 0) + 1
    return {"checked": True, "by_split": by_split,
            "made_with": sum(n for role, n in by_split.items() if role in MADE_WITH),
            "patients": sum(n for role, n in by_split.items() if role.startswith(PATIENT))}, found


def flatters(role: str) -> bool:
    """Whether a film of this role (``training_overlap``) flatters the model's figures: made with it, or another
    film of a patient whose films made it."""
    return role in MADE_WITH or role.startswith(PATIENT)


def overlap_sentence(overlap: dict[str, Any] | None) -> str:
    """The warning for films the model was made with among the evaluated ones ("" when there are none)."""
    if not overlap or not overlap.get("checked") or not (overlap.get("made_with") or overlap.get("patients")):
        return ""
    by_split = sorted(overlap["by_split"].items())

    def rest(key: str, too: str = "") -> str:
        w = overlap.get(key) or {}
        if not w.get("n"):
            return " No film is left without them."
        auc = "n/a" if w.get("auc") is None else f"{w['auc']:.3f}"
        return f" Without them{too}: {w['n']} films, accuracy {w['accuracy']:.3f}, AUC {auc}."

    out = []
    if made := overlap.get("made_with"):
        parts = ", ".join(f"{MADE_WITH[role]} {n}" for role, n in by_split if role in MADE_WITH)
        out.append(f"{made} of these films were used to make this model ({parts}; the same bytes as in its "
                   f"split.csv): figures on them flatter it.{rest('without')}")
    if patients := overlap.get("patients"):
        whose = ", ".join(f"{MADE_WITH[role.removeprefix(PATIENT)]} {n}" for role, n in by_split
                          if role.startswith(PATIENT) and role.removeprefix(PATIENT) in MADE_WITH)
        out.append(f"{patients} {'more' if made else 'of these films'} carry the patient id of films used to make it "
                   f"({whose}), matched by the file name alone (another collection that names its files the same "
                   "way, such as a viewer's IM-0001-0001 export, matches too): if they are that collection's films, "
                   f"they are not held out from it either.{rest('without_patients', ' too' if made else '')}")
    return " ".join(x.strip() for x in out) + " The predictions' model_split column names them."


def evaluate_folder(classifier: Classifier, data_dir: str | Path, class_map: dict[str, str] | None = None,
                    progress: Callable[[int, int], None] | None = None, batch_size: int = 16) -> Evaluation:
    """Score every image under ``data_dir/<class folder>/`` (recursively); unreadable files are skipped and listed."""
    data_dir = Path(data_dir)
    card = classifier.card
    items, unmatched = _items(data_dir, card.class_names, class_map)
    if not items:
        raise ValueError(f"no images of the classes {card.class_names} under {data_dir} (folders found: {unmatched})")
    label_of = {path.relative_to(data_dir).as_posix(): label for path, label in items}
    rows = _read_and_predict(classifier, [(rel, data_dir / rel) for rel in label_of], batch_size, progress)
    skipped = [{"path": name, "error": error} for name, prediction, error in rows if prediction is None]
    scored = [(name, prediction) for name, prediction, _ in rows if prediction is not None]
    if not scored:
        raise ValueError(f"none of the {len(items)} images under {data_dir} could be read")
    paths = [name for name, _ in scored]
    y = np.array([label_of[name] for name in paths], dtype=int)
    p = np.array([prediction.probabilities for _, prediction in scored], dtype=np.float64)
    result = score(card, y, p)
    result["skipped"] = skipped
    result["unmatched_folders"] = unmatched
    result["model"] = card.name
    result["model_dir"] = str(classifier.folder.resolve()) if classifier.folder is not None else None
    sources = [data_dir.name] * len(paths)
    familiarity = None
    if classifier.familiarity is not None and all(pr.familiarity is not None for _, pr in scored):
        # the served distances and flags, as on the Classify and Batch pages; rates as in a run's metrics.json
        distances = np.array([prediction.familiarity for _, prediction in scored], dtype=np.float64)
        familiarity = (distances, np.array([bool(prediction.unfamiliar) for _, prediction in scored]))
        result["familiarity"] = familiarity_rates(card, y, p, distances, classifier.familiarity, sources)
    overlap, found = training_overlap(classifier.folder, {name: data_dir / name for name in paths})

    def without(left_out: Callable[[str], bool]) -> dict[str, Any]:
        keep = np.array([name not in found or not left_out(found[name]) for name in paths])
        rest = score(card, y[keep], p[keep]) if keep.any() else {"n": 0}
        return {k: rest[k] for k in ("n", "accuracy", "auc") if k in rest}

    if found:  # the figures without the films found by their bytes
        overlap["without"] = without(lambda role: role in MADE_WITH)
    if overlap.get("patients"):  # and without those matched by the patient id in the name too (it can match others)
        overlap["without_patients"] = without(flatters)
    result["training_overlap"] = overlap
    frame = predictions_frame(card, paths, sources, y, p, split="evaluation", familiarity=familiarity)
    frame["model_split"] = [found.get(name, "") for name in paths]
    return Evaluation(result, frame, skipped)


def write(evaluation: Evaluation, out_dir: str | Path) -> Path:
    """Write ``metrics.json`` and ``predictions.csv`` into ``out_dir``; returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    evaluation.metrics.setdefault("skipped", evaluation.skipped)
    (out / "metrics.json").write_text(json.dumps(evaluation.metrics, indent=1) + "\n")
    csvsafe.to_csv(evaluation.predictions, out / "predictions.csv", keep_bytes=True, index=False)
    return out
