"""cxr_core.review: the batch table, its filters and CSV export."""

from __future__ import annotations

import base64
import dataclasses
import io
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxr_core import review
from cxr_core.card import ModelCard
from cxr_core.models import Prediction, decide
from cxr_core.quality import QualityReport

CARD = ModelCard(name="m", architecture="tiny", input_size=64, class_names=["NORMAL", "PNEUMONIA"],
                 target_layer="relu", negative_class="NORMAL", thresholds={"PNEUMONIA": 0.5}, low_confidence=0.6)


@dataclass
class Item:
    name: str
    prediction: Prediction | None
    error: str | None
    thumbnail: np.ndarray | None
    quality: QualityReport | None = None


@pytest.fixture()
def items() -> list[Item]:
    thumb = np.arange(12, dtype=np.uint8).reshape(3, 4)
    return [
        Item("a.jpeg", decide(CARD, [0.2, 0.8]), None, thumb, QualityReport(False)),
        Item("b.dcm", decide(CARD, [0.55, 0.45]), None, thumb, QualityReport(True, ["it is a colour picture"])),
        Item("broken.dcm", None, "The file is damaged.", None),
        Item("c.png", dataclasses.replace(decide(CARD, [0.9, 0.1]), familiarity=2.5, unfamiliar=True), None, thumb),
    ]


def test_thumbnail_uri_round_trips_the_pixels():
    thumb = np.arange(12, dtype=np.uint8).reshape(3, 4)
    uri = review.thumbnail_uri(thumb)
    assert uri.startswith("data:image/png;base64,")
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))
    np.testing.assert_array_equal(decoded, thumb)
    assert review.thumbnail_uri(None) is None


def test_batch_table_rows(items):
    table = review.batch_table(items, CARD.class_names)
    assert table["file"].tolist() == ["a.jpeg", "b.dcm", "broken.dcm", "c.png"]
    assert table["decision"].tolist()[:2] == ["PNEUMONIA", "NORMAL"]
    assert table["p_PNEUMONIA"].tolist()[:2] == [0.8, 0.45]
    assert table["positive"].tolist() == [True, False, False, False]
    assert table["low_confidence"].tolist() == [False, True, False, False]
    assert table["not_chest"].tolist() == [False, True, False, False]
    assert table.loc[1, "quality_notes"] == "it is a colour picture"
    assert table.loc[2, "error"] == "The file is damaged." and np.isnan(table.loc[2, "p_NORMAL"])


def test_filters(items):
    table = review.batch_table(items, CARD.class_names)
    assert review.filter_table(table, decisions=["NORMAL"])["file"].tolist() == ["b.dcm", "c.png"]
    assert review.filter_table(table, flags=["low_confidence", "not_chest"])["file"].tolist() == ["b.dcm"]
    assert review.filter_table(table, flags=["error"])["file"].tolist() == ["broken.dcm"]
    assert review.filter_table(table, text="DCM")["file"].tolist() == ["b.dcm", "broken.dcm"]
    assert review.filter_table(table, flags=["positive"]).index.tolist() == [0]
    with pytest.raises(ValueError, match="unknown flag"):
        review.filter_table(table, flags=["odd"])


def test_export_csv_matches_the_table_without_thumbnails(items):
    table = review.batch_table(items, CARD.class_names)
    back = pd.read_csv(io.StringIO(review.export_csv(table)), keep_default_na=False)
    assert "thumbnail" not in back.columns and "base64" not in review.export_csv(table)
    assert back["file"].tolist() == table["file"].tolist()
    np.testing.assert_allclose(back["p_PNEUMONIA"].iloc[[0, 1, 3]].astype(float), [0.8, 0.45, 0.1])
    assert back["error"].tolist()[2] == "The file is damaged."


def test_unique_names():
    assert review.unique_names(["a", "b", "a", "a"]) == ["a", "b", "a (2)", "a (3)"]
    # A file really named like a repeat keeps its name; the repeat takes the next free one.
    assert review.unique_names(["a.png", "a.png", "a.png (2)"]) == ["a.png", "a.png (3)", "a.png (2)"]
    assert review.unique_names(["a (2)", "a", "a"]) == ["a (2)", "a", "a (3)"]


def test_summary_counts_flags(items):
    table = review.batch_table(items, CARD.class_names)
    assert review.summary(table) == {"files": 4, "unreadable": 1, "positive": 1, "low_confidence": 1, "not_chest": 1,
                                     "unfamiliar": 1}


def test_familiarity_columns_and_filter(items):
    table = review.batch_table(items, CARD.class_names)
    assert table["unfamiliar"].tolist() == [False, False, False, True]
    assert np.isnan(table["familiarity"][:3]).all() and table["familiarity"][3] == 2.5
    assert review.filter_table(table, flags=["unfamiliar"])["file"].tolist() == ["c.png"]


def test_assess_item_flags_non_chest_inputs_from_the_batch_thumbnail(tiny_model_dir, data_dir):
    from cxr_core import models, pipeline

    classifier = models.load(tiny_model_dir)
    chest = data_dir / "kermany" / "train" / "NORMAL" / "IM-0115-0001.jpeg"
    dental = data_dir / "dicom" / "non_chest" / "CR-ModalitySequenceLUT.dcm"
    blank = io.BytesIO()
    Image.fromarray(np.full((300, 300), 128, np.uint8)).save(blank, format="PNG")
    sources = [("chest.jpeg", chest.read_bytes()), ("dental.dcm", dental), ("blank.png", blank.getvalue()),
               ("bad.dcm", b"DICM garbage")]
    results = pipeline.classify_many(classifier, sources)
    reports = [review.assess_item(item, src if isinstance(src, bytes) else None)
               for item, (_, src) in zip(results, sources, strict=True)]
    assert reports[0].probably_not_chest is False
    assert reports[1].probably_not_chest is True
    assert reports[2].probably_not_chest is True and "blank" in reports[2].reasons[0]
    assert reports[3] is None
    table = review.batch_table(results, classifier.card.class_names, reports)
    assert table["not_chest"].tolist() == [False, True, True, False]
    assert table.loc[3, "error"] != "" and table.loc[0, "error"] == ""


def test_quality_notes_say_what_the_reader_changed_in_the_film():
    """A film shown inverted (its header asked for it, or its values ran the wrong way) or read from the first of
    several frames: the batch tables and their CSV said nothing, though the model saw the changed picture."""
    from cxr_core.imaging import ImageInfo

    info = ImageInfo(format="DICOM", width=4, height=3, bit_depth=12, photometric="MONOCHROME2", frames=2,
                     inverted=True, metadata={"Presentation": "shown inverted", "Frames": "2 frames: the first"})
    thumb = np.zeros((3, 4), np.uint8)
    item = SimpleNamespace(name="x.dcm", prediction=decide(CARD, [0.2, 0.8]), error=None, thumbnail=thumb, info=info)
    row = review.table_row(item, QualityReport(True, ["looks like a negative"]), CARD.class_names)
    assert row["quality_notes"] == "looks like a negative"  # "Why flagged": the quality rules' reasons only
    assert row["reading_notes"] == "Presentation: shown inverted; Frames: 2 frames: the first"
    info.metadata["Conversion"] = "RGB to grayscale"  # routine for grey films saved as RGB: not a caution
    assert review.table_row(item, None, CARD.class_names)["reading_notes"] == row["reading_notes"]
    assert list(review.batch_table([item], CARD.class_names).columns).index("reading_notes") == \
        list(review.batch_table([item], CARD.class_names).columns).index("quality_notes") + 1
