"""cxr_core.report: a one-page PNG/PDF built in memory from a real radiograph and a card."""

from __future__ import annotations

import dataclasses
import datetime as dt
import io

import numpy as np
import pytest
from PIL import Image

from cxr_core import card, imaging, models, overlay, report

WHEN = dt.datetime(2025, 1, 2, 3, 4, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def parts(data_dir):
    pixels = imaging.load(data_dir / "kermany/train/NORMAL/IM-0115-0001.jpeg").pixels
    heat = np.zeros((64, 64), np.float32)
    heat[16:40, 8:30] = 1.0
    c = card.ModelCard(name="tiny-pneumonia", architecture="tiny", input_size=64, class_names=["NORMAL", "PNEUMONIA"],
                       target_layer="relu", negative_class="NORMAL", thresholds={"PNEUMONIA": 0.5},
                       weights_sha256="0123456789abcdef" * 4)
    return pixels, overlay.overlay(pixels, heat, opacity=1.0), c


def _render(parts, probs=(0.3, 0.7), model_card=None, when=WHEN, **kw):
    pixels, blended, c = parts
    c = model_card or c
    return report.render(pixels, blended, models.decide(c, probs), c, when=when, **kw)


def test_png_is_one_a4_page_with_the_image_and_overlay_in_place(parts):
    page = np.asarray(Image.open(io.BytesIO(_render(parts))).convert("RGB")).astype(int)
    assert page.shape == (report.PAGE[1], report.PAGE[0], 3)
    top, left, box = report.IMAGE_TOP, report.MARGIN, report.IMAGE_BOX
    radiograph = page[top:top + box, left:left + box]
    # The square 224 px film fills its box and stays grey (R == G == B).
    assert radiograph.std() > 30
    assert np.abs(radiograph[..., 0] - radiograph[..., 2]).max() <= 1
    right = report.PAGE[0] - report.MARGIN - box
    heat = page[top:top + box, right:right + box]
    # Opacity 1 over a hot rectangle: the jet colormap is red where the heatmap is 1, blue where 0.
    hot = heat[box * 20 // 64:box * 36 // 64, box * 12 // 64:box * 26 // 64]
    assert hot[..., 0].mean() > 100 and hot[..., 2].mean() < 60
    assert heat[box * 50 // 64:, box * 40 // 64:, 2].mean() > 100


def test_probability_bars_have_lengths_proportional_to_the_probabilities(parts):
    page = np.asarray(Image.open(io.BytesIO(_render(parts, probs=(0.25, 0.75)))).convert("RGB")).astype(int)
    width = report.PAGE[0] - 2 * report.MARGIN
    x0, bar_w = report.MARGIN + 300, width - 300 - 140
    red = (page[..., 0] > 150) & (page[..., 1] < 60) & (page[..., 2] < 60)
    rows = np.nonzero(red[:, x0 + 5])[0]
    rows = rows[rows > report.IMAGE_TOP + report.IMAGE_BOX]  # the PNEUMONIA bar, below the pictures
    assert rows.size > 20
    bar_row = red[rows[rows.size // 2]]
    length = np.nonzero(bar_row[x0:x0 + bar_w + 2])[0].max() + 1
    assert length == pytest.approx(0.75 * bar_w, abs=2)


def test_many_classes_keep_the_warnings_and_the_called_class_above_the_footer(parts):
    """A card may have up to 100 classes: the bars that fit are drawn (the called class among them), the rest
    summarised, and the warnings and familiarity line stay on the page above the footer."""
    pixels, blended, _ = parts
    names = [f"C{i}" for i in range(40)]
    c = card.ModelCard(name="many", architecture="tiny", input_size=64, class_names=names, target_layer="relu",
                       negative_class="C0", thresholds={n: 0.02 for n in names[1:]}, weights_sha256="0" * 64,
                       familiarity={"file": "f.npz", "threshold": 1.0})
    probs = np.full(40, 0.3 / 38)
    probs[0], probs[37] = 0.5, 0.2  # C37 is called (above its threshold), C0 is merely the most probable
    prediction = dataclasses.replace(models.decide(c, probs), familiarity=3.0, unfamiliar=True)
    assert prediction.decision == "C37"
    warnings = ["Low confidence.", "Not a chest."]
    rendered = report.render(pixels, blended, prediction, c, when=WHEN, warnings=warnings)
    page = np.asarray(Image.open(io.BytesIO(rendered)).convert("RGB")).astype(int)
    rule_y = report.PAGE[1] - report.MARGIN - 130 - 16
    below = report.IMAGE_TOP + report.IMAGE_BOX + 40  # under the pictures (the heatmap has amber in it)
    amber = np.nonzero(((np.abs(page[below:] - report._AMBER) < 40).all(axis=-1)).any(axis=1))[0] + below
    assert amber.size > 40 and amber.max() < rule_y  # 2 warnings and the familiarity line, above the footer rule
    red = (page[..., 0] > 150) & (page[..., 1] < 60) & (page[..., 2] < 60)
    x0, bar_w = report.MARGIN + 300, report.PAGE[0] - 2 * report.MARGIN - 300 - 140
    solid = red[below:rule_y, x0:x0 + bar_w].sum(axis=1) >= 0.18 * bar_w  # rows of a bar at P 0.2, not text
    assert solid.sum() > 20  # C37's bar is drawn between the pictures and the footer


def test_different_inputs_give_different_pages(parts):
    base = _render(parts)
    assert _render(parts) == base  # deterministic for the same inputs and time
    assert _render(parts, probs=(0.8, 0.2)) != base
    assert _render(parts, warnings=["Low confidence."]) != base
    assert _render(parts, method="Grad-CAM++") != base
    # The footer names the model, its weights and the time: each one changes the page.
    c = parts[2]
    for other in (dataclasses.replace(c, name="another-model"), dataclasses.replace(c, weights_sha256="f" * 64)):
        assert _render(parts, model_card=other) != base, other
    assert _render(parts, when=WHEN + dt.timedelta(days=1)) != base
    # ... and the inference engine with its precision, when given.
    on_openvino = _render(parts, engine="OpenVINO 2026.4.1 · f32")
    assert on_openvino != base and on_openvino != _render(parts, engine="OpenVINO 2026.4.1 · bf16")


def test_pdf_is_a_single_page_pdf(parts):
    data = _render(parts, fmt="PDF")
    assert data.startswith(b"%PDF")
    assert b"/Count 1" in data


def test_unknown_format_is_refused(parts):
    with pytest.raises(ValueError, match="PNG"):
        _render(parts, fmt="TIFF")


def test_decision_rule_in_words(parts):
    assert report.decision_rule(parts[2]) == "PNEUMONIA if P(PNEUMONIA) >= 0.5000; otherwise NORMAL"
    # As many decimals as the probabilities shown: a film at P 0.2705 is not called at 0.27241 ("0.27" said it was).
    fitted = dataclasses.replace(parts[2], thresholds={"PNEUMONIA": 0.27241})
    assert report.decision_rule(fitted) == "PNEUMONIA if P(PNEUMONIA) >= 0.2724; otherwise NORMAL"
    # Two thresholds can both be reached (0.30 + 0.20 < 1): the rule says which class is then called.
    three = dataclasses.replace(parts[2], class_names=["COVID-19", "NORMAL", "PNEUMONIA"], negative_class=None,
                                thresholds={"COVID-19": 0.3, "PNEUMONIA": 0.2})
    assert report.decision_rule(three) == ("COVID-19 if P(COVID-19) >= 0.3000; PNEUMONIA if P(PNEUMONIA) >= 0.2000 "
                                           "(where several reach their thresholds, the most probable of them); "
                                           "otherwise the most probable class")
    from cxr_core import models

    # Both reached: the more probable is called (PNEUMONIA at 0.60, then COVID-19 at 0.45).
    assert [models.decide(three, p).decision for p in ([0.35, 0.05, 0.60], [0.45, 0.30, 0.25])] == ["PNEUMONIA",
                                                                                                 "COVID-19"]


def test_report_carries_the_familiarity(parts):
    pixels, blended, c = parts
    c = dataclasses.replace(c, familiarity={"file": "familiarity.npz", "threshold": 1.4})
    plain = models.decide(c, (0.3, 0.7))
    familiar = dataclasses.replace(plain, familiarity=0.9, unfamiliar=False)
    unfamiliar = dataclasses.replace(plain, familiarity=3.2, unfamiliar=True)
    assert report.familiarity_line(plain, c) == ""
    assert report.familiarity_line(familiar, c) == ("Familiarity: distance 0.9000 (threshold 1.4000, fitted on "
                                                    "validation films): within the range of the films this model was "
                                                    "trained on, which does not make the result right.")
    # with the card's figures on a source held out in training: how many of its wrong calls the check flagged
    held = dataclasses.replace(c, metrics={**c.metrics, "familiarity": {"external": {
        "n": 50, "wrong": 16, "wrong_rate": 0.125, "right": 34, "right_rate": 1 / 34}}})
    assert report.familiarity_line(familiar, held).endswith(
        "which does not make the result right (on films of a source held out in training it flagged 2 of the 16 it "
        "got wrong).")
    assert "distance 3.2000" in report.familiarity_line(unfamiliar, c)
    assert "UNLIKE the films this model was trained on" in report.familiarity_line(unfamiliar, c)
    pages = [report.render(pixels, blended, p, c, when=WHEN) for p in (plain, familiar, unfamiliar)]
    assert len(set(pages)) == 3  # the line is drawn, and differs with the verdict


def test_a_class_called_at_its_threshold_though_another_is_more_probable_is_said(parts):
    """The pneumonia card's threshold (0.346 shipped) calls PNEUMONIA at 38 % beside NORMAL at 62 %: the page,
    the PACS page and the written DICOM cautions say so, naming both classes and the threshold."""
    c = dataclasses.replace(parts[2], thresholds={"PNEUMONIA": 0.346}, low_confidence=0.6)
    called = models.decide(c, (0.62, 0.38))
    assert called.decision == "PNEUMONIA" and called.top_class == "NORMAL" and not called.low_confidence
    line = report.threshold_call_line(called, c)
    assert line == ("PNEUMONIA is called because its probability (38.0%) reaches its threshold (34.6%, set on the "
                    "validation films to miss few PNEUMONIA films), although NORMAL is more probable (62.0%).")
    assert line in report.cautions(called, c)
    assert report.threshold_call_line(models.decide(c, (0.3, 0.7)), c) == ""  # the top class called
    assert report.threshold_call_line(models.decide(c, (0.7, 0.3)), c) == ""  # NORMAL: no threshold reached
    low = models.decide(c, (0.55, 0.45))
    assert report.low_confidence_line(low, c) == ("Low confidence: the most probable class, NORMAL, has 55.0%, below "
                                                  "the 60.0% this model asks for.")
