"""cxr_core.dicomweb, dicom_results and pacs against a real Orthanc (Debian's orthanc + orthanc-dicomweb).

One Orthanc per module, started on a free 127.0.0.1 port by the demo's code path and loaded over STOW-RS with
canary copies of every file of ../shared/data/dicom (all transfer syntaxes there).
"""

from __future__ import annotations

import copy
import http.server
import io
import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from types import SimpleNamespace

import highdicom as hd
import numpy as np
import pydicom
import pytest
from conftest import DICOM
from pacs_server import (
    CANARY,
    DX_J2K,
    EMPTY_ACCESSION,
    LATERAL_ACCESSION,
    NEEDLES,
    REFUSE_RESULTS,
    SIIM,
    loaded_orthanc,
    local_canary_bytes,
    new_study,
    stow_answer,
    stow_answering,
)
from pydicom.uid import generate_uid

from cxr_core import dicom_results, dicomweb, imaging, limits, models, overlay, pacs, pipeline
from cxr_core.dicomweb import PacsError
from cxr_core.errors import UnreadableImageError
from cxr_core.explain import Explainer
from cxr_core.orthanc import LocalOrthanc, free_port

REPO = Path(__file__).resolve().parents[1]
FILES = sorted(DICOM.rglob("*.dcm"))
RG1 = DICOM / "pydicom-data" / "RG1_J2KI.dcm"


@pytest.fixture(scope="module")
def orthanc():
    with loaded_orthanc() as (server, client):
        yield server, client


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    classifier = models.load(tiny_model_dir)
    return classifier, Explainer(classifier)


def loaded_uids() -> dict[Path, str]:
    """SOP Instance UID of each file as load_folder stored it (later copies of a UID get a derived one)."""
    seen, out = set(), {}
    for path in FILES:
        uid = str(pydicom.dcmread(path, force=True, stop_before_pixels=True).SOPInstanceUID)
        if uid in seen:
            uid = generate_uid(entropy_srcs=[uid, path.relative_to(DICOM).as_posix()])
        seen.add(uid)
        out[path] = uid
    return out


def study_of(path: Path) -> str:
    return str(pydicom.dcmread(path, force=True, stop_before_pixels=True).StudyInstanceUID)


def instance(client: dicomweb.Client, path: Path) -> dicomweb.Instance:
    uid = loaded_uids()[path]
    return next(i for i in client.instances(study_of(path)) if i.sop_uid == uid)


def by_accession(client: dicomweb.Client, accession: str) -> dicomweb.Study:
    (study,) = client.search_studies(accession=accession, modality="")
    return study


def test_search_by_modality_date_accession_and_body_part(orthanc):
    _, client = orthanc
    dx = {s.study_uid for s in client.search_studies(modality="DX")}
    assert dx == {study_of(p) for p in FILES if pydicom.dcmread(p, stop_before_pixels=True, force=True).get(
        "Modality") == "DX"} and len(dx) == 2
    everything = client.search_studies()
    assert {study_of(p) for p in FILES} <= {s.study_uid for s in everything}
    in_range = client.search_studies(date_from=date(2004, 8, 26), date_to=date(2004, 8, 31))
    assert {s.study_uid for s in in_range} == {study_of(RG1), study_of(DX_J2K)}
    (cr,) = client.search_studies(date_from=date(2004, 8, 26), date_to=date(2004, 8, 31), modality="CR")
    assert (cr.study_uid, cr.date, cr.description, cr.modalities, cr.films) == (study_of(RG1), "2004-08-26",
                                                                                "THORAX", "CR", 2)
    (fuji,) = client.search_studies(accession="FUJI95714")
    assert fuji.study_uid == study_of(DICOM / "fo-dicom" / "CR-MONO1-10-chest.dcm") and fuji.date == ""
    chest = {s.study_uid for s in client.search_studies(body_part="chest")}
    assert study_of(RG1) in chest and study_of(DICOM / "non_chest" / "CR-ModalitySequenceLUT.dcm") not in chest
    with pytest.raises(PacsError, match="starts .* after it ends"):
        client.search_studies(date_from=date(2005, 1, 1), date_to=date(2004, 1, 1))


def test_a_search_cut_at_its_limit_says_so(orthanc):
    """The PACS has more studies than the limit: the answer says it was cut (one more row is asked for)."""
    _, client = orthanc
    everything = client.search_studies(modality="")
    assert not everything.truncated and len(everything) > 2
    cut = client.search_studies(modality="", limit=2)
    assert cut.truncated and len(cut) == 2 and cut.limit == 2
    exact = client.search_studies(modality="", limit=len(everything))  # exactly the limit: nothing was left out
    assert not exact.truncated and len(exact) == len(everything)
    several = client.search_studies(limit=len(everything) - 1)  # CR, DX, DR asked one by one: their union is cut
    assert several.truncated and len(several) == len(everything) - 1


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name[:24])
def test_retrieve_gives_the_stored_transfer_syntax_and_identical_pixels(orthanc, path):
    _, client = orthanc
    retrieved = client.retrieve(instance(client, path))
    remote = pydicom.dcmread(io.BytesIO(retrieved))
    local = pydicom.dcmread(path, force=True)
    expected_syntax = local.file_meta.get("TransferSyntaxUID") if "TransferSyntaxUID" in local.file_meta else \
        pydicom.uid.ImplicitVRLittleEndian
    assert remote.file_meta.TransferSyntaxUID == expected_syntax
    assert remote.PixelData == local.PixelData
    try:
        expected = imaging.load(path)
    except UnreadableImageError as err:  # 966.dcm: the same clear error both ways
        with pytest.raises(UnreadableImageError) as remote_err:
            imaging.load(retrieved)
        assert str(remote_err.value) == str(err) and "could not be decoded" in str(err)
        return
    got = imaging.load(retrieved)
    np.testing.assert_array_equal(got.pixels, expected.pixels)
    assert got.info == expected.info


def test_classify_study_equals_classifying_the_file(orthanc, model):
    _, client = orthanc
    classifier, explainer = model
    result = pacs.classify_study(client, classifier, explainer, study_of(DX_J2K))
    (item,) = result.films
    direct = pipeline.classify(classifier, explainer, local_canary_bytes(DX_J2K), DX_J2K.name)
    assert item.result.prediction.probabilities == direct.prediction.probabilities
    np.testing.assert_array_equal(item.result.heatmap, direct.heatmap)
    assert str(item.source.SOPInstanceUID) == loaded_uids()[DX_J2K]


def read_back(client: dicomweb.Client, study_uid: str, card) -> tuple[list[pydicom.Dataset], list[pydicom.Dataset]]:
    ours = [i for i in client.instances(study_uid) if i.series_description.startswith(dicom_results.RESULT_PREFIX)]
    datasets = [client.retrieve_dataset(i) for i in ours]
    return [d for d in datasets if d.Modality == "SR"], [d for d in datasets if d.Modality != "SR"]


def test_write_back_sr_and_heatmap_read_back_over_wado(orthanc, model):
    _, client = orthanc
    classifier, explainer = model
    card = classifier.card
    study_uid = study_of(RG1)
    result = pacs.classify_study(client, classifier, explainer, study_uid)
    assert len(result.classified) == 2
    before = {i.series_uid for i in client.instances(study_uid)}
    stored = pacs.write_back(client, card, result)
    assert len(stored) == 4
    reports, captures = read_back(client, study_uid, card)
    assert len(reports) == 2 and len(captures) == 2
    sources = {str(f.source.SOPInstanceUID): f for f in result.classified}
    for sr in reports:
        hd.sr.ComprehensiveSR.from_dataset(sr)  # a valid SR for highdicom
        title = sr.ConceptNameCodeSequence[0]  # a CAD report, never filed as the study's diagnostic report
        assert (title.CodeValue, title.CodingSchemeDesignator) == ("112000", "DCM")  # "Chest CAD Report"
        assert [s.CodingSchemeDesignator for s in sr.CodingSchemeIdentificationSequence] == [dicom_results.SCHEME]
        values = dicom_results.read_report(sr)
        (ref,) = values.referenced_sop_uids
        prediction = sources[ref].result.prediction
        # DICOM decimal strings hold 16 characters: the probabilities to about 1e-14.
        assert values.probabilities == pytest.approx(prediction.as_dict(), abs=1e-13)
        assert values.decision == prediction.decision
        assert values.algorithm["name"] == card.name and values.algorithm["version"] == card.version
        assert card.weights_sha256 in values.algorithm["parameters"]
        assert values.comment == dicom_results.UNVERIFIED
        assert sr.CurrentRequestedProcedureEvidenceSequence[0].StudyInstanceUID == study_uid
    for ds in [*reports, *captures]:
        assert ds.StudyInstanceUID == study_uid and ds.SeriesInstanceUID not in before
        assert ds.SOPInstanceUID not in sources and str(ds.PatientName) == CANARY["PatientName"]
        assert ds.PatientID == CANARY["PatientID"] and ds.SeriesDescription.startswith("UNVERIFIED AI")
    for sc in captures:
        assert "UNVERIFIED" in sc.SeriesDescription
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID in sources
        item = sources[sc.SourceImageSequence[0].ReferencedSOPInstanceUID]
        source = item.source
        assert sc.get("BurnedInAnnotation") == source.get("BurnedInAnnotation")  # the film's, or none
        assert sc.pixel_array.shape == (source.Rows, source.Columns, 3) and sc.pixel_array.dtype == np.uint8
        # The overlay with the UNVERIFIED banner burned in across the top, the rest exactly the overlay.
        blended = overlay.overlay(item.result.image.pixels, item.result.heatmap, "jet", 0.4)
        np.testing.assert_array_equal(sc.pixel_array, dicom_results.burn_banner(blended))
    # A second write-back of the same study and model says so and writes nothing ...
    count = len(client.instances(study_uid))
    with pytest.raises(PacsError, match="already in the PACS for every film to write .*Nothing was written"):
        pacs.write_back(client, card, result)
    assert len(client.instances(study_uid)) == count
    # ... unless asked to write again; the results are never classified as films themselves.
    assert len(pacs.write_back(client, card, result, again=True)) == 4
    again = pacs.classify_study(client, classifier, explainer, study_uid)
    assert len(again.films) == 2 and any("written earlier by this application" in n for n in again.notes)


def test_a_film_added_to_a_study_later_is_written_alone(orthanc, model):
    """The refusal to write a model's results twice was per study: a repeat film added to a study after its
    results were written could be written only with 'write again', which copied the first film's results too.
    Now the films that have results (read from the results' headers) are left out and said so. (Accession
    SITE-REPEAT: the batch test leaves SITE- studies out.)"""
    _, client = orthanc
    classifier, explainer = model
    card = classifier.card
    first = new_study(SIIM, "SITE-REPEAT")
    client.store([first])
    study_uid = str(first.StudyInstanceUID)
    assert len(pacs.write_back(client, card, pacs.classify_study(client, classifier, explainer, study_uid))) == 2
    repeat = new_study(SIIM, "SITE-REPEAT")
    repeat.StudyInstanceUID, repeat.InstanceNumber = first.StudyInstanceUID, 2
    client.store([repeat])
    result = pacs.classify_study(client, classifier, explainer, study_uid)
    assert len(result.classified) == 2  # both films; the results written earlier are not classified
    stored = pacs.write_back(client, card, result)
    assert len(stored) == 2 and stored.already == 1
    reports, captures = read_back(client, study_uid, card)
    made_from = [dicom_results.referenced_films(ds) for ds in [*reports, *captures]]
    assert sorted(len(m) for m in made_from) == [1] * 4
    assert sorted(next(iter(m)) for m in made_from) == sorted([str(first.SOPInstanceUID)] * 2
                                                              + [str(repeat.SOPInstanceUID)] * 2)
    with pytest.raises(PacsError, match="already in the PACS for every film to write"):
        pacs.write_back(client, card, result)
    # An archive whose result headers cannot be read: the whole study counts as written, as before.
    header = client.header
    client.header = lambda instance: (_ for _ in ()).throw(PacsError("no metadata service"))
    try:
        with pytest.raises(PacsError, match="already in the PACS for this study"):
            pacs.write_back(client, card, result)
    finally:
        client.header = header


def test_results_whose_headers_name_no_film_count_the_whole_study_as_written():
    """Results whose headers name no source film (an archive's reduced metadata, or results another tool wrote)
    added nothing to the films already written, so every film was written again: they keep the per-study refusal."""
    named, bare = pydicom.Dataset(), pydicom.Dataset()
    source = pydicom.Dataset()
    source.ReferencedSOPInstanceUID = "1.2.3"
    named.SourceImageSequence = [source]
    bare.SOPInstanceUID = "1.2.9"
    answers = [dicomweb.Instance("1.1", "9.1", uid, "", "OT", "", "", "", n, 1) for n, uid in enumerate(("a", "b"))]
    client = SimpleNamespace(instances=lambda study: answers, header=lambda instance: headers[instance.sop_uid])
    headers = {"a": named, "b": named}
    assert pacs.films_with_results(client, "1.1", ["9.1"]) == {"1.2.3"}
    headers["b"] = bare
    assert pacs.films_with_results(client, "1.1", ["9.1"]) is None


def test_heatmap_capture_keeps_the_films_burned_in_annotation_and_burns_a_banner():
    card = SimpleNamespace(name="tiny", version="1")
    film = pydicom.dcmread(SIIM)
    rgb = np.full((int(film.Rows), int(film.Columns), 3), 90, np.uint8)
    with dicomweb.quiet():
        plain = dicom_results.heatmap_capture(film, rgb, card, "PNEUMONIA")
        # The film does not say whether a name is burned into its pixels, so neither does the capture of them
        # (it used to claim NO, which de-identification tools trust to leave the pixels as they are).
        assert "BurnedInAnnotation" not in film and "BurnedInAnnotation" not in plain
        for said in ("YES", "NO"):  # a film that says: the capture says the same
            film.BurnedInAnnotation = said
            assert dicom_results.heatmap_capture(film, rgb, card, "PNEUMONIA").BurnedInAnnotation == said
    band = dicom_results.banner_height(rgb.shape[1], rgb.shape[0])
    assert 20 <= band <= rgb.shape[0] // 4
    pixels = plain.pixel_array
    np.testing.assert_array_equal(pixels[band:], rgb[band:])  # the film below the banner is untouched
    top = pixels[:band]
    text = (top[..., 0] > 200) & (top[..., 1] > 200) & (top[..., 2] < 60)  # yellow on black
    assert (top == 0).all(axis=2).mean() > 0.5 and text.mean() > 0.05
    columns = np.flatnonzero(text.any(axis=0))  # the text spans most of the width: legible at the film's size
    assert columns[-1] - columns[0] > 0.8 * rgb.shape[1]


@pytest.mark.parametrize(("charset", "expected"), [(None, "ISO_IR 192"), ("ISO_IR 100", "ISO_IR 192"),
                                                 ("ISO_IR 192", "ISO_IR 192")])
def test_results_keep_names_and_our_text_that_the_declared_character_set_cannot_hold(model, charset, expected):
    """A DICOMweb JSON header gives the patient's name as Unicode and often no Specific Character Set (the archive
    decoded the film with its own default); class names may be accented and cautions hold '≥'. The written SR
    and heatmap declare UTF-8 when their text needs it, and read back the same characters (pydicom wrote '?' for
    each character outside the declared set, or the default repertoire when none was declared)."""
    classifier, explainer = model
    film = pydicom.dcmread(SIIM)
    film.pop("SpecificCharacterSet", None)
    if charset is not None:
        film.SpecificCharacterSet = charset
    film.PatientName = "王^小东" if charset != "ISO_IR 100" else "Müller^Jürgen"
    names = ["COVID-19", "Normal", "Pneumonía"]
    card = classifier.card.__class__.from_dict({**classifier.card.to_dict(), "class_names": names,
                                                "thresholds": {"Pneumonía": 0.5}, "negative_class": "Normal"})
    prediction = models.decide(card, [0.1, 0.2, 0.7])
    caution = "Low confidence: top probability 0.41 < 0.5 ≥ nothing"
    source = dicom_results.patient_study_source(film)
    rgb = np.zeros((int(film.Rows), int(film.Columns), 3), np.uint8)
    with dicomweb.quiet():
        written = [dicom_results.structured_report(source, prediction, card, [caution]),
                   dicom_results.heatmap_capture(source, rgb, card, "Pneumonía", [caution])]
    for ds in written:
        back = pydicom.dcmread(io.BytesIO(dicomweb.to_bytes(ds)))
        assert back.get("SpecificCharacterSet") == expected
        assert str(back.PatientName) == str(film.PatientName)
    report = dicom_results.read_report(pydicom.dcmread(io.BytesIO(dicomweb.to_bytes(written[0]))))
    assert report.decision == "Pneumonía" and caution in " ".join(report.cautions)
    comments = pydicom.dcmread(io.BytesIO(dicomweb.to_bytes(written[1]))).ImageComments
    assert "Grad-CAM for Pneumonía" in comments and "≥ nothing" in comments


def test_results_in_plain_ascii_declare_no_character_set(model):
    """Only text that needs it changes the declared set: an ASCII film and ASCII classes keep the default."""
    classifier, _ = model
    film = pydicom.dcmread(SIIM)
    film.pop("SpecificCharacterSet", None)
    film.PatientName = "Smith^John"
    classes = len(classifier.card.class_names)
    prediction = models.decide(classifier.card, [1.0 / classes] * classes)
    with dicomweb.quiet():
        sr = dicom_results.structured_report(dicom_results.patient_study_source(film), prediction, classifier.card)
    assert "SpecificCharacterSet" not in pydicom.dcmread(io.BytesIO(dicomweb.to_bytes(sr)))


def test_server_down_wrong_password_and_timeout(orthanc):
    server, _ = orthanc
    down = dicomweb.Client(dicomweb.Settings(url=f"http://127.0.0.1:{free_port()}/dicom-web", timeout=5))
    with pytest.raises(PacsError, match="cannot be reached .*server down"):
        down.search_studies()
    wrong = dicomweb.Settings(url=server.settings.url, username="cxr", password="not-the-password")
    with pytest.raises(PacsError, match=r"refused the credentials \(HTTP 401\)") as err:
        dicomweb.Client(wrong).search_studies()
    assert server.settings.password not in str(err.value) and "not-the-password" not in str(err.value)
    assert "not-the-password" not in repr(wrong) and server.settings.password not in repr(server.settings)
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        port = silent.getsockname()[1]
        slow = dicomweb.Client(dicomweb.Settings(url=f"http://127.0.0.1:{port}/dicom-web", timeout=1))
        with pytest.raises(PacsError, match="did not answer within 1 s"):
            slow.search_studies()


def _network_address() -> str:
    """This machine's address on its network (the source address of a route outward; no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))  # TEST-NET-1: only the route is looked up
        return probe.getsockname()[0]


def test_orthanc_answers_only_clients_on_this_machine(orthanc):
    """Orthanc 1.10 (Debian's) has no bind setting and listens on every interface; the generated
    configuration makes it refuse every client not on this machine (RemoteAccessAllowed false), even one
    with the right password."""
    import base64
    import urllib.error
    import urllib.request

    server, _ = orthanc
    address = _network_address()
    assert not address.startswith("127."), "this machine needs a network address for this check"
    auth = base64.b64encode(f"{server.settings.username}:{server.settings.password}".encode()).decode()

    def status(host: str) -> int:
        request = urllib.request.Request(f"http://{host}:{server.port}/system",
                                         headers={"Authorization": f"Basic {auth}"})
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status
        except urllib.error.HTTPError as err:
            return err.code

    assert status("127.0.0.1") == 200
    assert status(address) in (401, 403)


def test_study_without_images_lateral_and_non_chest_films(orthanc, model):
    _, client = orthanc
    classifier, explainer = model
    with pytest.raises(PacsError, match="holds no radiographs"):
        pacs.classify_study(client, classifier, explainer, by_accession(client, EMPTY_ACCESSION).study_uid)
    lateral = pacs.classify_study(client, classifier, explainer, by_accession(client, LATERAL_ACCESSION).study_uid)
    (film,) = lateral.films
    assert film.result is None and film.film.skip.startswith("Lateral view (LL): not classified")
    dental = pacs.classify_study(client, classifier, explainer, by_accession(client, "MODALITYLUT-001").study_uid)
    (item,) = dental.films
    assert item.quality.probably_not_chest and any("turned on its side" in r for r in item.quality.reasons)


class FakeClient:
    """The PACS as ``pacs.classify_study`` and ``score_studies`` use it: a QIDO answer and the retrieved datasets."""

    def __init__(self, datasets: dict[str, pydicom.Dataset], answers: list[dicomweb.Instance]) -> None:
        self.settings = dicomweb.Settings(url="http://127.0.0.1:9/dicom-web")
        self.datasets, self.answers = datasets, answers

    def instances(self, study_uid: str) -> list[dicomweb.Instance]:
        return list(self.answers)

    def retrieve_dataset(self, instance: dicomweb.Instance) -> pydicom.Dataset:
        return self.datasets[instance.sop_uid]

    def header(self, instance: dicomweb.Instance) -> pydicom.Dataset:
        raise PacsError("no WADO-RS metadata service here")  # an archive without it: write-back reads the film

    def retrieve(self, instance: dicomweb.Instance) -> bytes:
        stored = self.datasets[instance.sop_uid]
        return stored if isinstance(stored, bytes) else dicomweb.to_bytes(stored)

    def series_descriptions(self, study_uid: str) -> dict[str, str]:
        return {}

    def store(self, datasets) -> list[str]:
        self.stored = list(datasets)
        return [str(ds.SOPInstanceUID) for ds in datasets]


def test_a_film_whose_tags_the_results_cannot_be_built_from_is_a_clear_error_and_nothing_is_written(model):
    """A film read again for write-back with an empty SOP Class UID made highdicom raise KeyError, which went past
    the page as a traceback; now it is the message that names the study's tags, and nothing is stored."""
    classifier, explainer = model
    film = new_study(SIIM, "EMPTY-CLASS")
    answer = dicomweb.Instance(str(film.StudyInstanceUID), str(film.SeriesInstanceUID), str(film.SOPInstanceUID),
                               str(film.SOPClassUID), "CR", "PA", "CHEST", "chest", 1, 1)
    client = FakeClient({str(film.SOPInstanceUID): film}, [answer])
    result = pacs.classify_study(client, classifier, explainer, str(film.StudyInstanceUID))
    assert len(result.classified) == 1
    changed = copy.deepcopy(film)
    changed.SOPClassUID = ""  # as the PACS holds it when the results are written
    client.datasets[str(film.SOPInstanceUID)] = changed
    with pytest.raises(PacsError, match=r"could not be built from this study's DICOM tags \(KeyError\)"):
        pacs.write_back(client, classifier.card, result, include_not_chest=True)
    assert not hasattr(client, "stored")


def test_the_retrieved_film_is_checked_again_lateral_oblique_or_raw(model):
    """The QIDO answer says nothing of the view (or a PACS leaves it out); the film itself says lateral (View
    Position LL), oblique (a View Code Sequence), or raw detector data: none is classified. Oblique View Positions
    and DX For Processing are skipped from the QIDO answer alone."""
    classifier, explainer = model
    frontal = new_study(SIIM, "FAKE-1")
    lateral, oblique, raw = (new_study(SIIM, "FAKE-1") for _ in range(3))
    for ds in (lateral, oblique, raw):
        ds.StudyInstanceUID = frontal.StudyInstanceUID
    lateral.ViewPosition = "LL"
    oblique.ViewPosition = ""
    code = pydicom.Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "399135007", "SCT", "left anterior oblique"
    oblique.ViewCodeSequence = [code]
    raw.PresentationIntentType = "FOR PROCESSING"
    films = [frontal, lateral, oblique, raw]
    answers = [dicomweb.Instance(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID),
                                 str(ds.SOPClassUID), "CR", "", "CHEST", "chest", n, 1)  # no View Position
               for n, ds in enumerate(films, 1)]
    client = FakeClient({str(ds.SOPInstanceUID): ds for ds in films}, answers)
    result = pacs.classify_study(client, classifier, explainer, str(frontal.StudyInstanceUID))
    assert [f.film.instance.sop_uid for f in result.classified] == [str(frontal.SOPInstanceUID)]
    skips = [f.film.skip for f in result.films[1:]]
    assert skips[0].startswith("Lateral view (LL): not classified") and result.films[1].film.label.endswith("(LL)")
    assert skips[1].startswith("Oblique view (left anterior oblique): not classified")
    assert skips[2].startswith("Raw detector data (DX For Processing): not classified")
    assert all(f.result is None and f.error is None for f in result.films[1:])
    rows, _ = pacs.score_studies(client, classifier, [dicomweb.Study(str(frontal.StudyInstanceUID), "FAKE-1", "",
                                                                     "", "CR", 4)])
    assert [row.prediction is not None for row in rows] == [True, False, False, False]
    assert [row.error.split(" ")[0] for row in rows[1:]] == ["Lateral", "Oblique", "Raw"]
    # From the QIDO answer alone: oblique View Positions and the DX For Processing SOP class.
    qido = [dicomweb.Instance("1", "2", f"3.{n}", sop, "DX", view, "CHEST", "", n, 1) for n, (sop, view) in enumerate(
        [(pacs.FOR_PROCESSING, "PA"), ("1.2.840.10008.5.1.4.1.1.1.1", "RLO"), ("1.2.840.10008.5.1.4.1.1.1.1", "LLO"),
         ("1.2.840.10008.5.1.4.1.1.1.1", "PA")])]
    chosen, notes = pacs.films(qido, cap=10)
    assert [f.skip.split(" ")[0] if f.skip else None for f in chosen] == ["Raw", "Oblique", "Oblique", None]
    assert notes == []


def test_films_are_taken_in_series_number_order_not_uid_text_order(monkeypatch):
    """Series 1.2.10 (number 10) sorts before 1.2.9 (number 9) as text: the cap must keep series 9's films."""
    def item(series: str, series_number: int, sop: str, number: int) -> dict:
        return {"0020000E": {"vr": "UI", "Value": [series]}, "00080018": {"vr": "UI", "Value": [sop]},
                "00080016": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.1"]},
                "00080060": {"vr": "CS", "Value": ["CR"]},
                "00200011": {"vr": "IS", "Value": [series_number]}, "00200013": {"vr": "IS", "Value": [number]}}

    answer = [item("1.2.10", 10, "9.1", 1), item("1.2.9", 9, "9.3", 2), item("1.2.9", 9, "9.2", 10),
              item("1.2.8", None, "9.4", 1)]
    answer[3].pop("00200011")  # no series number: after the numbered ones
    client = dicomweb.Client(dicomweb.Settings(url="http://127.0.0.1:9/dicom-web"))
    monkeypatch.setattr(client._web, "search_for_instances", lambda **kwargs: answer)
    found = client.instances("1.2")
    assert [(i.series_number, i.number, i.sop_uid) for i in found] == [(9, 2, "9.3"), (9, 10, "9.2"), (10, 1, "9.1"),
                                                                        (None, 1, "9.4")]
    chosen, notes = pacs.films(found, cap=2)
    assert [f.instance.sop_uid for f in chosen if f.skip is None] == ["9.3", "9.2"]
    assert any("only the first 2 were read" in n for n in notes)


def test_undecodable_instance_and_a_study_over_the_cap(orthanc, model):
    _, client = orthanc
    classifier, explainer = model
    broken = pacs.classify_study(client, classifier, explainer, study_of(DICOM / "pylibjpeg-data" / "966.dcm"))
    errors = [f.error for f in broken.films if f.error]
    assert len(errors) == 1 and "could not be decoded" in errors[0] and len(broken.classified) == 1
    capped = pacs.classify_study(client, classifier, explainer, study_of(RG1), cap=1)
    assert len(capped.classified) == 1 and capped.films[1].film.skip.startswith("Over the limit of 1")
    assert any("has 2 frontal films; only the first 1 were read" in n for n in capped.notes)


def test_a_pacs_that_refuses_stow(model):
    classifier, explainer = model
    with LocalOrthanc(lua=REFUSE_RESULTS) as refusing:
        client = dicomweb.Client(refusing.settings)
        client.store([pydicom.dcmread(DX_J2K)])
        result = pacs.classify_study(client, classifier, explainer, study_of(DX_J2K))
        assert result.writable == []  # this DX film is stored upside down: flagged, written only when confirmed
        with pytest.raises(PacsError, match=r"did not keep 2 of 2 object\(s\) it was sent") as err:
            pacs.write_back(client, classifier.card, result, include_not_chest=True)
        assert "Nothing was stored" in str(err.value) and (err.value.sent, err.value.stored) == (2, 0)


def test_stow_refused_all_409_or_partly_202_says_why_and_what_was_stored():
    """Archives answer 409 when they refuse every object, 202 when they keep some (PS3.18 10.5.3): the message
    gives the failure reasons the server sent, and which objects were stored."""
    first, second = new_study(SIIM, "STOW-1"), new_study(SIIM, "STOW-1")
    second.StudyInstanceUID, second.SeriesDescription = first.StudyInstanceUID, "UNVERIFIED AI tiny v1 heatmap"
    first.SeriesDescription = "UNVERIFIED AI tiny v1 SR"
    uids = [str(first.SOPInstanceUID), str(second.SOPInstanceUID)]
    refused = stow_answer([], {uids[0]: 0x0122, uids[1]: 0x0122})
    with stow_answering(409, refused, warning='299 pacs: "SR objects are not accepted"') as client, \
            pytest.raises(PacsError) as err:
        client.store([first, second])
    message = str(err.value)
    assert "refused all 2 object(s) (HTTP 409 Conflict" in message and "Nothing was stored" in message
    assert "failure reason 0x0122 (SOP class not supported) for 2 object(s)" in message
    assert "SR objects are not accepted" in message and "names its DICOMweb root" not in message
    assert (err.value.sent, err.value.stored) == (2, 0)  # what the page's audit line says was kept
    partly = stow_answer([uids[1]], {uids[0]: 0xA700})
    with stow_answering(202, partly) as client, pytest.raises(PacsError) as err:
        client.store([first, second])
    message = str(err.value)
    assert "refused 1 of 2 object(s) (failure reason 0xA700 (out of resources) for 1 object(s))" in message
    assert f"It stored 1 of them, now in the study: UNVERIFIED AI tiny v1 heatmap (SOP Instance UID {uids[1]})" \
        in message and uids[0] not in message
    assert (err.value.sent, err.value.stored) == (2, 1)


@pytest.mark.parametrize(("status", "stored"), [(413, 0), (500, None)])
def test_a_store_that_failed_says_what_was_sent_and_kept_for_the_audit(status, stored, monkeypatch):
    """What the write-back audit line records: a 4xx refusal kept nothing, a 5xx may have kept some (unknown);
    nothing went out when the PACS could not be reached; a success whose check then failed is unknown too."""
    ds = new_study(SIIM, "STOW-2")
    with stow_answering(status, {}) as client, pytest.raises(PacsError) as err:
        client.store([ds])
    assert (err.value.sent, err.value.stored) == (1, stored)
    down = dicomweb.Client(dicomweb.Settings(url="http://127.0.0.1:9/dicom-web", timeout=3))
    with pytest.raises(PacsError, match="cannot be reached") as err:
        down.store([ds])
    assert (err.value.sent, err.value.stored) == (None, None)

    def check_fails(self, study_uid, sop_uid=""):
        raise PacsError("The PACS at 127.0.0.1 did not answer within 3 s")

    monkeypatch.setattr(dicomweb.Client, "instances", check_fails)
    with stow_answering(200, stow_answer([str(ds.SOPInstanceUID)], {})) as client, pytest.raises(PacsError) as err:
        client.store([ds])
    assert (err.value.sent, err.value.stored) == (1, None)

def test_a_film_other_than_asked_or_in_an_unknown_syntax_is_an_error_row_and_write_back_reads_the_patient_again(model):
    """The PACS answers with another instance than asked (wrong SOP Instance UID): not classified, said so. A film in a
    transfer syntax nothing here decodes (JPEG XL) is an error row, not a crash that loses the batch. Write-back
    takes the patient and study as the PACS holds them when it writes (reconciled since classification)."""
    classifier, explainer = model
    good, other, jxl = (new_study(SIIM, "FAKE-2") for _ in range(3))
    for ds in (other, jxl):
        ds.StudyInstanceUID = good.StudyInstanceUID
    # JPEG XL Lossless (2024), which pydicom 3.0 cannot even write: written as MPEG2 (a UID as long), then renamed.
    jxl.file_meta.TransferSyntaxUID = pydicom.uid.MPEG2MPML
    jxl.PixelData = pydicom.encaps.encapsulate([b"\xff\x0a" + bytes(64)])
    jxl_bytes = dicomweb.to_bytes(jxl).replace(b"1.2.840.10008.1.2.4.100\0", b"1.2.840.10008.1.2.4.110\0")
    wrong = copy.deepcopy(other)
    wrong.SOPInstanceUID = generate_uid()  # what the PACS sends back for `other`
    answers = [dicomweb.Instance(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID),
                                 str(ds.SOPClassUID), "CR", "PA", "CHEST", "chest", n, 1)
               for n, ds in enumerate((good, other, jxl), 1)]
    client = FakeClient({str(good.SOPInstanceUID): good, str(other.SOPInstanceUID): wrong,
                         str(jxl.SOPInstanceUID): jxl_bytes}, answers)
    result = pacs.classify_study(client, classifier, explainer, str(good.StudyInstanceUID))
    assert [f.result is not None for f in result.films] == [True, False, False]
    assert result.films[1].error.startswith("The PACS sent another image than the one asked for")
    assert "a transfer syntax this reader does not know (1.2.840.10008.1.2.4.110)" in result.films[2].error
    study = dicomweb.Study(str(good.StudyInstanceUID), "FAKE-2", "", "", "CR", 3)
    rows, _ = pacs.score_studies(client, classifier, [study])
    assert [row.prediction is not None for row in rows] == [True, False, False]
    assert rows[1].error.startswith("The PACS sent another image") and "does not know" in rows[2].error
    # The patient was reconciled in the PACS after classification: the results carry who the film belongs to now.
    reconciled = copy.deepcopy(good)
    reconciled.PatientID, reconciled.PatientName = "REAL-0042", "Real^Patient"
    client.datasets[str(good.SOPInstanceUID)] = reconciled
    pacs.write_back(client, classifier.card, result)
    assert len(client.stored) == 2 and {(d.PatientID, str(d.PatientName)) for d in client.stored} == {
        ("REAL-0042", "Real^Patient")}
    # A film that the PACS no longer sends as asked: nothing is written.
    client.datasets[str(good.SOPInstanceUID)] = wrong
    client.stored = []
    with pytest.raises(PacsError, match="could not be read again to write its results.*Nothing was written"):
        pacs.write_back(client, classifier.card, result)
    assert client.stored == []


def test_write_back_reads_the_patient_from_the_header_alone(orthanc, model, monkeypatch):
    """The patient and study the results carry are read again from each film's WADO-RS metadata (a few KB), not by
    retrieving the film again (30-60 MB): the same fields as the film's own header, and a write-back with film
    retrieval broken still writes them."""
    _, client = orthanc
    classifier, explainer = model
    study_uid = study_of(RG1)
    result = pacs.classify_study(client, classifier, explainer, study_uid)
    film = result.classified[0].film
    header, whole = client.header(film.instance), pacs.retrieve(client, film)[1]
    assert "PixelData" not in header and len(header) > 20
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                    "StudyTime", "AccessionNumber", "StudyID", "ReferringPhysicianName", "SOPInstanceUID",
                    "SOPClassUID", "SeriesInstanceUID", "Modality"):
        assert str(header.get(keyword, "")) == str(whole.get(keyword, "")), keyword
    other = dicomweb.Instance(film.instance.study_uid, film.instance.series_uid, "1.2.3.4", "", "", "", "", "", 1)
    with pytest.raises(PacsError):  # an instance the PACS does not hold
        client.header(other)

    def no_retrieval(*args, **kwargs):
        raise AssertionError("the film was retrieved again")

    monkeypatch.setattr(dicomweb.Client, "retrieve", no_retrieval)
    stored = pacs.write_back(client, classifier.card, result, again=True)
    assert len(stored) == 2 * len(result.classified)
    monkeypatch.undo()
    reports, _ = read_back(client, study_uid, classifier.card)
    assert {(str(r.PatientName), r.PatientID) for r in reports} == {(str(whole.PatientName), whole.PatientID)}


def test_study_labels_are_unique():
    studies = [dicomweb.Study(f"1.2.{n}", "", "2024-03-01", "CHEST PA", "CR", 1) for n in range(3)]
    studies.append(dicomweb.Study("1.2.9", "ACC-9", "2024-03-01", "CHEST PA", "CR", 1))
    assert pacs.study_labels(studies) == ["2024-03-01 · CHEST PA", "2024-03-01 · CHEST PA (2)",
                                          "2024-03-01 · CHEST PA (3)", "ACC-9 · 2024-03-01 · CHEST PA"]


def test_retrieval_stops_at_the_file_limit_and_a_deflate_bomb_never_inflates(orthanc, model, monkeypatch):
    """A film is read in a stream bounded by the reader's file limit; a Deflated film (96 kB that inflate to 93 MB)
    goes through the reader's bounded inflation: dicomweb-client parsed it whole (93 MB held) before any check."""
    import tracemalloc

    _, client = orthanc
    classifier, explainer = model
    bomb = new_study(SIIM, "BOMB-1")
    bomb.Rows = bomb.Columns = 7000
    bomb.BitsAllocated, bomb.BitsStored, bomb.HighBit = 16, 16, 15
    bomb.PixelData = bytes(7000 * 7000 * 2)
    bomb.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    client.store([bomb])
    del bomb
    tracemalloc.start()
    try:
        result = pacs.classify_study(client, classifier, explainer, study_of_dataset(client, "BOMB-1"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    (item,) = result.films
    assert item.result is None and "93 MB decoded, over the limit" in item.error
    assert peak < 32 * 2**20, f"{peak / 2**20:.0f} MB held while reading a 96 kB film"
    # Over the file limit: refused from the answer's declared length, before its body is read.
    film = instance(client, SIIM)
    size = len(client.retrieve(film))
    monkeypatch.setattr(limits, "MAX_FILE_BYTES", size // 2)
    with pytest.raises(PacsError, match="(sent more than|is sending an image of) 0 MB.* for one"):
        client.retrieve(film)


def study_of_dataset(client: dicomweb.Client, accession: str) -> str:
    (study,) = client.search_studies(accession=accession, modality="")
    return study.study_uid


@contextmanager
def local_pacs(handler: type[http.server.BaseHTTPRequestHandler], timeout: float) -> Iterator[dicomweb.Client]:
    """A client of ``handler`` served on 127.0.0.1 for the block, stopped after it."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield dicomweb.Client(dicomweb.Settings(url=f"http://127.0.0.1:{server.server_port}/dicom-web",
                                                timeout=timeout))
    finally:
        server.shutdown()
        server.server_close()


class _Trickle(http.server.BaseHTTPRequestHandler):
    """A DICOMweb server that answers any retrieval with a multipart body and no length: ``chunks`` chunks of
    ``size`` bytes, ``pause`` seconds apart (then it closes the connection)."""

    chunks, size, pause = 0, 0, 0.0

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(200)
        self.send_header("Content-Type", 'multipart/related; type="application/dicom"; boundary=b0undary')
        self.end_headers()
        self.wfile.write(b"--b0undary\r\nContent-Type: application/dicom\r\n\r\n")
        for _ in range(self.chunks):
            self.wfile.write(bytes(self.size))
            self.wfile.flush()
            time.sleep(self.pause)
        self.wfile.write(b"\r\n--b0undary--\r\n")

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize(("chunks", "size", "pause", "message"), [
    (40, 64 * 1024, 0.0, "sent more than 1 MB for one image"),  # no length given: stopped while streaming
    (1000, 16, 0.1, "took more than 1 s to send one image"),  # a byte every so often: the deadline, not the timeout
])
def test_a_pacs_that_sends_too_much_or_too_slowly_is_cut_off(monkeypatch, chunks, size, pause, message):
    monkeypatch.setattr(limits, "MAX_FILE_BYTES", 1 * limits.MiB)
    monkeypatch.setattr(dicomweb, "RETRIEVE_TIMEOUTS", 2)
    handler = type("Handler", (_Trickle,), {"chunks": chunks, "size": size, "pause": pause})
    with local_pacs(handler, 0.5) as client:
        started = time.monotonic()
        with pytest.raises(PacsError, match=message):
            client.retrieve(dicomweb.Instance("1.2", "1.3", "1.4", "", "CR", "PA", "CHEST", "", 1, 1))
        assert time.monotonic() - started < 5
        with pytest.raises(PacsError, match="UIDs are not DICOM UIDs"):
            client.retrieve(dicomweb.Instance("1.2", "../../x", "1.4", "", "CR", "PA", "CHEST", "", 1, 1))


def test_odd_or_missing_qido_fields():
    odd = [{"0020000D": {"vr": "UI", "Value": ["1.2.3"]}, "00080020": {"vr": "DA", "Value": ["2004"]},
            "00080050": {"vr": "SH"}, "00201208": {"vr": "IS", "Value": ["many"]}, "00081030": "not a dict"},
           {"00080050": {"vr": "SH", "Value": ["NO-UID"]}}, {"0020000D": {"vr": "UI", "Value": []}}]
    studies = [dicomweb._study(item) for item in odd]
    assert studies[0] == dicomweb.Study("1.2.3", "", "", "", "", None) and studies[1:] == [None, None]
    assert dicomweb._instance({"0020000E": {"Value": ["1.2"]}}, "1") is None  # no SOP UID: not listed
    # An empty value is null in DICOM JSON: no text "None", and the other modalities of a study stay.
    nulls = {"00080060": {"vr": "CS", "Value": [None]}, "00080050": {"vr": "SH", "Value": [None]},
             "00080061": {"vr": "CS", "Value": [None, "CR"]}, "00100010": {"vr": "PN", "Value": [{"Alphabetic": None}]}}
    assert [dicomweb._value(nulls, k) for k in ("Modality", "AccessionNumber", "ModalitiesInStudy", "PatientName")] \
        == ["", "", "CR", ""]
    # A QIDO answer that is JSON null or a number lists nothing, instead of failing outside the PACS error handling.
    client = dicomweb.Client(dicomweb.Settings(url="http://127.0.0.1:9/dicom-web"))
    client._web.search_for_instances = lambda **kwargs: None
    client._web.search_for_series = lambda **kwargs: 5
    assert client.instances("1.2") == [] and client.series_descriptions("1.2") == {}


def test_settings_from_secrets_or_environment():
    assert dicomweb.load_settings(None, {}) is None
    env = {"CXR_PACS_URL": "https://pacs.example.org/dicom-web/", "CXR_PACS_TOKEN": "tok", "CXR_PACS_VERIFY": "0",
           "CXR_PACS_TIMEOUT": "7.5"}
    s = dicomweb.load_settings(None, env)
    assert (s.url, s.token, s.verify, s.timeout, s.username) == ("https://pacs.example.org/dicom-web", "tok", False,
                                                                 7.5, None)
    section = {"url": "http://127.0.0.1:1/dicom-web", "username": "u", "password": "p"}
    secret = dicomweb.load_settings(section, {})
    assert (secret.username, secret.verify) == ("u", True) and "p" not in repr(secret).split("username")[1]
    # Both given: the environment wins (as the demo's line is meant to), whole, without the section's password.
    both = dicomweb.load_settings(section, env)
    assert (both.url, both.token, both.username, both.password) == ("https://pacs.example.org/dicom-web", "tok",
                                                                    None, None)
    bearer = dicomweb.Client(s)._web._session  # the token goes in the header, TLS checks as configured
    assert bearer.headers["Authorization"] == "Bearer tok" and bearer.auth is None and bearer.verify is False
    assert dicomweb.Client(secret)._web._session.auth == ("u", "p")
    with pytest.raises(PacsError, match="must not hold a user name or password"):
        dicomweb.load_settings({"url": "http://u:p@127.0.0.1/dicom-web"})
    with pytest.raises(PacsError, match="Unknown PACS setting"):
        dicomweb.load_settings({"url": "http://127.0.0.1/dicom-web", "pasword": "x"})


def test_verify_is_true_false_or_an_existing_ca_bundle(tmp_path):
    """A typo in 'verify' is said at once, naming the setting, not taken as a CA-bundle path that fails later
    as if the PACS were at fault."""
    url = "https://pacs.example.org/dicom-web"
    for text, expected in [("yes", True), ("TRUE", True), ("off", False), ("False", False)]:
        assert dicomweb.load_settings({"url": url, "verify": text}).verify is expected
    assert dicomweb.load_settings({"url": url, "verify": False}).verify is False
    bundle = tmp_path / "ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    assert dicomweb.load_settings(None, {"CXR_PACS_URL": url, "CXR_PACS_VERIFY": str(bundle)}).verify == str(bundle)
    with pytest.raises(PacsError, match=r"setting CXR_PACS_VERIFY is 'flase': it must be true, false, or the path"):
        dicomweb.load_settings(None, {"CXR_PACS_URL": url, "CXR_PACS_VERIFY": "flase"})
    with pytest.raises(PacsError, match=r"'verify' in the \[pacs\] settings is '.*missing.pem'"):
        dicomweb.load_settings({"url": url, "verify": str(tmp_path / "missing.pem")})


def test_demo_command_prints_one_line_and_serves_the_films(tmp_path):
    folder = tmp_path / "films"
    folder.mkdir()
    folder.joinpath("chest.dcm").write_bytes(DX_J2K.read_bytes())
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cxr_core.pacs", "demo", "--port", str(port), "--load",
                             str(folder)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        timer = threading.Timer(120, proc.kill)
        timer.start()
        line = proc.stdout.readline()
        timer.cancel()
        match = re.fullmatch(r"DICOMweb: (http://127\.0\.0\.1:(\d+)/dicom-web) (\S+) (\S+)\n", line)
        assert match and int(match[2]) == port, line
        client = dicomweb.Client(dicomweb.Settings(url=match[1], username=match[3], password=match[4]))
        (study,) = client.search_studies()
        assert study.study_uid == study_of(DX_J2K) and study.films == 1
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and out == "" and "Loaded 1 DICOM file(s)" in err
    assert not any(needle in err for needle in NEEDLES)


def test_score_a_whole_search_as_a_batch(orthanc, model):
    _, client = orthanc
    classifier, _ = model
    # The studies this module loaded (the SITES test below adds its own: whichever order the tests run in).
    studies = [s for s in client.search_studies(modality="") if not s.accession.startswith("SITE-")]
    seen: list[tuple[int, int]] = []
    rows, notes = pacs.score_studies(client, classifier, studies, progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (len(studies), len(studies)) and notes == []
    errors = {row.name: row.error for row in rows if row.prediction is None}
    assert any(e.startswith("Lateral view (LL)") for e in errors.values())
    assert any("could not be decoded" in e for e in errors.values())
    # A study with no film to classify (a presentation state only) has its row, not nothing.
    assert [name for name, e in errors.items() if e.startswith("No radiographs in this study")] \
        == [pacs.study_name(s) for s in studies if s.accession == EMPTY_ACCESSION]
    scored = [row for row in rows if row.prediction is not None]
    assert len(scored) == len(FILES) - 1  # every film but the corrupt 966.dcm
    assert len({row.name for row in rows}) == len(rows)  # names made unique for the table
    (dx,) = [row for row in scored if row.info.metadata.get("TransferSyntax") == "JPEG 2000 Image Compression "
             "(Lossless Only)" and row.info.width == 1420]
    direct = pipeline.classify(classifier, Explainer(classifier), local_canary_bytes(DX_J2K), DX_J2K.name)
    np.testing.assert_allclose(dx.prediction.probabilities, direct.prediction.probabilities, atol=1e-5)
    limited, notes = pacs.score_studies(client, classifier, studies, limit=1)
    assert "Only the first 1 films were scored" in notes[0] and len(limited) < len(rows)


# Sites send what highdicom refuses to copy as it is: ISO 2022 character sets with code extensions (Japanese,
# Korean; PS3.5 Annex H, I), a Patient's Sex outside M/F/O, refined or empty Patient Orientation (PS3.3 C.7.6.1.1.1).
# Also a Specific Character Set highdicom does not know: "ISO_IR 6" (a common misspelling of the default repertoire,
# which pydicom reads) or empty; the results then carry UTF-8, or no Specific Character Set when all text is ASCII.
SITES = [(["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう", "U", ["LP", "F"], "", "ISO_IR 192"),
         (["", "ISO 2022 IR 149"], "Hong^Gildong=洪^吉洞=홍^길동", "m", None, "M", "ISO_IR 192"),
         ("ISO 2022 IR 100", "Müller^Jürgen", "MALE", ["", ""], "M", "ISO_IR 192"),
         ("ISO_IR 6", "Smith^John", "M", ["L", "F"], "M", None),
         ("", "Núñez^José", "F", ["L", "F"], "F", "ISO_IR 192")]


@pytest.mark.parametrize(("charset", "name", "sex", "orientation", "expected_sex", "expected_charset"), SITES)
def test_write_back_for_sites_with_iso2022_names_odd_sex_and_orientation(orthanc, model, charset, name, sex,
                                                                         orientation, expected_sex, expected_charset):
    """Adds studies (accession SITE-n, which the batch test leaves out). The results are built, stored and read
    back over WADO with the patient's name in the same characters, a valid sex, and the film's own orientation."""
    _, client = orthanc
    classifier, explainer = model
    film = new_study(SIIM, f"SITE-{[site[1] for site in SITES].index(name)}")
    film.SpecificCharacterSet, film.PatientName, film.PatientSex = charset, name, sex
    film.LossyImageCompression = "01"
    if orientation is None:
        film.pop("PatientOrientation", None)
    else:
        film.PatientOrientation = orientation
    client.store([film])
    study_uid = str(film.StudyInstanceUID)
    result = pacs.classify_study(client, classifier, explainer, study_uid)
    assert len(result.classified) == 1
    assert str(result.classified[0].source.PatientName) == name  # as the PACS sends it back
    assert len(pacs.write_back(client, classifier.card, result)) == 2
    reports, captures = read_back(client, study_uid, classifier.card)
    assert len(reports) == 1 and len(captures) == 1
    for ds in [*reports, *captures]:
        assert str(ds.PatientName) == name and ds.PatientID == CANARY["PatientID"]
        assert ds.PatientSex == expected_sex and ds.get("SpecificCharacterSet") == expected_charset
    assert dicom_results.read_report(reports[0]).decision == result.classified[0].result.prediction.decision
    assert reports[0].ContinuityOfContent == "SEPARATE"
    (capture,) = captures
    assert list(capture.get("PatientOrientation") or []) == (orientation or [])  # not invented, not refined away
    assert capture.LossyImageCompression == "01" and capture.AccessionNumber == film.AccessionNumber


def test_write_back_carries_each_film_s_cautions_and_leaves_out_films_that_are_not_a_chest(model):
    """The page warned (not a chest; low confidence; unlike the training films; the header asked for the film
    inverted) but the PACS got only 'Finding: ...'. Now every caution goes into the SR and the heatmap's comments,
    a film flagged 'probably not a frontal chest radiograph' is not written at all, and a film that fails for an
    unforeseen reason (an engine error) is an error row while the study's other films are classified."""
    from cxr_core import report

    classifier, explainer = model
    plain, inverse, noise, broken = (new_study(SIIM, "CAUTION-1") for _ in range(4))
    inverse.decompress()  # values stored the other way round, with the header saying to show them inverted
    stored = inverse.pixel_array
    inverse.PixelData = (stored.max() - stored).astype(stored.dtype).tobytes()
    inverse.PresentationLUTShape = "INVERSE"
    noise.decompress()
    rng = np.random.default_rng(3)
    noise.PixelData = rng.integers(0, 255, (noise.Rows, noise.Columns), dtype=np.uint8).tobytes()
    for ds in (inverse, noise, broken):
        ds.StudyInstanceUID = plain.StudyInstanceUID
    films = (plain, inverse, noise, broken)
    answers = [dicomweb.Instance(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID),
                                 str(ds.SOPClassUID), "CR", "PA", "CHEST", "chest", n, 1)
               for n, ds in enumerate(films, 1)]
    client = FakeClient({str(ds.SOPInstanceUID): ds for ds in films[:3]}, answers)
    real = client.retrieve
    client.retrieve = lambda instance: (real(instance) if instance.sop_uid != str(broken.SOPInstanceUID)
                                        else (_ for _ in ()).throw(RuntimeError("engine")))
    result = pacs.classify_study(client, classifier, explainer, str(plain.StudyInstanceUID))
    assert [f.result is not None for f in result.films] == [True, True, True, False]
    assert result.films[3].error.startswith("This file could not be processed (unexpected RuntimeError)")
    assert result.films[2].quality.probably_not_chest and not result.films[0].quality.probably_not_chest
    assert result.films[1].result.image.info.inverted and not result.films[0].result.image.info.inverted
    writable = [f.film.instance.sop_uid for f in result.writable]
    assert writable == [str(plain.SOPInstanceUID), str(inverse.SOPInstanceUID)]
    pacs.write_back(client, classifier.card, result)
    reports = [ds for ds in client.stored if ds.Modality == "SR"]
    captures = [ds for ds in client.stored if ds.Modality != "SR"]
    assert len(reports) == len(captures) == 2
    for sr, capture, item in zip(reports, captures, result.writable, strict=True):
        expected = report.cautions(item.result.prediction, classifier.card, item.quality, item.result.image.info)
        values = dicom_results.read_report(sr)
        assert values.cautions == expected and values.comment == dicom_results.UNVERIFIED
        assert values.referenced_sop_uids == [item.film.instance.sop_uid]
        assert all(f"Caution: {c}" in capture.ImageComments for c in expected)
    inverse_cautions = dicom_results.read_report(reports[1]).cautions
    assert any(c.startswith("Reading: Presentation: the header's Presentation LUT Shape INVERSE")
               for c in inverse_cautions)
    assert not any(c.startswith("Reading:") for c in dicom_results.read_report(reports[0]).cautions)
    only_noise = pacs.StudyResult(result.study_uid, [result.films[2]], [])
    with pytest.raises(PacsError, match="probably not a frontal chest radiograph"):
        pacs.write_back(client, classifier.card, only_noise)
    pacs.write_back(client, classifier.card, only_noise, include_not_chest=True)  # confirmed: with that caution
    (sr,) = [ds for ds in client.stored if ds.Modality == "SR"]
    assert dicom_results.read_report(sr).cautions[0].startswith("Probably not a frontal chest radiograph: ")


def test_a_study_is_listed_page_by_page_when_the_archive_answers_a_page_at_a_time(monkeypatch):
    """An archive that answers at most its own page size (2 here) hid the study's later films, and write-back's
    check that each result was kept reported kept objects as refused. A server that ignores offset ends it."""
    def item(sop: str, number: int) -> dict:
        return {"0020000E": {"vr": "UI", "Value": ["1.2.9"]}, "00080018": {"vr": "UI", "Value": [sop]},
                "00080016": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.1"]},
                "00080060": {"vr": "CS", "Value": ["CR"]}, "00200013": {"vr": "IS", "Value": [number]}}

    stored = [item(f"9.{n}", n) for n in range(1, 6)]
    asked: list[tuple] = []

    def paged(study_instance_uid, fields, search_filters=None, limit=None, offset=0):
        asked.append((limit, offset, search_filters))
        chosen = [i for i in stored if not search_filters or i["00080018"]["Value"][0] == search_filters[
            "SOPInstanceUID"]]
        return chosen[offset:offset + min(limit or 2, 2)]

    client = dicomweb.Client(dicomweb.Settings(url="http://127.0.0.1:9/dicom-web"))
    monkeypatch.setattr(client._web, "search_for_instances", paged)
    assert [i.sop_uid for i in client.instances("1.2")] == ["9.1", "9.2", "9.3", "9.4", "9.5"]
    assert [offset for _, offset, _ in asked] == [0, 2, 4, 5]  # until an empty page
    assert [i.sop_uid for i in client.instances("1.2", "9.5")] == ["9.5"]
    monkeypatch.setattr(client._web, "search_for_instances", lambda **kwargs: stored[:2])  # offset ignored
    assert [i.sop_uid for i in client.instances("1.2")] == ["9.1", "9.2"]


class _CappedQido(http.server.BaseHTTPRequestHandler):
    """A QIDO server that holds ``held`` studies and answers at most ``cap`` of them, with the Warning header of
    PS3.18 when it cuts (``warn``), as dcm4chee does; Orthanc's LimitFindResults cuts without one."""

    held, cap, warn = 0, 0, True

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        query = dict(pair.split("=", 1) for pair in self.path.partition("?")[2].split("&") if "=" in pair)
        asked = min(int(query.get("limit", self.held)), self.held)
        rows = [{"0020000D": {"vr": "UI", "Value": [f"1.2.3.{n}"]}, "00080020": {"vr": "DA", "Value": ["20240101"]},
                 "00080050": {"vr": "SH", "Value": [f"ACC{n}"]}} for n in range(min(asked, self.cap))]
        body = json.dumps(rows).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        if asked > self.cap and self.warn:
            self.send_header("Warning", '299 qido: The number of results exceeded the maximum supported by the '
                                        'server. Additional results can be requested.')
        elif self.warn:  # another 299 warning, about something else: not a cut answer
            self.send_header("Warning", "299 qido: The fuzzymatching parameter is not supported. Only literal "
                                        "matching has been performed.")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize(("held", "cap", "warn", "listed", "truncated"), [
    (120, 50, True, 50, True),  # cut at the archive's own maximum, which it says: the page warns
    (30, 50, True, 30, False),  # all it has (its other 299 warning is not about the count)
    (120, 500, True, 100, True),  # more than the app's limit: cut by the app, as before
])
def test_a_search_cut_at_the_archive_s_own_maximum_says_so(held, cap, warn, listed, truncated):
    """An archive that answers fewer studies than asked because of its own maximum listed them as if they were
    all: the first ones it answered, not the newest, with no warning on the page."""
    with local_pacs(type("Handler", (_CappedQido,), {"held": held, "cap": cap, "warn": warn}), 5) as client:
        studies = client.search_studies(modality="", limit=100)
    assert len(studies) == listed and studies.truncated is truncated


class _TrickleJson(http.server.BaseHTTPRequestHandler):
    """A QIDO server that answers any search with a JSON body and no length: ``chunks`` chunks of ``size`` spaces,
    ``pause`` seconds apart, then an empty list."""

    chunks, size, pause = 0, 0, 0.0

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.end_headers()
        for _ in range(self.chunks):
            self.wfile.write(b" " * self.size)
            self.wfile.flush()
            time.sleep(self.pause)
        self.wfile.write(b"[]")

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize(("chunks", "size", "pause", "message"), [
    (40, 64 * 1024, 0.0, "sent more than 1 MB in answer to one request"),
    (1000, 16, 0.1, "took more than 1 s to answer one request"),
    (2, 16, 0.0, None),  # a small answer in time: read as before
])
def test_a_search_answer_too_large_or_too_slow_is_cut_off(monkeypatch, chunks, size, pause, message):
    """Searches went through dicomweb-client's unbounded read: a PACS trickling its answer held the page without
    end (the timeout bounds each wait for a byte), and gigabytes of JSON filled the server's memory."""
    monkeypatch.setattr(dicomweb, "MAX_ANSWER_BYTES", 1 * limits.MiB)
    monkeypatch.setattr(dicomweb, "RETRIEVE_TIMEOUTS", 2)
    handler = type("Handler", (_TrickleJson,), {"chunks": chunks, "size": size, "pause": pause})
    with local_pacs(handler, 0.5) as client:
        started = time.monotonic()
        if message is None:
            assert client.search_studies() == [] and client.instances("1.2") == []
        else:
            with pytest.raises(PacsError, match=message):
                client.search_studies()
        assert time.monotonic() - started < 5
