"""The two models shipped in ``models/``: complete folders, honest splits, and served == evaluated."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import DATA

from cxr_core import imaging, models
from training import data

REPO = Path(__file__).resolve().parents[1]
SHIPPED = {
    "densenet169-pneumonia": ["NORMAL", "PNEUMONIA"],
    "densenet169-cxr3": ["COVID-19", "NORMAL", "PNEUMONIA"],
}
# The dataset folders the models were trained on, by the source name training gave each (predictions.csv
# paths are relative to them).
SOURCES = {data.source_name(root): root for root in (
    DATA / "kermany" / "train", DATA / "covid19_radiography", DATA / "covid19_image_dataset" / "train",
    DATA / "nih_chestxray14")}
FILES = ("model.weights.h5", "model_card.json", "history.csv", "split.csv", "metrics.json", "predictions.csv")


def _split(name: str) -> pd.DataFrame:
    return pd.read_csv(REPO / "models" / name / "split.csv")


@pytest.fixture(scope="module", params=sorted(SHIPPED))
def shipped(request) -> tuple[str, models.Classifier]:
    # checks the weights' sha256; f32, which reproduces predictions.csv to 1e-4 (bf16 moves probabilities by ~1e-2)
    return request.param, models.load(REPO / "models" / request.param, precision="f32")


def test_model_folder_is_complete_and_its_card_describes_it(shipped):
    name, classifier = shipped
    folder = REPO / "models" / name
    for file in FILES:
        assert (folder / file).is_file(), file
    card = classifier.card
    assert card.architecture == "densenet169" and card.class_names == SHIPPED[name]
    assert card.negative_class == "NORMAL" and set(card.thresholds) == set(SHIPPED[name]) - {"NORMAL"}
    assert 0 < card.temperature < 10 and card.weights_sha256
    m = json.loads((folder / "metrics.json").read_text())
    assert m["split"] == "test" and m["classes"] == card.class_names
    # The card's headline figures are the held-out ones in metrics.json.
    assert card.metrics["test"]["accuracy"] == pytest.approx(m["accuracy"])
    assert card.metrics["test"]["auc"] == pytest.approx(m["auc"])
    assert card.recipe["note"]  # how it was trained and what a GPU run should do next
    history = pd.read_csv(folder / "history.csv")
    assert len(history) == card.recipe["epochs_run"] and np.isfinite(history["val_loss"]).all()


def test_split_is_patient_level_and_duplicates_stay_out_of_the_held_out_side(shipped):
    name, _ = shipped
    split = _split(name)
    kept = split[split["split"].isin(["train", "val", "test"])]
    with_patient = kept.dropna(subset=["patient"])
    assert with_patient.groupby(["source", "patient"])["split"].nunique().max() == 1
    train = set(kept.loc[kept["split"] == "train", "sha256"])
    held_out = set(kept.loc[kept["split"] != "train", "sha256"])
    assert not train & held_out


def test_cxr3_test_images_were_never_trained_on_by_the_pneumonia_model_it_starts_from():
    pneumonia, cxr3 = _split("densenet169-pneumonia"), _split("densenet169-cxr3")
    trained_on = set(pneumonia.loc[pneumonia["split"] == "train", "sha256"])
    held_out = set(cxr3.loc[cxr3["split"].isin(["val", "test"]), "sha256"])
    assert held_out and not trained_on & held_out
    # And the other way round: what the pneumonia model is tested on, cxr3 did not train on.
    assert not set(pneumonia.loc[pneumonia["split"] == "test", "sha256"]) & set(
        cxr3.loc[cxr3["split"] == "train", "sha256"])


def test_serving_reproduces_the_held_out_predictions(shipped):
    name, classifier = shipped
    preds = pd.read_csv(REPO / "models" / name / "predictions.csv")
    test = preds[preds["split"] == "test"]
    sample = test.groupby(["source", "true_class"], group_keys=False).head(2)
    pixels = [imaging.load(SOURCES[row.source] / row.path).pixels for row in sample.itertuples()]
    served = classifier.predict_pixels(pixels)
    columns = [f"p_{c}" for c in classifier.card.class_names]
    np.testing.assert_allclose([p.probabilities for p in served], sample[columns].to_numpy(), atol=1e-4)
    assert [p.decision for p in served] == sample["predicted_class"].tolist()


def test_metrics_json_agrees_with_predictions_csv(shipped):
    name, classifier = shipped
    folder = REPO / "models" / name
    m = json.loads((folder / "metrics.json").read_text())
    test = pd.read_csv(folder / "predictions.csv").query("split == 'test'")
    assert m["n"] == len(test)
    assert m["accuracy"] == pytest.approx((test["predicted_class"] == test["true_class"]).mean())
    cm = np.array(m["confusion_matrix"])
    classes = classifier.card.class_names
    for i, true in enumerate(classes):
        for j, pred in enumerate(classes):
            assert cm[i, j] == ((test["true_class"] == true) & (test["predicted_class"] == pred)).sum()


def test_shipped_models_record_bf16_agreement_for_their_current_card_and_serve_it_where_the_cpu_has_bf16(shipped):
    """Both shipped models met issue 14's bf16 bounds on their whole test split (``python -m
    benchmarks.engine_agreement --record``, on an AVX-512 BF16 CPU): the record matches the card as shipped, so a CPU
    of that kind serves them at bf16 by default, and any other CPU (AMX, no BF16) at f32."""
    from cxr_core import engine

    name, classifier = shipped
    record = classifier.card.metrics["engine_agreement"]["bf16"]
    assert record["passes"] is True and record["n"] == len(
        pd.read_csv(REPO / "models" / name / "predictions.csv").query("split == 'test'"))
    assert record["decisions_equal"] >= 0.995 and record["auc_delta"] <= 0.002
    # measured on both serving paths: batches and single films (the Classify and PACS pages)
    assert min(record["batch_decisions_equal"], record["single_film_decisions_equal"]) == record["decisions_equal"]
    assert record["cpu"]["flags"] and engine.bf16_kind(record["cpu"]["flags"]) == "avx512_bf16"
    # it holds on CPUs of the kind it was measured on (AVX-512 BF16 without AMX), not on others (AMX, none)
    here = engine.bf16_kind(engine.cpu_flags())
    assert engine.bf16_verified(classifier.card) == (here == "avx512_bf16")
    default = models.load(REPO / "models" / name)
    assert default.precision == ("bf16" if here == "avx512_bf16" and engine.bf16_supported() else "f32")
