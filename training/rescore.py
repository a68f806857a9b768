"""``python -m training rescore MODEL_DIR [--external DIR ...]``: redo a model folder's evaluation, no training.

Runs the steps that end every training run (``train.score_and_calibrate``) on a model folder's own
weights and split (``split.csv``): temperature and thresholds on val, the familiarity model on train
(threshold on val), metrics of every split. Use it to give a model trained before the familiarity
check existed its ``familiarity.npz``, or to score it on whole sources it never saw (``--external``:
labelled folders ``DIR/CLASS/**``, near-copies of its training films dropped), reported as the
``external`` split. The weights file is not rewritten (its sha256 stays); the card, ``metrics.json``,
``predictions.csv`` and ``familiarity.npz`` are.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cxr_core import card as card_lib
from cxr_core import models
from training import cache, data, dataset, hygiene
from training.config import TrainConfig
from training.train import score_and_calibrate


def _config(card: card_lib.ModelCard, folder: Path, cache_dir: str, batch_size: int) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    recipe = {k: v for k, v in card.recipe.items() if k in fields}
    config = TrainConfig.from_dict({**recipe, "split": tuple(recipe.get("split", (0.8, 0.1, 0.1)))})
    # What its weights trained on is in its own split.csv (its train split, and the "seen" rows of its start's
    # films, as they were when it was trained): read there, not from the recipe's start folder, which may have
    # moved or been replaced since (the shipped cxr3's recipe names its own folder, now holding other weights).
    return dataclasses.replace(config, out=str(folder), split_manifest=str(folder / "split.csv"), resume=False,
                               cache_dir=cache_dir, batch_size=batch_size, weights=str(folder))


def _external(prepared: dataset.Prepared, roots: Sequence[str], class_map: dict[str, str] | None,
              config: TrainConfig, log) -> dataset.Split:
    """Labelled folders never trained on, as one split; films that near-copy a training film, or that the starting
    weights of the model's run trained on, are dropped."""
    # Named apart from the model's own sources: a new folder called like the held-out one (its test/ beside its
    # train/) would merge with it in the external split's per-source figures, and share keys with its films.
    own = sorted({r.source for sp in prepared.splits.values() for r in sp.records})
    found = data.scan(roots, class_map, known=prepared.classes, taken=own)
    for folder in found.unmapped:
        log(f"external: skipped folder {folder}: it maps to none of the model's classes {prepared.classes}")
    # Without --map every folder is its own class: "Normal" is the model's NORMAL (as `evaluate` matches
    # them); a folder whose name is none of the classes is said, not silently left out.
    by_name = {c.lower(): c for c in prepared.classes}
    records, unmatched = [], Counter()
    for r in found.records:
        label = by_name.get(r.label.lower())
        if label is None:
            unmatched[(r.source, r.label)] += 1
        else:
            records.append(dataclasses.replace(r, label=label, split=data.EXTERNAL))
    for (source, folder), n in sorted(unmatched.items()):
        log(f"external: skipped folder {source}/{folder} ({n} films): it names none of the model's classes "
            f"{prepared.classes}; add --map '{folder}=CLASS' (or '{folder}=' to skip it quietly)")
    if not records:
        raise ValueError(f"--external {', '.join(map(str, roots))}: no folder maps to the model's classes "
                         f"{prepared.classes}; name the class folders so, or give --map FOLDER=CLASS")
    records, duplicates = data.deduplicate(records)
    cache_dir = cache.directory(config.cache_dir)
    decoded = cache.decode(records, config.input_size, cache_dir)
    if decoded.cache_note:
        log(f"warning: external: {decoded.cache_note}")
    for item in decoded.skipped:
        log(f"external: skipped unreadable file {item['path']}: {item['error']}")
    train = prepared.splits["train"]
    # The films its starting weights trained on ("seen" rows of its split.csv) trained it too: a re-encoded copy
    # of one under another name is no more held out than a copy of its own training films.
    seen = [dataclasses.replace(d, split="train", duplicate_of="", duplicate_kind="") for d in prepared.duplicates
            if d.duplicate_kind == "seen"]
    seen_decoded = cache.decode(seen, config.input_size, cache_dir) if seen else None
    if seen_decoded is not None and seen_decoded.skipped:  # not compared: a copy of one would be scored
        log(f"external: {len(seen_decoded.skipped)} films the model's start trained on could not be read, so copies "
            f"of them cannot be found among the external films (e.g. {seen_decoded.skipped[0]['path']}: "
            f"{seen_decoded.skipped[0]['error']})")
    trained_records = [*train.records, *(seen_decoded.records if seen_decoded else [])]
    trained_images = (np.concatenate([train.images, seen_decoded.images]) if seen_decoded is not None
                      else train.images)
    # The model's own val and test films (they chose its epoch, temperature and thresholds, or are scored as test)
    # and its held-out source's films are scored already: a copy of one among the new films is not scored twice.
    # Ranked as "test", so that the copy kept is theirs and the new film the one dropped.
    scored = [prepared.splits[n] for n in ("val", "test", data.EXTERNAL) if n in prepared.splits]
    scored_records = [dataclasses.replace(r, split="test" if r.split == data.EXTERNAL else r.split)
                      for sp in scored for r in sp.records]
    references = [*trained_records, *scored_records]
    both = [*references, *decoded.records]
    # split first: a training film is the copy kept, even where the external copy's name carries a patient id
    kept, dropped = hygiene.collapse(both, np.concatenate([trained_images, *(sp.images for sp in scored),
                                                           decoded.images]),
                                     config.near_duplicate_threshold, split_first=True)
    keep = [i - len(references) for i in kept if i >= len(references)]
    trained = {r.key for r in trained_records}
    already = {r.key for r in scored_records}
    gone = [d for d in dropped if d.split == data.EXTERNAL]
    copies = sum(1 for d in gone if d.duplicate_of in trained)
    rescored = sum(1 for d in gone if d.duplicate_of in already)
    log(f"external: {len(keep)} films from {sorted({r.source for r in decoded.records})}; dropped {len(duplicates)} "
        f"byte-identical, {copies} near-copies of training films, {rescored} of its val, test or held-out films "
        f"(scored there already) and {len(gone) - copies - rescored} near-copies of other external films")
    fresh, _seen = dataset.not_seen_by_start(config, [decoded.records[i] for i in keep], [*duplicates, *gone], log)
    keep = [keep[i] for i in fresh]
    # Another film of a patient the model itself trained on is not held out from it either (Kermany's own test
    # folder shares patient ids with its train folder, under whatever folder name it was downloaded); nor is one
    # of a patient of its val split (which chose its epoch, temperature and thresholds) or of its test split
    # (scored there already), as a training run leaves a patient's films out of every later split.
    own = [*trained_records, *(r for n in ("val", "test") if n in prepared.splits for r in prepared.splits[n].records)]
    patients = {r.patient for r in own if r.patient}  # by id: a download's folder name is no matter
    # and a patient one of whose external films was dropped as a copy of one of those films (a compilation's copy,
    # named without the patient, trained the model), directly or as a copy of such a copy
    own_keys = {r.key for r in own}
    kept_key = data.kept_of([*duplicates, *gone])
    patients |= {d.patient for d in [*duplicates, *gone] if d.patient and kept_key.get(d.key) in own_keys}
    same = [i for i in keep if decoded.records[i].patient and decoded.records[i].patient in patients]
    if same:
        log(f"external: left out {len(same)} films of patients in the model's train, val or test split (their other "
            "films trained, tuned or tested it)")
        keep = [i for i in keep if i not in set(same)]
    recs = [decoded.records[i] for i in keep]
    index = {c: i for i, c in enumerate(prepared.classes)}
    return dataset.Split(recs, decoded.images[keep], np.array([index[r.label] for r in recs], dtype=np.int64))


def data_roots(recipe_data: Sequence[str], given: Sequence[str] = ()) -> list[str]:
    """The training data folders to read the model's split from: the recipe's, or ``given`` (``--data``) where they
    moved since training. ``split.csv`` names each film by source (the folder's name) and path inside it, so the
    folders given must carry the same names, one for each of the recipe's. Raises ValueError, saying what to do,
    when a folder is missing or the names differ."""
    recipe_data = [str(d) for d in recipe_data]
    if given:
        # as the run named them, by position where two folders share a name (kermany/train, then kermany/test as
        # kermany-2): so the folders' own names count too
        names = list(data.roots_by_source(recipe_data))
        new = list(data.roots_by_source(given))
        if new != names or [Path(d).name for d in given] != [Path(d).name for d in recipe_data]:
            raise ValueError(f"--data gives the sources {new}; the model's split names {names} (a source is its "
                             "folder's name, or its parent's for a folder called train/val/test). Give one folder "
                             "per source, under the same names and in the recipe's order: "
                             + ", ".join(recipe_data))
        roots = [str(d) for d in given]
    else:
        roots = recipe_data
    missing = [d for d in roots if not Path(d).is_dir()]
    if missing:
        where = "" if given else (f" (a relative path is read from the folder you run in, {Path.cwd()}); run from "
                                  "where the model was trained, or give the folders where they are now with --data "
                                  "DIR, once per source: " + ", ".join(recipe_data))
        raise ValueError(f"the model's training data folder(s) {', '.join(missing)} are not here{where}")
    return roots


def run(model_dir: str | Path, external: Sequence[str] = (), class_map: dict[str, str] | None = None,
        cache_dir: str = "", batch_size: int = 32, log=print, data_dirs: Sequence[str] = ()) -> Path:
    """Re-score the model folder in place; returns it. ``data_dirs``: the training data folders where they moved
    since training (``data_roots``)."""
    folder = Path(model_dir)
    if not (folder / "split.csv").is_file():
        raise ValueError(f"{folder} has no split.csv: only a folder written by `python -m training train` can be "
                         "re-scored (use `python -m training evaluate` for any model and folder)")
    roots = data_roots(card_lib.load(folder).recipe.get("data") or [], data_dirs)  # before the model loads
    classifier = models.load(folder)  # checks the card and the weights' sha256
    card = classifier.card
    config = dataclasses.replace(_config(card, folder, cache_dir, batch_size), data=roots)
    prepared = dataset.prepare(config, folder, log)
    if list(prepared.classes) != list(card.class_names):
        raise ValueError(f"the split's classes {prepared.classes} differ from the card's {card.class_names}")
    if external:
        added = _external(prepared, external, class_map, config, log)
        held = prepared.splits.get(data.EXTERNAL)
        if held is not None and len(held.labels):  # the source held out in training stays beside them
            log(f"external: the {len(held.labels)} films of the source(s) held out in training, {prepared.holdout}, "
                "stay in the external split beside them")
            added = dataset.Split([*held.records, *added.records], np.concatenate([held.images, added.images]),
                                  np.concatenate([held.labels, added.labels]))
        prepared.splits[data.EXTERNAL] = added
        prepared.holdout = sorted({r.source for r in added.records})
    card.metrics = {k: v for k, v in card.metrics.items() if k in ("best_epoch", "best_val_loss")}
    score_and_calibrate(classifier.model, card, config, prepared, folder, log)
    card.recipe = {**card.recipe, "rescored": {"external": list(external), "class_map": dict(class_map or {}),
                                                **({"data": list(config.data)} if data_dirs else {}),
                                                "what": "evaluation redone by `python -m training rescore` on the "
                                                        "same weights and split"}}
    card.training_data = {**card.training_data, "external_sources": prepared.holdout}
    card_lib.save(card, folder)  # the card only: the weights file stays byte for byte
    return folder
