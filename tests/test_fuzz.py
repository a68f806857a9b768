"""Property-based fuzzing of the image reader on mutated real files (hypothesis).

Each case takes a real file (a Kermany JPEG, a PNG made from it, two real DICOM files) and
applies a few mutations: bit flips (biased to the header), truncation, inserted or deleted
bytes, overwritten runs, and header fields (image size, bit depth, DICOM Rows/Columns/Bits,
the pixel data length) set to edge values. The reader must then either return a float32
HxW image in [0, 1] or raise the one ``UnreadableImageError``, and must finish within
``BOUND_S``: anything else (another exception, a hang, a runaway allocation) fails with the
mutated bytes as the reproducer. ``derandomize=True`` makes the cases the same on every run.
"""

from __future__ import annotations

import io
import struct
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import numpy as np
import pytest
from badinput import DATA, FORMULA_NAMES, KERMANY_JPEG, chest_gray
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cxr_core import imaging
from cxr_core.errors import UnreadableImageError

BOUND_S = 10.0  # per case; a decode of these small files takes milliseconds, so only a hang reaches it
CR_DICOM = DATA / "dicom" / "fo-dicom" / "CR-MONO1-10-chest.dcm"  # implicit VR, no file meta
FAKE_DICOM = DATA / "dicom" / "torchxrayvision" / "Fake_MONOHR1.dcm"  # JPEG baseline, MONOCHROME1
EDGE_VALUES = (0, 1, 2, 7, 8, 15, 16, 17, 255, 256, 4096, 32767, 32768, 65535, 0x7FFFFFFF, 0xFFFFFFFF)
DICOM_TAGS = {  # (group, element) -> value size in bytes
    (0x0028, 0x0002): 2,  # SamplesPerPixel
    (0x0028, 0x0010): 2,  # Rows
    (0x0028, 0x0011): 2,  # Columns
    (0x0028, 0x0100): 2,  # BitsAllocated
    (0x0028, 0x0101): 2,  # BitsStored
    (0x0028, 0x0102): 2,  # HighBit
    (0x0028, 0x0103): 2,  # PixelRepresentation
}

_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fuzz-read")


Field = tuple[int, int, str]  # (offset, size in bytes, byte order)


def png_fields(data: bytes) -> list[Field]:
    """IHDR width, height, bit depth, colour type and interlace."""
    return [(16, 4, "big"), (20, 4, "big"), (24, 1, "big"), (25, 1, "big"), (28, 1, "big")]


def jpeg_fields(data: bytes) -> list[Field]:
    """The SOF precision, height, width and component count, and the SOS component count."""
    fields: list[Field] = []
    for marker in (b"\xff\xc0", b"\xff\xc2", b"\xff\xc1"):
        at = data.find(marker)
        if at >= 0:
            fields += [(at + 4, 1, "big"), (at + 5, 2, "big"), (at + 7, 2, "big"), (at + 9, 1, "big")]
    at = data.find(b"\xff\xda")
    if at >= 0:
        fields.append((at + 4, 1, "big"))
    return fields


def dicom_fields(data: bytes) -> list[Field]:
    """The image-pixel module's values and the pixel data's length field (little endian)."""
    fields: list[Field] = []
    for (group, element), size in DICOM_TAGS.items():
        at = data.find(struct.pack("<HH", group, element))
        if at >= 0:
            fields.append((at + 8, size, "little"))  # explicit VR 'US' + 2-byte length, or implicit 4-byte
    at = data.rfind(b"\xe0\x7f\x10\x00")
    if at >= 0:
        fields.append((at + 8, 4, "little") if data[at + 4:at + 6] in (b"OB", b"OW") else (at + 4, 4, "little"))
    return fields


def _png_seed() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(chest_gray()).save(buf, format="PNG")
    return buf.getvalue()


SEEDS: dict[str, tuple[str, bytes, list[Field]]] = {}


def seed(kind: str) -> tuple[str, bytes, list[Field]]:
    """(file name, real bytes, header fields) for one seed file, read once."""
    if not SEEDS:
        jpeg = KERMANY_JPEG.read_bytes()
        png = _png_seed()
        cr, fake = CR_DICOM.read_bytes(), FAKE_DICOM.read_bytes()
        SEEDS.update({
            "jpeg": ("chest.jpeg", jpeg, jpeg_fields(jpeg)),
            "png": ("chest.png", png, png_fields(png)),
            "cr_dicom": ("chest.dcm", cr, dicom_fields(cr)),
            "jpeg_dicom": ("fake.dcm", fake, dicom_fields(fake) + jpeg_fields(fake)),
        })
    return SEEDS[kind]


@st.composite
def mutated(draw: st.DrawFn, original: bytes, fields: list[Field]) -> bytes:
    """``original`` with one to four mutations applied in turn."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        n = len(data)
        pos = draw(st.one_of(st.integers(0, min(n, 2048) - 1), st.integers(0, n - 1)))
        kind = draw(st.sampled_from(("flip", "truncate", "insert", "delete", "overwrite", "field", "field")))
        if kind == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "delete":
            del data[pos:pos + draw(st.integers(1, 256))]
        elif kind == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=32))
            data[pos:pos + len(chunk)] = chunk
        elif fields:
            offset, size, order = draw(st.sampled_from(fields))
            value = draw(st.one_of(st.sampled_from(EDGE_VALUES), st.integers(0, 2 ** (8 * size) - 1)))
            value &= 2 ** (8 * size) - 1
            if offset + size <= len(data):
                data[offset:offset + size] = value.to_bytes(size, order)
    return bytes(data)


def read_bounded(data: bytes, name: str) -> imaging.LoadedImage | UnreadableImageError:
    """Read in a worker thread; fail on a hang (over BOUND_S) or any exception but the clear error."""
    future = _pool.submit(imaging.load, data, name)
    try:
        return future.result(timeout=BOUND_S)
    except UnreadableImageError as err:
        return err
    except FutureTimeout:
        pytest.fail(f"reading {name} hung for over {BOUND_S} s; reproducer: {data[:4096]!r}")
    except Exception as err:  # noqa: BLE001 - the property is that nothing else escapes
        pytest.fail(f"{type(err).__name__} escaped imaging.load({name}): {err}\nreproducer ({len(data)} bytes): "
                    f"{data[:4096]!r}")


def check(outcome: imaging.LoadedImage | UnreadableImageError) -> None:
    if isinstance(outcome, UnreadableImageError):
        assert len(str(outcome)) >= 20, f"unclear error message: {outcome!r}"
        return
    pixels = outcome.pixels
    assert pixels.dtype == np.float32 and pixels.ndim == 2 and min(pixels.shape) >= 1
    assert np.isfinite(pixels).all() and pixels.min() >= 0.0 and pixels.max() <= 1.0
    assert pixels.size <= imaging.MAX_PIXELS


FUZZ = settings(max_examples=700, derandomize=True, deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _fuzz(kind: str, examples: int) -> tuple[Callable[[], None], Counter]:
    """The hypothesis test for one seed file, and the counter of its outcomes."""
    name, original, fields = seed(kind)
    outcomes: Counter = Counter()

    @settings(FUZZ, max_examples=examples)
    @given(data=mutated(original, fields))
    def run(data: bytes) -> None:
        outcome = read_bounded(data, name)
        check(outcome)
        if not isinstance(outcome, UnreadableImageError):
            outcomes["ok"] += 1
        elif str(outcome).startswith(("This is ", "The file is empty")):
            outcomes["not an image"] += 1  # refused from the first bytes, before any decoder ran
        else:
            outcomes["decoder error"] += 1

    return run, outcomes


@pytest.mark.parametrize(("kind", "examples"), [("jpeg", 900), ("png", 700), ("cr_dicom", 700),
                                                ("jpeg_dicom", 500)])
def test_mutated_real_file_reads_or_raises_the_clear_error(kind, examples):
    run, outcomes = _fuzz(kind, examples)
    run()
    # Every case ran, and most reached the decoders (a fuzzer that only broke the magic number proves little).
    assert sum(outcomes.values()) == examples
    assert outcomes["ok"] >= 1 and outcomes["ok"] + outcomes["decoder error"] >= examples // 2, outcomes


@pytest.mark.parametrize("kind", ["jpeg", "png", "cr_dicom", "jpeg_dicom"])
def test_unmutated_seed_reads(kind):
    """The control: every seed file reads as a real chest image of its known size."""
    name, original, fields = seed(kind)
    image = imaging.load(original, name)
    expected = {"jpeg": (224, 224), "png": (224, 224), "cr_dicom": (440, 440), "jpeg_dicom": (1024, 1024)}[kind]
    assert image.pixels.shape == expected
    assert 0.2 < float(image.pixels.mean()) < 0.8
    assert len(fields) >= 3


# --- issue 15: the hostile classes as strategies ----------------------------------------------------------------
NUMBER_TEXT = st.one_of(
    st.sampled_from(["inf", "-inf", "NaN", "nan", "1e300", "-1e300", "1e38", "0", "-0", "", "abc", "1\\2", "1e-300"]),
    st.floats(allow_nan=True, allow_infinity=True).map(lambda v: repr(v)[:16]),
    st.integers(-(2**40), 2**40).map(str),
)
HOSTILE = settings(max_examples=150, derandomize=True, deadline=None, database=None,
                   suppress_health_check=[HealthCheck.too_slow])


@HOSTILE
@given(slope=st.none() | NUMBER_TEXT, intercept=st.none() | NUMBER_TEXT, center=st.none() | NUMBER_TEXT,
       width=st.none() | NUMBER_TEXT)
def test_rescale_and_window_values_give_finite_pixels_or_name_the_tag(slope, intercept, center, width):
    from badinput import dicom_with

    tags = {k: v for k, v in {"RescaleSlope": slope, "RescaleIntercept": intercept, "WindowCenter": center,
                              "WindowWidth": width}.items() if v is not None}
    pixels = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 200)
    outcome = read_bounded(dicom_with(pixels, **tags), "x.dcm")
    check(outcome)
    if isinstance(outcome, UnreadableImageError):
        assert any(tag in str(outcome) for tag in tags), (tags, str(outcome))
    else:
        lo, hi = outcome.info.value_range
        assert np.isfinite([lo, hi]).all()
        from cxr_core import windowing

        (c_lo, c_hi), (w_lo, w_hi) = windowing.slider_bounds(outcome.info)
        for c, w in windowing.presets(outcome.info).values():
            assert c_lo <= c <= c_hi and w_lo <= w <= w_hi


@HOSTILE
@given(entries=st.integers(0, 70000), first=st.integers(-70000, 70000), data=st.binary(max_size=512))
def test_voi_lut_values_give_finite_pixels_or_name_the_tag(entries, first, data):
    from badinput import dicom_with
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    item = Dataset()
    item.LUTDescriptor = [entries % 65536, first % 65536, 16]
    item.LUTData = data + b"\0" * (len(data) % 2)
    outcome = read_bounded(dicom_with(np.arange(64, dtype=np.uint16).reshape(8, 8), VOILUTSequence=Sequence([item])),
                           "x.dcm")
    check(outcome)
    if isinstance(outcome, UnreadableImageError):
        assert "VOILUTSequence" in str(outcome), str(outcome)


@HOSTILE
@given(width=st.one_of(st.integers(1, 8), st.integers(9, 200_000)), height=st.integers(1, 12))
def test_extreme_shapes_read_and_fit_the_display(width, height):
    from badinput import strip_png

    from cxr_core import limits, overlay

    w, h = (width, height) if width % 2 else (height, width)  # wide and tall strips
    outcome = read_bounded(strip_png(w, h), "strip.png")
    check(outcome)
    assert not isinstance(outcome, UnreadableImageError), str(outcome)
    shown = overlay.fit(outcome.pixels)
    assert 1 <= min(shown.shape) and max(shown.shape) <= limits.MAX_DISPLAY_SIDE
    assert overlay.overlay(shown, np.full((8, 8), 0.5, np.float32)).shape == (*shown.shape, 3)


@HOSTILE
@given(names=st.lists(st.one_of(st.binary(min_size=1, max_size=40), st.sampled_from(FORMULA_NAMES).map(str.encode),
                                st.sampled_from(["'", "=", "+", "-", "@", "\t", "\r", "\n", ","]).map(str.encode))
                      .filter(lambda b: b"/" not in b and b"\0" not in b), min_size=1, max_size=6))
def test_any_file_name_bytes_are_shown_and_exported_safely(names):
    import csv
    import os

    from cxr_core import csvsafe, review

    decoded = [os.fsdecode(b) for b in names]
    shown = review.unique_names(decoded)
    assert len(set(shown)) == len(shown)
    table = review.batch_table([_Row(n) for n in shown], ["NORMAL", "PNEUMONIA"], [None] * len(shown))
    text = review.export_csv(table)
    text.encode("utf-8")  # valid Unicode: no surrogates left
    rows = list(csv.reader(io.StringIO(text, newline="")))[1:]
    assert [r[0] for r in rows] == [csvsafe.cell(n) for n in shown]
    assert all(not r[0].startswith(csvsafe.TRIGGERS) for r in rows)
    assert [csvsafe.restore(r[0]) for r in rows] == shown


class _Row:
    """An unreadable batch row with a given name (what ``pipeline.classify_many`` makes of a bad file)."""

    def __init__(self, name: str):
        self.name, self.prediction, self.error, self.info, self.thumbnail = name, None, "unreadable", None, None
