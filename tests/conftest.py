"""Shared fixtures: the real data folder and tiny saved models."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Converted OpenVINO models (cxr_core.engine) go to a folder of this test session, not the user's cache.
if "CXR_ENGINE_CACHE" not in os.environ:
    os.environ["CXR_ENGINE_CACHE"] = tempfile.mkdtemp(prefix="cxr-engine-cache-")
    atexit.register(shutil.rmtree, os.environ["CXR_ENGINE_CACHE"], True)
# Hypothesis keeps its example database and caches in ./.hypothesis by default: in a folder of this test session
# instead (read when Hypothesis first needs it, after this), and no example database at all, so that a run leaves
# nothing in the checkout and no test replays examples saved by an earlier run.
if "HYPOTHESIS_STORAGE_DIRECTORY" not in os.environ:
    os.environ["HYPOTHESIS_STORAGE_DIRECTORY"] = tempfile.mkdtemp(prefix="cxr-hypothesis-")
    atexit.register(shutil.rmtree, os.environ["HYPOTHESIS_STORAGE_DIRECTORY"], True)

import crash_witness
import numpy as np
import pytest
from hypothesis import settings

settings.register_profile("cxr-tests", database=None)
settings.load_profile("cxr-tests")


def pytest_configure(config):
    crash_witness.start(config)


def pytest_unconfigure(config):
    crash_witness.stop()


DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DICOM = DATA / "dicom"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.fail(f"real test data not found at {DATA} (expected ../shared/data beside the checkout)")
    return DATA


def _train_tiny(folder: Path, classes: list[str], size: int, seed: int) -> Path:
    """Save a tiny model with non-trivial (randomly perturbed) weights and a card."""
    import keras

    from cxr_core import card, models

    keras.utils.set_random_seed(seed)
    model = models.build("tiny", len(classes), size)
    rng = np.random.default_rng(seed)
    # Perturb every variable so BatchNorm statistics and biases are not at their defaults.
    for var in model.weights:
        value = np.asarray(var.numpy())
        if "moving_variance" in var.path:
            value = value + rng.uniform(0.5, 1.5, value.shape)
        else:
            value = value + rng.normal(0, 0.3, value.shape)
        var.assign(value.astype(value.dtype))
    negative = classes[0]
    c = card.ModelCard(
        name=folder.name,
        architecture="tiny",
        input_size=size,
        class_names=classes,
        target_layer=models.ARCHITECTURES["tiny"].target_layer,
        negative_class=negative,
        thresholds={name: 0.5 for name in classes[1:]},
        training_data={"note": "random weights for tests"},
        metrics={"test": {"auc": 0.5, "accuracy": 0.5}},
    )
    models.save(model, c, folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A two-class (NORMAL, PNEUMONIA) tiny model folder at 64 px."""
    return _train_tiny(tmp_path_factory.mktemp("models") / "tiny-pneumonia", ["NORMAL", "PNEUMONIA"], 64, 1)


@pytest.fixture(scope="session")
def tiny_model3_dir(tmp_path_factory) -> Path:
    """A three-class (NORMAL, PNEUMONIA, COVID-19) tiny model folder at 64 px."""
    return _train_tiny(tmp_path_factory.mktemp("models") / "tiny-cxr3", ["NORMAL", "PNEUMONIA", "COVID-19"], 64, 2)


def familiar_films() -> list[Path]:
    """The 24 real Kermany films (12 per class) the test familiarity model is fitted on."""
    kermany = DATA / "kermany" / "train"
    return sorted((kermany / "NORMAL").iterdir())[:12] + sorted((kermany / "PNEUMONIA").iterdir())[:12]


@pytest.fixture(scope="session")
def familiar_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny two-class model with a familiarity model fitted on the features of 24 real Kermany films
    (threshold at their 90th percentile), its file hashed in the card like a trained model's."""
    import shutil

    from cxr_core import card, familiarity, imaging, models, preprocess

    folder = tmp_path_factory.mktemp("familiar") / "tiny-familiar"
    shutil.copytree(tiny_model_dir, folder)
    plain = models.load(folder)
    batch = preprocess.to_batch([preprocess.prepare(imaging.load(p).pixels, plain.input_size)
                                 for p in familiar_films()])
    _, features = plain.forward(batch)
    pooled = features.astype(np.float64).mean(axis=(1, 2))
    fam = familiarity.calibrate(familiarity.fit(pooled, np.array([0] * 12 + [1] * 12), components=4), pooled, 90)
    familiarity.save(fam, folder)
    c = card.read(folder)
    c.familiarity = {"file": familiarity.FILE, "threshold": fam.threshold, "percentile": 90}
    card.save(c, folder)
    return folder
