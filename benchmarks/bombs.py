"""DICOM decompression bombs and the memory probe: ``python -m benchmarks.bombs`` prints one JSON object.

The probe reads each bomb through ``cxr_core.imaging.load`` in this (fresh) process and reports the
peak resident memory above the baseline while it was refused (``bomb_peak_extra_mb``, the worst of
them), and the time to refuse 100 MB of zero bytes named ``.dcm`` (``zeros_refuse_s``). The bombs are
made in memory; the zero file is a sparse temporary file.
"""

from __future__ import annotations

import json
import struct
import sys
import tempfile
import time
import zlib
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

# The real JPEG-baseline DICOM (1024 x 1024) of the shared test data, beside the checkout.
JPEG_DICOM = Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom" / "torchxrayvision" / "Fake_MONOHR1.dcm"


def _deflate_segment(data: bytes) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush(zlib.Z_FULL_FLUSH)


def deflated_bomb(frames: int = 20, side: int = 4096, *, honest: bool = True) -> bytes:
    """A Deflated-syntax DICOM whose ``frames`` x ``side`` x ``side`` zero bytes deflate ~1000:1 (1 MB per GB).

    ``honest=False`` declares one 256 x 256 frame in the header, so only the inflation cap can stop it.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    head = Dataset()
    head.Modality, head.Rows, head.Columns, head.NumberOfFrames = "CR", side, side, frames
    if not honest:
        head.Rows, head.Columns, head.NumberOfFrames = 256, 256, 1
    head.SamplesPerPixel, head.PhotometricInterpretation = 1, "MONOCHROME2"
    head.BitsAllocated, head.BitsStored, head.HighBit, head.PixelRepresentation = 8, 8, 7, 0
    raw = pydicom.filebase.DicomBytesIO()
    raw.is_little_endian, raw.is_implicit_VR = True, False
    pydicom.filewriter.write_dataset(raw, head)
    buf = pydicom.filebase.DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    pydicom.filewriter.write_file_meta_info(buf, meta, enforce_standard=True)
    size = frames * side * side
    body = raw.getvalue() + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, size)
    # Fully flushed raw-deflate segments stand alone, so one compressed 16 MiB of zeros repeats as often as needed.
    zeros = _deflate_segment(bytes(1 << 24))
    parts = [_deflate_segment(body), zeros * (size >> 24), _deflate_segment(bytes(size & ((1 << 24) - 1))),
             zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS).flush()]
    return b"\x00" * 128 + b"DICM" + buf.getvalue() + b"".join(parts)


def codestream_bomb(side: int = 30000) -> bytes:
    """The real JPEG-baseline DICOM whose JPEG codestream (not the DICOM header) declares ``side`` x ``side``:
    the decoder would allocate that (0.9 GB at 30000, 12.9 GB at 65535 x 3) before any size check."""
    data = bytearray(JPEG_DICOM.read_bytes())
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = side.to_bytes(2, "big") * 2
    return bytes(data)


def bombs() -> dict[str, bytes]:
    """The corpus' bombs: honest headers (refused from the header) and a liar (stopped by the inflation cap)."""
    return {"20 frames of 4096x4096 (320 MB)": deflated_bomb(20, 4096),
            "128 frames of 4096x4096 (2 GB)": deflated_bomb(128, 4096),
            "header 256x256, data 2 GB": deflated_bomb(128, 4096, honest=False),
            "JPEG codestream 30000x30000 in a 1024x1024 DICOM": codestream_bomb(30000)}


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def probe() -> dict:
    """Peak extra MiB while each bomb is refused (worst reported) and seconds to refuse 100 MB of zeros; a bomb or
    the zeros read instead of refused are named (``bombs_accepted``, ``zeros_accepted``) and fail the targets."""
    from cxr_core import imaging
    from cxr_core.errors import UnreadableImageError

    peaks, accepted = {}, []
    for name, data in bombs().items():
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
        base = _status_mb("VmRSS")
        try:
            imaging.load(data, "bomb.dcm")
            accepted.append(name)  # read, not refused: its peak is not the refusal's (the target fails)
        except UnreadableImageError:
            pass
        peaks[name] = round(_status_mb("VmHWM") - base, 1)
    with tempfile.TemporaryDirectory() as tmp:
        zeros = Path(tmp) / "x.dcm"
        with open(zeros, "wb") as fh:
            fh.truncate(100 << 20)
        start = time.perf_counter()
        zeros_accepted = True
        try:
            imaging.load(zeros)
        except UnreadableImageError:
            zeros_accepted = False
        refuse_s = time.perf_counter() - start
    return {"bomb_peak_extra_mb": max(peaks.values()), "bomb_peaks_mb": peaks, "bombs_accepted": accepted,
            "zeros_refuse_s": round(refuse_s, 4), "zeros_accepted": zeros_accepted}


if __name__ == "__main__":
    print(json.dumps(probe()))
    sys.exit(0)
