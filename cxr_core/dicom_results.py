"""DICOM result objects for one classified film, written with highdicom, flagged UNVERIFIED.

    sr = structured_report(source, prediction, card)              # Comprehensive SR, new series
    sc = heatmap_capture(source, overlay_rgb, card, "PNEUMONIA")  # secondary capture of the Grad-CAM overlay

Both belong to the source film's patient and study (patient and study modules copied from ``source``,
the dataset retrieved from the PACS), get new series and SOP Instance UIDs, and carry a series
description that starts with ``RESULT_PREFIX`` so that a later write-back can find them
(``existing_results``). ``read_report`` parses an SR written here back into plain values.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import cv2
import highdicom as hd
import numpy as np
import pydicom
from pydicom.charset import python_encoding
from pydicom.sr.codedict import codes
from pydicom.valuerep import DA, DT, TM

from cxr_core.card import ModelCard

if TYPE_CHECKING:  # models imports Keras
    from cxr_core.models import Prediction

UNVERIFIED = "UNVERIFIED - research use only, not for diagnosis"
BANNER = "UNVERIFIED - research use only"  # burned into the heatmap's pixels: a screenshot keeps it
RESULT_PREFIX = "UNVERIFIED AI"
MANUFACTURER = "cxr_core (research software)"
SCHEME = "99CXR"  # private coding scheme for the per-class probabilities
# A CAD title, not LOINC's "Diagnostic imaging report": a RIS must never file these results as the study's report.
REPORT_TITLE = hd.sr.CodedConcept.from_code(codes.DCM.ChestCADReport)
CODING_SCHEME = hd.coding_schemes.CodingSchemeIdentificationItem(
    designator=SCHEME, name="cxr_core class probabilities", responsible_organization=MANUFACTURER)
SR_SERIES_NUMBER, SC_SERIES_NUMBER = 9901, 9902


def series_description(card: ModelCard, kind: str) -> str:
    """'UNVERIFIED AI <model> v<version> <kind>' cut to the 64 characters DICOM allows."""
    return f"{RESULT_PREFIX} {card.name} v{card.version} {kind}"[:64]


def existing_results(descriptions: Mapping[str, str], card: ModelCard) -> list[str]:
    """Series UIDs (from series UID -> description) that hold this model's results already."""
    mine = {series_description(card, kind) for kind in ("SR", "heatmap")}
    return sorted(uid for uid, text in descriptions.items() if text in mine)


def referenced_films(ds: pydicom.Dataset) -> set[str]:
    """SOP Instance UIDs of the films a result object was made from: a heatmap's Source Image Sequence, an SR's
    Current Requested Procedure Evidence (what ``heatmap_capture`` and ``structured_report`` write)."""
    found = {str(item.get("ReferencedSOPInstanceUID", "")) for item in ds.get("SourceImageSequence") or []}
    for study in ds.get("CurrentRequestedProcedureEvidenceSequence") or []:
        for series in study.get("ReferencedSeriesSequence") or []:
            found.update(str(item.get("ReferencedSOPInstanceUID", ""))
                         for item in series.get("ReferencedSOPSequence") or [])
    return found - {""}


TYPE2 = (("PatientName", "PN"), ("PatientID", "LO"), ("PatientBirthDate", "DA"), ("PatientSex", "CS"),
         ("StudyDate", "DA"), ("StudyTime", "TM"), ("StudyID", "SH"), ("AccessionNumber", "SH"),
         ("ReferringPhysicianName", "PN"))


SEXES = {"M": "M", "F": "F", "O": "O", "MALE": "M", "FEMALE": "F", "OTHER": "O"}  # PS3.3 C.7.1.1: M, F or O


def _needs_utf8(charset) -> bool:
    """Whether this Specific Character Set must be rewritten before highdicom copies it: several values (ISO 2022
    code extensions, as Japanese and Korean sites send, e.g. ``\\ISO 2022 IR 87``), or a value highdicom refuses:
    a single code-extension value, an empty one, or one outside its list (``hd.SpecificCharacterSetValues``), such
    as ``ISO_IR 6``, a common misspelling of the default repertoire that pydicom reads. Absent: nothing to do."""
    if charset is None:
        return False
    values = [charset] if isinstance(charset, str) else list(charset)
    if len(values) != 1:
        return True
    value = str(values[0])
    accepted = {v.value for v in hd.SpecificCharacterSetValues if not v.value.startswith("ISO 2022")}
    return value not in accepted


TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UR", "UT"})


def _text_values(ds: pydicom.Dataset) -> Iterator[str]:
    """Every text value of the dataset (sequences and multi-valued elements included), once decoded."""
    for element in ds.iterall():
        if element.VR not in TEXT_VRS:
            continue
        values = element.value if isinstance(element.value, list | tuple | pydicom.multival.MultiValue) \
            else [element.value]
        yield from (str(v) for v in values if v is not None)


def _all_ascii(ds: pydicom.Dataset) -> bool:
    """Whether every text value of the dataset (sequences included) is plain ASCII, once decoded."""
    return all(v.isascii() for v in _text_values(ds))


def _declare_utf8_where_needed(ds: pydicom.Dataset) -> None:
    """Declare UTF-8 (``ISO_IR 192``) when a text value cannot be written in the declared character set, or in
    the default repertoire (ASCII) when none is declared. Without it pydicom writes ``?`` for each character it
    cannot encode: a patient's name from a DICOMweb JSON header (Unicode, and often no Specific Character Set,
    when the archive decoded the film with its own default), an accented class name, or a caution's ``≥``. The
    values stay the same characters; a set with ISO 2022 code extensions is left as it is
    (``patient_study_source`` replaces those)."""
    declared = ds.get("SpecificCharacterSet")
    values = [] if declared is None else [declared] if isinstance(declared, str) else list(declared)
    if len(values) > 1:
        return
    codec = "ascii" if not values or not values[0] else python_encoding.get(str(values[0]))
    if codec is None:
        return
    try:
        for value in _text_values(ds):
            value.encode(codec)
    except UnicodeEncodeError:
        ds.SpecificCharacterSet = "ISO_IR 192"


def patient_study_source(source: pydicom.Dataset) -> pydicom.Dataset:
    """A shallow copy of ``source`` whose patient and study fields highdicom can copy: missing ones present
    but empty, dates or times that do not parse (anonymisers leave hashes there) emptied, a Patient's Sex
    outside M/F/O (``U``, ``m``, ``MALE``) mapped or emptied, and text in a character set that highdicom refuses
    (ISO 2022 code extensions, an empty or misspelt value such as ``ISO_IR 6``) re-encoded as UTF-8 (the names stay
    the same characters), or without a Specific Character Set when all of it is ASCII (the default repertoire)."""
    clean = pydicom.Dataset()
    clean.update(source)
    clean.file_meta = getattr(source, "file_meta", pydicom.dataset.FileMetaDataset())
    if _needs_utf8(source.get("SpecificCharacterSet")):
        clean.walk(lambda _ds, _element: None)  # decode every value with the source's character set first
        if _all_ascii(clean):
            del clean.SpecificCharacterSet
        else:
            clean.SpecificCharacterSet = "ISO_IR 192"
    sex = str(source.get("PatientSex") or "").strip().upper()
    if sex and SEXES.get(sex) != source.get("PatientSex"):
        clean.add_new("PatientSex", "CS", SEXES.get(sex, ""))
    for element in list(source):
        parse = {"DA": DA, "TM": TM, "DT": DT}.get(element.VR)
        if parse is None or element.value in (None, ""):
            continue
        try:
            parse(element.value)
        except (TypeError, ValueError):
            clean.add_new(element.tag, element.VR, "")  # a new element: the source keeps its value
    for keyword, vr in TYPE2:
        if keyword not in clean:
            clean.add_new(keyword, vr, "")
    return clean


def probability_concept(class_name: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(class_name.upper().replace(" ", "_")[:16], SCHEME, f"Probability of {class_name}")


def _text(name, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=name, value=value[:1024], relationship_type="CONTAINS")


def structured_report(source: pydicom.Dataset, prediction: Prediction, card: ModelCard,
                      cautions: Sequence[str] = ()) -> hd.sr.ComprehensiveSR:
    """A Comprehensive SR: per class the calibrated probability, the decision at the card's thresholds,
    the algorithm (name, version, weights sha256), the UNVERIFIED text, a reference to ``source``, and each of
    ``cautions`` (``report.cautions``: low confidence, unlike the training films, what the reader changed) as a
    comment beside the finding, so that the PACS shows what the app's page showed."""
    rule = ", ".join(f"{c} >= {t:.3f}" for c, t in card.thresholds.items()) or "top class"
    items = [
        _text(codes.DCM.Comment, UNVERIFIED),
        _text(codes.DCM.AlgorithmName, card.name),
        _text(codes.DCM.AlgorithmVersion, card.version),
        _text(codes.DCM.AlgorithmParameters, f"weights sha256 {card.weights_sha256}; architecture "
                                              f"{card.architecture}; decision rule {rule}, otherwise "
                                              f"{card.negative_class or 'top class'}"),
        hd.sr.ImageContentItem(name=codes.DCM.SourceOfMeasurement, referenced_sop_class_uid=source.SOPClassUID,
                               referenced_sop_instance_uid=source.SOPInstanceUID, relationship_type="CONTAINS"),
    ]
    items += [hd.sr.NumContentItem(name=probability_concept(name), value=float(p), unit=codes.UCUM.NoUnits,
                                   relationship_type="CONTAINS")
              for name, p in zip(prediction.class_names, prediction.probabilities, strict=True)]
    items.append(_text(codes.DCM.Finding, prediction.decision))
    items += [_text(codes.DCM.Comment, f"Caution: {caution}") for caution in cautions]
    root = hd.sr.ContainerContentItem(name=REPORT_TITLE, is_content_continuous=False)  # separate items
    root.ContentSequence = hd.sr.ContentSequence(items)
    sr = hd.sr.ComprehensiveSR(
        evidence=[source], content=root, series_instance_uid=hd.UID(), series_number=SR_SERIES_NUMBER,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER, is_complete=True,
        is_final=False, is_verified=False, series_description=series_description(card, "SR"),
        coding_schemes=[CODING_SCHEME],  # declares the private scheme of the probability codes
    )
    _declare_utf8_where_needed(sr)
    return sr


def heatmap_capture(source: pydicom.Dataset, overlay_rgb: np.ndarray, card: ModelCard,
                    explained_class: str, cautions: Sequence[str] = ()) -> hd.sc.SCImage:
    """A secondary capture (RGB, 8 bit) of the Grad-CAM overlay ``overlay_rgb`` (uint8 HxWx3) with the ``BANNER``
    burned in at the top, same study, new series, an UNVERIFIED series description, and the source film's Burned
    In Annotation (it tells whether the pixels identify the patient; the banner does not), none when the film
    does not say."""
    pixels = np.ascontiguousarray(overlay_rgb, dtype=np.uint8)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"overlay_rgb must be uint8 (H, W, 3), got shape {pixels.shape}")
    pixels = burn_banner(pixels)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source, pixel_array=pixels, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", series_instance_uid=hd.UID(), series_number=SC_SERIES_NUMBER,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER,
        patient_orientation=("L", "F"),  # replaced below: highdicom takes single letters only
        series_description=series_description(card, "heatmap"),
    )
    # The film's own orientation as it is (refined values such as LP\F, or empty: Type 2), never an invented one.
    sc.PatientOrientation = source.get("PatientOrientation") or ""
    sc.copy_patient_and_study_information(source)  # the whole Patient and Study modules, as the SR has them
    if str(source.get("LossyImageCompression", "")) == "01":  # PS3.3 C.7.6.1.1.5: a lossy source stays marked
        sc.LossyImageCompression = "01"
    burned = str(source.get("BurnedInAnnotation") or "").strip().upper()
    if burned in ("YES", "NO"):
        sc.BurnedInAnnotation = burned
    elif "BurnedInAnnotation" in sc:  # unknown for the film, so unknown for its pixels here: no claim (Type 3)
        del sc.BurnedInAnnotation
    sc.ImageComments = " ".join([f"{UNVERIFIED}. Grad-CAM for {explained_class}, {card.name} v{card.version}.",
                                 *(f"Caution: {c}" for c in cautions)])[:10240]
    sc.DerivationDescription = f"Grad-CAM heatmap over the source film ({card.name} v{card.version})"
    sc.SourceImageSequence = [_reference(source)]
    _declare_utf8_where_needed(sc)
    return sc


def _banner_layout(cols: int, rows: int) -> tuple[float, int, int, tuple[int, int]]:
    """(font scale, stroke thickness, band rows, text origin) for the banner on a cols x rows image: the text
    spans nine tenths of the width, the band holds it with its descenders and a margin (a quarter of the image at
    most)."""
    font = cv2.FONT_HERSHEY_SIMPLEX
    (unit_width, _), _ = cv2.getTextSize(BANNER, font, 1.0, 2)
    scale = max(0.3, 0.9 * cols / unit_width)
    thickness = max(1, round(scale * 2))
    (width, height), baseline = cv2.getTextSize(BANNER, font, scale, thickness)
    margin = max(2, height // 3)
    band = min(max(1, rows // 4), height + baseline + thickness + 2 * margin)
    return scale, thickness, band, (max(0, (cols - width) // 2), min(band - 1, margin + height))


def banner_height(cols: int, rows: int) -> int:
    """Rows of the black band that ``burn_banner`` draws across the top of a cols x rows image."""
    return _banner_layout(cols, rows)[2]


def burn_banner(rgb: np.ndarray) -> np.ndarray:
    """A copy of ``rgb`` (uint8 HxWx3) with ``BANNER`` in yellow on a black band across the top, sized to the
    image (the text spans about nine tenths of its width): legible at the film's size and in any screenshot."""
    out = np.array(rgb, dtype=np.uint8, copy=True)
    rows, cols = out.shape[:2]
    scale, thickness, band, origin = _banner_layout(cols, rows)
    out[:band] = 0
    cv2.putText(out, BANNER, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 0), thickness, cv2.LINE_AA)
    out[band:] = rgb[band:]  # the film below the band stays exactly as it was
    return out


def _reference(source: pydicom.Dataset) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    return item


@dataclass(frozen=True)
class ReportValues:
    """What ``read_report`` finds in an SR written by ``structured_report``."""

    probabilities: dict[str, float]
    decision: str
    algorithm: dict[str, str]  # name, version, parameters
    comment: str
    referenced_sop_uids: list[str]
    cautions: list[str] = field(default_factory=list)  # the "Caution: ..." comments, without the prefix


def read_report(sr: pydicom.Dataset) -> ReportValues:
    """Probabilities, decision, algorithm identification, comment and image references of our SR."""
    probabilities: dict[str, float] = {}
    texts: dict[str, str] = {}
    references: list[str] = []
    cautions: list[str] = []
    for item in sr.ContentSequence:
        concept = item.ConceptNameCodeSequence[0]
        if item.ValueType == "NUM" and concept.CodingSchemeDesignator == SCHEME:
            name = str(concept.CodeMeaning).removeprefix("Probability of ")
            probabilities[name] = float(item.MeasuredValueSequence[0].NumericValue)
        elif item.ValueType == "TEXT" and str(item.TextValue).startswith("Caution: "):
            cautions.append(str(item.TextValue).removeprefix("Caution: "))
        elif item.ValueType == "TEXT":
            texts.setdefault(str(concept.CodeMeaning), str(item.TextValue))
        elif item.ValueType == "IMAGE":
            references.append(str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
    algorithm = {key.split()[-1].lower(): texts.get(key, "")
                 for key in ("Algorithm Name", "Algorithm Version", "Algorithm Parameters")}
    return ReportValues(probabilities, texts.get("Finding", ""), algorithm, texts.get("Comment", ""), references,
                        cautions)
