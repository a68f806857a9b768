"""cxr_core.card: round trip, weights hash, and clear errors for broken model folders."""

from __future__ import annotations

import hashlib
import json
import shutil
import unicodedata
from pathlib import Path

import pytest

from cxr_core import card
from cxr_core.errors import ModelCardError

CLASSES = ["NORMAL", "PNEUMONIA", "COVID-19"]


def _card(**overrides) -> card.ModelCard:
    fields = dict(
        name="cxr3-test",
        architecture="tiny",
        input_size=64,
        class_names=list(CLASSES),
        target_layer="relu",
        negative_class="NORMAL",
        thresholds={"PNEUMONIA": 0.42, "COVID-19": 0.3},
        temperature=1.7,
        training_data={"kermany": {"NORMAL": 10, "PNEUMONIA": 20}},
        metrics={"test": {"auc": 0.93, "per_class": {"NORMAL": {"sensitivity": 0.9}}}},
        recipe={"epochs": 3, "dropout": 0.3},
        limitations=["pediatric training images"],
    )
    fields.update(overrides)
    return card.ModelCard(**fields)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A model folder with fake weights bytes and a saved card."""
    (tmp_path / card.WEIGHTS_FILE).write_bytes(bytes(range(256)) * 40)
    card.save(_card(), tmp_path)
    return tmp_path


def _flip_one_byte(path: Path, at: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def _write_card(folder: Path, data) -> None:
    (folder / card.CARD_FILE).write_text(json.dumps(data))


def test_round_trip_and_recorded_fields(folder):
    written = json.loads((folder / card.CARD_FILE).read_text())
    back = card.read(folder)
    assert back.to_dict() == written
    expected = _card().to_dict()
    for key in ("weights_sha256", "created", "versions", "card_sha256"):
        expected.pop(key)
        assert written[key]
    assert {k: v for k, v in written.items() if k in expected} == expected
    assert back.thresholds == {"PNEUMONIA": 0.42, "COVID-19": 0.3} and back.temperature == 1.7
    assert back.num_classes == 3 and back.intended_use == card.RESEARCH_USE


def test_card_content_hash_covers_every_field_but_itself(folder):
    written = json.loads((folder / card.CARD_FILE).read_text())
    assert written["card_sha256"] == card.content_sha256(written)
    assert card.content_sha256({**written, "card_sha256": "x"}) == written["card_sha256"]
    for key, value in (("thresholds", {"PNEUMONIA": 0.43, "COVID-19": 0.3}), ("low_confidence", 0.5),
                       ("limitations", []), ("metrics", {})):
        assert card.content_sha256({**written, key: value}) != written["card_sha256"], key
    card.load(folder)
    _write_card(folder, {**written, "low_confidence": 0.1})
    with pytest.raises(ModelCardError, match="was changed after it was written"):
        card.load(folder)
    card.read(folder)  # listings still read it (the sidebar shows the card, then refuses to load it)


def test_sha256_and_provenance_are_recorded(folder):
    back = card.load(folder)
    assert back.weights_sha256 == hashlib.sha256((folder / card.WEIGHTS_FILE).read_bytes()).hexdigest()
    assert len(back.weights_sha256) == 64
    assert back.created.startswith("20") and "T" in back.created
    assert {"python", "numpy", "keras"} <= set(back.versions)


def test_tampered_weights_are_refused(folder):
    _flip_one_byte(folder / card.WEIGHTS_FILE)
    assert card.read(folder).name == "cxr3-test"  # listing still works: read does not hash
    with pytest.raises(ModelCardError, match="weights file does not match its model card"):
        card.load(folder)


def test_tampered_model_is_refused_by_models_load(tiny_model_dir, tmp_path):
    from cxr_core import models

    copy = Path(shutil.copytree(tiny_model_dir, tmp_path / "copy"))
    assert models.load(copy).card.name == tiny_model_dir.name  # the intact copy loads
    _flip_one_byte(copy / card.WEIGHTS_FILE, at=(copy / card.WEIGHTS_FILE).stat().st_size // 2)
    with pytest.raises(ModelCardError, match="does not match its model card"):
        models.load(copy)


def test_missing_weights(folder, tmp_path):
    (folder / card.WEIGHTS_FILE).unlink()
    with pytest.raises(ModelCardError, match="missing"):
        card.load(folder)
    with pytest.raises(ModelCardError, match="weights file model.weights.h5 is missing"):
        card.save(_card(), folder)


def test_missing_card(tmp_path):
    with pytest.raises(ModelCardError, match="not a model folder: it has no model_card.json"):
        card.read(tmp_path)
    with pytest.raises(ModelCardError, match="no model_card.json"):
        card.load(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("content", "message"),
    [("{not json", "not valid JSON"), ("[1, 2]", "does not hold a JSON object"), ("", "not valid JSON")],
    ids=["broken", "array", "empty"],
)
def test_invalid_json(folder, content, message):
    (folder / card.CARD_FILE).write_text(content)
    with pytest.raises(ModelCardError, match=message):
        card.read(folder)


def test_missing_required_fields(folder):
    data = json.loads((folder / card.CARD_FILE).read_text())
    del data["class_names"], data["target_layer"]
    _write_card(folder, data)
    with pytest.raises(ModelCardError, match=r"lacks required fields: \['class_names', 'target_layer'\]"):
        card.read(folder)


def test_wrong_field_type(folder):
    data = json.loads((folder / card.CARD_FILE).read_text())
    data["input_size"] = "large"
    _write_card(folder, data)
    with pytest.raises(ModelCardError, match="wrong type"):
        card.read(folder)


def test_unknown_fields_are_ignored(folder):
    data = json.loads((folder / card.CARD_FILE).read_text())
    data["added_in_a_later_version"] = {"x": 1}
    _write_card(folder, data)
    assert card.read(folder).name == "cxr3-test"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"thresholds": {"TUBERCULOSIS": 0.5}}, r"not in class_names: \['TUBERCULOSIS'\]"),
        ({"negative_class": "Normal"}, r"not in class_names: \['Normal'\]"),
        ({"class_names": ["NORMAL", "NORMAL"], "thresholds": {}, "negative_class": None}, "unique"),
        ({"class_names": [], "thresholds": {}, "negative_class": None}, "non-empty"),
        ({"input_size": 8}, "at least 16"),
        ({"temperature": 0.0}, "temperature must be a number from 0.001 to 1000"),
        ({"temperature": float("nan")}, "temperature must be a number from 0.001 to 1000"),
        ({"temperature": 1e-310}, "temperature must be a number from 0.001 to 1000"),
        ({"metrics": None}, "metrics must be an object"),
        ({"recipe": []}, "recipe must be an object"),
        ({"weights_sha256": None}, "weights_sha256 must be a string"),
        ({"intended_use": 5}, "intended_use must be a string"),
        ({"limitations": ["ok", 3]}, "limitations must be a list of sentences"),
        ({"familiarity": {"file": "f.npz", "threshold": 2.0, "percentile": "99"}}, "familiarity.percentile"),
    ],
    ids=["threshold-class", "negative-class", "duplicates", "empty", "input-size", "temperature", "nan-temperature",
         "subnormal-temperature",
         "metrics-null", "recipe-list", "hash-null", "intended-use-number", "limitation-number", "percentile-text"],
)
def test_invalid_cards_raise_clear_errors(folder, overrides, message):
    with pytest.raises(ModelCardError, match=message):
        _card(**overrides)
    # The same checks apply to a card read from disk.
    data = json.loads((folder / card.CARD_FILE).read_text())
    data.update(overrides)
    (folder / card.CARD_FILE).write_text(json.dumps(data))
    with pytest.raises(ModelCardError, match=message):
        card.read(folder)


def test_class_names_are_plain_words_for_pages_and_csv_columns():
    """Shown as Markdown on every page and naming CSV columns: letters, digits, spaces and - _ . + ( ) / only."""
    for good in ("COVID-19", "NORMAL", "Pleural effusion", "Pneumonia (viral)", "No_findings", "Atelectasis/collapse",
                 "Épanchement", unicodedata.normalize("NFD", "Épanchement"), "3+"):  # NFD: a folder made on macOS
        assert card.class_name_problem(good) == "", good
    for bad in ("Effusion*", "`code`", "$x$", "[link](x)", "_under", " lead", "trail ", "a|b", "x" * 65, "#1"):
        assert "letters, digits, spaces" in card.class_name_problem(bad), bad
