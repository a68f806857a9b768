"""A real Orthanc for the PACS tests, loaded over STOW-RS with canary copies of ../shared/data/dicom.

Every loaded film carries the canary patient name and ID (``CANARY``); two extra studies are made from
real films: one whose only film is a lateral view, and one that holds no image at all.
"""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pydicom
from conftest import DICOM
from pydicom.uid import generate_uid

from cxr_core import dicomweb, orthanc
from cxr_core.orthanc import LocalOrthanc

CANARY = {"PatientName": "Quokkaberg^Philippa", "PatientID": "CANARY-7731-PID"}
NEEDLES = sorted(set(CANARY.values()) | set(CANARY["PatientName"].split("^")))
SIIM = DICOM / "torchxrayvision" / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
DX_J2K = DICOM / "pylibjpeg-data" / "JPEG2KLossless_1s_1f_u_16_16.dcm"  # the only film of its study
LATERAL_ACCESSION, EMPTY_ACCESSION = "LATERAL-0001", "NOIMAGE-0001"
# An archive that keeps films but silently drops this application's results (it answers STOW-RS with success).
REFUSE_RESULTS = ("function ReceivedInstanceFilter(dicom, origin, info)\n"
                  "  return string.find(dicom.SeriesDescription or '', 'UNVERIFIED AI', 1, true) == nil\nend\n")


def canary(ds: pydicom.Dataset) -> None:
    for key, value in CANARY.items():
        setattr(ds, key, value)


def new_study(path, accession: str) -> pydicom.Dataset:
    """A canary copy of a real film in a study of its own (new UIDs)."""
    ds = orthanc.part10(pydicom.dcmread(path, force=True))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = (generate_uid() for _ in range(3))
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.AccessionNumber = accession
    canary(ds)
    return ds


def extra_studies() -> list[pydicom.Dataset]:
    lateral = new_study(SIIM, LATERAL_ACCESSION)
    lateral.ViewPosition = "LL"
    empty = new_study(SIIM, EMPTY_ACCESSION)  # a presentation state, no pixel data: not a film
    del empty.PixelData
    empty.SOPClassUID = empty.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.11.1"
    return [lateral, empty]


@contextmanager
def loaded_orthanc() -> Iterator[tuple[LocalOrthanc, dicomweb.Client]]:
    """Orthanc on a free 127.0.0.1 port (the demo's code path), holding every canary film plus the extras."""
    with LocalOrthanc() as server:
        client = dicomweb.Client(server.settings)
        stored, problems = orthanc.load_folder(client, DICOM, edit=canary)
        assert problems == [] and stored == len(list(DICOM.rglob("*.dcm"))), problems
        client.store(extra_studies())
        yield server, client


def local_canary_bytes(path) -> bytes:
    """The file as the test loaded it into Orthanc (canary patient), as Part 10 bytes."""
    ds = orthanc.part10(pydicom.dcmread(path, force=True))
    canary(ds)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def stow_answer(stored: list[str], failed: dict[str, int]) -> dict:
    """A STOW-RS answer in DICOM JSON: ReferencedSOPSequence for ``stored`` UIDs, FailedSOPSequence with each
    refused UID's FailureReason (PS3.18 Table 10.5.3-1)."""
    answer: dict = {"00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": [uid]}} for uid in stored]}}
    if failed:
        answer["00081198"] = {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": [uid]},
                                                     "00081197": {"vr": "US", "Value": [reason]}}
                                                    for uid, reason in failed.items()]}
    return answer


@contextmanager
def stow_answering(status: int, answer: dict, warning: str = "") -> Iterator[dicomweb.Client]:
    """A client of a fake DICOMweb server on 127.0.0.1 that answers every STOW-RS with ``status`` and ``answer``
    (DICOM JSON) and a ``Warning`` header if given, as archives that refuse objects do (Orthanc 1.10 answers
    200 even when its filter refused them)."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            if "Content-Length" in self.headers:
                self.rfile.read(int(self.headers["Content-Length"]))
            else:  # chunked, as dicomweb-client sends large requests
                self._chunks()
            body = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", str(len(body)))
            if warning:
                self.send_header("Warning", warning)
            self.end_headers()
            self.wfile.write(body)

        def _chunks(self) -> None:
            while (size := int(self.rfile.readline().strip() or b"0", 16)) > 0:
                self.rfile.read(size + 2)
            self.rfile.readline()

        def log_message(self, *args) -> None:  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield dicomweb.Client(dicomweb.Settings(url=f"http://127.0.0.1:{server.server_port}/dicom-web", timeout=10))
    finally:
        server.shutdown()
        server.server_close()
