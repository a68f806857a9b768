"""Reading chest X-rays (DICOM, JPEG, PNG, BMP, TIFF, WebP, GIF) into float32 HxW in [0, 1].

One entry point, ``load(source, filename)``: the format is detected from the bytes, never from
the extension; the result is grayscale with lungs dark and bone bright, plus an ``ImageInfo``
saying what was read. Every failure ends as ``UnreadableImageError`` with a message a clinician
can act on. DICOM files are parsed for a fixed list of non-identifying tags only, so patient
data never enters memory, the record or an error message.
"""

from __future__ import annotations

import io
import os
import re
import stat
import warnings
import zlib
from contextlib import ExitStack
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path, PurePath
from typing import BinaryIO

import numpy as np
import pydicom
from PIL import Image, ImageOps
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import get_frame
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset, read_partial, read_preamble
from pydicom.filewriter import write_file_meta_info
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, pixel_array
from pydicom.tag import Tag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

import cxr_core
from cxr_core import errors, limits
from cxr_core.errors import UnreadableImageError, quoted

MAX_PIXELS = limits.MAX_PIXELS
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
    "PixelPaddingValue", "PixelPaddingRangeLimit",
    "PixelData", "FloatPixelData", "DoubleFloatPixelData",
)  # fmt: skip
_READ_TAG_NUMBERS = [Tag(keyword) for keyword in _READ_TAGS]
_READS_PER_ELEMENT = 4  # pydicom reads a data element with 1-3 calls (tag and length, long length, value)
_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
UID = re.compile(r"[0-9]+(\.[0-9]+)*")  # a UID's characters (PS3.5 9.1); at most 64 of them
_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"II+\x00", "TIFF"), (b"MM\x00+", "TIFF"), (b"BM", "BMP"),
)  # fmt: skip
_FORMATS = "DICOM, JPEG, PNG, BMP, TIFF, WebP or GIF"
PALETTE = ("This DICOM stores a palette-colour image, not a radiograph. Export the X-ray as MONOCHROME or RGB and "
           "retry.")


def _photometric(ds: pydicom.Dataset) -> str:
    """PhotometricInterpretation upper-cased; missing or empty (both seen in the wild) reads as MONOCHROME2."""
    return str(ds.get("PhotometricInterpretation", "") or "").strip().upper() or "MONOCHROME2"
BACKGROUND = "black"  # what transparent pixels are composited on: the dark surround of a film on a viewer


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
    # A colour DICOM's colourfulness (``colourfulness_of`` its decoded RGB): the quality check's colour rule reads
    # other formats from the file, which for a DICOM takes a decoder. None for grey films and other formats.
    colourfulness: float | None = None
    # A film shown through its VOI LUT has no window: the window its presets start from instead (the file's
    # WindowCenter/Width where it holds one, else the 0.5-99.5 percentiles), so that one hot pixel in the value
    # range does not make them blank. None for other films.
    reference_window: tuple[float, float] | None = None


@dataclass(frozen=True)
class LoadedImage:
    """``pixels``: float32 (height, width) in [0, 1], lungs dark and bone bright.

    ``values`` (DICOM only, else None): float32 (height, width) modality values, i.e. the stored
    values after Rescale Slope/Intercept or the Modality LUT, before the window (what a viewer's hover shows).
    """

    pixels: np.ndarray
    info: ImageInfo
    values: np.ndarray | None = None


# ImageInfo.metadata keys that say what the reader changed
NOTES = ("Exif", "Transparency", "NonFinitePixels", "Conversion", "Polarity", "Presentation", "Frames",
         "BitPosition")


def colourfulness_of(rgb: np.ndarray) -> float:
    """Hasler-Suesstrunk colourfulness of an RGB array on the 0-255 scale (0 = grey, about 30+ = a colourful
    photo)."""
    rgb = np.asarray(rgb, dtype=np.float32)
    if rgb.ndim != 3 or rgb.shape[-1] < 3:
        return 0.0
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    rg, yb = r - g, 0.5 * (r + g) - b
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


def reading_notes(info: ImageInfo, cautions: bool = False) -> list[str]:
    """What the reader changed in the picture or left out (composited transparency, non-finite samples, colour to
    gray, a MONOCHROME2 film whose values run the wrong way or whose header asks for it inverted, the frames after
    the first). ``cautions``: only what should travel with a result (not the colour-to-gray conversion, routine
    for grey films saved as RGB or YBR; a truly colourful picture is flagged by the quality check)."""
    return [f"{key}: {info.metadata[key]}" for key in NOTES
            if key in info.metadata and not (cautions and key == "Conversion")]


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
    cxr_core.keep_dicom_values_out_of_logs()
    try:
        if window is not None and not (np.isfinite(window).all() and float(window[1]) > 0):
            raise UnreadableImageError(f"The window width must be positive and the window finite, got "
                                       f"{tuple(window)}. Choose another window.")
        with ExitStack() as stack:
            fp, name, size = _open(source, filename, stack)
            if size > limits.MAX_FILE_BYTES:
                raise UnreadableImageError(limits.file_too_large(size))
            head = fp.read(132)
            fp.seek(0)
            if not head:
                raise UnreadableImageError("The file is empty (0 bytes): the upload or copy did not complete. "
                                           "Export the image again and retry.")
            fmt = _sniff(head, name)
            if fmt is None:
                raise UnreadableImageError(f"This is {_describe(head)}, not an image. "
                                           f"Upload a chest X-ray as {_FORMATS}.")
            if fmt == "NOT DICOM":
                raise UnreadableImageError("The file is named like a DICOM file but is not one: it has neither the "
                                           "DICM marker nor a DICOM data element at its start. Export the image "
                                           "again from the PACS or modality and retry.")
            loaded = _read_dicom(fp, window, max_pixels) if fmt == "DICOM" else _read_pillow(fp, fmt, max_pixels)
            _check_result(loaded.pixels)
            return loaded
    except UnreadableImageError:
        raise
    except MemoryError as exc:
        raise UnreadableImageError(errors.TOO_LARGE_FOR_MEMORY) from exc
    except Exception as exc:  # the boundary: nothing but UnreadableImageError leaves load()
        raise UnreadableImageError(errors.UNEXPECTED_READ.format(kind=type(exc).__name__) +
                                   f"Check that it is a chest X-ray in {_FORMATS} format, "
                                   "or export it again.") from exc


def _check_result(pixels: np.ndarray) -> None:
    """The reader's promise, checked once for every format: finite float32 HxW in [0, 1]."""
    if pixels.ndim != 2 or pixels.dtype != np.float32 or not np.isfinite(pixels).all():
        raise UnreadableImageError("The image's pixel values could not be turned into a picture (they are not "
                                   "finite numbers). Export the image again and retry.")
    if pixels.size and not (float(pixels.min()) >= 0.0 and float(pixels.max()) <= 1.0):
        raise UnreadableImageError("The image's pixel values fall outside the displayable range. "
                                   "Export the image again and retry.")


def _open(source: str | PathLike | bytes, filename: str | None, stack: ExitStack) -> tuple[BinaryIO, str, int]:
    """The source as a binary file, its name and its size in bytes; paths must be regular files."""
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        return io.BytesIO(data), filename or "", len(data)
    if not isinstance(source, str | PathLike):
        raise UnreadableImageError(f"Expected a file path or the file's bytes, got {type(source).__name__}.")
    try:
        # Non-blocking, so a FIFO opens at once instead of waiting for a writer; checked to be a file below.
        fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        # No path in the message: file names may carry patient names.
        raise UnreadableImageError("The file could not be found or opened. Check that it still exists "
                                   "and that you may read it, then retry.") from exc
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise UnreadableImageError("This is not a regular file (a folder, device, pipe or socket), so it cannot "
                                   "be an image. Choose an image file.")
    fp = stack.enter_context(os.fdopen(fd, "rb"))
    return fp, filename or Path(source).name, int(info.st_size)


def pillow_format(head: bytes) -> str | None:
    """The Pillow format the reader opens a file starting with ``head`` (its first 132 bytes) as; None for a DICOM
    (whatever its preamble looks like) and for what the reader does not take."""
    fmt = _sniff(head, "")
    return fmt if fmt not in (None, "DICOM", "NOT DICOM") else None


def _sniff(head: bytes, name: str) -> str | None:
    """The format from the magic number; raw DICOM (no preamble) from its first tag group.

    "NOT DICOM" for a file named .dcm that starts like no DICOM file: refused before a forced parse.
    """
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
        return "DICOM" if _first_element_plausible(head) else "NOT DICOM"
    return None


def _first_element_plausible(head: bytes) -> bool:
    """Whether ``head`` starts with a data element of a raw DICOM dataset (any byte order, any VR encoding).

    The first element of a dataset without a preamble is in an even group between the file meta (0002)
    and the pixel data (7FE0): zero bytes (group 0000) or text are not.
    """
    if len(head) < 8:
        return False
    explicit = all(0x41 <= byte <= 0x5A for byte in head[4:6])  # a VR: two capital letters
    implicit_length = int.from_bytes(head[4:8], "little")
    for order, ok in (("little", explicit or implicit_length < limits.MAX_FILE_BYTES or implicit_length == 0xFFFFFFFF),
                      ("big", explicit)):
        group = int.from_bytes(head[0:2], order)  # type: ignore[arg-type]
        if ok and 0x0002 <= group <= 0x7FE0 and group % 2 == 0:
            return True
    return False


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
        raise _undecodable(fp, fmt) from exc
    _check_pixels(*im.size, max_pixels)
    try:
        im.load()  # decodes now, so a truncated file fails here instead of coming out half grey
    except Exception as exc:
        raise _undecodable(fp, fmt) from exc
    metadata = {"PillowMode": im.mode}
    opened = im
    unreadable = "its EXIF block could not be read: the picture is shown as stored, not turned as a camera may ask"
    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception:  # a damaged EXIF block (PNG, WebP) around a sound picture: read it as it is stored
        orientation, metadata["Exif"] = None, unreadable
    if orientation in range(2, 9):
        try:
            im = ImageOps.exif_transpose(im)  # a new image: its frames are counted on the file's
            metadata["ExifOrientation"] = str(orientation)
        except Exception:
            metadata["Exif"] = unreadable
    inverted = _tiff_min_is_white(opened) and im.mode.startswith(("I", "F"))  # Pillow inverts only 8-bit ones
    pixels, bit_depth, notes = _pillow_gray(im, invert=inverted)
    metadata.update(notes)
    if inverted:
        metadata["Polarity"] = ("the TIFF states that its lowest value is white (PhotometricInterpretation "
                                "WhiteIsZero, as DICOM's MONOCHROME1): shown inverted, lungs dark")
    mode = im.mode  # before counting frames, which moves the file's image to its later frames
    frames = _frame_count(opened)
    if frames > 1:  # a multi-page TIFF or an animated GIF, as a DICOM with several frames
        metadata["Frames"] = frames_note(frames, counted_all=frames < _MAX_FRAMES_COUNTED)
    if mode not in ("1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        metadata["Conversion"] = f"{mode} to grayscale (ITU-R 601 luma)"
    height, width = pixels.shape
    return LoadedImage(pixels, ImageInfo(format=fmt, width=width, height=height, bit_depth=bit_depth,
                                         photometric=metadata["PillowMode"], frames=frames, inverted=inverted,
                                         metadata=metadata))


_MAX_FRAMES_COUNTED = 1000


def _tiff_min_is_white(im: Image.Image) -> bool:
    try:
        return im.format == "TIFF" and int(im.tag_v2.get(262, -1)) == 0
    except Exception:  # noqa: BLE001 - a damaged tag states nothing
        return False


def frames_note(frames: int, counted_all: bool = True) -> str:
    """The reading note of a file with several frames (pages): only the first is shown and classified."""
    count = str(frames) if counted_all else f"at least {frames}"
    return f"{count} frames in the file: only the first is shown and classified"


def _frame_count(im: Image.Image) -> int:
    """How many frames (pages) the file holds, counted to at most ``_MAX_FRAMES_COUNTED``: Pillow's ``n_frames``
    walks a TIFF's every page at a cost that grows with the square of their number (40,000 chained pages in a
    4.6 MB file took 40 s, a 200 MB one would take hours). Only the first frame is read, so a damaged later
    frame only ends the count."""
    if im.format != "TIFF":  # a GIF's n_frames skips its frames without decoding them (seek would decode each)
        try:
            return int(getattr(im, "n_frames", 1))
        except Exception:  # a damaged later frame (an animation cut short): the first one was read
            return 1
    count = 1
    try:
        while count < _MAX_FRAMES_COUNTED:
            im.seek(count)
            count += 1
    except Exception:  # EOFError at the end; a damaged page (TypeError, SyntaxError, KeyError...) ends it too
        pass
    return count


_LOSSLESS_SOF = {0xC3: "lossless JPEG (process 14)", 0xC7: "lossless JPEG (process 14)", 0xCB: "lossless JPEG",
                 0xCF: "lossless JPEG", 0xF7: "JPEG-LS"}


def _undecodable(fp: BinaryIO, fmt: str) -> UnreadableImageError:
    """Why a file Pillow could not decode failed: damaged, or (for an intact JPEG coded in a way Pillow does not
    decode: lossless JPEG or JPEG-LS, as some modalities export) a coding that exporting the same way again would
    not help with."""
    try:
        fp.seek(0)
        head = fp.read(1 << 20) if fmt == "JPEG" else b""
    except Exception:  # noqa: BLE001 - only a better message was at stake
        head = b""
    at = _jpeg_sof(head)
    kind = _LOSSLESS_SOF.get(head[at + 1]) if at is not None else None
    if kind is None:
        return _damaged(fmt)
    return UnreadableImageError(f"This JPEG file is coded as {kind}, which this reader cannot decode. Export the "
                                "image as PNG, as a standard (baseline) JPEG or as DICOM, and retry.")


def _scaled_by_bits_used(values: np.ndarray, notes: dict[str, str]) -> np.ndarray:
    """16-bit samples to [0, 1] by the bits they use: 10-, 12- and 14-bit detector data saved in a 16-bit PNG or
    TIFF (values up to 1023, 4095 or 16383) would come out nearly black divided by 65535, and be called blank.
    The full 16 bits are used as they are."""
    peak = float(values.max(initial=0.0))
    bits = min(max(int(np.ceil(np.log2(peak + 1))), 8), 16) if peak > 0 else 16
    if bits < 16:
        notes["BitsUsed"] = f"{bits}-bit values in a 16-bit image: scaled to {2 ** bits - 1} as white"
    return values / np.float32(2 ** bits - 1)


def _pillow_gray(im: Image.Image, invert: bool = False) -> tuple[np.ndarray, int, dict[str, str]]:
    """A decoded Pillow image as float32 HxW in [0, 1], its bits per sample, and notes on what was changed.

    Transparent pixels are composited on black (``BACKGROUND``), as a dark viewer shows them; float
    samples that are NaN or infinite count as missing and become black. ``invert`` (a 16-bit or float TIFF whose
    lowest value is white; Pillow inverts 8-bit ones itself) inverts the picture, those pixels staying black.
    """
    mode, notes = im.mode, {}
    if mode.startswith("I;16"):
        arr = np.asarray(im).astype(np.float32)
        clear = _transparent(im, arr)
        if clear is not None:
            arr[clear] = 0  # before the scale is found: a transparent white must not set it
            notes["Transparency"] = f"transparent pixels composited on {BACKGROUND}"
        return _inverted(_scaled_by_bits_used(arr, notes), invert, clear), 16, notes
    if mode in ("I", "F"):
        arr = np.asarray(im).astype(np.float64)
        finite = np.isfinite(arr)
        if not finite.any():
            raise UnreadableImageError("The image holds no finite pixel values (all NaN or infinite). "
                                       "Export it again as an ordinary 8- or 16-bit image.")
        if not finite.all():
            notes["NonFinitePixels"] = f"{int(arr.size - finite.sum()):,} NaN or infinite pixels shown black"
        clear = _transparent(im, arr) if mode == "I" else None
        if clear is not None:
            finite &= ~clear
            if not finite.any():
                raise UnreadableImageError("Every pixel of the image is transparent: there is no picture to read. "
                                           "Export it again without transparency.")
            notes["Transparency"] = f"transparent pixels composited on {BACKGROUND}"
        lo, hi = float(arr[finite].min()), float(arr[finite].max())
        arr = np.where(finite, arr, lo)  # missing: not the scale; black after it (``_inverted``)
        missing = None if finite.all() else ~finite
        if mode == "I" and lo >= 0 and hi <= 65535:  # 16-bit data widened to int32 by some plugins
            return _inverted(_scaled_by_bits_used(arr.astype(np.float32), notes), invert, missing), 16, notes
        if mode == "F" and lo >= 0 and hi <= 1:
            return _inverted(arr.astype(np.float32), invert, missing), 32, notes
        return _inverted(((arr - lo) / max(hi - lo, 1e-300)).astype(np.float32), invert, missing), 32, notes
    if "A" in mode or "a" in mode or "transparency" in im.info:
        rgba = im.convert("RGBA")
        if rgba.getextrema()[3][0] < 255:  # some pixel is (partly) transparent
            notes["Transparency"] = f"transparent pixels composited on {BACKGROUND}"
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("L")
    elif mode not in ("L", "1", "RGB", "P"):
        im = im.convert("RGB")
    if im.mode != "L":
        im = im.convert("L")
    return np.asarray(im).astype(np.float32) / np.float32(255), 1 if mode == "1" else 8, notes


def _inverted(pixels: np.ndarray, invert: bool, black: np.ndarray | None) -> np.ndarray:
    """``pixels`` (float32 in [0, 1]) inverted if asked, the ``black`` ones (transparent, missing) black after it."""
    if invert:
        np.subtract(np.float32(1), pixels, out=pixels)
    if black is not None:
        pixels[black] = 0
    return pixels


def _transparent(im: Image.Image, arr: np.ndarray) -> np.ndarray | None:
    """The pixels a 16- or 32-bit grey image's transparency value (a PNG's tRNS) marks, or None when none is."""
    key = im.info.get("transparency")
    if not isinstance(key, (int, float)) or isinstance(key, bool):
        return None
    clear = arr == key
    return clear if clear.any() else None


class _TooManyElements(Exception):
    pass


class _Budgeted:
    """A binary file whose ``read`` calls are counted: pydicom reads each data element's header with a call
    or two, nested sequence items included, so the count bounds the parse's work whatever the nesting."""

    def __init__(self, fp: BinaryIO, reads: int):
        self._fp, self._left = fp, reads
        self.name = getattr(fp, "name", None)

    def read(self, size: int = -1) -> bytes:
        self._left -= 1
        if self._left < 0:
            raise _TooManyElements
        return self._fp.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._fp.seek(offset, whence)

    def tell(self) -> int:
        return self._fp.tell()


def read_header(data: bytes) -> pydicom.Dataset:
    """Every data element of a DICOM file (bytes) before its pixel data, under the reader's limits: its size,
    a Deflated dataset inflated in a bounded stream, the element budget. For code that needs the whole header
    (a PACS film's patient and study modules), not only the tags ``load`` reads. Raises UnreadableImageError."""
    cxr_core.keep_dicom_values_out_of_logs()
    if len(data) > limits.MAX_FILE_BYTES:
        raise UnreadableImageError(limits.file_too_large(len(data)))
    fp, _ = _inflate(io.BytesIO(data), MAX_PIXELS)
    return _parse(fp, stop_at_pixels=True, every_tag=True)


def _parse(fp: BinaryIO, *, stop_at_pixels: bool, every_tag: bool = False) -> pydicom.Dataset:
    fp.seek(0)
    stop_when = (lambda tag, vr, length: tag >= 0x7FE00000) if stop_at_pixels else None
    try:
        budgeted = _Budgeted(fp, _READS_PER_ELEMENT * limits.MAX_DICOM_ELEMENTS)
        return read_partial(budgeted, stop_when=stop_when, force=True,  # type: ignore[arg-type]
                            specific_tags=None if every_tag else _READ_TAG_NUMBERS)
    except _TooManyElements as exc:
        raise UnreadableImageError(f"The DICOM file holds more than {limits.MAX_DICOM_ELEMENTS:,} data elements, "
                                   "far more than any radiograph: it is damaged or not an image. Export the image "
                                   "again from the PACS or modality and retry.") from exc
    except Exception as exc:
        raise UnreadableImageError("The DICOM file could not be parsed: it is damaged or incomplete. "
                                   "Export it again from the PACS or modality and retry.") from exc


def _inflate(fp: BinaryIO, max_pixels: int) -> tuple[BinaryIO, str | None]:
    """A Deflated-syntax file as Explicit VR Little Endian, inflated in a stream that stops at the limit.

    The header's declared size is checked as soon as the first megabyte is inflated.

    Returns (file, the original syntax's name) or (the same file, None) for every other syntax.
    pydicom would inflate the whole dataset at once, however large it grows. A file that starts with the "DICM"
    marker but lacks the 128-byte preamble before it (pydicom would parse the marker as a tag) gets one.
    """
    fp.seek(0)
    head = fp.read(132)
    if head[:4] == b"DICM" and head[128:132] != b"DICM":
        fp.seek(0)
        fp = io.BytesIO(b"\0" * 128 + fp.read())  # bounded: the file's size was checked before
    fp.seek(0)
    try:
        read_preamble(fp, True)
        meta = FileMetaDataset(read_dataset(fp, is_implicit_VR=False, is_little_endian=True,
                                            stop_when=lambda tag, vr, length: tag >> 16 != 2))
        deflated = meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
    except Exception:  # not even a file meta: the full parse gives the message
        deflated = False
    if not deflated:
        fp.seek(0)
        return fp, None
    out = DicomBytesIO()
    out.write(b"\0" * 128 + b"DICM")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    write_file_meta_info(out, meta, enforce_standard=False)
    start, cap = out.tell(), limits.MAX_DICOM_INFLATED_BYTES
    inflater, checked = zlib.decompressobj(-zlib.MAX_WBITS), False
    try:
        while not inflater.eof and (chunk := fp.read(limits.MiB)):
            while chunk:
                out.write(inflater.decompress(chunk, 4 * limits.MiB))
                chunk = inflater.unconsumed_tail
                if not checked and out.tell() - start >= limits.MiB:
                    checked = _check_partial_header(out, max_pixels)
                if out.tell() - start > cap:
                    raise UnreadableImageError(
                        f"The compressed DICOM data inflates to more than {cap // limits.MiB} MB, over the limit for "
                        "one radiograph (a decompression bomb or a huge series). Export the single image again.")
    except zlib.error as exc:
        raise _damaged("DICOM (deflated)") from exc
    out.seek(0)
    return out, DeflatedExplicitVRLittleEndian.name


def _check_partial_header(out: BinaryIO, max_pixels: int) -> bool:
    """Check the declared size in the part inflated so far; True once the header was there to check."""
    end = out.tell()
    with warnings.catch_warnings():  # the partial dataset ends mid-element
        warnings.simplefilter("ignore")
        try:
            header = _parse(out, stop_at_pixels=True)
        except UnreadableImageError:
            header = None
    out.seek(end)
    if header is None or "Rows" not in header or "Columns" not in header:
        return False
    _declared_size(header, max_pixels)
    return True


# What a numeric tag's value may look like to be quoted in a message: digits, signs, exponents, decimal points,
# separators; or inf/nan. Anything else is not quoted: a value whose length was damaged runs on through the
# elements after it, which may be a physician's name or an admission id, and messages reach pages, CSVs and logs.
_QUOTABLE = re.compile(r"[0-9eE+\-., \\\[\]']{1,32}|[+-]?(?i:inf|infinity|nan)")


def _tag_error(tag: str, value: object, why: str, *, ours: bool = False) -> UnreadableImageError:
    """``value`` is read from the file (quoted only when it looks like a number), or ``ours`` (our own words)."""
    text = str(value)
    shown = f"'{quoted(text)}'" if ours or _QUOTABLE.fullmatch(text) else "its value, not shown"
    return UnreadableImageError(f"The DICOM tag {tag} is malformed ({shown}: {why}), so the image cannot be shown "
                                "correctly. Export the image again from the PACS or modality and retry.")


def _number(ds: pydicom.Dataset, tag: str, default: float) -> float:
    """A numeric tag's (first) value; a tag that is not one finite number raises naming the tag."""
    if tag not in ds or ds[tag].value in (None, "", b""):
        return default
    value = ds[tag].value
    try:
        number = float(_first(value))
    except (TypeError, ValueError, IndexError) as exc:
        raise _tag_error(tag, value, "not a number") from exc
    if not np.isfinite(number):
        raise _tag_error(tag, value, "not a finite number")
    return number


def _declared_size(ds: pydicom.Dataset, max_pixels: int) -> tuple[int, int, int, int]:
    """(rows, columns, frames, samples per pixel), checked against the limits before anything is decoded."""
    rows, cols = int(_number(ds, "Rows", 0)), int(_number(ds, "Columns", 0))
    frames, samples = int(_number(ds, "NumberOfFrames", 1)), int(_number(ds, "SamplesPerPixel", 1))
    bits = int(_number(ds, "BitsAllocated", 16))
    _check_pixels(cols, rows, max_pixels)
    if frames < 1 or samples not in (1, 3) or bits not in (1, 8, 16, 32, 64):
        raise _tag_error("NumberOfFrames" if frames < 1 else "SamplesPerPixel" if samples not in (1, 3)
                         else "BitsAllocated", frames if frames < 1 else samples if samples not in (1, 3) else bits,
                         "not a value an image can have")
    frame = rows * cols * samples * max(bits // 8, 1)
    if frame > limits.MAX_DICOM_FRAME_BYTES or frame * frames > limits.MAX_DICOM_PIXEL_BYTES:
        raise UnreadableImageError(
            f"The DICOM image is too large: {frames:,} frame(s) of {cols} x {rows} x {samples} samples at "
            f"{bits} bits = {frame * frames / limits.MiB:,.0f} MB decoded, over the limit of "
            f"{limits.MAX_DICOM_FRAME_BYTES // limits.MiB} MB per frame and "
            f"{limits.MAX_DICOM_PIXEL_BYTES // limits.MiB} MB in all. Export the single radiograph (one frame).")
    photometric = _photometric(ds)
    if photometric == "PALETTE COLOR":
        raise UnreadableImageError(PALETTE)
    if photometric.startswith("MONOCHROME") != (samples == 1):
        raise UnreadableImageError(
            f"The DICOM header contradicts itself: PhotometricInterpretation {quoted(photometric)} with "
            f"SamplesPerPixel {samples} (a colour image labelled grayscale, or the reverse). Export the image again "
            "and retry.")
    return rows, cols, frames, samples


def _check_native_length(ds: pydicom.Dataset, syntax: pydicom.uid.UID, rows: int, cols: int, frames: int,
                         samples: int) -> None:
    """Uncompressed pixel data must not hold (much) more than the header declares, e.g. RGB labelled MONOCHROME2."""
    if syntax.is_encapsulated or "PixelData" not in ds:
        return
    bits = int(_number(ds, "BitsAllocated", 16))
    expected = (rows * cols * frames * samples * bits + 7) // 8
    actual = len(ds.PixelData)
    if expected and actual >= 2 * expected:
        raise UnreadableImageError(
            f"The DICOM pixel data holds {actual / expected:.3g} times what its header declares (Rows x Columns x "
            f"SamplesPerPixel x NumberOfFrames), e.g. a colour image labelled "
            f"{quoted(ds.get('PhotometricInterpretation'))}. "
            "It would be shown garbled; export the image again from the PACS or modality.")


_JPEG_SOF = frozenset({*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0), 0xF7})


_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"


def _jpeg_sof(data: bytes) -> int | None:
    """Where a JPEG's frame header (SOF) starts, found by walking its marker segments from SOI: a segment's length
    skips its body, so the walk costs one step per segment however long the segments (up to 64 KiB each) are."""
    if not data.startswith(b"\xff\xd8"):
        return None
    i = 2
    while i + 10 <= len(data) and data[i] == 0xFF:
        code = data[i + 1]
        if code in _JPEG_SOF:
            return i
        if code == 0xFF:  # fill byte
            i += 1
        elif code in (0x01, *range(0xD0, 0xD8)):
            i += 2
        else:
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def _codestream_size(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) a JPEG, JPEG-LS or JPEG 2000 codestream declares; None when not found.

    The whole codestream is searched: segments or boxes placed before the frame header must not hide it (two
    legal 64 KiB APP segments once did, and the decoder was handed a 30000 x 30000 frame)."""
    if data.startswith(b"\xff\xd8"):
        i = _jpeg_sof(data)
        if i is None:
            return None
        return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big"), data[i + 9]
    if data.startswith(b"\xff\x4f\xff\x51"):  # JPEG 2000: SOC then SIZ
        at = 0
    elif data.startswith(_JP2_SIGNATURE):  # a JP2 file: the codestream sits in its jp2c box, after the others
        at = data.find(b"\xff\x4f\xff\x51")
    else:
        return None
    if at < 0 or at + 44 > len(data):
        return None
    siz = data[at + 4:]
    x, y, x0, y0 = (int.from_bytes(siz[k:k + 4], "big") for k in (4, 8, 12, 16))
    return x - x0, y - y0, int.from_bytes(siz[36:38], "big")


def _check_codestream(ds: pydicom.Dataset, syntax: pydicom.uid.UID, rows: int, cols: int, frames: int,
                      samples: int) -> None:
    """The first frame's compressed image must declare the header's size: decoders allocate what the codestream
    says (a 0.1 MB JPEG inside a 1024 x 1024 DICOM declaring 65535 x 65535 x 3 is a 12 GB decode)."""
    if not syntax.is_encapsulated or "PixelData" not in ds:
        return
    try:
        frame = get_frame(ds.PixelData, 0, number_of_frames=frames)
    except Exception:  # noqa: BLE001 - the decoder gives the message for fragments it cannot find
        return
    size = _codestream_size(bytes(frame))
    if size is None:  # RLE, or no codestream header the reader recognises: the decoder gives its own message
        return
    if size[1] == 0:  # a JPEG whose height comes later (DNL): the decoder then sizes its buffers blindly (~10 GB)
        raise UnreadableImageError(
            "The compressed image inside this DICOM does not declare its height (JPEG with a DNL marker), which "
            "this reader does not decode: the file is damaged or unusual. Export the image again from the PACS or "
            "modality and retry.")
    if size != (cols, rows, samples):
        raise UnreadableImageError(
            f"The compressed image inside this DICOM declares {size[0]} x {size[1]} pixels with {size[2]} "
            f"component(s), but the DICOM header says {cols} x {rows} with {samples}: the file is damaged or forged. "
            "Export the image again from the PACS or modality and retry.")


def _read_dicom(fp: BinaryIO, window: tuple[float, float] | None, max_pixels: int) -> LoadedImage:
    fp, deflated = _inflate(fp, max_pixels)
    header = _parse(fp, stop_at_pixels=True)  # cheap: stops before the pixel data
    meta = getattr(header, "file_meta", None)
    syntax_uid = str(meta.get("TransferSyntaxUID", "") if meta is not None else "").rstrip("\x00 ")
    if syntax_uid and (len(syntax_uid) > 64 or not UID.fullmatch(syntax_uid)):
        raise UnreadableImageError("The DICOM file's header is damaged: its transfer syntax is not a DICOM UID "
                                   "(damaged bytes, or an element length that runs into the data after it), so "
                                   "the rest of the file cannot be read reliably. Export the image again from the "
                                   "PACS or modality and retry.")
    if "Rows" not in header or "Columns" not in header:
        raise UnreadableImageError("The DICOM file contains no image (no Pixel Data): it may be a report, "
                                   "structured report or presentation state. Export the image itself and retry.")
    rows, cols, frames, samples = _declared_size(header, max_pixels)
    del header
    ds = _parse(fp, stop_at_pixels=False)
    if deflated:
        fp.close()  # the inflated copy: the dataset holds what it needs
    if not any(tag in ds for tag in _PIXEL_TAGS):
        raise UnreadableImageError("The DICOM file contains no image (no Pixel Data): it may be a report, "
                                   "structured report or presentation state. Export the image itself and retry.")
    meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    if "TransferSyntaxUID" not in meta:  # no file meta header: infer from how the dataset parsed
        implicit, little = ds.original_encoding
        explicit = ExplicitVRBigEndian if little is False else ExplicitVRLittleEndian
        meta.TransferSyntaxUID = explicit if implicit is False else ImplicitVRLittleEndian
        ds.file_meta = meta
    syntax = meta.TransferSyntaxUID
    if not syntax.is_transfer_syntax:  # a newer one (JPEG XL, HTJ2K in an old pydicom...) or a private one
        raise UnreadableImageError(f"The DICOM file uses a transfer syntax this reader does not know ({syntax}), so "
                                   "its image cannot be decoded. Re-export the image uncompressed or as standard "
                                   "JPEG or JPEG 2000 from the PACS or modality and retry.")
    _check_native_length(ds, syntax, rows, cols, frames, samples)
    _check_codestream(ds, syntax, rows, cols, frames, samples)
    photometric = _photometric(ds)
    assumed = {}
    if not str(ds.get("PhotometricInterpretation", "")).strip() and samples == 1:  # required; grey has one reading
        ds.PhotometricInterpretation = "MONOCHROME2"
        assumed["PhotometricInterpretation"] = "missing from the file: read as MONOCHROME2"
    stored_bits = ds.get("BitsStored")
    shift = 0
    try:
        arr, shift = _first_frame(ds, syntax)
    except Exception as exc:
        if syntax.is_encapsulated and "missing dependencies" in str(exc):  # pydicom: no plugin installed
            raise UnreadableImageError(errors.NO_DECODER.format(syntax=syntax.name)) from exc
        if syntax.is_encapsulated:
            raise UnreadableImageError(
                f"The DICOM image data could not be decoded ({syntax.name}): the compressed pixel data is corrupt "
                "or uses an unsupported compression. Re-export the image (uncompressed or standard JPEG) from the "
                "PACS or modality and retry.") from exc
        raise UnreadableImageError(
            "The DICOM image data could not be read: the uncompressed pixel data does not fit what the header "
            "declares (the file is cut short, or tags such as BitsAllocated, BitsStored, PixelRepresentation, "
            "PhotometricInterpretation or NumberOfFrames hold values the data cannot have). Export the image again "
            "from the PACS or modality and retry.") from exc
    metadata = {key: str(ds[key].value) for key in METADATA_TAGS if key in ds} | assumed
    metadata["TransferSyntax"] = deflated or syntax.name
    if shift:
        metadata["BitPosition"] = (f"the {stored_bits}-bit values sit in bits {shift}-{shift + int(stored_bits) - 1} "
                                   f"of each sample (HighBit {int(ds.HighBit)}): read from there")
    missing = _non_finite(arr)
    bits = int(_number(ds, "BitsStored", arr.dtype.itemsize * 8))
    values = _modality_values(arr, ds, photometric, metadata, missing)
    value_range = (float(values.min()), float(values.max()))
    modality = values.copy()  # windowing works in place
    pixels, used, source = _apply_window(values, ds, window, arr.ndim == 3, bits, _padding_mask(arr, ds))
    reference, used = (used, None) if source == "voi_lut" else (None, used)
    # DX requires Presentation LUT Shape INVERSE with MONOCHROME1: the same single inversion, not a second one.
    inverted = photometric == "MONOCHROME1"
    if frames > 1:
        metadata["Frames"] = frames_note(frames)
    if photometric == "MONOCHROME2" and arr.ndim == 2 and _presentation_inverse(ds):
        inverted = True  # PS3.3 C.11.6.1.2: INVERSE shows the minimum value as white (an explicit statement)
        metadata["Presentation"] = ("the header's Presentation LUT Shape INVERSE asks for this MONOCHROME2 film to be "
                                    "shown inverted: shown so")
    elif photometric == "MONOCHROME2" and arr.ndim == 2 and lungs_brighter_than_mediastinum(modality):
        inverted = True  # the values run opposite to the header: a converter wrote raw detector values
        metadata["Polarity"] = ("the film's values run opposite to its MONOCHROME2 header (the lung fields are "
                                "brighter than the mediastinum): shown inverted, lungs dark")
    if inverted:
        np.subtract(np.float32(1), pixels, out=pixels)
    if missing is not None:
        pixels[missing] = 0  # black whatever the inversion (MONOCHROME1, a negative slope) made of them
    info = ImageInfo(format="DICOM", width=cols, height=rows, bit_depth=bits, photometric=photometric,
                     window=used, window_source=source, value_range=value_range, frames=frames,
                     inverted=inverted, metadata=metadata, colourfulness=_dicom_colourfulness(arr, bits),
                     reference_window=reference)
    return LoadedImage(pixels, info, modality)


def _first_frame(ds: pydicom.Dataset, syntax: pydicom.uid.UID) -> tuple[np.ndarray, int]:
    """The first frame's stored values (even for a multi-frame file), and how far they were shifted down: an
    uncompressed film whose HighBit says its values sit above bit 0 and whose samples do use the bits up to it is
    read from there; one whose samples fit under BitsStored (a stale HighBit) is read from bit 0, as pydicom does."""
    shift = _bits_above_zero(ds, syntax)
    if not shift:
        return pixel_array(ds, index=0), 0
    stored = ds.BitsStored
    try:
        ds.BitsStored = int(ds.HighBit) + 1
        wide = pixel_array(ds, index=0)  # signed data sign-extended from HighBit
    finally:
        ds.BitsStored = stored
    bits = int(stored)
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1)) if wide.dtype.kind == "i" else (0, 2 ** bits)
    if wide.size and low <= int(wide.min()) and int(wide.max()) < high:  # every value fits from bit 0: a stale HighBit
        return pixel_array(ds, index=0), 0
    return wide >> shift, shift  # arithmetic for signed data: the sign stays


def _bits_above_zero(ds: pydicom.Dataset, syntax: pydicom.uid.UID) -> int:
    """How far above bit 0 an uncompressed film's stored bits sit (HighBit + 1 - BitsStored): 0 as the standard
    asks, but some old modalities stored 12-bit values in the top bits of 16, which read from bit 0 are noise."""
    if syntax.is_encapsulated or "PixelData" not in ds:
        return 0
    try:
        high, stored, allocated = int(ds.HighBit), int(ds.BitsStored), int(ds.BitsAllocated)
    except Exception:  # noqa: BLE001 - missing or damaged: pydicom reads from bit 0 as the standard says
        return 0
    shift = high + 1 - stored
    return shift if 0 < shift and stored >= 1 and high < allocated else 0


def _non_finite(arr: np.ndarray) -> np.ndarray | None:
    """The float samples that count as missing (NaN, infinite, beyond single precision), or None."""
    if arr.dtype.kind != "f" or arr.ndim != 2:
        return None
    missing = ~(np.isfinite(arr) & (np.abs(arr) <= np.finfo(np.float32).max))
    return missing if missing.any() else None


def _dicom_colourfulness(arr: np.ndarray, bits: int) -> float | None:
    """A colour film's colourfulness, on a sample of at most about 256 px a side; None for a grey one."""
    if arr.ndim != 3:
        return None
    step = max(1, max(arr.shape[:2]) // 256)
    sample = arr[::step, ::step, :3].astype(np.float32)
    top = float(2 ** min(max(bits, 1), 16) - 1) if arr.dtype.kind in "iu" else max(float(sample.max()), 1e-6)
    return colourfulness_of(np.clip(sample * np.float32(255 / top), 0, 255))


def _presentation_inverse(ds: pydicom.Dataset) -> bool:
    try:
        return str(ds.get("PresentationLUTShape", "") or "").strip().upper() == "INVERSE"
    except Exception:  # noqa: BLE001 - a malformed tag states nothing
        return False


def lungs_brighter_than_mediastinum(values: np.ndarray) -> bool:
    """Whether a frontal chest film's values run the wrong way: both lung fields (the outer fifths of the middle
    half of the film's height) brighter than the mediastinum (its central sixth) by ``limits.POLARITY_MARGIN`` of
    the film's 1-99 percentile range. A MONOCHROME1 header is an explicit statement and is not second-guessed."""
    h, w = values.shape
    step = max(1, min(h, w) // 256)
    lo, hi = np.percentile(values[::step, ::step], (1, 99))
    if not hi > lo:
        return False
    band = values[h // 4: 3 * h // 4]

    def mean(a: float, b: float) -> float:
        return float(band[:, int(w * a): int(w * b)].mean())

    lungs, center = min(mean(0.15, 0.35), mean(0.65, 0.85)), mean(0.42, 0.58)
    return (lungs - center) / (hi - lo) > limits.POLARITY_MARGIN


def _modality_values(arr: np.ndarray, ds: pydicom.Dataset, photometric: str, metadata: dict[str, str],
                     missing: np.ndarray | None = None) -> np.ndarray:
    """Stored values -> modality values (float32, finite): luma for colour, the Modality LUT or the rescale.
    ``missing``: the float samples that count as missing (``_non_finite``), set to the film's lowest value here."""
    if arr.ndim == 3:  # colour (decoded to RGB by pydicom): luma, on the stored scale
        metadata["Conversion"] = f"{photometric} to grayscale (ITU-R 601 luma)"
        return arr.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if "ModalityLUTSequence" in ds:
        try:
            return apply_modality_lut(arr, ds).astype(np.float32)
        except Exception as exc:
            raise _tag_error("ModalityLUTSequence", "LUTDescriptor/LUTData", "not a usable lookup table",
                             ours=True) from exc
    if missing is not None:  # float pixel data may hold NaN, infinities or doubles past float32: missing samples
        if missing.all():
            raise UnreadableImageError("The DICOM image holds no finite pixel values (all NaN, infinite or beyond "
                                       "single precision). Export it again as an ordinary 8- or 16-bit image.")
        metadata["NonFinitePixels"] = f"{int(missing.sum()):,} NaN or infinite pixels shown black"
        arr = np.where(missing, arr[~missing].min(), arr)
    values = arr.astype(np.float32)
    slope, intercept = _number(ds, "RescaleSlope", 1.0), _number(ds, "RescaleIntercept", 0.0)
    if slope == 0:
        raise _tag_error("RescaleSlope", ds.RescaleSlope, "zero would make every pixel the same value")
    if (slope, intercept) != (1.0, 0.0):
        peak = max(abs(float(values.min())), abs(float(values.max()))) * abs(slope) + abs(intercept)
        if not peak < limits.MAX_MODALITY_VALUE:
            raise _tag_error("RescaleSlope" if abs(slope) > 1 else "RescaleIntercept",
                             ds.get("RescaleSlope") if abs(slope) > 1 else ds.get("RescaleIntercept"),
                             "the rescaled pixel values overflow")
        values *= np.float32(slope)
        values += np.float32(intercept)
    return values


def _padding_mask(arr: np.ndarray, ds: pydicom.Dataset) -> np.ndarray | None:
    """Pixels that are padding, not anatomy (Pixel Padding Value, up to Pixel Padding Range Limit; stored values,
    PS3.3 C.7.5.1.1.2), or None when the file declares none (or everything would be padding)."""
    if arr.ndim != 2 or "PixelPaddingValue" not in ds:
        return None
    try:  # a malformed padding tag only costs the better window, never the film
        pad = _number(ds, "PixelPaddingValue", np.nan)
        limit = _number(ds, "PixelPaddingRangeLimit", pad) if "PixelPaddingRangeLimit" in ds else pad
    except Exception:  # not a number, or bytes pydicom cannot convert
        return None
    if not (np.isfinite(pad) and np.isfinite(limit)):
        return None
    mask = (arr >= min(pad, limit)) & (arr <= max(pad, limit))
    return mask if mask.any() and not mask.all() else None


def _apply_window(values: np.ndarray, ds: pydicom.Dataset, window: tuple[float, float] | None, colour: bool,
                  bits: int, padding: np.ndarray | None = None) -> tuple[np.ndarray, tuple[float, float] | None, str]:
    """Map modality values to [0, 1] in place: the caller's window, the file's VOI LUT or window, else percentiles.

    The percentiles, and the check of the file's window against the pixels, leave ``padding`` pixels out: a
    film padded to a rectangle would otherwise get a window stretched over the padding.
    Returns (pixels, (center, width) or None, window_source); for "voi_lut" the window is the one the file would
    be shown at without its LUT (``ImageInfo.reference_window``).
    """
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if window is not None:  # the file's curve goes with any window (PS3.3 C.11.2.1.3): a chosen one too
        center, width = float(window[0]), float(window[1])
        chosen = function if function in ("SIGMOID", "LINEAR_EXACT") else "LINEAR"
        return _linear(values, center, width, chosen), (center, width), "caller"
    if colour:
        top = 2.0**bits - 1
        return _linear(values, top / 2, top, "LINEAR_EXACT"), None, "none"
    (center, width), source = _file_or_percentile_window(values, ds, padding)
    if "VOILUTSequence" in ds and ds["VOILUTSequence"].value:
        try:
            little = (getattr(ds, "original_encoding", None) or (None, True))[1] is not False
            signed = ds.get("PixelRepresentation", 0) == 1 or float(values.min()) < 0
            return _voi_lut(values, ds.VOILUTSequence[0], little, signed), (center, width), "voi_lut"
        except Exception as exc:
            raise _tag_error("VOILUTSequence", "LUTDescriptor/LUTData", "not a usable lookup table", ours=True) from exc
    return _linear(values, center, width, function if source == "file" else "LINEAR_EXACT"), (center, width), source


def _file_or_percentile_window(values: np.ndarray, ds: pydicom.Dataset, padding: np.ndarray | None
                               ) -> tuple[tuple[float, float], str]:
    """The window a grey film is shown at without a VOI LUT, and its source: the file's WindowCenter/Width where
    they fit the pixels ("file"), else the 0.5-99.5 percentiles ("percentile")."""
    step = max(1, int(np.sqrt(values.size / _SAMPLE_PIXELS)))
    sample = values[::step, ::step]
    if padding is not None and not padding[::step, ::step].all():
        sample = sample[~padding[::step, ::step]]
    lo, hi = (float(v) for v in np.percentile(sample, PERCENTILES))
    # The narrowest window: one unit for whole-number values, else a millionth of their magnitude (values in
    # 0..0.1 after a small RescaleSlope must not be squeezed into a sliver of grey by a 1-unit floor).
    whole = not sample.size or bool(np.all(np.mod(sample, 1) == 0))
    floor = 1.0 if whole else 1e-6 * max(1.0, abs(lo), abs(hi))
    if "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = (_number(ds, key, np.nan) for key in ("WindowCenter", "WindowWidth"))
        inside = np.count_nonzero((sample >= center - width / 2) & (sample <= center + width / 2)) / sample.size
        # A stored window that leaves most pixels saturated, or squeezes them into a sliver of grey, is wrong
        # for this pixel data (re-encoded files keep stale windows), so it falls back to the percentiles.
        if width > 0 and inside >= 0.2 and width <= 10 * max(hi - lo, floor):
            return (center, width), "file"
    return ((lo + hi) / 2, max(hi - lo, floor)), "percentile"


def _first(value: object) -> object:
    return value[0] if isinstance(value, list | tuple | MultiValue) else value


def _linear(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing to [0, 1], in place on float32 ``values``."""
    if function == "SIGMOID":
        with np.errstate(over="ignore"):  # exp overflows to inf far from the center: 1 / inf = 0, as it should
            out = 1.0 / (1.0 + np.exp(-4.0 * (values.astype(np.float64) - center) / max(width, 1e-6)))
        return out.astype(np.float32)
    # PS3.3's LINEAR (width - 1, centre - 0.5) is meant for whole-number values: a window under 2 wide (small or
    # fractional values, e.g. after a RescaleSlope of 0.001, whether the file's window or one chosen) would leave
    # two grey levels. LINEAR_EXACT maps any width.
    if function == "LINEAR_EXACT" or width < 2:
        low, span = center - width / 2, max(width, 1e-6)
    else:
        low, span = center - 0.5 - (width - 1) / 2, max(width - 1, 1e-6)
    values -= np.float32(low)
    values *= np.float32(1 / span)
    return np.clip(values, 0, 1, out=values)


def _voi_lut(values: np.ndarray, item: pydicom.Dataset, little_endian: bool = True, signed: bool = False
             ) -> np.ndarray:
    """Apply a VOI LUT Sequence item, scaled by the LUT's own output range to [0, 1].

    LUT Data held as OW bytes is in the file's byte order (Explicit VR Big Endian files are big-endian). The first
    value mapped is signed where the values can be (PS3.3 C.11.2.1.1: a writer may store -1024 as US 64512).
    """
    entries, first, _ = (int(v) for v in item.LUTDescriptor)
    if signed and first > 32767:
        first -= 65536
    data = item.LUTData
    order = "<u2" if little_endian else ">u2"
    lut = np.frombuffer(data, dtype=order) if isinstance(data, bytes) else np.asarray(data, dtype=np.float32)
    lut = lut.astype(np.float32).ravel()[: entries or limits.MAX_LUT_ENTRIES]
    if not lut.size or not np.isfinite(lut).all():
        raise ValueError("empty or non-finite LUT")
    lo, hi = float(lut.min()), float(lut.max())
    index = np.clip(np.rint(values) - first, 0, lut.size - 1).astype(np.intp)
    return (lut[index] - lo) / np.float32(max(hi - lo, 1e-6))
