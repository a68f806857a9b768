"""Is this probably not a frontal chest radiograph? Simple rules a clinician can check.

The classifiers were trained on frontal chest films only; on anything else their output
means nothing. ``assess`` flags an input when any of these rules fires (bounds calibrated
on real images from ../shared/data, see ``build_template.py``):

1. colour: the original file is a colour picture (Hasler-Suesstrunk colourfulness above
   ``COLOUR_MAX``; grey X-rays saved as RGB score about 0);
2. blank: the image is (nearly) one flat grey (pixel standard deviation below ``BLANK_STD``);
3. DICOM tags: the modality is not radiography (CR/DX) or the body part is not the chest;
4. shape: width / height outside ``ASPECT_RANGE`` (chest films are roughly square);
5. template: the 32x32 rank thumbnail (see ``thumbnail``) hardly correlates with the mean upright chest film
   (below ``TEMPLATE_MIN``), or correlates weakly (below ``SIDEWAYS_BELOW``) and better
   with that mean turned 90 degrees (a film on its side, a dental panoramic); a strongly
   negative correlation (below ``INVERTED_BELOW``) is reported as a negative (inverted) film;
   a correlation with that mean turned upside down higher than upright by ``UPSIDE_DOWN_MARGIN``
   is reported as an upside-down film.

Lateral views are not reliably caught. Of 1451 real films turned upside down, 1331 (92 %) are flagged:
96-100 % of the adult collections' films, 76-83 % of Kermany's children and 79 % of the COVID-19 Image
Dataset's viral pneumonias; upright, none of them fires the upside-down rule (largest margin 0.15).
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from functools import lru_cache
from os import PathLike
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from cxr_core import imaging, limits
from cxr_core.errors import quoted

CODE_STRING = re.compile(r"[A-Z0-9 _]{0,16}")  # a DICOM code string (CS): PS3.5 6.2

TEMPLATE_FILE = Path(__file__).with_name("chest_template.png")
TEMPLATE_SIZE = 32
BORDER = 0.05
COLOUR_MAX = 15.0
BLANK_STD = 0.02
ASPECT_RANGE = (0.5, 2.0)
# A radiograph has hundreds to thousands of pixels a side (the smallest of the 13,417 films in ../shared/data: 200
# px on its short side); the model looks at 224 x 224, so a picture much smaller is a thumbnail, an icon or a crop.
MIN_SIDE = 128
TEMPLATE_MIN = 0.1
SIDEWAYS_BELOW = 0.3
INVERTED_BELOW = -0.2  # a negative film (lungs bright) anti-correlates with the template
UPSIDE_DOWN_MARGIN = 0.25  # upright real films: upside-down corr - upright corr at most 0.15 (1451 films)
RADIOGRAPHY = {"", "CR", "DX", "DR", "RG", "OT"}
CHEST_PARTS = ("CHEST", "THORAX", "LUNG", "TORSO", "RIB")

# Measured with the rules below on images not used for the template (see build_template.sample).
CALIBRATION = ("725 real chest films (300 Kermany, 300 COVID-19 Radiography, 125 COVID-19 Image Dataset) "
               "that were not used to build the template")
FALSE_POSITIVES = "1 of the 725 films (0.14%)"

RULES = (
    f"colour picture (colourfulness above {COLOUR_MAX:g}; X-rays are grey)",
    f"blank or nearly uniform image (pixel standard deviation below {BLANK_STD:g} on a 0-1 scale)",
    "DICOM modality other than CR/DX, or a body part other than the chest",
    f"width/height ratio outside {ASPECT_RANGE[0]:g}-{ASPECT_RANGE[1]:g}",
    f"correlation of the 32x32 thumbnail with the average upright chest film below {TEMPLATE_MIN:g}, "
    f"or below {SIDEWAYS_BELOW:g} and lower than with that average turned 90 degrees, "
    f"or lower by more than {UPSIDE_DOWN_MARGIN:g} than with it turned upside down",
)


@dataclass(frozen=True)
class QualityReport:
    """Whether the input is probably not a frontal chest radiograph, why, and the raw scores."""

    probably_not_chest: bool
    reasons: list[str] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)


@lru_cache(maxsize=1)
def template() -> np.ndarray:
    """The mean chest film, float32 (32, 32) standardised to zero mean, unit std."""
    img = np.asarray(Image.open(TEMPLATE_FILE).convert("L"), dtype=np.float32)
    return _standardise(img)


def _standardise(img: np.ndarray) -> np.ndarray:
    img = img - img.mean()
    std = img.std()
    return img / std if std > 1e-8 else img


def thumbnail(pixels: np.ndarray, size: int = TEMPLATE_SIZE) -> np.ndarray:
    """Standardised float32 (size, size) rank thumbnail of a float HxW image.

    A ``BORDER`` fraction is cut from each side (film edges, labels, collimation), the rest is
    area-resized (aspect ratio not kept) and replaced by its pixel ranks (histogram
    equalisation), so exposure and contrast do not matter, only the layout of dark and bright.
    """
    img = np.asarray(pixels, dtype=np.float32)
    h, w = img.shape
    dy, dx = int(h * BORDER), int(w * BORDER)
    small = cv2.resize(img[dy:h - dy or None, dx:w - dx or None], (size, size), interpolation=cv2.INTER_AREA)
    ranks = np.argsort(np.argsort(small.ravel(), kind="stable"), kind="stable").reshape(small.shape)
    return _standardise(ranks.astype(np.float32))


def template_scores(pixels: np.ndarray) -> dict[str, float]:
    """Pearson correlation of the image's thumbnail with the template upright, turned 90 degrees (best side)
    and upside down."""
    thumb = thumbnail(pixels)
    t = template()
    n = t.size

    def corr(a: np.ndarray) -> float:
        return float((thumb * a).sum() / n)

    return {
        "template_corr": corr(t),
        "sideways_corr": max(corr(np.rot90(t, 1)), corr(np.rot90(t, 3))),
        "upside_down_corr": corr(np.flipud(t)),
    }


def colour_sample(data: bytes | str | PathLike) -> np.ndarray | None:
    """What the colour rule scores of a file: its RGB thumbnail (uint8, longer side at most 256 px), or None for
    a grey image, a DICOM or a file PIL cannot read (no colour evidence). Small enough to keep in place of the
    file's bytes (``python -m scoring`` holds one per file of a slice; a DX DICOM is 30-60 MB)."""
    try:
        with io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else open(data, "rb") as source:
            # The format the reader took it as (a DICOM's colour is measured as it is decoded, in
            # ImageInfo.colourfulness), and no bigger than it takes: the image was read once already, within the
            # limits.
            fmt = imaging.pillow_format(source.read(132))
            if fmt is None:
                return None
            source.seek(0)
            with Image.open(source, formats=[fmt]) as im:
                if im.width * im.height > limits.MAX_PIXELS:
                    return None
                im.draft("RGB", (256, 256))
                if im.mode in ("L", "I", "I;16", "F", "1", "LA"):
                    return None
                im = im.convert("RGB")
                im.thumbnail((256, 256))
                return np.asarray(im, dtype=np.uint8)
    except Exception:  # not a picture PIL knows (DICOM, corrupt): no colour evidence
        return None


def colourfulness(data: bytes | str | PathLike | np.ndarray | None) -> float:
    """Hasler-Suesstrunk colourfulness of an image (0 = grey, about 30+ = a colourful photo).

    Takes the original file's bytes or path (``colour_sample``), or a uint8 HxWx3 RGB array (such a sample).
    """
    if isinstance(data, (bytes, bytearray, str, PathLike)):
        data = colour_sample(data)
    return 0.0 if data is None else imaging.colourfulness_of(data)


def _code(value: str) -> str:
    """A DICOM code string (CS) fit to quote: its own characters only (upper-case letters, digits, space,
    underscore, at most 16). Anything else is not quoted: a value whose length was damaged runs on into the
    elements after it (a referring physician's name follows the modality), and the sentence reaches pages, CSVs
    and logs."""
    return quoted(value, 16) if CODE_STRING.fullmatch(value) else "a value that is no DICOM code"


def _tag_reasons(metadata: dict[str, Any]) -> list[str]:
    reasons = []
    modality = str(metadata.get("Modality", "") or "").strip().upper()
    if modality not in RADIOGRAPHY:  # the file's own text goes into a sentence a page shows
        reasons.append(f"DICOM modality is {_code(modality)}, not chest radiography (CR/DX)")
    part = str(metadata.get("BodyPartExamined", "") or "").strip().upper()
    if part and not any(p in part for p in CHEST_PARTS):
        reasons.append(f"DICOM body part is {_code(part)}, not the chest")
    return reasons


def pixel_scores(pixels: np.ndarray) -> dict[str, float]:
    """What the rules measure in the pixels (float32 HxW in [0, 1]): their standard deviation and, unless the
    image is blank, the template correlations. A batch measures them on the full film as it reads it
    (``pipeline``), so that it flags the films the Classify page flags: its 96 px thumbnail flagged a
    COVID-19 Radiography film turned on its side (0.27 against 0.33) that the full film shows upright."""
    pixels = np.asarray(pixels, dtype=np.float32)
    std = float(pixels.std())
    if std < BLANK_STD:
        return {"pixel_std": std, "template_corr": 0.0, "sideways_corr": 0.0, "upside_down_corr": 0.0}
    return {"pixel_std": std, **template_scores(pixels)}


def assess(loaded: Any, original: bytes | str | PathLike | np.ndarray | None = None,
           image_scores: dict[str, float] | None = None) -> QualityReport:
    """Apply the rules above to a ``cxr_core.imaging.LoadedImage`` (and, for colour, its original bytes or path or
    their ``colour_sample``); ``image_scores``: ``pixel_scores`` of the full film when ``loaded`` holds only a
    thumbnail of it.

    ``loaded.pixels`` is float32 HxW in [0, 1]; ``loaded.info`` gives width, height and
    the de-identified DICOM metadata. Scores are returned for display.
    """
    pixels = np.asarray(loaded.pixels, dtype=np.float32)
    info = loaded.info
    height, width = pixels.shape
    measured = dict(image_scores) if image_scores is not None else pixel_scores(pixels)
    scores = {
        # A DICOM's colour is measured as it is decoded (ImageInfo.colourfulness): its bytes need a decoder.
        "colourfulness": max(colourfulness(original), float(getattr(info, "colourfulness", None) or 0.0)),
        "pixel_std": measured.pop("pixel_std"),
        "aspect_ratio": float(getattr(info, "width", 0) or width) / float(getattr(info, "height", 0) or height),
        **measured,
    }
    reasons = []
    if scores["colourfulness"] > COLOUR_MAX:
        reasons.append(f"it is a colour picture (colourfulness {scores['colourfulness']:.1f} > {COLOUR_MAX:g})")
    if scores["pixel_std"] < BLANK_STD:
        reasons.append(f"it is blank or nearly uniform (pixel std {scores['pixel_std']:.3f} < {BLANK_STD:g})")
    else:
        if scores["template_corr"] < INVERTED_BELOW:
            reasons.append(f"it looks like a negative, lungs bright and bones dark (correlation with the average "
                           f"chest {scores['template_corr']:.2f}); check the file's photometric interpretation")
        elif scores["upside_down_corr"] > scores["template_corr"] + UPSIDE_DOWN_MARGIN:
            reasons.append(f"it looks upside down (correlation with the average chest {scores['template_corr']:.2f}, "
                           f"with it turned upside down {scores['upside_down_corr']:.2f}); check the film's "
                           "orientation")
        elif scores["template_corr"] < TEMPLATE_MIN:
            reasons.append(f"it does not look like a chest film (correlation with the average chest "
                           f"{scores['template_corr']:.2f} < {TEMPLATE_MIN:g})")
        elif scores["template_corr"] < SIDEWAYS_BELOW and scores["sideways_corr"] > scores["template_corr"]:
            reasons.append(f"it looks turned on its side (correlation with the average chest "
                           f"{scores['template_corr']:.2f}, with it turned 90 degrees {scores['sideways_corr']:.2f})")
    reasons.extend(_tag_reasons(dict(getattr(info, "metadata", {}) or {})))
    given = (int(getattr(info, "width", 0) or 0), int(getattr(info, "height", 0) or 0))
    if all(given) and min(given) < MIN_SIDE:  # the file's own size (a batch assesses a thumbnail of it)
        reasons.append(f"it is only {given[0]} x {given[1]} pixels, far smaller than a radiograph (under {MIN_SIDE} "
                       "px a side: a thumbnail or a crop)")
    low, high = ASPECT_RANGE
    if not low <= scores["aspect_ratio"] <= high:
        reasons.append(f"its width/height ratio {scores['aspect_ratio']:.2f} is outside {low:g}-{high:g}")
    return QualityReport(probably_not_chest=bool(reasons), reasons=reasons, scores=scores)
