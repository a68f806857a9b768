"""Issue 15: the eight failure classes of the adversarial pass, each at its mechanism.

The files of F1, F3, F6, F7 and the minor items are in the bad-input corpus (tests/badinput.py), so
test_bad_input.py sends them through the reader, the pipeline, the classify page and the batch page;
here are the classes a file alone cannot carry (forged model folders, file names, CSV cells, slider
bounds, FIFOs) and the mechanisms behind the file classes (limits checked before the work).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from badinput import FORMULA_NAMES, KERMANY_JPEG, deflated_bomb, dicom_with, hostile_cases

from cxr_core import card, csvsafe, imaging, limits, models, overlay, pipeline, report, review, windowing
from cxr_core.errors import ModelCardError, UnreadableImageError


# --- F1 and the reader's promise --------------------------------------------------------------------------------
@pytest.mark.parametrize("slope", ["1e300", "-1e300", "inf", "-inf", "NaN", "0", "1e38"])
def test_rescale_slope_that_is_not_usable_is_named(slope):
    with pytest.raises(UnreadableImageError, match="RescaleSlope"):
        imaging.load(dicom_with(RescaleSlope=slope), "x.dcm")


def test_a_usable_rescale_is_applied_exactly():
    stored = (np.arange(64, dtype=np.uint16) * 1000).reshape(8, 8)
    image = imaging.load(dicom_with(stored, RescaleSlope="0.5", RescaleIntercept="-1024"), "x.dcm")
    assert image.info.value_range == (-1024.0, 63000 * 0.5 - 1024)


@pytest.mark.parametrize("tag,value", [("WindowCenter", "abc"), ("WindowWidth", "NaN"), ("WindowCenter", "inf"),
                                       ("WindowWidth", "1e999")])
def test_malformed_window_tag_is_named(tag, value):
    other = {"WindowCenter": "30000", "WindowWidth": "40000"}
    with pytest.raises(UnreadableImageError, match=tag):
        imaging.load(dicom_with(**{**other, tag: value}), "x.dcm")


def test_malformed_voi_lut_is_named():
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    item = Dataset()
    item.LUTDescriptor = [0, 0, 16]
    item.LUTData = b""  # no entries at all
    with pytest.raises(UnreadableImageError, match="VOILUTSequence"):
        imaging.load(dicom_with(VOILUTSequence=Sequence([item])), "x.dcm")


MARKDOWN = "[SEE ADVICE](HTTPS://EV.IL/A) ![](HTTPS://EV.IL/P.PNG) :RED[X] $X$"


def _inert(text: str) -> bool:
    """No character that Markdown or Streamlit's directives act on (the pages show these sentences as Markdown)."""
    return not set(text) & set("[]()!:$*_`<>#|~")


def test_dicom_text_in_the_not_a_chest_reasons_cannot_carry_markdown():
    from cxr_core import quality

    image = imaging.load(dicom_with(Modality=MARKDOWN[:16], BodyPartExamined=MARKDOWN[16:32]), "x.dcm")
    assert image.info.metadata["Modality"].startswith("[SEE")  # the file really carries it
    reasons = quality.assess(image).reasons
    said = [r for r in reasons if r.startswith("DICOM modality is")] + [r for r in reasons if "body part" in r]
    assert len(said) == 2, reasons
    assert said[0] == "DICOM modality is a value that is no DICOM code, not chest radiography (CR/DX)"
    assert all(_inert(r.split(" is ", 1)[1].split(", not ")[0]) for r in said), said
    # A real code is quoted.
    reasons = quality.assess(imaging.load(dicom_with(Modality="CT", BodyPartExamined="HEAD"), "x.dcm")).reasons
    assert "DICOM modality is CT, not chest radiography (CR/DX)" in reasons and "DICOM body part is HEAD, not the " \
        "chest" in reasons, reasons


def test_a_malformed_tag_is_named_and_its_text_not_quoted():
    with pytest.raises(UnreadableImageError, match="WindowCenter") as err:
        imaging.load(dicom_with(WindowCenter="[A](HTTP://EV.IL)", WindowWidth="40000"), "x.dcm")
    assert "(its value, not shown: not a number)" in str(err.value) and "EV.IL" not in str(err.value), str(err.value)
    with pytest.raises(UnreadableImageError, match="WindowWidth") as err:
        imaging.load(dicom_with(WindowCenter="30000", WindowWidth="1e999"), "x.dcm")
    assert "('1e999': not a finite number)" in str(err.value), str(err.value)  # a number is quoted


def test_a_tag_whose_length_runs_into_the_next_elements_does_not_quote_them():
    """A damaged RescaleSlope length swallows the elements after it (here a physician's name and an admission
    id): the message names the tag and quotes none of it, since messages reach pages, CSVs and logs."""
    import struct

    import pydicom

    ds = pydicom.dcmread(io.BytesIO(dicom_with(RescaleSlope="1", RescaleIntercept="0")))
    ds.RequestingPhysician = "DOE^JANE"
    ds.AdmissionID = "ADM4711"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    blob = bytearray(out.getvalue())
    at = blob.index(b"\x28\x00\x53\x10DS")  # RescaleSlope, explicit VR little endian: tag, VR, 2-byte length
    blob[at + 6:at + 8] = struct.pack("<H", blob.index(b"ADM4711") + 8 - (at + 8))
    with pytest.raises(UnreadableImageError, match="RescaleSlope") as err:
        imaging.load(bytes(blob), "x.dcm")
    assert "JANE" not in str(err.value) and "4711" not in str(err.value), str(err.value)


def test_float_tiff_with_infinities_reads_finite_and_says_so():
    case = next(c for c in hostile_cases() if c.name == "inf.tif")
    image = imaging.load(case.data, case.name)
    assert np.isfinite(image.pixels).all() and image.pixels.min() == 0.0 and image.pixels.max() == 1.0
    assert np.all(np.diag(image.pixels) == 0.0)  # the +inf diagonal is shown black, not white or NaN
    assert image.info.metadata["NonFinitePixels"].startswith("64 ")


# --- F6 and F7: bounded before the work -------------------------------------------------------------------------
def test_deflated_bomb_is_refused_from_its_header_before_inflating():
    start = time.perf_counter()
    with pytest.raises(UnreadableImageError, match="2,048 MB decoded"):
        imaging.load(deflated_bomb(128, 4096), "bomb.dcm")
    assert time.perf_counter() - start < 2  # 2 GB were never inflated (that takes ~3 s)


def test_deflated_data_beyond_its_header_stops_at_the_inflation_cap(monkeypatch):
    monkeypatch.setattr(limits, "MAX_DICOM_INFLATED_BYTES", 8 * limits.MiB)
    with pytest.raises(UnreadableImageError, match="inflates to more than 8 MB"):
        imaging.load(deflated_bomb(1, 4096, honest=False), "liar.dcm")


def test_frames_count_towards_the_memory_bound():
    small = np.zeros((8, 8), np.uint16)
    # 5 frames of 4096 x 4096 at 16 bits = 160 MB declared: each frame is under the frame limit, all are not.
    with pytest.raises(UnreadableImageError, match="5 frame.* = 160 MB decoded"):
        imaging.load(dicom_with(small, Rows=4096, Columns=4096, NumberOfFrames="5"), "x.dcm")
    with pytest.raises(UnreadableImageError) as err:  # one such frame passes the bound, then fails as truncated
        imaging.load(dicom_with(small, Rows=4096, Columns=4096), "x.dcm")
    assert "too large" not in str(err.value)


def test_jpeg_dicom_whose_codestream_has_no_height_is_refused_before_decoding():
    """A fuzzer case: a JPEG baseline DICOM whose SOF declares height 0 (the height would follow in a DNL marker).
    The decoder then sized its buffers blindly (9.5 GB for one 127 kB file); it is refused from the codestream."""
    import resource

    from conftest import DICOM

    data = bytearray((DICOM / "torchxrayvision" / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm")
                     .read_bytes())
    sof = data.find(b"\xff\xc0\x00\x0b\x08")
    assert sof > 0 and int.from_bytes(data[sof + 5:sof + 7], "big") == 1024
    data[sof + 5:sof + 7] = (0).to_bytes(2, "big")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(UnreadableImageError, match="does not declare its height"):
        imaging.load(bytes(data), "no-height.dcm")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 300 * 1024  # kB: under 300 MB more


def test_zero_bytes_named_dcm_are_refused_at_once(tmp_path):
    path = tmp_path / "x.dcm"
    with open(path, "wb") as fh:
        fh.truncate(100 << 20)  # 100 MB of zeros
    start = time.perf_counter()
    with pytest.raises(UnreadableImageError, match="not one"):
        imaging.load(path)
    assert time.perf_counter() - start < 1


def test_a_forced_parse_stops_after_the_element_budget(monkeypatch):
    # A raw dataset (no preamble) that is nothing but empty elements: parsed, but only up to the budget.
    body = b"".join((0x0008).to_bytes(2, "little") + (0x1000 + i % 0xE000).to_bytes(2, "little") + b"\0\0\0\0"
                    for i in range(5000))
    monkeypatch.setattr(limits, "MAX_DICOM_ELEMENTS", 1000)
    with pytest.raises(UnreadableImageError, match="more than 1,000 data elements"):
        imaging.load(body, "x.dcm")


def test_only_regular_files_are_read(tmp_path):
    fifo = tmp_path / "pipe.dcm"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero"), tmp_path):
        start = time.perf_counter()
        with pytest.raises(UnreadableImageError, match="not a regular file"):
            imaging.load(path)
        assert time.perf_counter() - start < 1  # no blocking on the FIFO, no endless read of /dev/zero


# --- F3: display and report paths ------------------------------------------------------------------------------
def test_report_and_display_of_a_49_million_pixel_strip():
    strip = np.linspace(0, 1, 49_000_000, dtype=np.float32)[None, :]
    shown = overlay.fit(strip)
    assert shown.shape == (1, limits.MAX_DISPLAY_SIDE) and abs(float(shown.mean()) - 0.5) < 0.01
    from cxr_core.models import Prediction

    prediction = Prediction(("NORMAL", "PNEUMONIA"), (0.3, 0.7), "PNEUMONIA", 0.7, "PNEUMONIA", True, False)
    c = card.ModelCard(name="m", architecture="tiny", input_size=64, class_names=["NORMAL", "PNEUMONIA"],
                       target_layer="relu")
    png = report.render(strip, overlay.to_rgb(shown), prediction, c)
    assert png.startswith(b"\x89PNG")


# --- F2 ---------------------------------------------------------------------------------------------------------
def test_slider_bounds_hold_the_file_window_beside_an_outlier():
    stored = np.full((64, 64), 1200, np.uint16)
    stored[:, :32] = np.linspace(1000, 1400, 32).astype(np.uint16)
    stored[0, 0] = 65535
    info = imaging.load(dicom_with(stored, WindowCenter="1200", WindowWidth="400"), "x.dcm").info
    assert info.window == (1200.0, 400.0) and info.value_range[1] == 65535.0
    (c_lo, c_hi), (w_lo, w_hi) = windowing.slider_bounds(info)
    for center, width in windowing.presets(info).values():
        assert c_lo <= center <= c_hi and w_lo <= width <= w_hi
    assert c_lo < c_hi and w_lo < w_hi


# --- F4 and F5 --------------------------------------------------------------------------------------------------
def test_csv_cells_never_become_formulas():
    table = pd.DataFrame({"file": [*FORMULA_NAMES, "ok.png"], "p": [-0.5] * (len(FORMULA_NAMES) + 1)})
    text = review.export_csv(table)
    rows = list(csv.reader(io.StringIO(text, newline="")))[1:]
    assert all(not row[0].startswith(csvsafe.TRIGGERS) for row in rows), rows
    assert [row[1] for row in rows] == ["-0.500000"] * len(rows)  # numbers stay numbers
    assert [csvsafe.restore(row[0]) for row in rows] == [*FORMULA_NAMES, "ok.png"]


def test_non_utf8_file_names_are_shown_and_exported(tmp_path, tiny_model_dir):
    name = os.fsdecode(b"chest\xff.jpeg")  # a surrogate escape, as Python lists such a server file
    (tmp_path / name).write_bytes(KERMANY_JPEG.read_bytes())
    names = review.unique_names([name, os.fsdecode(b"chest\xfe.jpeg")])
    assert names == ["chest\ufffd.jpeg", "chest\ufffd.jpeg (2)"]
    classifier = models.load(tiny_model_dir)
    rows = pipeline.classify_many(classifier, [(names[0], tmp_path / name)])
    table = review.batch_table(rows, classifier.card.class_names)
    text = review.export_csv(table)
    assert text.encode("utf-8") and "chest\ufffd.jpeg" in text and rows[0].prediction is not None


# --- F8 ---------------------------------------------------------------------------------------------------------
def _forge(folder: Path, tiny_model_dir: Path, **fields) -> Path:
    """A copy of the tiny model folder whose card is re-written with ``fields`` and re-hashed (as a forger would)."""
    shutil.copytree(tiny_model_dir, folder)
    data = json.loads((folder / card.CARD_FILE).read_text())
    data.update(fields)
    from cxr_core.card import content_sha256

    data["card_sha256"] = content_sha256(data)
    (folder / card.CARD_FILE).write_text(json.dumps(data))
    return folder


@pytest.mark.parametrize("fields,fragment", [
    ({"input_size": 100000}, "input_size"),
    ({"input_size": 8}, "input_size"),
    ({"input_size": True}, "input_size"),
    ({"class_names": ["NP"]}, "class_names"),
    ({"class_names": ["NORMAL", ""]}, "class_names"),
    ({"class_names": ["NORMAL", 7]}, "class_names"),
    # Markdown in a class name would be emphasis, code, maths or a link on every page that shows it
    ({"class_names": ["NORMAL", "PNEUMONIA*"], "thresholds": {}, "negative_class": None}, "class name 'PNEUMONIA\\*'"),
    ({"class_names": ["NORMAL", "`x`"], "thresholds": {}, "negative_class": None}, "class name"),
    ({"class_names": ["NORMAL", "$x$"], "thresholds": {}, "negative_class": None}, "class name"),
    ({"class_names": ["NORMAL", "[a](http://ev.il)"], "thresholds": {}, "negative_class": None}, "class name"),
    ({"class_names": ["NORMAL", " PNEUMONIA"], "thresholds": {}, "negative_class": None}, "class name"),
    ({"temperature": float("inf")}, "temperature"),
    ({"temperature": 0}, "temperature"),
    ({"thresholds": {"PNEUMONIA": float("nan")}}, "threshold"),
    ({"thresholds": {"PNEUMONIA": 1.5}}, "threshold"),
    ({"low_confidence": -1}, "low_confidence"),
    ({"weights_file": "/etc/passwd"}, "weights_file"),
    ({"weights_file": "../../../etc/passwd"}, "weights_file"),
    ({"weights_file": ".."}, "weights_file"),
])
def test_forged_card_fields_are_refused_on_load(tmp_path, tiny_model_dir, fields, fragment):
    folder = _forge(tmp_path / "forged", tiny_model_dir, **fields)
    with pytest.raises(ModelCardError, match=fragment):
        models.load(folder)


def test_weights_that_link_out_are_refused_without_a_word_about_the_target(tmp_path, tiny_model_dir):
    outside = tmp_path / "outside.h5"
    outside.write_bytes(b"secret outside the model folder")
    folder = _forge(tmp_path / "forged", tiny_model_dir, weights_file="linked.weights.h5")
    (folder / "linked.weights.h5").symlink_to(outside)
    with pytest.raises(ModelCardError, match="link") as err:
        card.load(folder)
    digest = card.sha256_of(outside)
    assert digest[:6] not in str(err.value) and str(outside) not in str(err.value)


def test_a_hash_mismatch_names_only_the_cards_own_hash(tmp_path, tiny_model_dir):
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    (folder / card.WEIGHTS_FILE).write_bytes(b"replaced")
    with pytest.raises(ModelCardError) as err:
        card.load(folder)
    assert card.sha256_of(folder / card.WEIGHTS_FILE)[:8] not in str(err.value)


# --- defence in depth: one file never loses the batch ----------------------------------------------------------
@pytest.mark.parametrize("slow", ["fetch", "decode"])
def test_an_interrupted_batch_stops_reading_ahead_after_the_file_it_is_on(tiny_model_dir, monkeypatch, slow):
    """Ctrl-C during a batch (or a stopped app run) must not wait while the reader thread fetches or decodes the
    rest of the next batch: with slow URL reads that was up to a minute per file, 16 files a batch; a DX DICOM
    takes seconds to decode. The interrupt comes while the reader is on the next batch's second file."""
    import threading

    classifier = models.load(tiny_model_dir)
    jpeg = KERMANY_JPEG.read_bytes()
    pulled, decoded = [], []
    real_read = pipeline._read

    def slow_read(name, source, size):
        decoded.append(name)
        if slow == "decode" and len(decoded) > 8:
            time.sleep(0.5)
        return real_read(name, source, size)

    def items():
        for i in range(40):
            pulled.append(i)
            if slow == "fetch" and i >= 8:
                time.sleep(0.5)  # a slow read, done lazily in the reader thread
            yield f"{i}.jpeg", jpeg

    monkeypatch.setattr(pipeline, "_read", slow_read)

    class Interrupted:
        def __init__(self, inner):
            self.inner, self.input_size, self.card = inner, inner.input_size, inner.card

        def predict(self, batch):
            done = pulled if slow == "fetch" else decoded
            deadline = time.monotonic() + 30
            while len(done) < 10 and time.monotonic() < deadline:  # the reader is on the next batch's 2nd file
                time.sleep(0.01)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pipeline.classify_many(Interrupted(classifier), items(), batch_size=8)
    for t in threading.enumerate():
        if t.name.startswith("cxr-read"):
            t.join(timeout=30)
    # The first batch (8) and the file the reader was on; without the stop it went through the second batch: 16.
    assert len(pulled if slow == "fetch" else decoded) == 10, (pulled, decoded)


def test_classify_many_turns_any_failure_into_that_files_row(tiny_model_dir, monkeypatch):
    classifier = models.load(tiny_model_dir)
    jpeg = KERMANY_JPEG.read_bytes()
    real_load = imaging.load

    def load(source, filename=None, **kwargs):
        if filename == "boom.jpeg":
            raise RuntimeError("a bug nobody foresaw")
        return real_load(source, filename, **kwargs)

    monkeypatch.setattr(imaging, "load", load)
    rows = pipeline.classify_many(classifier, [("a.jpeg", jpeg), ("boom.jpeg", jpeg), ("b.jpeg", jpeg)])
    assert [r.prediction is not None for r in rows] == [True, False, True]
    assert "unexpected RuntimeError" in rows[1].error and "nobody" not in rows[1].error

    class Flaky:
        """Fails on any batch that holds a constant image, as a broken engine might."""

        def __init__(self, inner):
            self.inner, self.input_size, self.card = inner, inner.input_size, inner.card

        def predict(self, batch):
            if any(float(np.ptp(x)) == 0 for x in batch):
                raise FloatingPointError("engine failure")
            return self.inner.predict(batch)

    flat = imaging.load(jpeg).pixels * 0  # a black image: constant after preprocessing
    import PIL.Image

    buf = io.BytesIO()
    PIL.Image.fromarray((flat * 255).astype(np.uint8)).save(buf, format="PNG")
    rows = pipeline.classify_many(Flaky(classifier), [("a.jpeg", jpeg), ("black.png", buf.getvalue())])
    assert rows[0].prediction is not None and rows[1].prediction is None
    assert "unexpected FloatingPointError" in rows[1].error


def test_every_hostile_case_is_a_row_or_a_result(tiny_model_dir):
    classifier = models.load(tiny_model_dir)
    cases = hostile_cases()
    rows = pipeline.classify_many(classifier, [(c.name, c.data) for c in cases], batch_size=3)
    for case, row in zip(cases, rows, strict=True):
        assert (row.prediction is not None) == case.ok, (case.name, row.error)
        if not case.ok:
            assert case.fragment in row.error.lower(), (case.name, row.error)


def test_limits_are_documented_in_one_place():
    source = Path(limits.__file__).read_text()
    for name in ("MAX_PIXELS", "MAX_FILE_BYTES", "MAX_DICOM_FRAME_BYTES", "MAX_DICOM_PIXEL_BYTES",
                 "MAX_DICOM_INFLATED_BYTES", "MAX_DICOM_ELEMENTS", "MAX_DISPLAY_SIDE", "MAX_INPUT_SIZE"):
        above = source[: source.index(f"\n{name} =")].rstrip().splitlines()
        while " = " in above[-1]:  # a group of related limits shares its comment
            above.pop()
        assert above[-1].startswith("#"), name  # a sentence on why, right above it
    assert imaging.MAX_PIXELS == limits.MAX_PIXELS  # the reader uses the one value


def test_training_csvs_are_spreadsheet_safe_and_read_back_exactly(tmp_path):
    from training import data

    root = tmp_path / "kermany"
    root.mkdir()
    names = [*FORMULA_NAMES, os.fsdecode(b"chest\xff.jpeg")]
    names = [n for n in names if "/" not in n]
    records = [data.Record(path=root / n, rel=n, source="kermany", label="NORMAL", split="train", patient=n)
               for n in names]
    manifest = data.write_manifest(records, tmp_path / "split.csv")
    with manifest.open(newline="", encoding="utf-8", errors="surrogateescape") as fh:
        cells = [row[0] for row in csv.reader(fh)][1:]
    assert all(not c.startswith(csvsafe.TRIGGERS) for c in cells), cells
    back = data.read_manifest(manifest, [root])
    assert [r.rel for r in back] == names and [r.path for r in back] == [root.resolve() / n for n in names]
    table = pd.DataFrame({"path": names, "p_NORMAL": [-0.0] * len(names)})
    csvsafe.to_csv(table, tmp_path / "predictions.csv", keep_bytes=True, index=False)
    assert csvsafe.read_csv(tmp_path / "predictions.csv")["path"].tolist() == names


# --- found by the ninth session's review --------------------------------------------------------------------------
def _jpeg_dicom_declaring(side: int, padding: int) -> bytes:
    """The JPEG DICOM of the corpus, its codestream declaring ``side`` x ``side``, with ``padding`` legal 64 KiB APP15
    segments before the frame header (SOF)."""
    import pydicom
    from pydicom.encaps import encapsulate, get_frame

    from benchmarks.bombs import JPEG_DICOM

    ds = pydicom.dcmread(JPEG_DICOM)
    frame = bytearray(get_frame(ds.PixelData, 0, number_of_frames=1))
    sof = frame.find(b"\xff\xc0")
    frame[sof + 5:sof + 9] = side.to_bytes(2, "big") * 2
    segment = b"\xff\xef" + (65535).to_bytes(2, "big") + bytes(65533)
    ds.PixelData = encapsulate([bytes(frame[:2] + segment * padding + frame[2:])])
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


@pytest.mark.parametrize("padding", [0, 2])
def test_a_jpeg_frame_size_hidden_behind_large_segments_is_still_checked(padding):
    """The header check once read only the first 64 KiB of the codestream: two APP segments pushed the frame header
    past it and the decoder was handed what the codestream declared (6000 x 6000 here: +171 MiB; 30000 x 30000:
    about 4 GB)."""
    with pytest.raises(UnreadableImageError, match=r"declares 6000 x 6000 pixels .* header says 1024 x 1024"):
        imaging.load(_jpeg_dicom_declaring(6000, padding), "x.dcm")


def _tiff_pages(n: int) -> bytes:
    """A 1 x 1 grey TIFF of ``n`` chained pages (IFDs), all pointing at one byte."""
    import struct

    def entry(tag: int, kind: int, value: int) -> bytes:
        return struct.pack("<HHII", tag, kind, 1, value)

    out = bytearray(b"II*\x00" + struct.pack("<I", 9) + b"\x80")
    for i in range(n):
        entries = [entry(256, 4, 1), entry(257, 4, 1), entry(258, 3, 8), entry(259, 3, 1), entry(262, 3, 1),
                   entry(273, 4, 8), entry(277, 3, 1), entry(278, 4, 1), entry(279, 4, 1)]
        following = len(out) + 2 + 12 * len(entries) + 4 if i < n - 1 else 0
        out += struct.pack("<H", len(entries)) + b"".join(entries) + struct.pack("<I", following)
    return bytes(out)


def test_a_tiff_of_many_pages_is_counted_only_so_far():
    """Pillow's n_frames walks every page at a cost growing with the square of their number (40,000 pages: 40 s);
    the reader counts to imaging._MAX_FRAMES_COUNTED and reads the first page."""
    image = imaging.load(_tiff_pages(3000), "x.tif")
    assert image.info.frames == imaging._MAX_FRAMES_COUNTED == 1000 and image.pixels.shape == (1, 1)
    assert imaging.load(_tiff_pages(3), "x.tif").info.frames == 3
    from PIL import Image

    pages = [Image.fromarray(np.full((4, 6), v, np.uint8)).convert("RGB") for v in (10, 200)]
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the image read is a transposed copy, the frames are still the file's
    buf = io.BytesIO()
    pages[0].save(buf, "WEBP", save_all=True, append_images=pages[1:], exif=exif, lossless=True)
    rotated = imaging.load(buf.getvalue(), "x.webp")
    assert (rotated.info.frames, rotated.pixels.shape, rotated.info.metadata["ExifOrientation"]) == (2, (6, 4), "6")


def test_twelve_bit_values_in_a_16_bit_png_are_scaled_by_the_bits_they_use():
    """A 12-bit detector's values (0-4095) in a 16-bit PNG came out nearly black (max 0.06) and were called blank."""
    from PIL import Image

    from cxr_core import quality

    film = np.asarray(Image.open(KERMANY_JPEG).convert("L"))
    buf = io.BytesIO()
    Image.fromarray(film.astype(np.uint16) * 16).save(buf, "PNG")  # 8-bit film x 16: 12-bit values, max 4080
    image = imaging.load(buf.getvalue(), "chest12.png")
    np.testing.assert_allclose(image.pixels, film / 255.0 * (255 * 16) / 4095, atol=1e-6)
    assert image.info.metadata["BitsUsed"].startswith("12-bit")
    assert not quality.assess(image, buf.getvalue()).probably_not_chest
    buf = io.BytesIO()
    Image.fromarray(film.astype(np.uint16) * 257).save(buf, "PNG")  # the full 16 bits: as before
    np.testing.assert_allclose(imaging.load(buf.getvalue(), "chest16.png").pixels, film / 255.0, atol=1e-6)


def test_a_lossless_or_jpeg_ls_file_is_named_as_such_not_as_damaged(data_dir):
    import pydicom
    from pydicom.encaps import get_frame

    for path, kind in (("dicom/non_chest/CR-ModalitySequenceLUT.dcm", "lossless JPEG"),
                       ("dicom/pylibjpeg-data/RG1_JLSN.dcm", "JPEG-LS")):
        frame = get_frame(pydicom.dcmread(data_dir / path).PixelData, 0, number_of_frames=1)
        with pytest.raises(UnreadableImageError, match=f"coded as {kind}") as err:
            imaging.load(bytes(frame), "film.jpg")
        assert "damaged" not in str(err.value) and "Export the image as PNG" in str(err.value)
    with pytest.raises(UnreadableImageError, match="damaged or incomplete"):  # a cut baseline JPEG still is
        imaging.load(KERMANY_JPEG.read_bytes()[:2000], "film.jpg")


def test_an_uncompressed_dicom_that_cannot_be_read_is_not_called_compressed():
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(dicom_with()))
    ds.PixelRepresentation = 2  # neither unsigned (0) nor signed (1)
    out = io.BytesIO()
    ds.save_as(out)
    for data in (dicom_with()[:-3000], out.getvalue()):
        with pytest.raises(UnreadableImageError, match="uncompressed pixel data does not fit") as err:
            imaging.load(data, "x.dcm")
        assert "compressed pixel data is corrupt" not in str(err.value)


def test_a_grey_dicom_without_photometric_interpretation_is_read_as_monochrome2():
    import pydicom

    reference = imaging.load(dicom_with(), "x.dcm")
    ds = pydicom.dcmread(io.BytesIO(dicom_with()))
    del ds.PhotometricInterpretation
    out = io.BytesIO()
    ds.save_as(out)
    image = imaging.load(out.getvalue(), "x.dcm")
    np.testing.assert_array_equal(image.pixels, reference.pixels)
    assert image.info.metadata["PhotometricInterpretation"].startswith("missing from the file")


def test_the_colour_check_decodes_nothing_over_the_pixel_limit(monkeypatch):
    from cxr_core import quality

    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[:, :32, 0] = 255
    rgb[:, 32:, 2] = 255
    buf = io.BytesIO()
    from PIL import Image

    Image.fromarray(rgb).save(buf, "PNG")
    assert quality.colourfulness(buf.getvalue()) > 30
    monkeypatch.setattr(limits, "MAX_PIXELS", 64 * 64 - 1)
    assert quality.colourfulness(buf.getvalue()) == 0.0


# --- a read-only review's hostile files (2026-12-02): each was refused as "unexpected" or misnamed ---------------
def _dicom_of(pixels: np.ndarray, photometric: str = "MONOCHROME2", **tags: object) -> bytes:
    """A minimal Secondary Capture DICOM of ``pixels`` (tags set as given; None deletes one)."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Modality, ds.PhotometricInterpretation = "DX", photometric
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
    ds.BitsAllocated = ds.BitsStored = pixels.dtype.itemsize * 8
    ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, 0
    ds.PixelData = pixels.tobytes()
    for key, value in tags.items():
        if value is None:
            del ds[key]
        else:
            setattr(ds, key, value)
    out = io.BytesIO()
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


def _gradient(dtype=np.uint16) -> np.ndarray:
    y, x = np.mgrid[0:64, 0:64]
    return ((x * 64 + y) % 4096).astype(dtype)


def test_a_damaged_exif_block_leaves_a_sound_picture_readable():
    """PNG and WebP with an EXIF block Pillow cannot parse: read as stored (was "unexpected SyntaxError", which
    scoring took for this machine's fault and retried on every --resume)."""
    import struct
    import zlib

    from PIL import Image

    picture = Image.fromarray(_gradient(np.uint8) * 4)
    png = io.BytesIO()
    picture.save(png, "PNG")
    body = b"MM\x00*garbage"
    chunk = struct.pack(">I", len(body)) + b"eXIf" + body + struct.pack(">I", zlib.crc32(b"eXIf" + body))
    data = png.getvalue()[:33] + chunk + png.getvalue()[33:]
    image = imaging.load(data, "x.png")
    np.testing.assert_array_equal(image.pixels, imaging.load(png.getvalue(), "x.png").pixels)
    if "Exif" in image.info.metadata:  # where Pillow cannot read the block, the reading notes say so
        assert "shown as stored" in " ".join(imaging.reading_notes(image.info)), image.info.metadata
    webp = io.BytesIO()
    picture.convert("RGB").save(webp, "WEBP", lossless=True, exif=b"Exif\x00\x00garbagegarbage")
    assert imaging.load(webp.getvalue(), "x.webp").pixels.shape == (64, 64)


def test_a_gif_cut_inside_a_later_frame_still_gives_its_first():
    from PIL import Image

    frames = [Image.fromarray((_gradient(np.uint8) * 4 + 40 * i).astype(np.uint8)) for i in range(3)]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:])
    whole = imaging.load(out.getvalue(), "x.gif")
    assert whole.info.frames == 3
    data = out.getvalue()
    first_read = 0
    for end in range(len(data) // 3, len(data), 5):  # cut anywhere from inside the first frame to the end
        try:
            image = imaging.load(data[:end], "x.gif")
        except UnreadableImageError as err:
            assert "unexpected" not in str(err), (end, str(err))  # damaged: said so, not "an unexpected failure"
            continue
        np.testing.assert_array_equal(image.pixels, whole.pixels)
        first_read += 1
    assert first_read > 10


def test_photometric_text_in_a_message_cannot_carry_markdown():
    rgb = np.dstack([_gradient(np.uint8)] * 3)
    forged = "MONOCHROME2 [CLICK](HTTPS://EV.IL/X) ![I](HTTPS://EV.IL/P.PNG)"
    with pytest.raises(UnreadableImageError, match="contradicts itself") as err:
        imaging.load(_dicom_of(rgb, photometric=forged, PlanarConfiguration=0), "x.dcm")
    assert _inert(str(err.value).split("Interpretation ")[1].split(" with")[0]), str(err.value)
    assert "](" not in str(err.value) and "![" not in str(err.value), str(err.value)
    grey = _gradient(np.uint8)
    long_data = _dicom_of(grey, photometric="MONOCHROME2 [X](HTTPS://EV.IL)", PixelData=np.dstack([grey] * 3).tobytes())
    with pytest.raises(UnreadableImageError, match="times what its header declares") as err:
        imaging.load(long_data, "x.dcm")
    assert "](" not in str(err.value), str(err.value)


def test_a_palette_colour_dicom_is_named_as_such():
    with pytest.raises(UnreadableImageError, match="palette-colour image"):
        imaging.load(_dicom_of(_gradient(np.uint8), photometric="PALETTE COLOR"), "x.dcm")


def test_an_empty_photometric_interpretation_reads_like_a_missing_one():
    image = imaging.load(_dicom_of(_gradient(), photometric=""), "x.dcm")
    np.testing.assert_array_equal(image.pixels, imaging.load(_dicom_of(_gradient()), "x.dcm").pixels)
    assert image.info.metadata["PhotometricInterpretation"].startswith("missing from the file")


def test_non_finite_float_dicom_pixels_are_said_or_refused():
    values = _gradient().astype(np.float64)
    values[0, :8] = np.nan
    values[1, :4] = 1e300  # beyond float32: was infinite, then 0
    tags = {"PixelData": None, "BitsAllocated": 64, "BitsStored": None, "HighBit": None,
            "PixelRepresentation": None}
    image = imaging.load(_dicom_of(values, DoubleFloatPixelData=values.tobytes(), **tags), "x.dcm")
    assert image.info.metadata["NonFinitePixels"].startswith("12 ") and np.isfinite(image.pixels).all()
    finite = values[np.isfinite(values) & (values < 1e300)]
    assert image.info.value_range == (finite.min(), finite.max())  # neither 0 nor 1e300 drags the range
    assert (image.pixels[0, :8] == image.pixels.min()).all()  # shown black
    nothing = np.full((64, 64), np.nan)
    with pytest.raises(UnreadableImageError, match="no finite pixel values"):
        imaging.load(_dicom_of(nothing, DoubleFloatPixelData=nothing.tobytes(), **tags), "x.dcm")


def test_a_dicom_marker_without_its_preamble_is_read():
    data = _dicom_of(_gradient())
    image = imaging.load(data[128:], "x")  # "DICM" at byte 0
    np.testing.assert_array_equal(image.pixels, imaging.load(data, "x.dcm").pixels)


def test_a_bigtiff_is_recognised_as_tiff():
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(_gradient(np.uint8)).save(out, "TIFF", big_tiff=True)
    assert out.getvalue()[:4] in (b"II+\x00", b"MM\x00+")
    image = imaging.load(out.getvalue(), "x.tif")
    assert image.info.format == "TIFF" and image.pixels.shape == (64, 64)


def test_the_conversion_note_names_the_first_pages_mode():
    """Counting a multi-page TIFF's pages moves the file to its later pages: the note is of the page read."""
    from PIL import Image

    grey = Image.fromarray(_gradient(np.uint8))
    out = io.BytesIO()
    grey.save(out, "TIFF", save_all=True, append_images=[grey.convert("RGB")])
    image = imaging.load(out.getvalue(), "x.tif")
    assert image.info.frames == 2 and "Conversion" not in image.info.metadata, image.info.metadata
