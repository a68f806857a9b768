"""The bad-input corpus: what clinicians' systems export, generated in memory from real files.

Every ``Case`` is an upload (file name and bytes) and what must happen to it: ``"ok"`` with
the facts a correct read shows (format, size, frames, the pixels it must resemble), or
``"error"`` with a fragment of the one clear ``UnreadableImageError`` message. Nothing is
written to disk; the only inputs are the real files under ``../shared/data``.
"""

from __future__ import annotations

import functools
import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from benchmarks.bombs import codestream_bomb, deflated_bomb

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
KERMANY_JPEG = DATA / "kermany" / "train" / "NORMAL" / "IM-0115-0001.jpeg"
CORRUPT_DICOM = DATA / "dicom" / "pylibjpeg-data" / "966.dcm"
CR_DICOM = DATA / "dicom" / "fo-dicom" / "CR-MONO1-10-chest.dcm"
SIIM_DICOM = DATA / "dicom" / "torchxrayvision" / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
NON_CHEST_DICOM = DATA / "dicom" / "non_chest" / "CR-ModalitySequenceLUT.dcm"


@dataclass(frozen=True)
class Case:
    """One upload and its expected outcome.

    ``size`` is (height, width) of the image as displayed; ``reference`` is float32 HxW in
    [0, 1] that a correct read must correlate with (lungs dark, bone bright).
    """

    name: str
    data: bytes
    expected: str  # "ok" or "error"
    why: str
    fragment: str = ""  # lower-case piece of the error message
    format: str | None = None
    size: tuple[int, int] | None = None
    frames: int = 1
    reference: np.ndarray | None = None

    @property
    def ok(self) -> bool:
        return self.expected == "ok"

    def __repr__(self) -> str:  # pytest ids and failure messages stay short
        return f"Case({self.name!r}, {self.expected})"


def chest_gray() -> np.ndarray:
    """The real Kermany chest JPEG as uint8 (224, 224), lungs dark."""
    with Image.open(KERMANY_JPEG) as im:
        return np.asarray(im.convert("L"))


def _unit(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float32)
    return (a - a.min()) / max(float(a.max() - a.min()), 1e-6)


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def huge_png(width: int = 40000, height: int = 40000) -> bytes:
    """A well-formed PNG header declaring ``width`` x ``height`` 8-bit gray pixels, with one row of data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" + b"\x80" * width)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def dicom_bytes(
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    transfer_syntax: str = ExplicitVRLittleEndian,
    *,
    pixel_data: bool = True,
    **tags: object,
) -> bytes:
    """A valid DICOM Part 10 file holding ``pixels``: uint8/uint16 (H, W), (F, H, W) or (H, W, 3) RGB."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    rgb = photometric == "RGB"
    frames = pixels.shape[0] if pixels.ndim == 3 and not rgb else 1
    ds.Rows, ds.Columns = (pixels.shape[1:3] if frames > 1 else pixels.shape[:2])
    ds.SamplesPerPixel = 3 if rgb else 1
    if rgb:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PhotometricInterpretation = photometric
    bits = 16 if pixels.dtype == np.uint16 else 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    for key, value in tags.items():
        setattr(ds, key, value)
    if pixel_data:
        order = ">" if transfer_syntax == ExplicitVRBigEndian else "<"
        ds.PixelData = pixels.astype(pixels.dtype.newbyteorder(order)).tobytes()
        ds["PixelData"].VR = "OW" if bits == 16 else "OB"
    buf = io.BytesIO()
    big = transfer_syntax == ExplicitVRBigEndian
    ds.save_as(buf, enforce_file_format=True, little_endian=not big, implicit_vr=False)
    return buf.getvalue()


def jpeg_with_orientation(gray: np.ndarray, orientation: int) -> bytes:
    """A JPEG of ``gray`` whose EXIF says it must be rotated (6: 90 degrees clockwise) for display."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(Image.fromarray(gray), "JPEG", quality=95, exif=exif.tobytes())


def _cmyk_jpeg(gray: np.ndarray) -> bytes:
    """CMYK JPEG with ink only in K, so a correct read gives back the gray picture."""
    k = 255 - gray
    zeros = np.zeros_like(gray)
    cmyk = Image.fromarray(np.stack([zeros, zeros, zeros, k], axis=-1), mode="CMYK")
    return _encode(cmyk, "JPEG", quality=95)


def ok_cases() -> list[Case]:
    """Inputs that must load, each with the facts a correct read shows."""
    gray = chest_gray()
    ref = _unit(gray)
    h, w = gray.shape
    portrait = gray[:, 32:192]  # 224 x 160: a rotation is visible in the shape
    rgb = np.stack([gray, gray, gray], axis=-1)
    g16 = gray.astype(np.uint16) * 257
    large = Image.fromarray(gray).resize((6000, 5000), Image.BILINEAR)
    big_ref = _unit(np.asarray(large.resize((600, 500), Image.BILINEAR)))
    frames = np.stack([gray, 255 - gray, gray // 2])
    return [
        Case("chest.jpeg", KERMANY_JPEG.read_bytes(), "ok", "real Kermany JPEG", format="JPEG", size=(h, w),
             reference=ref),
        Case("chest16.png", _encode(Image.fromarray(g16), "PNG"), "ok", "16-bit grayscale PNG", format="PNG",
             size=(h, w), reference=ref),
        Case("chest_cmyk.jpg", _cmyk_jpeg(gray), "ok", "CMYK JPEG (print workflow export)", format="JPEG",
             size=(h, w), reference=ref),
        Case("chest_exif6.jpg", jpeg_with_orientation(portrait, 6), "ok",
             "EXIF orientation 6: must be shown rotated 90 degrees clockwise", format="JPEG", size=(160, 224),
             reference=_unit(np.rot90(portrait, k=-1))),
        Case("chest.gif", _encode(Image.fromarray(gray), "GIF"), "ok", "GIF (palette)", format="GIF",
             size=(h, w), reference=ref),
        Case("chest.tif", _encode(Image.fromarray(g16), "TIFF", compression="tiff_lzw"), "ok",
             "16-bit LZW TIFF", format="TIFF", size=(h, w), reference=ref),
        Case("chest.bmp", _encode(Image.fromarray(rgb), "BMP"), "ok", "24-bit RGB BMP", format="BMP",
             size=(h, w), reference=ref),
        Case("chest.webp", _encode(Image.fromarray(gray), "WEBP", lossless=True), "ok", "lossless WebP",
             format="WEBP", size=(h, w), reference=ref),
        Case("chest_jpeg_named.png", KERMANY_JPEG.read_bytes(), "ok", "a JPEG with a .png name (read by content)",
             format="JPEG", size=(h, w), reference=ref),
        Case("large.jpg", _encode(large, "JPEG", quality=80), "ok", "very large but valid 6000x5000 JPEG",
             format="JPEG", size=(5000, 6000), reference=big_ref),
        Case("rgb.dcm", dicom_bytes(rgb, "RGB"), "ok", "RGB DICOM (secondary capture)", format="DICOM",
             size=(h, w), reference=ref),
        Case("multiframe.dcm", dicom_bytes(frames), "ok", "3-frame DICOM: the first frame is shown",
             format="DICOM", size=(h, w), frames=3, reference=ref),
        Case("bigendian.dcm", dicom_bytes(g16, transfer_syntax=ExplicitVRBigEndian), "ok",
             "retired Explicit VR Big Endian transfer syntax", format="DICOM", size=(h, w), reference=ref),
        Case("deflated.dcm", dicom_bytes(g16, transfer_syntax=DeflatedExplicitVRLittleEndian), "ok",
             "Deflated Explicit VR Little Endian transfer syntax", format="DICOM", size=(h, w), reference=ref),
        Case("IM000001", private_tags_dicom(), "ok", "extension-less DICOM with private tags", format="DICOM",
             size=(h, w), reference=ref),
        Case("dental.dcm", NON_CHEST_DICOM.read_bytes(), "ok", "a real non-chest (dental) DICOM: loads",
             format="DICOM", size=(1576, 1976)),
    ]


def private_tags_dicom() -> bytes:
    """The chest as MONOCHROME2 DICOM carrying a vendor's private block and an odd private element."""
    buf = io.BytesIO(dicom_bytes(chest_gray()))
    ds = pydicom.dcmread(buf)
    block = ds.private_block(0x0029, "ACME 1.0", create=True)
    block.add_new(0x10, "LO", "vendor setting")
    block.add_new(0x11, "OB", bytes(range(256)) * 4)
    ds.add_new(0x00331010, "UN", b"\x00\xffunknown-vr")
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def error_cases() -> list[Case]:
    """Inputs that must end in the one clear UnreadableImageError."""
    jpeg = KERMANY_JPEG.read_bytes()
    png = _encode(Image.fromarray(chest_gray()), "PNG")
    no_pixels = pydicom.dcmread(io.BytesIO(dicom_bytes(chest_gray())))
    del no_pixels.PixelData
    buf = io.BytesIO()
    no_pixels.save_as(buf, enforce_file_format=True)
    pdf = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
    html = b"<!DOCTYPE html><html><head><title>PACS</title></head><body><img src='x.png'></body></html>"
    damaged = "damaged or incomplete"
    text = b"Patient doing well, see attached X-ray.\n" * 20
    return [
        Case("empty.png", b"", "error", "empty file", fragment="empty"),
        Case("truncated.jpg", jpeg[: len(jpeg) * 6 // 10], "error", "JPEG cut at 60%", fragment=damaged),
        Case("truncated.png", png[: len(png) // 2], "error", "PNG cut in half", fragment=damaged),
        Case("notes.png", text, "error", "text renamed .png", fragment="text file"),
        Case("report.png", pdf, "error", "PDF renamed .png", fragment="pdf"),
        Case("viewer.html", html, "error", "an HTML page saved from a PACS viewer",
             fragment="web page"),
        Case("bomb.png", huge_png(), "error", "PNG declaring 40000x40000 pixels (decompression bomb)",
             fragment="too large"),
        Case("nopixels.dcm", buf.getvalue(), "error", "DICOM without pixel data", fragment="no image"),
        Case("966.dcm", CORRUPT_DICOM.read_bytes(), "error", "real DICOM with a corrupt JPEG 2000 codestream",
             fragment="could not be decoded"),
    ]


def corpus() -> list[Case]:
    """The whole corpus, good files first."""
    return ok_cases() + error_cases() + list(hostile_cases())


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two images after resizing ``a`` to ``b``'s shape."""
    if a.shape != b.shape:
        a = np.asarray(Image.fromarray(a.astype(np.float32)).resize(b.shape[::-1], Image.BILINEAR))
    return float(np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1])


# --- hostile inputs (issue 15): one or more per failure class, made here, never written to disk ----------------


def dicom_with(pixels: np.ndarray | None = None, **tags: object) -> bytes:
    """The real chest (or ``pixels``) as a 16-bit MONOCHROME2 DICOM with ``tags`` set, even values pydicom would
    refuse to write (set as raw strings)."""
    data = dicom_bytes(chest_gray().astype(np.uint16) * 257 if pixels is None else pixels)
    ds = pydicom.dcmread(io.BytesIO(data))
    for key, value in tags.items():
        if isinstance(value, str):  # written as raw bytes, so that pydicom cannot refuse or fix the value
            raw = value.encode("latin-1") + b" " * (len(value) % 2)
            vr = pydicom.datadict.dictionary_VR(key)
            ds[key] = pydicom.dataelem.RawDataElement(Tag(key), vr, len(raw), raw, 0, False, True)
        else:
            setattr(ds, key, value)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def transfer_syntax_running_through(data: bytes, *through: bytes) -> bytes:
    """``data`` (a DICOM file with file meta) with its Transfer Syntax UID (0002,0010) claiming a length that
    runs on through the last of the byte strings ``through`` (each found in the file), and 2 bytes past it."""
    blob = bytearray(data)
    at = blob.index(b"\x02\x00\x10\x00UI")  # explicit VR: tag, VR, 2-byte length, value
    end = max(blob.index(part) + len(part) for part in through)
    blob[at + 6:at + 8] = struct.pack("<H", end + 2 - (at + 8))
    return bytes(blob)


def empty_items_dicom(items: int) -> bytes:
    """The chest DICOM with an undefined-length sequence of ``items`` empty items before its first tag: cheap
    bytes (8 per item) that cost a parser per item, nested where a top-level element count does not reach."""
    base = dicom_bytes(chest_gray())
    at = base.find(b"\x08\x00\x16\x00")  # SOP Class UID, the dataset's first element
    sequence = (struct.pack("<HH2sHI", 0x0008, 0x1140, b"SQ", 0, 0xFFFFFFFF)
                + struct.pack("<HHI", 0xFFFE, 0xE000, 0) * items + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
    return base[:at] + sequence + base[at:]


def float_tiff(values: np.ndarray) -> bytes:
    """A 32-bit float TIFF (Pillow mode F) holding ``values``, NaN and infinities included."""
    return _encode(Image.fromarray(values.astype(np.float32), mode="F"), "TIFF")


def rgb_as_monochrome() -> bytes:
    """An RGB picture's interleaved bytes labelled MONOCHROME2 with one sample per pixel (a broken export)."""
    gray = chest_gray()
    rgb = np.stack([gray, gray // 2, gray // 3], axis=-1)
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(gray)))
    ds.PixelData = rgb.tobytes()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def strip_png(width: int, height: int) -> bytes:
    """A valid gray PNG of extreme aspect (e.g. 30000 x 10), a gradient so that it is not blank."""
    row = np.linspace(0, 255, width).astype(np.uint8)
    return _encode(Image.fromarray(np.repeat(row[None, :], height, axis=0)), "PNG")


def rgba_png() -> bytes:
    """The chest as RGBA whose left half is fully transparent (white underneath)."""
    gray = chest_gray()
    rgba = np.dstack([gray, gray, gray, np.full_like(gray, 255)])
    rgba[:, : gray.shape[1] // 2, :3] = 255
    rgba[:, : gray.shape[1] // 2, 3] = 0
    return _encode(Image.fromarray(rgba, mode="RGBA"), "PNG")


FORMULA_NAMES = ("=HYPERLINK(\"http://x\",\"y\").jpeg", "+cmd.jpeg", "-@SUM(1+1).jpeg", "@SUM(1).png",
                 "\tTAB.png", "\rCR.png", "x\r=cmd.png", "x\n+cmd.png", "'=already quoted.png")


@functools.cache
def hostile_cases() -> list[Case]:
    """One case per failure class of issue 15 that a file alone can carry (F1, F3, F6, F7, minor items)."""
    return [
        Case("slope_1e300.dcm", dicom_with(RescaleSlope="1e300"), "error", "F1: RescaleSlope 1e300 overflows",
             fragment="rescaleslope"),
        Case("slope_inf.dcm", dicom_with(RescaleSlope="inf"), "error", "F1: RescaleSlope inf", fragment="rescaleslope"),
        Case("slope_nan.dcm", dicom_with(RescaleSlope="NaN"), "error", "F1: RescaleSlope NaN", fragment="rescaleslope"),
        Case("intercept_nan.dcm", dicom_with(RescaleIntercept="NaN"), "error", "F1: RescaleIntercept NaN",
             fragment="rescaleintercept"),
        Case("slope_zero.dcm", dicom_with(RescaleSlope="0"), "error", "RescaleSlope 0 (was taken as 1)",
             fragment="rescaleslope"),
        Case("window_text.dcm", dicom_with(WindowCenter="abc", WindowWidth="400"), "error",
             "malformed WindowCenter", fragment="windowcenter"),
        Case("width_nan.dcm", dicom_with(WindowCenter="1200", WindowWidth="NaN"), "error", "WindowWidth NaN",
             fragment="windowwidth"),
        Case("rgb_as_mono2.dcm", rgb_as_monochrome(), "error", "RGB bytes labelled MONOCHROME2",
             fragment="times what its header declares"),
        Case("mono_3samples.dcm", dicom_with(SamplesPerPixel=3), "error", "MONOCHROME2 with 3 samples per pixel",
             fragment="contradicts itself"),
        Case("deflated_bomb.dcm", deflated_bomb(20, 4096), "error", "F6: 20 frames of 4096x4096 zeros, deflated",
             fragment="too large"),
        Case("deflated_bomb_2gb.dcm", deflated_bomb(128, 4096), "error",
             "F6: a deflated file inflating to 2 GB", fragment="too large"),
        Case("deflated_liar.dcm", deflated_bomb(128, 4096, honest=False), "error",
             "F6: a deflated file whose header declares 256x256 but whose pixel data inflates to 2 GB",
             fragment="inflates to more than"),
        Case("sequence_items.dcm", empty_items_dicom(200_000), "error",
             "F7: 1.6 MB holding 200,000 empty sequence items (minutes of parsing unbounded)",
             fragment="data elements"),
        Case("jpeg_bomb.dcm", codestream_bomb(), "error",
             "F6: a JPEG DICOM whose codestream declares 30000x30000 (4.3 GB and 39 s before)",
             fragment="compressed image inside"),
        Case("zeros.dcm", bytes(10 << 20), "error", "F7: 10 MB of zero bytes named .dcm", fragment="not one"),
        Case("strip_30000x10.png", strip_png(30000, 10), "ok", "F3: a 30000 x 10 PNG", format="PNG",
             size=(10, 30000), reference=_unit(np.asarray(Image.open(io.BytesIO(strip_png(30000, 10))).convert("L")))),
        Case("strip_1x2000000.png", strip_png(2_000_000, 1), "ok", "F3: a 2,000,000 x 1 PNG", format="PNG",
             size=(1, 2_000_000)),
        Case("rgba.png", rgba_png(), "ok", "RGBA, left half transparent: composited on black", format="PNG",
             size=chest_gray().shape, reference=_unit(np.where(np.arange(224) < 112, 0, chest_gray()))),
        Case("inf.tif", float_tiff(np.where(np.eye(64) > 0, np.inf, np.linspace(0, 1, 64))), "ok",
             "F1: float TIFF holding +inf: inf shown black, the rest scaled", format="TIFF", size=(64, 64)),
    ]
