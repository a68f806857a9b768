"""Inputs and reference results for the python -m scoring tests: real films, bad files, the app's own path."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
from conftest import DATA, DICOM

FILMS = [
    *sorted((DATA / "kermany" / "train" / "NORMAL").glob("*.jpeg"))[:4],
    *sorted((DATA / "kermany" / "train" / "PNEUMONIA").glob("*.jpeg"))[:4],
    *sorted((DATA / "covid19_radiography" / "COVID").glob("*"))[:2],
    DICOM / "torchxrayvision" / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm",
    DICOM / "fo-dicom" / "CR-MONO1-10-chest.dcm",
    DICOM / "non_chest" / "CR-ModalitySequenceLUT.dcm",
]
# Large JPEG 2000 / JPEG-LS films: a second or so each to decode, so a run lasts long enough to be interrupted.
SLOW = [DICOM / "pydicom-data" / "RG1_J2KI.dcm", DICOM / "pylibjpeg-data" / "RG1_JLSN.dcm",
        DICOM / "pylibjpeg-data" / "966_fixed.dcm", DICOM / "pylibjpeg-data" / "JPEG2KLossless_1s_1f_u_16_16.dcm"]
BAD = {"broken.jpeg": b"\xff\xd8\xff\xe0 this is not really a JPEG", "notes.png": b"not an image\n" * 10,
       "empty.png": b""}


def film_folder(root: Path, slow_copies: int = 0) -> Path:
    """``root`` with the real films in subfolders, the bad files, and ``slow_copies`` of each slow film last."""
    for i, src in enumerate(FILMS):
        dest = root / ("dicom" if src.suffix == ".dcm" else "jpeg") / f"{i:02d}_{src.name}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
    for name, data in BAD.items():
        (root / name).write_bytes(data)
    for copy in range(slow_copies):
        for i, src in enumerate(SLOW):
            dest = root / "zz_slow" / f"{copy}_{i}_{src.name}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)
    return root


def batch_review_csv(classifier, items: list[tuple[str, bytes]], batch_size: int) -> pd.DataFrame:
    """What the Batch review page exports for these uploads (pages/batch.py's calls), read back as strings."""
    from cxr_core import pipeline, review

    results = pipeline.classify_many(classifier, items, batch_size=batch_size)
    reports = [review.assess_item(item, data) for item, (_, data) in zip(results, items, strict=True)]
    table = review.batch_table(results, classifier.card.class_names, reports)
    return pd.read_csv(io.StringIO(review.export_csv(table)), dtype=str, keep_default_na=False)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def same_scores(a: pd.DataFrame, b: pd.DataFrame, atol: float = 1e-6) -> None:
    """Two outputs agree row by row on everything but the time (probabilities within ``atol``)."""
    assert a["path"].tolist() == b["path"].tolist()
    for column in a.columns:
        if column == "scored_at":
            continue
        if column.startswith("p_") or column in ("top_probability", "familiarity"):
            pd.testing.assert_series_equal(a[column], b[column], atol=atol, rtol=0, check_names=False)
        else:
            assert a[column].tolist() == b[column].tolist(), column


_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 1, 2


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


@contextlib.contextmanager
def unreadable(*paths: Path) -> Iterator[None]:
    """``paths`` refused to this thread by the kernel, as an account without access (or a root-squashed share)
    would see them: mode 000, and, when the tests run as root (whom modes do not stop), this thread's
    capabilities to override them (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH) dropped from its effective set for the
    duration; they stay permitted, so they are taken back at the end."""
    modes = [p.stat().st_mode for p in paths]
    libc = ctypes.CDLL(None, use_errno=True)
    header, data = _CapHeader(0x20080522, 0), (_CapData * 2)()  # _LINUX_CAPABILITY_VERSION_3, this thread
    if os.geteuid() == 0:
        assert libc.capget(ctypes.byref(header), data) == 0, os.strerror(ctypes.get_errno())
    saved = data[0].effective
    for p in paths:
        p.chmod(0)
    try:
        if os.geteuid() == 0:
            data[0].effective = saved & ~((1 << _CAP_DAC_OVERRIDE) | (1 << _CAP_DAC_READ_SEARCH))
            assert libc.capset(ctypes.byref(header), data) == 0, os.strerror(ctypes.get_errno())
        for p in paths:  # really refused, or the test would prove nothing
            with contextlib.suppress(PermissionError):
                os.listdir(p) if p.is_dir() else p.read_bytes()
                raise AssertionError(f"{p} is still readable")
        yield
    finally:
        if os.geteuid() == 0:
            data[0].effective = saved
            assert libc.capset(ctypes.byref(header), data) == 0, os.strerror(ctypes.get_errno())
        for p, mode in zip(paths, modes, strict=True):
            p.chmod(mode)
