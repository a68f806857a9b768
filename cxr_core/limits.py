"""Every bound the toolkit puts on untrusted input, in one place, each with the reason for its value.

Images, DICOM files, file names and model cards come from outside (uploads, server folders,
downloaded model folders). Each limit below is checked *before* the work it bounds (decoding,
inflating, parsing, allocating), so a hostile or broken input costs a clear message, not the
machine's memory or a core for a minute.
"""

from __future__ import annotations

MiB = 1 << 20

# --- image size and shape -------------------------------------------------------------------------------
# Width x height of one image. The largest radiograph detectors (43 x 43 cm at 0.1 mm) give ~4300 x 4300
# = 18.5 megapixels; 50 M leaves room for scanned films while keeping the float32 copy under 200 MB.
MAX_PIXELS = 50_000_000
# Any input file, in bytes. A 4300 x 4300 16-bit uncompressed DICOM is 37 MB; Streamlit's own upload
# limit is 200 MB. Larger files are refused from their size alone, before a byte is parsed.
MAX_FILE_BYTES = 256 * MiB


def file_too_large(size: int, at_least: bool = False) -> str:
    """What a user is told about a file over ``MAX_FILE_BYTES`` of ``size`` bytes (``at_least``: the size is a
    lower bound, e.g. what was read before stopping)."""
    return (f"The file is too large ({size / MiB:,.0f} MB{' or more' if at_least else ''}, over the limit of "
            f"{MAX_FILE_BYTES // MiB} MB). Export a smaller image.")

# --- DICOM ------------------------------------------------------------------------------------------------
# One decoded frame (rows x columns x samples x bytes per sample). The largest detector's 16-bit frame is
# 37 MB and a 4300 x 4300 RGB secondary capture 55 MB; a compressed bomb is refused before it is decoded.
MAX_DICOM_FRAME_BYTES = 64 * MiB
# All frames declared (rows x columns x frames x samples x bytes). Only the first frame is shown, but the
# reader holds the whole Pixel Data element; 128 MB allows a few full-size frames (dual energy: three).
MAX_DICOM_PIXEL_BYTES = 128 * MiB
# What a Deflated Explicit VR Little Endian dataset may inflate to: the pixel bound plus room for every
# other element. Inflation streams and stops at this size, so a 1000:1 bomb never reaches memory.
MAX_DICOM_INFLATED_BYTES = MAX_DICOM_PIXEL_BYTES + 16 * MiB
# Data elements parsed, nested sequence items included. A radiograph has a few hundred (an enhanced
# multi-frame file a few thousand); a forged file of millions of empty elements or sequence items would
# otherwise cost pydicom tens of microseconds each: 16 MB of empty items took four minutes of a core.
MAX_DICOM_ELEMENTS = 20_000
# Elements in a VOI or Modality LUT. DICOM LUT descriptors count entries with 16 bits (0 means 65536).
MAX_LUT_ENTRIES = 65_536
# |stored value x RescaleSlope + RescaleIntercept| must stay under float32's largest finite value
# (3.4e38), or the modality values overflow to infinity; real slopes are 0.001-1000.
MAX_MODALITY_VALUE = 1e37

# A MONOCHROME2 DICOM film is shown inverted when both lung fields are brighter than the mediastinum by this
# share of its 1-99 percentile range (imaging.lungs_brighter_than_mediastinum). Measured with that rule on the
# films here: 1151 real chest films of every collection at most 0.072 (mean -0.30), the one DICOM chest whose
# values run opposite to its header (pylibjpeg-data JPEG2KLossless_1s_1f_u_16_16.dcm) about 0.39.
POLARITY_MARGIN = 0.2

# --- display ----------------------------------------------------------------------------------------------
# Longest side of an image sent to the browser. Streamlit shrinks anything wider than 1460 px itself, and
# a 30000 x 10 strip shrunk that way is 0 px tall (an error); below this size it draws what it is given.
MAX_DISPLAY_SIDE = 1400

# --- model cards ------------------------------------------------------------------------------------------
# Model input side in pixels. Published chest X-ray classifiers use 224-512 px; at 1024 px a DenseNet169
# forward and Grad-CAM already need ~4 GB, and 100000 px would ask for 40 GB per image.
MIN_INPUT_SIZE = 16
MAX_INPUT_SIZE = 1024
# Classes in one model: the head has one logit per class; chest X-ray label sets have at most ~20.
MAX_CLASSES = 100
