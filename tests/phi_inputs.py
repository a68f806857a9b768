"""Patient data for the PHI tests: real DICOM files given known patient values, a damaged one whose reading
makes pydicom quote them, and the search for those values in whatever the code under test wrote."""

from __future__ import annotations

import io
import uuid
from pathlib import Path

import pydicom
from badinput import CR_DICOM, SIIM_DICOM, transfer_syntax_running_through

# upload name -> real file (JPEG baseline with file meta; implicit VR without file meta)
SOURCES = {"study1.dcm": SIIM_DICOM, "study2.dcm": CR_DICOM}
PHI = {
    "PatientName": "Quibbleworth^Zenobia",
    "PatientID": "PID-86753091",
    "PatientBirthDate": "19230417",
    "AccessionNumber": "ACC77341902",
    "InstitutionName": "Saint Marmaduke Infirmary",
    "ReferringPhysicianName": "Fennimore^Ulysses",
    "OtherPatientIDs": "OPID-4417730",
}
MARKER = f"UPLOAD-MARKER-{uuid.uuid4().hex}"
# What must never appear: each value and each part of the person names.
NEEDLES = sorted({v for v in PHI.values()} | {p for v in PHI.values() for p in v.split("^")} | {MARKER})


def with_phi(path: Path) -> bytes:
    """The real file with PHI set and MARKER in a private tag, as bytes (written like the original)."""
    ds = pydicom.dcmread(path, force=True)
    for key, value in PHI.items():
        setattr(ds, key, value)
    ds.private_block(0x0011, "PHI TEST", create=True).add_new(0x01, "LO", MARKER)
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def find_needles(blob: bytes | str, where: str) -> list[str]:
    data = blob.encode("utf-8", "replace") if isinstance(blob, str) else blob
    found = []
    for needle in NEEDLES:
        for encoding in ("utf-8", "utf-16-le"):
            if needle.encode(encoding) in data:
                found.append(f"{needle!r} ({encoding}) in {where}")
    return found


def damaged_with_phi() -> bytes:
    """study1 with PHI whose Transfer Syntax UID element (0002,0010) claims a length that runs on through the
    patient's name and id: pydicom then warns "Invalid value for VR UI: '...'" quoting those bytes."""
    return transfer_syntax_running_through(with_phi(SOURCES["study1.dcm"]),
                                           PHI["PatientName"].encode(), PHI["PatientID"].encode())
