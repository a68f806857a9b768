"""cxr_core.familiarity: the distance from the training films' features, its threshold, its file and its hash."""

from __future__ import annotations

import numpy as np
import pytest

from cxr_core import card as card_lib
from cxr_core import familiarity
from cxr_core.errors import ModelCardError

_DIM = 40
_ROTATION = np.linalg.qr(np.random.default_rng(99).normal(size=(_DIM, _DIM)))[0]
_SCALES = np.linspace(3.0, 0.05, _DIM)  # a few strong directions, many weak ones (as pooled CNN features)


def _clusters(rng: np.random.Generator, n: int, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Two classes of correlated Gaussian features, rotated off the axes."""
    labels = rng.integers(0, 2, n)
    centres = np.stack([np.full(_DIM, 2.0), np.full(_DIM, -2.0)])
    x = centres[labels] + (rng.normal(size=(n, _DIM)) * _SCALES) @ _ROTATION.T + shift
    return x, labels


def test_training_like_features_sit_near_one_and_shifted_ones_far():
    rng = np.random.default_rng(0)
    x, y = _clusters(rng, 3000)
    model = familiarity.fit(x, y, components=10)
    x_val, _ = _clusters(rng, 1000)
    model = familiarity.calibrate(model, x_val, 99.0)
    d_val = model.distance(x_val)
    assert np.median(d_val) == pytest.approx(1.0, abs=0.1)
    assert model.flags(d_val).mean() == pytest.approx(0.01, abs=0.002)
    x_new, _ = _clusters(rng, 1000)
    assert model.flags(model.distance(x_new)).mean() < 0.03
    # A shift along a direction the training films never vary in is caught by the residual term ...
    away = 12.0 * _ROTATION[:, -1]  # 240 standard deviations of the weakest direction; 4 of the strongest
    assert model.flags(model.distance(x_new + away)).mean() > 0.9
    # ... and one far along the main direction by the class-conditional part.
    far, _ = _clusters(rng, 1000, shift=40.0)
    assert model.flags(model.distance(far)).mean() > 0.99


def test_distance_is_the_smallest_over_classes_and_rejects_bad_input():
    rng = np.random.default_rng(1)
    x, y = _clusters(rng, 2000)
    model = familiarity.fit(x, y, components=5)
    # A film exactly at a class mean is as familiar as a film can be: distance 0.
    assert model.distance(model.means) == pytest.approx([0.0, 0.0], abs=1e-9)
    bad = x[:3].copy()
    bad[1, 4] = np.nan
    d = model.distance(bad)
    assert np.isinf(d[1]) and np.isfinite(d[[0, 2]]).all()
    assert model.flags(d)[1]  # never familiar
    with pytest.raises(ValueError, match=r"\(N, 40\)"):
        model.distance(x[:, :10])
    with pytest.raises(ValueError, match="NaN"):
        familiarity.fit(bad, y[:3])


def test_save_and_load_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    x, y = _clusters(rng, 500)
    model = familiarity.calibrate(familiarity.fit(x, y, components=8), x[:200], 95.0)
    familiarity.save(model, tmp_path)
    back = familiarity.load(tmp_path / familiarity.FILE)
    assert back.threshold == model.threshold
    np.testing.assert_allclose(back.distance(x[:50]), model.distance(x[:50]), rtol=1e-5)


def test_rates_overall_and_per_group():
    out = familiarity.rates(np.array([True, False, False, True]), ["a", "a", "b", "b"])
    assert out == {"n": 4, "flagged": 2, "rate": 0.5,
                   "by_group": {"a": {"n": 2, "flagged": 1, "rate": 0.5}, "b": {"n": 2, "flagged": 1, "rate": 0.5}}}


def test_the_card_hash_covers_the_familiarity_file(tiny_model_dir, tmp_path):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    card = card_lib.read(folder)
    rng = np.random.default_rng(3)
    x, y = _clusters(rng, 300)
    familiarity.save(familiarity.calibrate(familiarity.fit(x, y, components=4), x), folder)
    card.familiarity = {"file": familiarity.FILE, "threshold": 1.0}
    card_lib.save(card, folder)
    loaded = card_lib.load(folder)
    assert loaded.familiarity["sha256"] == card_lib.sha256_of(folder / familiarity.FILE)
    # A familiarity file swapped for another (a looser threshold, say) is refused like swapped weights.
    looser = familiarity.load(folder / familiarity.FILE).with_threshold(1e9)
    familiarity.save(looser, folder)
    with pytest.raises(ModelCardError, match="familiarity file does not match"):
        card_lib.load(folder)
    (folder / familiarity.FILE).unlink()
    with pytest.raises(ModelCardError, match="familiarity file 'familiarity.npz' is missing"):
        card_lib.load(folder)


@pytest.fixture(scope="module")
def familiar_model(familiar_model_dir):
    from conftest import familiar_films

    from cxr_core import familiarity as fam_lib

    return familiar_model_dir, familiar_films(), fam_lib.load(familiar_model_dir / fam_lib.FILE)


def test_every_serving_path_carries_the_familiarity(familiar_model):
    from cxr_core import explain, imaging, models, pipeline, preprocess

    folder, files, fam = familiar_model
    classifier = models.load(folder)
    assert classifier.familiarity is not None and classifier.familiarity.threshold == fam.threshold
    batch = preprocess.to_batch([preprocess.prepare(imaging.load(p).pixels, classifier.input_size) for p in files])
    _, features = classifier.forward(batch)
    expected = fam.distance(features.astype(np.float64).mean(axis=(1, 2)))
    predictions = classifier.predict(batch)
    np.testing.assert_allclose([p.familiarity for p in predictions], expected, rtol=1e-4)
    assert [p.unfamiliar for p in predictions] == list(fam.flags(expected))
    assert 0 < sum(p.unfamiliar for p in predictions) < len(files)  # the 90th percentile: a few, not all
    # A flat grey square is nothing like a chest film: flagged.
    grey = classifier.predict(preprocess.to_batch([np.full((64, 64), 128, np.uint8)]))[0]
    assert grey.unfamiliar and grey.familiarity > fam.threshold
    # The single-film path (prediction and Grad-CAM from one pass) and the batch path agree with predict.
    explainer = explain.Explainer(classifier)
    result = pipeline.classify(classifier, explainer, files[0])
    assert result.prediction.familiarity == pytest.approx(expected[0], rel=1e-4)
    assert result.prediction.unfamiliar == bool(fam.flags(expected[:1])[0])
    rows = pipeline.classify_many(classifier, [(p.name, p) for p in files[:4]])
    np.testing.assert_allclose([r.prediction.familiarity for r in rows], expected[:4], rtol=1e-4)
    # A model folder without a familiarity model serves as before: no score, no flag.
    plain = models.Classifier(classifier.card, classifier.model, folder)
    assert plain.predict(batch[:1])[0].familiarity is None and plain.predict(batch[:1])[0].unfamiliar is None


def test_a_familiarity_model_of_other_features_is_refused(familiar_model, tmp_path):
    import shutil

    from cxr_core import models

    folder = tmp_path / "m"
    shutil.copytree(familiar_model[0], folder)
    rng = np.random.default_rng(5)
    x, y = _clusters(rng, 200)  # 40-dimensional features: the tiny model has 16
    other = familiarity.calibrate(familiarity.fit(x, y, components=3), x)
    familiarity.save(other, folder)
    card = card_lib.read(folder)
    card.familiarity = {**card.familiarity, "threshold": other.threshold}
    card_lib.save(card, folder)
    with pytest.raises(ModelCardError, match="does not fit the model's features"):
        models.load(folder)


@pytest.mark.parametrize("entry, message", [
    ({"file": "../../etc/passwd", "threshold": 1.0}, "familiarity.file must be a plain file name"),
    ({"file": "/abs/familiarity.npz", "threshold": 1.0}, "familiarity.file must be a plain file name"),
    ({"file": "familiarity.npz", "threshold": float("nan")}, "familiarity.threshold must be a positive finite"),
    ({"file": "familiarity.npz", "threshold": -1}, "familiarity.threshold must be a positive finite"),
])
def test_forged_familiarity_entries_are_refused(familiar_model_dir, tmp_path, entry, message):
    import json
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(familiar_model_dir, folder)
    data = json.loads((folder / card_lib.CARD_FILE).read_text())
    data["familiarity"] = {**data["familiarity"], **entry}
    data["card_sha256"] = card_lib.content_sha256(data)  # re-hashed, as a forger would
    (folder / card_lib.CARD_FILE).write_text(json.dumps(data))
    with pytest.raises(ModelCardError, match=message):
        card_lib.load(folder)


def test_forged_familiarity_files_are_refused(familiar_model_dir, tmp_path):
    import os
    import shutil
    import zipfile

    from cxr_core import models

    folder = tmp_path / "m"
    shutil.copytree(familiar_model_dir, folder)
    # A link out of the folder instead of the file.
    outside = tmp_path / "outside.npz"
    shutil.copy(folder / familiarity.FILE, outside)
    (folder / familiarity.FILE).unlink()
    os.symlink(outside, folder / familiarity.FILE)
    with pytest.raises(ModelCardError, match="not a plain file"):
        card_lib.load(folder)
    (folder / familiarity.FILE).unlink()
    # A deflate bomb: 300 MB of zeros in a small archive, written and re-hashed by card.save.
    with zipfile.ZipFile(folder / familiarity.FILE, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("means.npy", "w", force_zip64=True) as member:
            for _ in range(300):
                member.write(bytes(1 << 20))
    assert (folder / familiarity.FILE).stat().st_size < 2_000_000
    card_lib.save(card_lib.read(folder), folder)
    with pytest.raises(ModelCardError, match="would take 300 MB"):
        models.load(folder)
    # A well-formed file whose threshold is not the card's.
    fam = familiarity.load(familiar_model_dir / familiarity.FILE)
    familiarity.save(fam.with_threshold(fam.threshold * 3), folder)
    card_lib.save(card_lib.read(folder), folder)
    with pytest.raises(ModelCardError, match="threshold differs from its card's"):
        models.load(folder)


def test_too_few_training_films_for_the_classes_is_refused_and_a_missing_group_is_a_group():
    x = np.random.default_rng(0).normal(size=(3, 8))
    with pytest.raises(ValueError, match="need at least 5 training films for 3 classes"):
        familiarity.fit(x, np.array([0, 1, 2]))
    out = familiarity.rates(np.array([True, False, True]), ["a", None, "a"])
    assert out["by_group"] == {"None": {"n": 1, "flagged": 0, "rate": 0.0}, "a": {"n": 2, "flagged": 2, "rate": 1.0}}
