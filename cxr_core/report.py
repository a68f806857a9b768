"""A one-page report of one classification, drawn with PIL and returned as PNG or PDF bytes.

The page (A4 portrait at 150 dpi, 1240x1754 px) holds the radiograph and its heatmap
overlay, a bar per class probability, the decision and the rule behind it, any warnings,
the model's name, version and weights hash, the date, and the research-use notice. It
never receives the file name or any DICOM tag, so it cannot leak patient data; nothing is
written to disk.
"""

from __future__ import annotations

import datetime as _dt
import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cxr_core.card import RESEARCH_USE, ModelCard
from cxr_core.overlay import fit as fit_display

if TYPE_CHECKING:  # models imports Keras; the report only needs the Prediction fields
    from cxr_core.models import Prediction

PAGE = (1240, 1754)  # A4 at 150 dpi
MARGIN = 60
IMAGE_BOX = 540  # each picture fits in a square of this side
IMAGE_TOP = 200
FORMATS = {"PNG": "image/png", "PDF": "application/pdf"}
_INK, _GREY, _RED, _BLUE, _AMBER = (20, 20, 20), (110, 110, 110), (190, 30, 30), (40, 90, 170), (170, 110, 0)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _fit(picture: np.ndarray, box: int) -> Image.Image:
    """float HxW in [0, 1] or uint8 HxWx3 -> PIL RGB image whose longer side is ``box``."""
    arr = fit_display(np.asarray(picture), box)  # area-shrunk first: Lanczos over a 49,000,000 px row needs GBs
    if arr.dtype != np.uint8:
        arr = np.rint(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)
    img = Image.fromarray(arr).convert("RGB")
    scale = box / max(img.size)
    return img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.LANCZOS)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    return lines + ([line] if line else [])


def _paragraph(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, size: int, fill: tuple, width: int) -> int:
    """Draw wrapped text; return the y below it."""
    font = _font(size)
    x, y = xy
    for line in _wrap(draw, text, font, width):
        draw.text((x, y), line, font=font, fill=fill)
        y += int(size * 1.35)
    return y


def decision_rule(card: ModelCard) -> str:
    """The card's decision rule in words, e.g. 'PNEUMONIA if P >= 0.50; otherwise NORMAL'."""
    if not card.thresholds:
        return "the most probable class"
    called = "; ".join(f"{c} if P({c}) >= {t:.4f}" for c, t in card.thresholds.items())
    if len(card.thresholds) > 1:  # the tie-break, as models.decide applies it
        called += " (where several reach their thresholds, the most probable of them)"
    return f"{called}; otherwise {card.negative_class or 'the most probable class'}"


def _short_rule(card: ModelCard, prediction: Prediction) -> str:
    """``decision_rule`` for the report: with many thresholds, the called class's and a pointer to the card."""
    if len(card.thresholds) <= 4:
        return decision_rule(card)
    own = card.thresholds.get(prediction.decision)
    called = f"; {prediction.decision}'s threshold is {own:.4f}" if own is not None else ""
    return (f"each of {len(card.thresholds)} classes is called when its probability reaches its threshold (the most "
            f"probable of those called), otherwise {card.negative_class or 'the most probable class'}{called}; "
            "every threshold is in the model card")


def _height(draw: ImageDraw.ImageDraw, text: str, size: int, width: int) -> int:
    """The height ``_paragraph`` gives ``text``."""
    return len(_wrap(draw, text, _font(size), width)) * int(size * 1.35)


def cautions(prediction: Prediction, card: ModelCard, checked=None, info=None) -> list[str]:
    """Every caution a result carries, one sentence each, for places that show no page around it (the DICOM
    results written back to the PACS): probably not a frontal chest film (``checked``, a quality report), low
    confidence, unlike the training films, and what the reader changed in the picture (``info``, the film's
    ImageInfo: inverted, colour to grey, frames left out...)."""
    out = []
    if checked is not None and checked.probably_not_chest:
        out.append(not_chest_line(checked) + " The result is not meaningful for this film.")
    if prediction.low_confidence:
        out.append(low_confidence_line(prediction, card) + " Treat this result as uncertain.")
    if called := threshold_call_line(prediction, card):
        out.append(called)
    if prediction.unfamiliar:
        out.append(familiarity_line(prediction, card))
    return out + reading_lines(info)


def not_chest_line(checked) -> str:
    """The quality check's verdict on a flagged film, as one sentence (each page adds what it means there)."""
    return "Probably not a frontal chest radiograph: " + "; ".join(checked.reasons) + "."


def low_confidence_line(prediction: Prediction, card: ModelCard) -> str:
    """A low-confidence result, as one sentence: the top class, its probability and the card's bound."""
    return (f"Low confidence: the most probable class, {prediction.top_class}, has {prediction.top_probability:.1%}, "
            f"below the {card.low_confidence:.1%} this model asks for.")


def threshold_call_line(prediction: Prediction, card: ModelCard) -> str:
    """When the called class is not the most probable one (its threshold, set for sensitivity on the validation
    films, is below the other's probability), one sentence that says so; '' otherwise."""
    decision, top = prediction.decision, prediction.top_class
    if decision == top or decision not in card.thresholds:
        return ""
    p = prediction.probabilities[prediction.class_names.index(decision)]
    return (f"{decision} is called because its probability ({p:.1%}) reaches its threshold "
            f"({card.thresholds[decision]:.1%}, set on the validation films to miss few {decision} films), although "
            f"{top} is more probable ({prediction.top_probability:.1%}).")


def reading_lines(info) -> list[str]:
    """What the reader changed in the picture that should travel with a result (``ImageInfo``; None: nothing)."""
    from cxr_core import imaging

    return [f"Reading: {note}." for note in imaging.reading_notes(info, cautions=True)] if info is not None else []


def unfamiliar_warning(distance: float, card: ModelCard) -> str:
    """The pages' warning for a film the familiarity check flags (Classify, PACS, a Batch review row): the
    warning, the film's familiarity distance and the card's threshold."""
    from cxr_core import familiarity

    threshold = card.familiarity.get("threshold")
    limit = f", above the threshold {threshold:.4f} fitted on validation films" if threshold is not None else ""
    return f"{familiarity.WARNING} (familiarity distance {distance:.4f}{limit})"


def familiarity_line(prediction: Prediction, card: ModelCard) -> str:
    """The familiarity check's result as one sentence, or "" when the model has no familiarity model."""
    if prediction.familiarity is None:
        return ""
    threshold = card.familiarity.get("threshold")
    limit = f" (threshold {threshold:.4f}, fitted on validation films)" if threshold is not None else ""
    # A familiar film is not a right result: on films of a source held out in training the check flags only some of
    # the wrong calls (the card's own figure, metrics.familiarity.external), so the line must not read as a
    # reassurance.
    verdict = ("UNLIKE the films this model was trained on: treat the result as unreliable" if prediction.unfamiliar
               else "within the range of the films this model was trained on, which does not make the result right"
               + _held_out_miss(card))
    return f"Familiarity: distance {prediction.familiarity:.4f}{limit}: {verdict}."


def _held_out_miss(card: ModelCard) -> str:
    """" (on films of a source held out in training it flagged F of the W it got wrong)" from the card's metrics, or
    "" where the card has no such figure."""
    external = ((card.metrics or {}).get("familiarity") or {}).get("external")
    try:
        wrong = int(external["wrong"])
        flagged = round(float(external["wrong_rate"]) * wrong)
    except (KeyError, TypeError, ValueError, OverflowError):
        return ""
    if wrong <= 0:
        return ""
    return f" (on films of a source held out in training it flagged {flagged} of the {wrong} it got wrong)"


def render(
    image: np.ndarray,
    overlay_rgb: np.ndarray,
    prediction: Prediction,
    card: ModelCard,
    *,
    method: str = "gradcam",
    explained_class: str | None = None,
    warnings: Sequence[str] = (),
    when: _dt.datetime | None = None,
    fmt: str = "PNG",
    engine: str | None = None,
    drawn_as: str = "",
) -> bytes:
    """The report page as PNG or PDF bytes.

    ``image``: float32 HxW in [0, 1] (the radiograph as shown); ``overlay_rgb``: uint8 HxWx3
    (the heatmap over it); ``warnings``: sentences shown in amber (low confidence, not a chest);
    ``engine``: the inference engine and precision (``Classifier.engine_label``), named in the footer;
    ``explained_class``: the class the heatmap explains (default: the class called, which ``pipeline.classify``
    explains unless told otherwise; at a threshold it can differ from the most probable class); ``drawn_as``: how
    ``overlay_rgb`` draws the heatmap when not as a colour wash (" (contour lines at 50, 70, 90 %)"), after the
    heatmap's caption.
    """
    if fmt not in FORMATS:
        raise ValueError(f"report format must be one of {sorted(FORMATS)}, got {fmt!r}")
    when = when or _dt.datetime.now().astimezone()
    page = Image.new("RGB", PAGE, "white")
    draw = ImageDraw.Draw(page)
    width = PAGE[0] - 2 * MARGIN

    draw.text((MARGIN, 50), "Chest X-ray classification report", font=_font(44), fill=_INK)
    _paragraph(draw, (MARGIN, 112), RESEARCH_USE, 22, _RED, width)

    captions_end = 0
    heat_caption = f"{method} heatmap for {explained_class or prediction.decision}{drawn_as}"
    for i, (picture, caption) in enumerate(((image, "Radiograph"), (overlay_rgb, heat_caption))):
        left = MARGIN + i * (IMAGE_BOX + width - 2 * IMAGE_BOX)
        fitted = _fit(picture, IMAGE_BOX)
        page.paste(fitted, (left + (IMAGE_BOX - fitted.width) // 2, IMAGE_TOP + (IMAGE_BOX - fitted.height) // 2))
        draw.rectangle((left - 1, IMAGE_TOP - 1, left + IMAGE_BOX, IMAGE_TOP + IMAGE_BOX), outline=_GREY)
        captions_end = max(captions_end, _paragraph(draw, (left, IMAGE_TOP + IMAGE_BOX + 10), caption, 22, _GREY,
                                                    IMAGE_BOX))  # wrapped in its picture's width

    y = max(IMAGE_TOP + IMAGE_BOX + 70, captions_end + 30)
    colour = _RED if prediction.positive else _BLUE
    draw.text((MARGIN, y), f"Decision: {prediction.decision}", font=_font(40), fill=colour)
    y = _paragraph(draw, (MARGIN, y + 56), f"Rule: {_short_rule(card, prediction)}.", 22, _GREY, width) + 20

    # Everything above the footer: the warnings and the familiarity line first, then as many class bars as fit
    # (a card may have up to limits.MAX_CLASSES classes; bars past the page would push the warnings off it).
    line = familiarity_line(prediction, card)
    notes = [(f"Warning: {w}", _AMBER) for w in warnings]
    notes += [(line, _AMBER if prediction.unfamiliar else _GREY)] if line else []
    footer_top = PAGE[1] - MARGIN - 130 - 26
    notes_h = 10 + sum(_height(draw, text, 22, width) + 6 for text, _ in notes)
    label_w, bar_w, bar_h = 300, width - 300 - 140, 34
    rows = list(zip(prediction.class_names, prediction.probabilities, strict=True))
    fit = max(1, (footer_top - notes_h - y) // (bar_h + 16))
    rest = []
    if len(rows) > fit:  # the most probable classes (the called one among them) in card order, then a summary
        keep = sorted(range(len(rows)), key=lambda i: -rows[i][1])[:max(fit - 1, 1)]
        called = prediction.class_names.index(prediction.decision)
        keep = sorted(keep if called in keep else [*keep[:-1], called])
        rest = [p for i, (_, p) in enumerate(rows) if i not in keep]
        rows = [rows[i] for i in keep]
    for name, p in rows:
        draw.text((MARGIN, y + 4), name, font=_font(24), fill=_INK)
        x0 = MARGIN + label_w
        draw.rectangle((x0, y, x0 + bar_w, y + bar_h), outline=_GREY)
        draw.rectangle((x0, y, x0 + round(bar_w * float(p)), y + bar_h), fill=colour if name == prediction.decision
                       else _GREY)
        draw.text((x0 + bar_w + 16, y + 4), f"{p:.4f}", font=_font(24), fill=_INK)
        y += bar_h + 16
    if rest:
        draw.text((MARGIN, y + 4), f"{len(rest)} more classes, each at P <= {max(rest):.4f} (all in the app)",
                  font=_font(24), fill=_GREY)
        y += bar_h + 16

    y += 10
    for text, fill in notes:
        y = _paragraph(draw, (MARGIN, y), text, 22, fill, width) + 6

    footer = (
        f"Model: {card.name} (version {card.version}, {card.architecture}, {card.input_size} px), "
        f"weights sha256 {card.weights_sha256[:16]}. Probabilities are temperature-calibrated "
        f"(T = {card.temperature:.3g}). " + (f"Inference: {engine}. " if engine else "")
        + f"Report created {when.strftime('%Y-%m-%d %H:%M %Z').strip()}."
    )
    y_footer = PAGE[1] - MARGIN - 130
    draw.line((MARGIN, y_footer - 16, PAGE[0] - MARGIN, y_footer - 16), fill=_GREY, width=2)
    y_footer = _paragraph(draw, (MARGIN, y_footer), footer, 20, _GREY, width)
    _paragraph(draw, (MARGIN, y_footer + 4), card.intended_use or RESEARCH_USE, 20, _RED, width)

    buffer = io.BytesIO()
    page.save(buffer, format=fmt, **({"resolution": 150.0} if fmt == "PDF" else {"optimize": False}))
    return buffer.getvalue()
