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
import dataclasses
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom

from cxr_core import dicom_results, imaging, orthanc, overlay, quality, report, review
from cxr_core.card import ModelCard
from cxr_core.dicomweb import Client, Instance, PacsError, Study, is_instance, quiet
from cxr_core.errors import UNEXPECTED, UnreadableImageError

if TYPE_CHECKING:  # pipeline imports Keras: the demo command does without it
    from cxr_core import pipeline

LATERAL = frozenset({"LL", "RL", "LAT", "LATERAL", "LLD", "RLD", "LEFT LATERAL", "RIGHT LATERAL"})
OBLIQUE = frozenset({"RLO", "LLO", "RAO", "LAO", "RPO", "LPO", "OBL", "OBLIQUE"})
# View Code Sequence (CID 4010) codes of frontal chest views: postero-anterior, antero-posterior, frontal (SNOMED CT,
# and the SNOMED RT codes older modalities send). Any other view code that says lateral or oblique is not frontal.
FRONTAL_CODES = frozenset({"272479007", "399348003", "399033003", "R-10214", "R-10206", "R-10202"})
NON_FRONTAL_WORDS = ("lateral", "oblique", "axial", "sagittal", "tangential")
MODALITIES = frozenset({"", "CR", "DX", "DR"})
IMAGE_SOP_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1",  # CR, DX For Presentation
    "1.2.840.10008.5.1.4.1.1.7",  # secondary capture: some archives keep digitised films as SC
})  # fmt: skip
FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"  # DX For Processing: raw detector data, never shown to a reader
FRONTAL_ONLY = "not classified, the model reads frontal (PA/AP) chest films only."
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

    @property
    def writable(self) -> list[FilmResult]:
        """The classified films whose results may go back to the PACS: not those flagged as probably not a
        frontal chest film (the page says their result is not meaningful; the PACS would show it as a finding)."""
        return [f for f in self.classified if not (f.quality is not None and f.quality.probably_not_chest)]


def _label(instance: Instance) -> str:
    view = f" ({instance.view_position})" if instance.view_position else ""
    return f"{instance.modality or 'image'} {instance.series_description or 'series'} #{instance.number or '?'}{view}"


def skip_reason(*, view: str = "", view_code: tuple[str, str] = ("", ""), body_part: str = "", modality: str = "",
                sop_class: str = "", intent: str = "") -> str | None:
    """Why a film is not classified (None: a frontal chest radiograph as far as its tags say): a lateral or oblique
    view (View Position, or the View Code Sequence's code and meaning), raw detector data (DX For Processing), a
    body part other than the chest, a modality other than radiography. The same rules for a QIDO answer and for
    the retrieved dataset (``dataset_skip``), which may say more."""
    view, (code, meaning) = view.strip().upper(), view_code
    said = view or meaning or code
    if view in LATERAL or "LATERAL" in view:
        return f"Lateral view ({said}): {FRONTAL_ONLY}"
    if view in OBLIQUE or "OBLIQUE" in view:
        return f"Oblique view ({said}): {FRONTAL_ONLY}"
    words = meaning.lower()
    if code not in FRONTAL_CODES and any(word in words for word in NON_FRONTAL_WORDS):
        kind = "Lateral" if "lateral" in words and "oblique" not in words else \
            "Oblique" if "oblique" in words else "Not a frontal"
        return f"{kind} view ({meaning}): {FRONTAL_ONLY}"
    if sop_class == FOR_PROCESSING or intent.strip().upper() == "FOR PROCESSING":
        return ("Raw detector data (DX For Processing): not classified, the model reads films processed for "
                "presentation. Open the film's For Presentation version in the PACS.")
    body = body_part.strip().upper()
    if body and not any(part in body for part in quality.CHEST_PARTS):
        return f"Body part {body}, not the chest: not classified, the model reads chest films only."
    if modality.strip().upper() not in MODALITIES:
        return f"Modality {modality.strip().upper()}, not radiography (CR/DX): not classified."
    return None


def _view_code(ds: pydicom.Dataset) -> tuple[str, str]:
    """(code value, code meaning) of the dataset's View Code Sequence; empty strings when it has none."""
    try:
        item = ds.ViewCodeSequence[0]
        return str(item.get("CodeValue") or item.get("LongCodeValue") or ""), str(item.get("CodeMeaning") or "")
    except (AttributeError, IndexError, TypeError, KeyError):
        return "", ""


def dataset_skip(ds: pydicom.Dataset) -> str | None:
    """``skip_reason`` for a retrieved film: its own tags, which the QIDO answer may have lacked or got wrong."""
    with quiet():  # a value that does not parse is read as text, without a warning that quotes it
        tags = {key: str(ds.get(keyword) or "") for key, keyword in (
            ("view", "ViewPosition"), ("body_part", "BodyPartExamined"), ("modality", "Modality"),
            ("sop_class", "SOPClassUID"), ("intent", "PresentationIntentType"))}
        return skip_reason(view_code=_view_code(ds), **tags)


def retrieve(client: Client, film: Film) -> tuple[bytes, pydicom.Dataset]:
    """The film's bytes (read under the reader's limits) and its header (every element before the pixel data),
    checked to be the image asked for. Raises PacsError or UnreadableImageError."""
    data = client.retrieve(film.instance)
    with quiet():
        header = imaging.read_header(data)
    if not is_instance(header, film.instance):
        raise PacsError("The PACS sent another image than the one asked for (its study, series or instance UID "
                        "differs), so it was not classified. Ask the PACS administrator to check the archive.")
    return data, header


def recheck(film: Film, ds: pydicom.Dataset) -> Film:
    """The film as its retrieved dataset describes it: skipped when its own tags say it is no frontal chest
    radiograph (the QIDO answer may lack View Position, body part...), labelled with the dataset's view."""
    skip = dataset_skip(ds)
    if skip is None:
        return film
    view = str(ds.get("ViewPosition") or "").strip().upper() or film.instance.view_position
    instance = dataclasses.replace(film.instance, view_position=view)
    return Film(instance, _label(instance), skip)


def films(instances: Sequence[Instance], cap: int) -> tuple[list[Film], list[str]]:
    """The study's films (result series and non-image objects left out), lateral, oblique, raw or non-chest ones
    with a skip reason, at most ``cap`` of those to classify; plus notes saying what was left out."""
    notes: list[str] = []
    ours = [i for i in instances if i.series_description.startswith(dicom_results.RESULT_PREFIX)]
    images = [i for i in instances if i not in ours and i.sop_class in IMAGE_SOP_CLASSES | {FOR_PROCESSING}]
    others = len(instances) - len(ours) - len(images)
    if others:
        notes.append(f"{others} object(s) that are not radiographs (reports, presentation states...) were left out.")
    if ours:
        notes.append(f"{len(ours)} object(s) written earlier by this application (UNVERIFIED AI results) left out.")
    out: list[Film] = []
    for instance in images:
        skip = skip_reason(view=instance.view_position, body_part=instance.body_part, modality=instance.modality,
                           sop_class=instance.sop_class)
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
            data, source = retrieve(client, film)
            checked = recheck(film, source)
            if checked.skip is not None:  # the film's own tags say lateral, oblique, raw, not the chest...
                results.append(FilmResult(checked))
                continue
            result = pipeline.classify(classifier, explainer, data, film.label)
            results.append(FilmResult(film, result, quality.assess(result.image, data), source))
        except (PacsError, UnreadableImageError) as err:
            results.append(FilmResult(film, error=str(err)))
        except Exception as exc:  # noqa: BLE001 - an engine error, memory: this film fails, not the study's others
            results.append(FilmResult(film, error=UNEXPECTED.format(kind=type(exc).__name__)))
    if not any(r.result is not None for r in results) and all(r.film.skip for r in results):
        notes.append("No frontal chest film in this study could be classified (see the reasons per film).")
    return StudyResult(study_uid, results, notes)


class Written(list):
    """``write_back``'s answer: the new SOP Instance UIDs; ``already``: films left out because this model's
    results for them were in the study already."""

    already: int = 0


def films_with_results(client: Client, study_uid: str, series: Sequence[str]) -> set[str] | None:
    """SOP Instance UIDs of the films that the result objects in ``series`` (of this study) were made from, read
    from each object's header (WADO-RS metadata); None when a header cannot be read or names no film."""
    found: set[str] = set()
    for instance in client.instances(study_uid):
        if instance.series_uid in series:
            try:
                films = dicom_results.referenced_films(client.header(instance))
            except PacsError:
                return None
            if not films:  # reduced metadata, or results another tool wrote: which film it is for is unknown
                return None
            found |= films
    return found


def write_back(client: Client, card: ModelCard, study: StudyResult, *, again: bool = False,
               include_not_chest: bool = False, colormap: str = "jet", opacity: float = 0.4) -> Written:
    """Store an SR and a heatmap secondary capture per classified film in one STOW-RS request.

    Each carries the film's cautions (``report.cautions``). Films flagged 'probably not a frontal chest
    radiograph' are left out (their result is not meaningful) unless ``include_not_chest`` (the user confirmed
    them one by one: the flag has false alarms), and then carry that caution too.

    Films whose results from this model are in the study already are left out unless ``again`` (a repeat film
    added to the study later is written alone); when that holds for every film, or the existing results' headers
    cannot be read, it refuses (PacsError, nothing written). All objects are built before anything is sent, from
    each film as the PACS holds it at that moment (read again: its patient may have changed since it was
    classified). Returns the new SOP Instance UIDs (``Written``).
    """
    done = study.classified if include_not_chest else study.writable
    if not done:
        raise PacsError("Nothing to write back: no film of this study was classified" +
                        (" as a frontal chest film (each was flagged 'probably not a frontal chest radiograph', "
                         "so its result is not meaningful)." if study.classified else "."))
    existing = dicom_results.existing_results(client.series_descriptions(study.study_uid), card)
    already = 0
    if existing and not again:
        written = films_with_results(client, study.study_uid, existing)
        todo = None if written is None else [item for item in done if item.film.instance.sop_uid not in written]
        if not todo:
            which = "for every film to write" if written is not None else "for this study"
            raise PacsError(f"Results of {card.name} v{card.version} are already in the PACS {which} "
                            f"({len(existing)} series). Nothing was written; choose 'write again' to add another "
                            "copy.")
        already, done = len(done) - len(todo), todo
    # The patient and study modules the results carry are read again now: a film filed under a placeholder patient
    # (an emergency) may have been reconciled to the real one since it was classified. From the header alone
    # (WADO-RS metadata), else from the film read again (an archive without the metadata service).
    current = []
    for item in done:
        try:
            try:
                current.append(client.header(item.film.instance))
            except PacsError:
                current.append(retrieve(client, item.film)[1])
        except (PacsError, UnreadableImageError) as err:
            raise PacsError(f"The film '{item.film.label}' could not be read again to write its results: {err} "
                            "Nothing was written.") from err
    objects: list[pydicom.Dataset] = []
    try:
        with quiet():
            for item, film in zip(done, current, strict=True):
                result = item.result
                source = dicom_results.patient_study_source(film)
                blended = overlay.overlay(result.image.pixels, result.heatmap, colormap, opacity)
                explained = card.class_names[result.class_index]
                cautions = report.cautions(result.prediction, card, item.quality, result.image.info)
                objects.append(dicom_results.structured_report(source, result.prediction, card, cautions))
                objects.append(dicom_results.heatmap_capture(source, blended, card, explained, cautions))
    except (AttributeError, KeyError, TypeError, ValueError) as exc:  # a source film whose tags highdicom cannot copy
        raise PacsError(f"The results could not be built from this study's DICOM tags ({type(exc).__name__}): "
                        "nothing was written. Ask the PACS administrator to check the study's patient and study "
                        "fields.") from exc
    stored = Written(client.store(objects))
    stored.already = already
    return stored


def study_name(study: Study) -> str:
    """How a study is named in tables: accession, else date, else the end of its UID (no patient data)."""
    return study.accession or study.date or f"study …{study.study_uid[-8:]}"


def study_label(study: Study) -> str:
    """'accession · date · description' for choosing a study (parts that are missing left out)."""
    parts = [study_name(study), study.date if study.accession else "", study.description]
    return " · ".join(p for p in parts if p)


def study_labels(studies: Sequence[Study]) -> list[str]:
    """``study_label`` of each study, made unique (' (2)'...): a choice widget hands back the label, and two
    studies of one day with one description and no accession number would otherwise open the same study."""
    return review.unique_names(study_label(study) for study in studies)


def score_studies(client: Client, classifier, studies: Sequence[Study], *,
                  progress: Callable[[int, int], None] | None = None, limit: int = MAX_BATCH_FILMS
                  ) -> tuple[list[pipeline.BatchItem], list[str]]:
    """Batch rows (``pipeline.classify_many``) for the frontal films of many studies; films that could not be
    retrieved keep an error row, and a study with no film to classify has a row saying so; ``progress(done,
    total)`` counts studies read. Returns (rows, notes).

    Each study's films are scored as soon as they are retrieved and their bytes let go, so that the server holds
    one study's films at a time (500 uncompressed CR films held at once were 5-10 GB). ``limit`` counts the films
    retrieved to be scored, not those skipped from their tags."""
    from cxr_core import pipeline

    rows: list[pipeline.BatchItem] = []
    notes: list[str] = []
    retrieved = 0
    for n, study in enumerate(studies, 1):
        if retrieved >= limit:
            notes.append(f"Only the first {limit} films were scored; narrow the search for the rest.")
            break
        named: list[tuple[str, bytes | None, str | None]] = []
        try:
            chosen, _ = films(client.instances(study.study_uid), client.settings.max_instances)
        except PacsError as err:
            chosen, named = [], [(study_name(study), None, str(err))]
        for film in chosen:
            name = f"{study_name(study)} · {film.label}"
            if film.skip is not None:
                named.append((name, None, film.skip))
                continue
            if retrieved >= limit:
                named.append((name, None, f"Not scored: the batch stops at {limit} films."))
                continue
            retrieved += 1
            try:
                data, source = retrieve(client, film)
                checked = recheck(film, source)
                if checked.skip is not None:
                    named.append((f"{study_name(study)} · {checked.label}", None, checked.skip))
                else:
                    named.append((name, data, None))
            except (PacsError, UnreadableImageError) as err:
                named.append((name, None, str(err)))
        if not named:
            named.append((study_name(study), None, "No radiographs in this study: nothing to classify."))
        readable = [(name, data) for name, data, _ in named if data is not None]
        scored = iter(pipeline.classify_many(classifier, readable))
        rows += [next(scored) if data is not None else pipeline.BatchItem(name, None, error, None, None)
                 for name, data, error in named]
        del named, readable  # this study's bytes
        if progress is not None:
            progress(n, len(studies))
    names = review.unique_names(row.name for row in rows)  # the table's rows need distinct names
    rows = [row if row.name == name else dataclasses.replace(row, name=name) for row, name in zip(rows, names,
                                                                                               strict=True)]
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
