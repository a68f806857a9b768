"""Reading chest X-rays (DICOM, JPEG, PNG, BMP, TIFF, WebP, GIF) into float32 HxW in [0, 1].

One entry point, ``load(source, filename)``: the format is detected from the bytes, never from
the extension; the result is grayscale with lungs dark and bone bright, plus an ``ImageInfo``
saying what was read. Every failure ends as ``UnreadableImageError`` with a message a clinician
can act on. DICOM files are parsed for a fixed list of non-identifying tags only, so patient
data never enters memory, the record or an error message.
"""

from __future__ import annotations

import io
from contextlib import ExitStack
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path, PurePath
from typing import BinaryIO

import numpy as np
import pydicom
from PIL import Image, ImageOps
from pydicom.dataset import FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, pixel_array
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from cxr_core.errors import UnreadableImageError

MAX_PIXELS = 50_000_000
IMAGE_EXTENSIONS = frozenset(
    {".dcm", ".dicom", ".dic", "", ".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
)
PERCENTILES = (0.5, 99.5)  # robust auto-window, in percent of pixels
_SAMPLE_PIXELS = 262_144  # enough pixels for stable percentiles at a fraction of the cost

# Safe DICOM tags to keep in ImageInfo.metadata; none identifies a patient, a site or a date.
METADATA_TAGS = (
    "Modality", "ViewPosition", "BodyPartExamined", "ImageLaterality", "PhotometricInterpretation",
    "Rows", "Columns", "BitsAllocated", "BitsStored", "SamplesPerPixel", "NumberOfFrames", "Manufacturer",
    "ManufacturerModelName", "PixelSpacing", "ImagerPixelSpacing", "RescaleSlope", "RescaleIntercept",
    "WindowCenter", "WindowWidth", "VOILUTFunction", "PresentationLUTShape", "PresentationIntentType",
)  # fmt: skip
# The only tags parsed at all: the safe ones plus what decoding and the LUTs need.
_READ_TAGS = METADATA_TAGS + (
    "SpecificCharacterSet", "HighBit", "PixelRepresentation", "PlanarConfiguration", "RescaleType",
    "ModalityLUTSequence", "VOILUTSequence", "ExtendedOffsetTable", "ExtendedOffsetTableLengths",
    "PixelData", "FloatPixelData", "DoubleFloatPixelData",
)  # fmt: skip
_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"BM", "BMP"),
)  # fmt: skip
_FORMATS = "DICOM, JPEG, PNG, BMP, TIFF, WebP or GIF"


@dataclass(frozen=True)
class ImageInfo:
    """What was read: format, size in pixels, bit depth, photometric, and the window applied.

    ``window`` is (center, width) in modality units (DICOM only); ``window_source`` is one of
    "file", "voi_lut", "caller", "percentile", "none". ``value_range`` is (min, max) after the
    modality LUT (DICOM only), for window sliders. ``photometric`` is the DICOM Photometric
    Interpretation, or the Pillow mode ("L", "RGB", "I;16"...) for other formats.
    """

    format: str
    width: int
    height: int
    bit_depth: int
    photometric: str
    window: tuple[float, float] | None = None
    window_source: str = "none"
    value_range: tuple[float, float] | None = None
    frames: int = 1
    inverted: bool = False
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class LoadedImage:
    """``pixels``: float32 (height, width) in [0, 1], lungs dark and bone bright.

    ``values`` (DICOM only, else None): float32 (height, width) modality values, i.e. the stored
    values after Rescale Slope/Intercept or the Modality LUT, before the window (what a viewer's hover shows).
    """

    pixels: np.ndarray
    info: ImageInfo
    values: np.ndarray | None = None


def is_image_name(name: str) -> bool:
    """True for file names ``load`` may read: known suffixes, no suffix, or DICOM UID-like names."""
    path = PurePath(name)
    if not path.name or path.name.startswith("."):
        return False
    suffix = path.suffix.lower()
    return suffix in IMAGE_EXTENSIONS or suffix[1:].isdigit()


def load(
    source: str | PathLike | bytes,
    filename: str | None = None,
    *,
    window: tuple[float, float] | None = None,
    max_pixels: int = MAX_PIXELS,
) -> LoadedImage:
    """Read an image file (path or bytes) as float32 HxW in [0, 1]; raises only UnreadableImageError.

    ``filename`` is only a hint for extension-less DICOM; ``window`` is a (center, width) in
    modality units that replaces the DICOM file's own; ``max_pixels`` caps width x height,
    checked from the header before any decoding.
    """
    try:
        if window is not None and not float(window[1]) > 0:
            raise UnreadableImageError(f"The window width must be positive, got {window[1]}. Choose a wider one.")
        with ExitStack() as stack:
            fp, name = _open(source, filename, stack)
            head = fp.read(132)
            fp.seek(0)
            if not head:
                raise UnreadableImageError("The file is empty (0 bytes): the upload or copy did not complete. "
                                           "Export the image again and retry.")
            fmt = _sniff(head, name)
            if fmt is None:
                raise UnreadableImageError(f"This is {_describe(head)}, not an image. "
                                           f"Upload a chest X-ray as {_FORMATS}.")
            if fmt == "DICOM":
                return _read_dicom(fp, window, max_pixels)
            return _read_pillow(fp, fmt, max_pixels)
    except UnreadableImageError:
        raise
    except MemoryError as exc:
        raise UnreadableImageError("The image is too large to load in the available memory. "
                                   "Export a smaller image and retry.") from exc
    except Exception as exc:  # the boundary: nothing but UnreadableImageError leaves load()
        raise UnreadableImageError(f"The image could not be read (unexpected {type(exc).__name__}). "
                                   f"Check that it is a chest X-ray in {_FORMATS} format, "
                                   "or export it again.") from exc


def _open(source: str | PathLike | bytes, filename: str | None, stack: ExitStack) -> tuple[BinaryIO, str]:
    if isinstance(source, bytes | bytearray | memoryview):
        return io.BytesIO(bytes(source)), filename or ""
    if not isinstance(source, str | PathLike):
        raise UnreadableImageError(f"Expected a file path or the file's bytes, got {type(source).__name__}.")
    try:
        fp = stack.enter_context(open(source, "rb"))  # noqa: SIM115 - closed by the ExitStack
    except OSError as exc:
        # No path in the message: file names may carry patient names.
        raise UnreadableImageError("The file could not be found or opened. Check that it still exists "
                                   "and that you may read it, then retry.") from exc
    return fp, filename or Path(source).name


def _sniff(head: bytes, name: str) -> str | None:
    """The format from the magic number; raw DICOM (no preamble) from its first tag group."""
    if head[128:132] == b"DICM" or head[:4] == b"DICM":
        return "DICOM"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt
    group, element = int.from_bytes(head[0:2], "little"), int.from_bytes(head[2:4], "little")
    if group in (0x0002, 0x0008) and element <= 0x00FF:
        return "DICOM"
    if PurePath(name).suffix.lower() in (".dcm", ".dicom", ".dic"):
        return "DICOM"
    return None


def _describe(head: bytes) -> str:
    """What a non-image file probably is, in words."""
    start = head.lstrip().lower()
    if head.startswith(b"%PDF"):
        return "a PDF document"
    if start.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "a web page (HTML)"
    if start.startswith((b"<?xml", b"<svg")):
        return "an XML or SVG file"
    if head.startswith(b"PK\x03\x04"):
        return "a ZIP archive (extract it first)"
    if not any(byte < 9 or 13 < byte < 32 for byte in head):  # no control bytes: plain (UTF-8) text
        return "a text file"
    return "a file of an unknown format"


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width < 1 or height < 1:
        raise UnreadableImageError("The image has no pixels (width or height is 0). Export it again and retry.")
    if width * height > max_pixels:
        raise UnreadableImageError(f"The image is too large: {width} x {height} = {width * height:,} pixels, "
                                   f"over the limit of {max_pixels:,}. Export a smaller version and retry.")


def _damaged(fmt: str) -> UnreadableImageError:
    return UnreadableImageError(f"The {fmt} file is damaged or incomplete (truncated), so its image cannot be "
                                "decoded. Download or export it again and retry.")


def _read_pillow(fp: BinaryIO, fmt: str, max_pixels: int) -> LoadedImage:
    try:
        im = Image.open(fp, formats=[fmt])
    except Image.DecompressionBombError as exc:
        raise UnreadableImageError(f"The image is too large (over the limit of {max_pixels:,} pixels). "
                                   "Export a smaller version and retry.") from exc
    except Exception as exc:
        raise _damaged(fmt) from exc
    _check_pixels(*im.size, max_pixels)
    try:
        im.load()  # decodes now, so a truncated file fails here instead of coming out half grey
        frames = getattr(im, "n_frames", 1)
    except Exception as exc:
        raise _damaged(fmt) from exc
    metadata = {"PillowMode": im.mode}
    orientation = im.getexif().get(0x0112, 1)
    if orientation in range(2, 9):
        im = ImageOps.exif_transpose(im)
        metadata["ExifOrientation"] = str(orientation)
    pixels, bit_depth = _pillow_gray(im)
    if im.mode not in ("1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        metadata["Conversion"] = f"{im.mode} to grayscale (ITU-R 601 luma)"
    height, width = pixels.shape
    return LoadedImage(pixels, ImageInfo(format=fmt, width=width, height=height, bit_depth=bit_depth,
                                         photometric=metadata["PillowMode"], frames=frames, metadata=metadata))


def _pillow_gray(im: Image.Image) -> tuple[np.ndarray, int]:
    """A decoded Pillow image as float32 HxW in [0, 1] and its bits per sample."""
    mode = im.mode
    if mode.startswith("I;16"):
        return np.asarray(im).astype(np.float32) / np.float32(65535), 16
    if mode in ("I", "F"):
        arr = np.nan_to_num(np.asarray(im).astype(np.float32))
        lo, hi = float(arr.min()), float(arr.max())
        if mode == "I" and lo >= 0 and hi <= 65535:  # 16-bit data widened to int32 by some plugins
            return arr / np.float32(65535), 16
        if mode == "F" and lo >= 0 and hi <= 1:
            return arr, 32
        return (arr - lo) / np.float32(max(hi - lo, 1e-12)), 32
    if mode in ("LA", "La"):
        im = im.getchannel(0)
    elif mode not in ("L", "1", "RGB", "RGBA", "P"):
        im = im.convert("RGB")
    if im.mode != "L":
        im = im.convert("L")
    return np.asarray(im).astype(np.float32) / np.float32(255), 1 if mode == "1" else 8


def _read_dicom(fp: BinaryIO, window: tuple[float, float] | None, max_pixels: int) -> LoadedImage:
    try:
        ds = pydicom.dcmread(fp, force=True, specific_tags=list(_READ_TAGS))
    except Exception as exc:
        raise UnreadableImageError("The DICOM file could not be parsed: it is damaged or incomplete. "
                                   "Export it again from the PACS or modality and retry.") from exc
    if not any(tag in ds for tag in _PIXEL_TAGS) or "Rows" not in ds or "Columns" not in ds:
        raise UnreadableImageError("The DICOM file contains no image (no Pixel Data): it may be a report, "
                                   "structured report or presentation state. Export the image itself and retry.")
    rows, cols, frames = int(ds.Rows), int(ds.Columns), int(ds.get("NumberOfFrames") or 1)
    _check_pixels(cols, rows, max_pixels)
    meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    if "TransferSyntaxUID" not in meta:  # no file meta header: infer from how the dataset parsed
        implicit, little = ds.original_encoding
        explicit = ExplicitVRBigEndian if little is False else ExplicitVRLittleEndian
        meta.TransferSyntaxUID = explicit if implicit is False else ImplicitVRLittleEndian
        ds.file_meta = meta
    syntax = meta.TransferSyntaxUID
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric == "PALETTE COLOR":
        raise UnreadableImageError("This DICOM stores a palette-colour image, not a radiograph. "
                                   "Export the X-ray as MONOCHROME or RGB and retry.")
    try:
        arr = pixel_array(ds, index=0)  # the first frame only, even for multi-frame files
    except Exception as exc:
        raise UnreadableImageError(f"The DICOM image data could not be decoded ({syntax.name}): the compressed "
                                   "pixel data is corrupt or uses an unsupported compression. Re-export the image "
                                   "(uncompressed or standard JPEG) from the PACS or modality and retry.") from exc
    metadata = {key: str(ds[key].value) for key in METADATA_TAGS if key in ds}
    metadata["TransferSyntax"] = syntax.name
    bits = int(ds.get("BitsStored") or arr.dtype.itemsize * 8)
    if arr.ndim == 3:  # colour (decoded to RGB by pydicom): luma, on the stored scale
        values = arr.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        metadata["Conversion"] = f"{photometric} to grayscale (ITU-R 601 luma)"
    elif "ModalityLUTSequence" in ds:
        values = apply_modality_lut(arr, ds).astype(np.float32)
    else:
        values = arr.astype(np.float32)
        slope, intercept = float(ds.get("RescaleSlope") or 1.0), float(ds.get("RescaleIntercept") or 0.0)
        if (slope, intercept) != (1.0, 0.0):
            values *= np.float32(slope)
            values += np.float32(intercept)
    if arr.dtype.kind == "f":  # float pixel data may hold NaN or infinities
        np.nan_to_num(values, copy=False, posinf=0.0, neginf=0.0)
    value_range = (float(values.min()), float(values.max()))
    modality = values.copy()  # windowing works in place
    pixels, used, source = _apply_window(values, ds, window, arr.ndim == 3, bits)
    # DX requires Presentation LUT Shape INVERSE with MONOCHROME1: the same single inversion, not a second one.
    inverted = photometric == "MONOCHROME1"
    if inverted:
        np.subtract(np.float32(1), pixels, out=pixels)
    info = ImageInfo(format="DICOM", width=cols, height=rows, bit_depth=bits, photometric=photometric,
                     window=used, window_source=source, value_range=value_range, frames=frames,
                     inverted=inverted, metadata=metadata)
    return LoadedImage(pixels, info, modality)


def _apply_window(values: np.ndarray, ds: pydicom.Dataset, window: tuple[float, float] | None, colour: bool,
                  bits: int) -> tuple[np.ndarray, tuple[float, float] | None, str]:
    """Map modality values to [0, 1] in place: the caller's window, the file's VOI LUT or window, else percentiles.

    Returns (pixels, (center, width) or None, window_source).
    """
    if window is not None:
        center, width = float(window[0]), float(window[1])
        return _linear(values, center, width, "LINEAR"), (center, width), "caller"
    if colour:
        top = 2.0**bits - 1
        return _linear(values, top / 2, top, "LINEAR_EXACT"), None, "none"
    if ds.get("VOILUTSequence"):
        return _voi_lut(values, ds.VOILUTSequence[0]), None, "voi_lut"
    step = max(1, int(np.sqrt(values.size / _SAMPLE_PIXELS)))
    sample = values[::step, ::step]
    lo, hi = (float(v) for v in np.percentile(sample, PERCENTILES))
    if "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = (float(_first(ds[key].value)) for key in ("WindowCenter", "WindowWidth"))
        inside = np.count_nonzero((sample >= center - width / 2) & (sample <= center + width / 2)) / sample.size
        # A stored window that leaves most pixels saturated, or squeezes them into a sliver of grey, is wrong
        # for this pixel data (re-encoded files keep stale windows), so it falls back to the percentiles.
        if width > 0 and inside >= 0.2 and width <= 10 * max(hi - lo, 1.0):
            function = str(ds.get("VOILUTFunction", "LINEAR")).upper()
            return _linear(values, center, width, function), (center, width), "file"
    center, width = (lo + hi) / 2, max(hi - lo, 1.0)
    return _linear(values, center, width, "LINEAR_EXACT"), (center, width), "percentile"


def _first(value: object) -> object:
    return value[0] if isinstance(value, list | tuple | MultiValue) else value


def _linear(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing to [0, 1], in place on float32 ``values``."""
    if function == "SIGMOID":
        out = 1.0 / (1.0 + np.exp(-4.0 * (values - center) / max(width, 1e-6)))
        return out.astype(np.float32)
    if function == "LINEAR_EXACT":
        low, span = center - width / 2, max(width, 1e-6)
    else:
        low, span = center - 0.5 - (width - 1) / 2, max(width - 1, 1e-6)
    values -= np.float32(low)
    values *= np.float32(1 / span)
    return np.clip(values, 0, 1, out=values)


def _voi_lut(values: np.ndarray, item: pydicom.Dataset) -> np.ndarray:
    """Apply a VOI LUT Sequence item, scaled by the LUT's own output range to [0, 1]."""
    entries, first, _ = (int(v) for v in item.LUTDescriptor)
    data = item.LUTData
    lut = np.frombuffer(data, dtype="<u2") if isinstance(data, bytes) else np.asarray(data, dtype=np.float32)
    lut = lut.astype(np.float32)[: entries or 65536]
    lo, hi = float(lut.min()), float(lut.max())
    index = np.clip(np.rint(values) - first, 0, lut.size - 1).astype(np.intp)
    return (lut[index] - lo) / np.float32(max(hi - lo, 1e-6))
