"""Classifying studies from a DICOMweb PACS and writing the results back; ``python -m cxr_core.pacs demo``.

    films = pacs.films(client.instances(study_uid), cap=settings.max_instances)
    study = pacs.classify_study(client, classifier, explainer, study_uid)   # frontal films, Grad-CAM, checks
    written = pacs.write_back(client, classifier.card, study)              # SR + heatmap per film, opt-in
    rows = pacs.score_studies(client, classifier, studies)                 # a whole search result, batch rows

Films go through ``pipeline`` exactly like an upload: the retrieved dataset is turned into Part 10 bytes
in memory and read by ``imaging.load``. Nothing read from the PACS is written to disk or logged; the
retrieved datasets live in memory only, for the write-back.

``python -m cxr_core.pacs demo [--port N] [--load DIR]`` starts a local Orthanc (``orthanc.demo``),
loads DIR's DICOM films over STOW-RS and prints one line ``DICOMweb: URL user PASSWORD``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom

from cxr_core import dicom_results, orthanc, overlay, quality, review
from cxr_core.card import ModelCard
from cxr_core.dicomweb import Client, Instance, PacsError, Study, quiet, to_bytes
from cxr_core.errors import UnreadableImageError

if TYPE_CHECKING:  # pipeline imports Keras: the demo command does without it
    from cxr_core import pipeline

LATERAL = frozenset({"LL", "RL", "LAT", "LATERAL", "LLD", "RLD", "LEFT LATERAL", "RIGHT LATERAL"})
MODALITIES = frozenset({"", "CR", "DX", "DR"})
IMAGE_SOP_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1.1",
    "1.2.840.10008.5.1.4.1.1.7",  # secondary capture: some archives keep digitised films as SC
})  # fmt: skip
MAX_BATCH_FILMS = 500


@dataclass(frozen=True)
class Film:
    """One instance of a study and, when it is not classified, why (``skip``)."""

    instance: Instance
    label: str
    skip: str | None = None


@dataclass
class FilmResult:
    """A classified film: its pipeline result and checks, or the error; ``source`` stays in memory."""

    film: Film
    result: pipeline.Result | None = None
    quality: quality.QualityReport | None = None
    source: pydicom.Dataset | None = field(default=None, repr=False)
    error: str | None = None


@dataclass
class StudyResult:
    """Every film of one study with its result, and notes for the clinician (cap, skipped objects)."""

    study_uid: str
    films: list[FilmResult]
    notes: list[str]

    @property
    def classified(self) -> list[FilmResult]:
        return [f for f in self.films if f.result is not None]


def _label(instance: Instance) -> str:
    view = f" ({instance.view_position})" if instance.view_position else ""
    return f"{instance.modality or 'image'} {instance.series_description or 'series'} #{instance.number or '?'}{view}"


def films(instances: Sequence[Instance], cap: int) -> tuple[list[Film], list[str]]:
    """The study's films (result series and non-image objects left out), lateral or non-chest ones with a
    skip reason, at most ``cap`` of those to classify; plus notes saying what was left out."""
    notes: list[str] = []
    ours = [i for i in instances if i.series_description.startswith(dicom_results.RESULT_PREFIX)]
    images = [i for i in instances if i not in ours and i.sop_class in IMAGE_SOP_CLASSES]
    others = len(instances) - len(ours) - len(images)
    if others:
        notes.append(f"{others} object(s) that are not radiographs (reports, presentation states...) were left out.")
    if ours:
        notes.append(f"{len(ours)} object(s) written earlier by this application (UNVERIFIED AI results) left out.")
    out: list[Film] = []
    for instance in images:
        skip = None
        if instance.view_position in LATERAL:
            skip = (f"Lateral view ({instance.view_position}): not classified, the model reads frontal "
                    "(PA/AP) chest films only.")
        elif instance.body_part and not any(part in instance.body_part for part in quality.CHEST_PARTS):
            skip = f"Body part {instance.body_part}, not the chest: not classified, the model reads chest films only."
        elif instance.modality not in MODALITIES:
            skip = f"Modality {instance.modality}, not radiography (CR/DX): not classified."
        out.append(Film(instance, _label(instance), skip))
    todo = [f for f in out if f.skip is None]
    if len(todo) > cap:
        notes.append(f"The study has {len(todo)} frontal films; only the first {cap} were read (the limit "
                     "'max_instances' in the [pacs] settings). Open the rest in the PACS viewer.")
        extra = {id(f) for f in todo[cap:]}
        out = [f if id(f) not in extra else Film(f.instance, f.label, f"Over the limit of {cap} films per study: "
                                                  "not read.") for f in out]
    return out, notes


def classify_study(client: Client, classifier, explainer, study_uid: str, *,
                   cap: int | None = None) -> StudyResult:
    """Retrieve and classify a study's frontal films; PacsError when the study has no image to read."""
    from cxr_core import pipeline

    cap = cap or client.settings.max_instances
    chosen, notes = films(client.instances(study_uid), cap)
    if not chosen:
        raise PacsError("This study holds no radiographs (no CR/DX images) to classify. Choose another study.")
    results: list[FilmResult] = []
    for film in chosen:
        if film.skip is not None:
            results.append(FilmResult(film))
            continue
        try:
            source = client.retrieve_dataset(film.instance)
            data = to_bytes(source)
            result = pipeline.classify(classifier, explainer, data, film.label)
            results.append(FilmResult(film, result, quality.assess(result.image, data), source))
        except (PacsError, UnreadableImageError) as err:
            results.append(FilmResult(film, error=str(err)))
    if not any(r.result is not None for r in results) and all(r.film.skip for r in results):
        notes.append("No frontal chest film in this study could be classified (see the reasons per film).")
    return StudyResult(study_uid, results, notes)


def write_back(client: Client, card: ModelCard, study: StudyResult, *, again: bool = False,
               colormap: str = "jet", opacity: float = 0.4) -> list[str]:
    """Store an SR and a heatmap secondary capture per classified film in one STOW-RS request.

    Refuses (PacsError, nothing written) when this model's results are already in the study, unless
    ``again``; all objects are built before anything is sent. Returns the new SOP Instance UIDs.
    """
    done = study.classified
    if not done:
        raise PacsError("Nothing to write back: no film of this study was classified.")
    existing = dicom_results.existing_results(client.series_descriptions(study.study_uid), card)
    if existing and not again:
        raise PacsError(f"Results of {card.name} v{card.version} are already in the PACS for this study "
                        f"({len(existing)} series). Nothing was written; choose 'write again' to add another copy.")
    objects: list[pydicom.Dataset] = []
    try:
        with quiet():
            for item in done:
                result = item.result
                source = dicom_results.patient_study_source(item.source)
                blended = overlay.overlay(result.image.pixels, result.heatmap, colormap, opacity)
                explained = card.class_names[result.class_index]
                objects.append(dicom_results.structured_report(source, result.prediction, card))
                objects.append(dicom_results.heatmap_capture(source, blended, card, explained))
    except (AttributeError, TypeError, ValueError) as exc:  # a source film whose tags highdicom cannot copy
        raise PacsError(f"The results could not be built from this study's DICOM tags ({type(exc).__name__}): "
                        "nothing was written. Ask the PACS administrator to check the study's patient and study "
                        "fields.") from exc
    return client.store(objects)


def study_name(study: Study) -> str:
    """How a study is named in tables: accession, else date, else the end of its UID (no patient data)."""
    return study.accession or study.date or f"study …{study.study_uid[-8:]}"


def study_label(study: Study) -> str:
    """'accession · date · description' for choosing a study (parts that are missing left out)."""
    parts = [study_name(study), study.date if study.accession else "", study.description]
    return " · ".join(p for p in parts if p)


def score_studies(client: Client, classifier, studies: Sequence[Study], *,
                  progress: Callable[[int, int], None] | None = None, limit: int = MAX_BATCH_FILMS
                  ) -> tuple[list[pipeline.BatchItem], list[str]]:
    """Batch rows (``pipeline.classify_many``) for the frontal films of many studies; films that could not be
    retrieved keep an error row; ``progress(done, total)`` counts studies read. Returns (rows, notes)."""
    from cxr_core import pipeline

    named: list[tuple[str, bytes | None, str | None]] = []
    notes: list[str] = []
    for n, study in enumerate(studies, 1):
        if len(named) >= limit:
            notes.append(f"Only the first {limit} films were scored; narrow the search for the rest.")
            break
        try:
            chosen, _ = films(client.instances(study.study_uid), client.settings.max_instances)
        except PacsError as err:
            named.append((study_name(study), None, str(err)))
            continue
        for film in chosen:
            name = f"{study_name(study)} · {film.label}"
            if film.skip is not None:
                named.append((name, None, film.skip))
                continue
            try:
                named.append((name, client.retrieve(film.instance), None))
            except PacsError as err:
                named.append((name, None, str(err)))
        if progress is not None:
            progress(n, len(studies))
    names = review.unique_names(name for name, _, _ in named)
    readable = [(name, data) for name, (_, data, _) in zip(names, named, strict=True) if data is not None]
    scored = iter(pipeline.classify_many(classifier, readable))
    rows = [next(scored) if data is not None else pipeline.BatchItem(name, None, error, None, None)
            for name, (_, data, error) in zip(names, named, strict=True)]
    return rows, notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cxr_core.pacs", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("demo", help="start a local Orthanc with sample chest films (127.0.0.1)")
    cmd.add_argument("--port", type=int, default=None, help="HTTP port (default: a free one)")
    cmd.add_argument("--load", type=Path, default=orthanc.DEMO_DATA,
                     help=f"folder of DICOM files (default {orthanc.DEMO_DATA})")
    args = parser.parse_args(argv)
    if not args.load.is_dir():
        parser.error(f"--load: {args.load} is not a folder")
    try:
        orthanc.demo(args.port, args.load)
    except RuntimeError as err:
        print(err, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
