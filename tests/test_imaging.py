"""cxr_core.imaging: real DICOM and JPEG files, generated files of every format, and every bad input."""

from __future__ import annotations

import io
import struct
import time
import warnings
import zlib

import numpy as np
import pydicom
import pytest
from badinput import transfer_syntax_running_through
from conftest import DATA, DICOM
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from cxr_core import imaging
from cxr_core.errors import UnreadableImageError

SIIM = "torchxrayvision/1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
# Every file in the DICOM folder: (photometric, BitsStored, rows, columns), or None where it must fail.
DICOM_FILES = {
    "fo-dicom/CR-MONO1-10-chest.dcm": ("MONOCHROME1", 10, 440, 440),
    "pydicom-data/RG1_J2KI.dcm": ("MONOCHROME1", 15, 1955, 1841),
    "pylibjpeg-data/RG1_JLSN.dcm": ("MONOCHROME1", 15, 1955, 1841),
    "pylibjpeg-data/966_fixed.dcm": ("MONOCHROME1", 12, 2128, 2000),
    "pylibjpeg-data/966.dcm": None,
    "pylibjpeg-data/JPEG2KLossless_1s_1f_u_16_16.dcm": ("MONOCHROME2", 16, 1416, 1420),
    SIIM: ("MONOCHROME2", 8, 1024, 1024),
    "torchxrayvision/Fake_MONOHR1.dcm": ("MONOCHROME1", 8, 1024, 1024),
    "non_chest/CR-ModalitySequenceLUT.dcm": ("MONOCHROME1", 10, 1576, 1976),
}
CHESTS = ["fo-dicom/CR-MONO1-10-chest.dcm", "pydicom-data/RG1_J2KI.dcm", "pylibjpeg-data/RG1_JLSN.dcm",
          "pylibjpeg-data/966_fixed.dcm", SIIM, "pylibjpeg-data/JPEG2KLossless_1s_1f_u_16_16.dcm"]  # fmt: skip
PATIENT = {"PatientName": "Doe^Jane", "PatientID": "PID-73519", "PatientBirthDate": "19610704",
           "AccessionNumber": "ACC-88412", "InstitutionName": "St Example Hospital", "StudyDate": "20240229",
           "ReferringPhysicianName": "Who^Doctor", "OtherPatientIDs": "OTHER-4417"}  # fmt: skip


def _load(name: str, **kwargs) -> imaging.LoadedImage:
    return imaging.load(DICOM / name, **kwargs)


def _raw(name: str) -> np.ndarray:
    """Stored values through pydicom alone, as an independent reference."""
    ds = pydicom.dcmread(DICOM / name, force=True)
    if "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    return ds.pixel_array.astype(np.float64)


def _dicom(pixels: np.ndarray, frames: int = 1, **tags) -> bytes:
    """An uncompressed DICOM file (with preamble and file meta) holding ``pixels`` (frames, H, W[, 3])."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if pixels.ndim == 4 else pixels.shape[-2:]
    ds.SamplesPerPixel = 3 if pixels.ndim == 4 else 1
    ds.PhotometricInterpretation = "RGB" if pixels.ndim == 4 else "MONOCHROME2"
    if pixels.ndim == 4:
        ds.PlanarConfiguration = 0
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = pixels.tobytes()
    for key, value in tags.items():
        setattr(ds, key, value)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _encode(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _gradient(h: int = 32, w: int = 64) -> np.ndarray:
    return np.tile(np.linspace(0, 255, w).round().astype(np.uint8), (h, 1))


def _lung_contrast(pixels: np.ndarray) -> tuple[float, float, float]:
    """Mean of the central vertical strip (spine, mediastinum) and of the left and right lung fields."""
    h, w = pixels.shape
    rows = slice(h // 4, 3 * h // 4)
    centre = pixels[rows, w // 2 - w // 20 : w // 2 + w // 20].mean()
    left, right = pixels[rows, w // 5 : w // 3].mean(), pixels[rows, 2 * w // 3 : 4 * w // 5].mean()
    return float(centre), float(left), float(right)


# --- real DICOM files ---------------------------------------------------------------------------------------------


def test_dicom_table_covers_the_folder(data_dir):
    assert sorted(str(p.relative_to(DICOM)) for p in DICOM.rglob("*.dcm")) == sorted(DICOM_FILES)


@pytest.mark.parametrize("name", sorted(DICOM_FILES))
def test_every_dicom_loads_or_fails_as_documented(data_dir, name):
    expected = DICOM_FILES[name]
    with warnings.catch_warnings(record=True) as caught:  # pydicom warnings may quote tag values
        warnings.simplefilter("always")
        if expected is None:
            with pytest.raises(UnreadableImageError, match="could not be decoded.*corrupt") as err:
                _load(name)
            assert "JPEG 2000" in str(err.value) and "Re-export" in str(err.value)  # what was wrong, what to do
        else:
            img = _load(name)
    assert [str(w.message) for w in caught] == []
    if expected is None:
        return
    photometric, bits, rows, cols = expected
    assert img.pixels.shape == (rows, cols) and img.pixels.dtype == np.float32
    assert 0.0 <= img.pixels.min() < 0.2 and 0.8 < img.pixels.max() <= 1.0
    info = img.info
    assert (info.format, info.width, info.height, info.frames) == ("DICOM", cols, rows, 1)
    # MONOCHROME1 is shown inverted; so is the one MONOCHROME2 chest whose values run the wrong way (below).
    inverted = photometric == "MONOCHROME1" or name == "pylibjpeg-data/JPEG2KLossless_1s_1f_u_16_16.dcm"
    assert (info.photometric, info.bit_depth, info.inverted) == (photometric, bits, inverted)
    assert info.metadata["PhotometricInterpretation"] == photometric
    assert info.value_range[0] < info.value_range[1] < 2**bits
    assert info.window_source in ("file", "percentile")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some test files break VR length rules in patient tags
        ds = pydicom.dcmread(DICOM / name, force=True, stop_before_pixels=True)
        secrets = [str(ds[key].value) for key in ("PatientName", "PatientID", "AccessionNumber") if ds.get(key)]
    assert [s for s in secrets if len(s) > 2 and s in repr(info)] == []


@pytest.mark.parametrize("name", CHESTS)
def test_chest_lungs_dark_whatever_the_photometric(data_dir, name):
    centre, left, right = _lung_contrast(_load(name).pixels)
    assert centre > left + 0.05 and centre > right + 0.05, (centre, left, right)


def test_fake_monochrome1_is_exact_inverse_of_siim_sample(data_dir):
    a, b = _load(SIIM), _load("torchxrayvision/Fake_MONOHR1.dcm")
    assert not a.info.inverted and b.info.inverted
    np.testing.assert_allclose(1.0 - a.pixels, b.pixels, atol=1e-6)
    assert a.pixels.std() > 0.15


def test_a_monochrome2_film_whose_values_run_the_wrong_way_is_shown_inverted_and_says_so(data_dir):
    """The JPEG 2000 DX chest says MONOCHROME2, but its lungs hold the high values (a converter's raw detector
    data): it is shown inverted, with a reading note; a MONOCHROME2 film the right way round is not touched,
    whatever window the viewer asks for."""
    name = "pylibjpeg-data/JPEG2KLossless_1s_1f_u_16_16.dcm"
    img = _load(name)
    assert img.info.photometric == "MONOCHROME2" and img.info.inverted
    assert any(note.startswith("Polarity: the film's values run opposite") for note in imaging.reading_notes(img.info))
    windowed = _load(name, window=img.info.window)
    np.testing.assert_allclose(windowed.pixels, img.pixels, atol=1e-3)  # the viewer's re-render is not flipped
    assert imaging.lungs_brighter_than_mediastinum(img.values)
    siim = _load(SIIM)
    assert not siim.info.inverted and "Polarity" not in siim.info.metadata
    assert not imaging.lungs_brighter_than_mediastinum(siim.values)
    assert imaging.lungs_brighter_than_mediastinum(siim.values.max() - siim.values)  # the same film, values reversed
    assert not imaging.lungs_brighter_than_mediastinum(np.full((64, 64), 7.0, np.float32))  # flat: no opinion


def test_jpeg2000_lossy_and_jpegls_near_lossless_agree(data_dir):
    a, b = _load("pydicom-data/RG1_J2KI.dcm").pixels, _load("pylibjpeg-data/RG1_JLSN.dcm").pixels
    assert np.abs(a - b).mean() < 0.01
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99


def test_window_that_misses_the_pixels_falls_back_to_percentiles(data_dir):
    img = _load("pylibjpeg-data/JPEG2KLossless_1s_1f_u_16_16.dcm")
    assert img.info.metadata["WindowCenter"] == "2725"  # the stored window, unused
    assert img.info.window_source == "percentile"
    assert img.info.value_range == (32744.0, 65535.0)
    center, width = img.info.window
    assert 32744 < center - width / 2 < center + width / 2 < 65535
    saturated = np.mean((img.pixels <= 0.0) | (img.pixels >= 1.0))
    assert img.pixels.std() > 0.1 and saturated < 0.05


def test_no_file_meta_uses_the_files_own_window(data_dir):
    img = _load("fo-dicom/CR-MONO1-10-chest.dcm")
    assert (img.info.window, img.info.window_source) == ((550.0, 1024.0), "file")
    assert img.info.metadata["TransferSyntax"] == "Implicit VR Little Endian"
    expected = 1 - np.clip((_raw("fo-dicom/CR-MONO1-10-chest.dcm") - 549.5) / 1023 + 0.5, 0, 1)
    np.testing.assert_allclose(img.pixels, expected, atol=1e-5)


def test_caller_window_is_honoured(data_dir):
    name = "fo-dicom/CR-MONO1-10-chest.dcm"
    default, narrow = _load(name), _load(name, window=(400, 200))
    assert (narrow.info.window, narrow.info.window_source) == ((400.0, 200.0), "caller")
    expected = 1 - np.clip((_raw(name) - 399.5) / 199 + 0.5, 0, 1)
    np.testing.assert_allclose(narrow.pixels, expected, atol=1e-5)
    assert np.abs(narrow.pixels - default.pixels).mean() > 0.05


def test_caller_window_must_have_positive_width(data_dir):
    with pytest.raises(UnreadableImageError, match="width must be positive"):
        _load("fo-dicom/CR-MONO1-10-chest.dcm", window=(400, 0))


def test_modality_lut_sequence_file_is_windowed_from_its_lut_output(data_dir):
    img = _load("non_chest/CR-ModalitySequenceLUT.dcm")
    assert img.info.window_source == "percentile" and img.info.value_range == (0.0, 1023.0)
    assert "JPEG Lossless" in img.info.metadata["TransferSyntax"]


# --- real JPEGs -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("folder", ["kermany/train/NORMAL", "kermany/train/PNEUMONIA", "covid19_radiography/COVID",
                                    "covid19_radiography/Normal", "covid19_image_dataset/train/Covid"])  # fmt: skip
def test_real_jpegs_path_equals_bytes(data_dir, folder):
    for path in sorted((DATA / folder).iterdir())[:3]:
        img = imaging.load(path)
        assert img.pixels.dtype == np.float32 and img.pixels.ndim == 2
        assert img.pixels.shape == (img.info.height, img.info.width)
        assert 0.0 <= img.pixels.min() and img.pixels.max() <= 1.0 and img.pixels.std() > 0.05
        assert (img.info.format, img.info.bit_depth, img.info.window_source) == ("JPEG", 8, "none")
        if folder.startswith(("kermany", "covid19_radiography")):
            assert img.pixels.shape == (224, 224)
        same = imaging.load(path.read_bytes(), path.name)
        np.testing.assert_array_equal(same.pixels, img.pixels)
        assert same.info == img.info


def test_224px_jpeg_loads_in_milliseconds(data_dir):
    data = sorted((DATA / "kermany/train/NORMAL").iterdir())[0].read_bytes()
    imaging.load(data)
    times = []
    for _ in range(20):
        start = time.perf_counter()
        imaging.load(data)
        times.append(time.perf_counter() - start)
    assert np.median(times) < 0.02  # ~1 ms on an idle core; generous for a shared CI machine


# --- generated files of every format -----------------------------------------------------------------------------


def test_16bit_png_scales_to_full_range(tmp_path):
    values = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (4, 1))
    path = tmp_path / "grad16.png"
    Image.fromarray(values).save(path)
    img = imaging.load(path)
    assert (img.info.format, img.info.bit_depth) == ("PNG", 16)
    np.testing.assert_allclose(img.pixels, values / 65535.0, atol=1e-6)
    assert img.pixels.max() == 1.0 and img.pixels[0, 128] == pytest.approx(values[0, 128] / 65535, abs=1e-6)


@pytest.mark.parametrize("fmt,kwargs", [("BMP", {}), ("TIFF", {}), ("WEBP", {"lossless": True}), ("PNG", {})])
def test_lossless_formats_round_trip_grayscale(fmt, kwargs):
    grad = _gradient()
    img = imaging.load(_encode(Image.fromarray(grad), fmt, **kwargs), f"x.{fmt.lower()}")
    assert img.info.format == fmt and img.pixels.shape == (32, 64)
    np.testing.assert_allclose(img.pixels, grad / 255.0, atol=1e-6)


def test_gif_first_frame_and_frame_count():
    first, second = Image.fromarray(_gradient()), Image.fromarray(255 - _gradient())
    img = imaging.load(_encode(first, "GIF", save_all=True, append_images=[second]), "anim.gif")
    assert (img.info.format, img.info.frames) == ("GIF", 2)
    np.testing.assert_allclose(img.pixels, _gradient() / 255.0, atol=1.5 / 255)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "LA"])
def test_colour_modes_become_luma(mode):
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[:, :8] = (200, 100, 50)
    rgb[:, 8:] = (10, 250, 120)
    im = Image.fromarray(rgb).convert("RGBA" if mode == "RGBA" else "RGB")
    if mode == "P":
        im = im.quantize(4)
    elif mode == "LA":
        im = Image.fromarray(rgb).convert("L").convert("LA")
    img = imaging.load(_encode(im, "PNG"))
    luma = (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]) / 255
    assert img.info.photometric == mode and img.pixels.shape == (16, 16)
    np.testing.assert_allclose(img.pixels, luma, atol=1.0 / 255)
    assert ("Conversion" in img.info.metadata) == (mode != "LA")


@pytest.mark.parametrize("mode", ["RGB", "CMYK"])
def test_colour_jpegs_become_luma(mode):
    rgb = np.full((16, 16, 3), (200, 100, 50), np.uint8)
    img = imaging.load(_encode(Image.fromarray(rgb).convert(mode), "JPEG", quality=95))
    assert img.info.photometric == mode
    assert img.pixels.mean() == pytest.approx((0.299 * 200 + 0.587 * 100 + 0.114 * 50) / 255, abs=4 / 255)


def test_exif_orientation_is_applied():
    stored = np.zeros((10, 20), np.uint8)  # 20 wide, 10 high; bright block at the stored top-left
    stored[:5, :5] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    img = imaging.load(_encode(Image.fromarray(stored), "JPEG", exif=exif, quality=95))
    assert img.pixels.shape == (20, 10) and (img.info.width, img.info.height) == (10, 20)
    assert img.pixels[:5, 5:].mean() > 0.9  # the block is now top-right
    assert img.pixels[:5, :5].mean() < 0.1 and img.pixels[5:].mean() < 0.1
    assert img.info.metadata["ExifOrientation"] == "6"


# --- generated DICOM ---------------------------------------------------------------------------------------------


def test_multiframe_dicom_gives_first_frame(tmp_path):
    frames = np.stack([np.tile(np.arange(0, 4096, 64, dtype=np.uint16), (8, 1)) + i for i in (0, 7, 9)])
    frames[1:] = 4095 - frames[1:]
    path = tmp_path / "IM000001"  # no extension: the bytes say DICOM
    path.write_bytes(_dicom(frames, 3, BitsStored=12, HighBit=11, WindowCenter=2048, WindowWidth=4096))
    img = imaging.load(path)
    assert (img.info.frames, img.info.window_source, img.pixels.shape) == (3, "file", (8, 64))
    np.testing.assert_allclose(img.pixels, frames[0] / 4095.0, atol=1e-6)


def test_rescale_slope_intercept_sets_value_range():
    stored = np.tile(np.linspace(0, 1000, 50).astype(np.uint16), (10, 1))
    img = imaging.load(_dicom(stored, RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=-24, WindowWidth=2001))
    assert img.info.value_range == (-1024.0, 976.0)
    modality = 2.0 * stored - 1024
    np.testing.assert_allclose(img.pixels, np.clip((modality + 24.5) / 2000 + 0.5, 0, 1), atol=1e-6)  # PS3.3 C.11.2.1.2


@pytest.mark.parametrize("slope", [0.001, 0.0001])
def test_small_float_values_keep_their_grey_levels_in_the_default_and_in_a_chosen_window(slope):
    """A RescaleSlope that makes the values 0..1 or 0..0.1: the default (percentile) window spans the film, and a
    window the user chooses over half the range gives many grey levels, not two (LINEAR's width - 1 would)."""
    stored = np.tile(np.linspace(0, 1000, 64).astype(np.uint16), (16, 1))
    img = imaging.load(_dicom(stored, RescaleSlope=slope))
    assert img.info.window_source == "percentile"
    assert img.pixels.min() == 0.0 and img.pixels.max() == 1.0 and len(np.unique(img.pixels)) > 50
    top = 1000 * slope
    chosen = imaging.load(_dicom(stored, RescaleSlope=slope), window=(top / 2, top / 2))
    modality = stored.astype(np.float64) * slope
    np.testing.assert_allclose(chosen.pixels, np.clip((modality - top / 4) / (top / 2), 0, 1), atol=2e-5)
    assert len(np.unique(chosen.pixels)) > 25
    stored_window = imaging.load(_dicom(stored, RescaleSlope=slope, WindowCenter=top / 2, WindowWidth=top * 0.8))
    assert stored_window.info.window_source == "file" and len(np.unique(stored_window.pixels)) > 40


def test_modality_lut_sequence_is_applied():
    # A non-linear modality LUT (stored v -> v**2 // 64): a reader that skipped it, or used
    # rescale slope/intercept instead, would give pixels linear in the stored values.
    stored = np.tile(np.arange(0, 256, dtype=np.uint16), (4, 1))
    lut = [v * v // 64 for v in range(256)]  # 0 .. 1016
    item = Dataset()
    item.LUTDescriptor = [256, 0, 16]
    item.ModalityLUTType = "US"
    item.add_new("LUTData", "US", lut)
    img = imaging.load(_dicom(stored, BitsStored=8, ModalityLUTSequence=Sequence([item]),
                              RescaleSlope=3, RescaleIntercept=-100,  # must be ignored: the LUT wins
                              WindowCenter=508, WindowWidth=1017))
    assert img.info.value_range == (0.0, 1016.0)
    assert (img.info.window_source, img.info.window) == ("file", (508.0, 1017.0))
    modality = np.array(lut, dtype=np.float64)[stored]
    np.testing.assert_allclose(img.pixels, np.clip((modality - 507.5) / 1016 + 0.5, 0, 1), atol=1e-6)
    linear = np.clip((stored * 3.0 - 100 - 507.5) / 1016 + 0.5, 0, 1)
    assert np.abs(img.pixels - linear).max() > 0.2


def test_voi_lut_sequence_is_applied():
    stored = np.tile(np.arange(0, 256, 4, dtype=np.uint16), (4, 1))
    item = Dataset()
    item.LUTDescriptor = [256, 0, 12]
    item.add_new("LUTData", "US", [min(4 * v, 1000) for v in range(256)])  # saturates at stored 250
    img = imaging.load(_dicom(stored, BitsStored=8, VOILUTSequence=Sequence([item])))
    assert (img.info.window_source, img.info.window) == ("voi_lut", None)
    np.testing.assert_allclose(img.pixels, np.minimum(4 * stored, 1000) / 1000.0, atol=1e-6)


def test_voi_lut_stored_as_ow_bytes_follows_the_files_byte_order():
    """In an Explicit VR Big Endian file (retired, still in archives) LUT Data as OW bytes is big-endian."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import ExplicitVRBigEndian

    stored = np.tile(np.arange(0, 256, 4, dtype=np.uint16), (4, 1))
    lut = np.array([min(4 * v, 1000) for v in range(256)], dtype=np.uint16)
    for syntax, order in ((ExplicitVRLittleEndian, "<u2"), (ExplicitVRBigEndian, ">u2")):
        ds = pydicom.dcmread(io.BytesIO(_dicom(stored, BitsStored=16)))
        ds.file_meta.TransferSyntaxUID = syntax
        ds.PixelData = stored.astype(order).tobytes()
        item = Dataset()
        item.LUTDescriptor = [256, 0, 16]
        item.add_new("LUTData", "OW", lut.astype(order).tobytes())
        ds.VOILUTSequence = Sequence([item])
        fp = DicomBytesIO()
        fp.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(fp, ds.file_meta, enforce_standard=True)
        fp.is_little_endian, fp.is_implicit_VR = syntax == ExplicitVRLittleEndian, False
        write_dataset(fp, ds)
        img = imaging.load(fp.getvalue())
        assert img.info.window_source == "voi_lut", syntax
        np.testing.assert_allclose(img.pixels, np.minimum(4 * stored, 1000) / 1000.0, atol=1e-6, err_msg=str(syntax))


def test_pixel_padding_is_left_out_of_the_automatic_window():
    """A film padded to a rectangle (40 % of its pixels at the padding value 0, anatomy 1000-2000, no window):
    the automatic window spans the anatomy, not the padding."""
    stored = np.zeros((50, 100), np.uint16)
    stored[:, 40:] = np.tile(np.linspace(1000, 2000, 60).astype(np.uint16), (50, 1))
    anatomy = np.s_[:, 40:]
    plain = imaging.load(_dicom(stored))
    padded = imaging.load(_dicom(stored, PixelPaddingValue=0))
    assert plain.pixels[anatomy].min() > 0.3  # stretched over the padding: the anatomy loses a third of the greys
    assert padded.info.window_source == "percentile"
    assert padded.pixels[anatomy].min() < 0.02 and padded.pixels[anatomy].max() > 0.98
    ranged = imaging.load(_dicom(stored, PixelPaddingValue=0, PixelPaddingRangeLimit=10))
    np.testing.assert_allclose(ranged.pixels, padded.pixels, atol=1e-6)
    ds = pydicom.dcmread(io.BytesIO(_dicom(stored)))
    ds.add_new(0x00280120, "LO", "none")  # a malformed Pixel Padding Value: ignored, the film still loads
    buf = io.BytesIO()
    ds.save_as(buf)
    np.testing.assert_allclose(imaging.load(buf.getvalue()).pixels, plain.pixels, atol=1e-6)


def test_float_dicom_with_nan_stays_finite():
    values = np.tile(np.linspace(-1, 1, 16, dtype=np.float32), (4, 1))
    values[0, 0] = np.nan
    ds = pydicom.dcmread(io.BytesIO(_dicom(np.zeros((4, 16), np.uint16))))
    del ds.PixelData
    ds.BitsAllocated, ds.SamplesPerPixel = 32, 1
    for key in ("BitsStored", "HighBit", "PixelRepresentation"):
        delattr(ds, key)
    ds.FloatPixelData = values.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf)
    img = imaging.load(buf.getvalue())
    assert np.isfinite(img.pixels).all() and img.info.value_range == (-1.0, 1.0)
    assert img.pixels[1, 0] < 0.05 and img.pixels[1, -1] > 0.95


def _float_dicom(values: np.ndarray, **tags) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(_dicom(np.zeros(values.shape, np.uint16))))
    del ds.PixelData
    ds.BitsAllocated, ds.SamplesPerPixel = 32, 1
    for key in ("BitsStored", "HighBit", "PixelRepresentation"):
        delattr(ds, key)
    ds.FloatPixelData = values.astype(np.float32).tobytes()
    for key, value in tags.items():
        setattr(ds, key, value)
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def test_missing_float_samples_are_black_in_a_monochrome1_film_too():
    """NaN samples are shown black as the note says, also where MONOCHROME1's inversion (or a negative slope) would
    turn the film's lowest value white."""
    values = np.tile(np.linspace(0, 1000, 16, dtype=np.float32), (8, 1))
    values[:, :3] = np.nan
    for tags in ({"PhotometricInterpretation": "MONOCHROME1"}, {}, {"RescaleSlope": -1, "RescaleIntercept": 0}):
        img = imaging.load(_float_dicom(values, **tags))
        assert img.pixels[:, :3].max() == 0.0, tags
        assert img.pixels[:, 3:].max() > 0.9, tags  # the rest of the film is still there, windowed
        assert img.info.metadata["NonFinitePixels"] == "24 NaN or infinite pixels shown black"


def test_twelve_bit_values_stored_in_the_high_bits_are_read_from_there(data_dir):
    """HighBit 15 with BitsStored 12: the values sit in bits 4-15 (old modalities did so). Read from bit 0, as
    pydicom does, the film was noise with no word said."""
    film = np.asarray(Image.open(data_dir / "kermany" / "train" / "NORMAL" / "IM-0115-0001.jpeg").convert("L")
                      .resize((256, 256)), dtype=np.uint16) * 16  # 12-bit values
    plain = imaging.load(_dicom(film, BitsStored=12, HighBit=11))
    for pixel_representation, data in ((0, film << 4), (1, (film.astype(np.int16) - 2048) << 4)):
        high = imaging.load(_dicom(data.astype(np.uint16 if pixel_representation == 0 else np.int16),
                                   BitsStored=12, HighBit=15, PixelRepresentation=pixel_representation))
        assert np.corrcoef(high.pixels.ravel(), plain.pixels.ravel())[0, 1] > 0.999, pixel_representation
        assert high.info.metadata["BitPosition"] == ("the 12-bit values sit in bits 4-15 of each sample (HighBit 15): "
                                                     "read from there")
        assert "BitPosition: " in " ".join(imaging.reading_notes(high.info, cautions=True))
    lo, hi = high.info.value_range
    assert -2048 <= lo < hi <= 2047  # signed 12-bit values, sign kept through the shift
    assert "BitPosition" not in plain.info.metadata
    # A stale HighBit (15) over signed 12-bit values stored from bit 0, sign-extended through 16: read as stored.
    signed = np.tile(np.linspace(-2000, 2000, 64).astype(np.int16), (64, 1))
    stale = imaging.load(_dicom(signed, BitsStored=12, HighBit=15, PixelRepresentation=1, WindowCenter=0,
                                WindowWidth=4000))
    assert stale.info.value_range == (-2000.0, 2000.0) and "BitPosition" not in stale.info.metadata
    assert stale.info.window_source == "file"


def _min_is_white_tiff(arr: np.ndarray) -> bytes:
    """A TIFF of ``arr`` whose PhotometricInterpretation (tag 262) says WhiteIsZero."""
    raw = bytearray(_encode(Image.fromarray(arr), "TIFF"))
    assert raw[:2] == b"II"
    ifd = struct.unpack_from("<I", raw, 4)[0]
    for i in range(struct.unpack_from("<H", raw, ifd)[0]):
        entry = ifd + 2 + 12 * i
        if struct.unpack_from("<H", raw, entry)[0] == 262:
            struct.pack_into("<H", raw, entry + 8, 0)
            return bytes(raw)
    raise AssertionError("no tag 262")


@pytest.mark.parametrize("dtype, top", [(np.uint8, 255), (np.uint16, 65535), (np.float32, 1000.0)])
def test_a_tiff_whose_lowest_value_is_white_is_shown_inverted_at_any_depth(dtype, top):
    """TIFF's WhiteIsZero is its MONOCHROME1: Pillow inverts 8-bit files itself, not 16-bit or float ones, which
    came out as negatives."""
    ramp = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (16, 1))
    img = imaging.load(_min_is_white_tiff((ramp * top).astype(dtype)), "film.tif")
    assert img.pixels[:, 0].mean() > 0.99 and img.pixels[:, -1].mean() < 0.01  # stored 0 shown white
    if dtype is not np.uint8:
        assert img.info.inverted and img.info.metadata["Polarity"].startswith("the TIFF states that its lowest")
    if dtype is np.float32:  # missing samples stay black through the inversion, as the note says
        values = (ramp * top).astype(dtype)
        values[:, 20:23] = np.nan
        img = imaging.load(_min_is_white_tiff(values), "film.tif")
        assert img.pixels[:, 20:23].max() == 0.0 and img.pixels[:, 0].mean() > 0.99
        assert img.info.metadata["NonFinitePixels"] == "48 NaN or infinite pixels shown black"


def test_a_16_bit_png_s_transparent_grey_is_composited_on_black():
    grey = np.full((20, 40), 40000, np.uint16)
    grey[:, :10] = 65535  # the tRNS grey: transparent
    img = imaging.load(_encode(Image.fromarray(grey), "PNG", transparency=65535), "film.png")
    assert Image.open(io.BytesIO(_encode(Image.fromarray(grey), "PNG", transparency=65535))).mode == "I;16"
    assert img.pixels[:, :10].max() == 0.0
    np.testing.assert_allclose(img.pixels[:, 10:], 40000 / 65535, atol=1e-6)
    assert img.info.metadata["Transparency"] == "transparent pixels composited on black"


def test_a_colour_dicom_meets_the_colour_rule_as_a_colour_png_does(data_dir):
    from cxr_core import quality

    grey = np.asarray(Image.open(data_dir / "kermany" / "train" / "NORMAL" / "IM-0115-0001.jpeg").convert("L")
                      .resize((256, 256)), dtype=np.float32)
    tinted = np.stack([grey, grey * 0.5, np.zeros_like(grey)], -1).astype(np.uint8)  # a false-colour picture
    dicom = imaging.load(_dicom(tinted[None]))
    png = _encode(Image.fromarray(tinted), "PNG")
    assert dicom.info.colourfulness == pytest.approx(quality.colourfulness(png), rel=0.05)
    checked = quality.assess(dicom, None)
    assert checked.probably_not_chest and checked.reasons[0].startswith("it is a colour picture")
    grey_rgb = imaging.load(_dicom(np.repeat(grey.astype(np.uint8)[None, ..., None], 3, -1)))
    assert grey_rgb.info.colourfulness == 0.0 and not quality.assess(grey_rgb).reasons  # grey saved as RGB: fine
    assert imaging.load(_dicom(grey.astype(np.uint16))).info.colourfulness is None


def test_rgb_dicom_becomes_grayscale():
    rgb = np.zeros((1, 6, 6, 3), np.uint8)
    rgb[..., :] = (200, 100, 50)
    img = imaging.load(_dicom(rgb))
    assert img.info.photometric == "RGB" and "Conversion" in img.info.metadata
    np.testing.assert_allclose(img.pixels, (0.299 * 200 + 0.587 * 100 + 0.114 * 50) / 255, atol=1e-5)


def test_patient_tags_never_reach_the_record():
    img = imaging.load(_dicom(np.zeros((4, 4), np.uint16) + np.arange(4, dtype=np.uint16), **PATIENT))
    text = repr(img.info) + repr(img.info.metadata)
    assert [value for value in PATIENT.values() if value.split("^")[0] in text] == []
    assert img.info.metadata["Modality"] == "DX"


# --- bad input ----------------------------------------------------------------------------------------------------


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("data,cause", [
    (b"", "empty"),
    (b"patient notes: cough for three days\n", "text file"),
    ("Röntgen Thorax, Befund: unauffällig\n".encode(), "text file"),
    (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj", "PDF"),
    (b"<!DOCTYPE html><html><body>404</body></html>", "HTML"),
    (b"PK\x03\x04\x14\x00\x00\x00", "ZIP"),
])  # fmt: skip
def test_not_an_image(data, cause):
    with pytest.raises(UnreadableImageError, match=cause):
        imaging.load(data, "scan.png")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_files_are_rejected(fmt):
    rng = np.random.default_rng(0)
    data = _encode(Image.fromarray(rng.integers(0, 255, (256, 256), dtype=np.uint8)), fmt)
    with pytest.raises(UnreadableImageError, match="truncated"):
        imaging.load(data[: len(data) // 2])


def test_pixel_bomb_fails_fast_before_decoding():
    start = time.perf_counter()
    with pytest.raises(UnreadableImageError, match="too large"):
        imaging.load(_png_header(40000, 40000))
    assert time.perf_counter() - start < 0.5


def test_max_pixels_applies_to_pillow_and_dicom():
    with pytest.raises(UnreadableImageError, match="64 x 32 = 2,048 pixels, over the limit of 1,000"):
        imaging.load(_encode(Image.fromarray(_gradient()), "PNG"), max_pixels=1000)
    bomb = _dicom(np.zeros((2, 2), np.uint16), Rows=40000, Columns=40000)  # header lies; pixels never decoded
    with pytest.raises(UnreadableImageError, match="40000 x 40000"):
        imaging.load(bomb)


def test_dicom_without_pixel_data(tmp_path):
    ds = pydicom.dcmread(io.BytesIO(_dicom(np.zeros((2, 2), np.uint16))))
    del ds.PixelData
    path = tmp_path / "report.dcm"
    ds.save_as(path)
    with pytest.raises(UnreadableImageError, match="no image"):
        imaging.load(path)


def test_missing_path_and_wrong_type(tmp_path):
    with pytest.raises(UnreadableImageError, match="could not be found") as err:
        imaging.load(tmp_path / "Doe_Jane_chest.dcm")
    assert "Doe" not in str(err.value)  # file names may carry patient names
    with pytest.raises(UnreadableImageError, match="file path or the file's bytes"):
        imaging.load(12345)  # type: ignore[arg-type]


def test_only_unreadable_image_error_escapes():
    rng = np.random.default_rng(1)
    blobs = [bytes(rng.integers(0, 256, n, dtype=np.uint8)) for n in (1, 7, 200, 5000)]
    blobs += [b"\xff\xd8\xff" + bytes(40), b"BM" + bytes(60), b"GIF89a" + bytes(20), b"\x08\x00\x05\x00" + bytes(300)]
    for blob in blobs:
        with pytest.raises(UnreadableImageError):
            imaging.load(blob, "x.dcm")


def test_image_names():
    assert all(map(imaging.is_image_name, ["a.dcm", "A.JPG", "b.png", "IM0001", "1.2.840.113619.2.55.3", "c.tiff"]))
    assert not any(map(imaging.is_image_name, ["notes.txt", "report.pdf", ".DS_Store", "._x.jpg", "data.csv"]))


@pytest.mark.parametrize("damage", ["length runs on", "not a uid"])
def test_a_damaged_transfer_syntax_uid_is_refused_as_a_damaged_header(damage):
    """A Transfer Syntax UID whose length swallows the elements after it (or that holds no UID at all) is
    named as the damage, not read on into a misleading message (it used to say 'no Pixel Data: a report')."""
    good = _dicom(_gradient().astype(np.uint16), PatientName="Doe^Jane")
    assert imaging.load(good, "x.dcm").pixels.shape == (32, 64)  # the same file, undamaged, reads
    if damage == "length runs on":
        damaged = transfer_syntax_running_through(good, b"Doe^Jane")
    else:
        uid = ExplicitVRLittleEndian.encode() + b"\x00"  # as written (padded to an even length)
        damaged = good.replace(uid, b"1.2.840.x0008.1.2.1\x00"[:len(uid)], 1)
        assert damaged != good
    with pytest.raises(UnreadableImageError, match="header is damaged: its transfer syntax is not a DICOM UID"):
        imaging.load(damaged, "x.dcm")


def test_presentation_lut_shape_inverse_on_monochrome2_is_shown_inverted_and_says_so(data_dir):
    """PS3.3 C.11.6.1.2: INVERSE shows the minimum value as white. The reader ignored it on MONOCHROME2, so such
    a film reached the model as a negative unless the polarity heuristic happened to fire."""
    ds = pydicom.dcmread(DICOM / SIIM)
    plain = _load(SIIM)
    ds.PresentationLUTShape = "INVERSE"
    buffer = io.BytesIO()
    ds.save_as(buffer)
    shown = imaging.load(buffer.getvalue(), "inverse.dcm")
    assert shown.info.inverted and not plain.info.inverted
    np.testing.assert_allclose(shown.pixels, 1.0 - plain.pixels, atol=1e-6)
    notes = imaging.reading_notes(shown.info)
    assert [n for n in notes if n.startswith("Presentation: the header's Presentation LUT Shape INVERSE")]
    assert not [n for n in notes if n.startswith("Polarity")]  # one inversion, one reason


def test_a_multi_frame_file_says_that_only_its_first_frame_is_classified():
    frames = np.stack([np.full((32, 32), v, np.uint16) for v in (100, 2000, 4000)])
    frames[0, :, :16] = 900  # the first frame is not flat
    img = imaging.load(_dicom(frames, frames=3), "three.dcm")
    assert img.info.frames == 3 and img.pixels[:, :16].mean() > img.pixels[:, 16:].mean()
    assert imaging.reading_notes(img.info) == ["Frames: 3 frames in the file: only the first is shown and classified"]
    single = imaging.load(_dicom(frames[:1]), "one.dcm")
    assert imaging.reading_notes(single.info) == []


@pytest.mark.parametrize("fmt", ["TIFF", "GIF"])
def test_a_multi_page_tiff_or_animated_gif_says_that_only_its_first_frame_is_classified(fmt):
    """Only the first frame of a multi-page TIFF or an animated GIF was classified, with no note, where a DICOM
    with several frames had one on the page, in the report and in the batch table."""
    from PIL import Image

    first = np.tile(np.linspace(0, 255, 32, dtype=np.uint8), (32, 1))
    pages = [Image.fromarray(first), Image.fromarray(255 - first)]  # the second frame inverted
    buffer = io.BytesIO()
    pages[0].save(buffer, format=fmt, save_all=True, append_images=pages[1:])
    img = imaging.load(buffer.getvalue(), f"two.{fmt.lower()}")
    assert img.info.frames == 2 and img.pixels[:, 0].mean() < img.pixels[:, -1].mean()  # the first frame's
    frames = [n for n in imaging.reading_notes(img.info) if n.startswith("Frames")]  # a GIF is converted too
    assert frames == ["Frames: 2 frames in the file: only the first is shown and classified"]
    single = io.BytesIO()
    pages[0].save(single, format=fmt)
    assert not [n for n in imaging.reading_notes(imaging.load(single.getvalue(), f"one.{fmt.lower()}").info)
                if n.startswith("Frames")]
