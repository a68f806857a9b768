"""cxr_core.preprocess: real JPEGs to model input, with exact expected pixel values."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import DATA
from PIL import Image

from cxr_core import preprocess

KERMANY = [DATA / "kermany/train/NORMAL/IM-0115-0001.jpeg", DATA / "kermany/train/PNEUMONIA/person1_bacteria_1.jpeg"]
LARGE = [DATA / "covid19_image_dataset/train/Covid/01.jpeg", DATA / "covid19_image_dataset/train/Normal/01.jpeg"]


def _pil_pixels(path: Path) -> np.ndarray:
    """float32 HxW in [0, 1] through PIL's own grayscale conversion."""
    with Image.open(path) as im:
        return np.asarray(im.convert("L"), dtype=np.float32) / 255.0


def _read(path: Path) -> np.ndarray:
    """The project's reader when it exists, else PIL: float32 HxW in [0, 1]."""
    if importlib.util.find_spec("cxr_core.imaging") is None:
        return _pil_pixels(path)
    from cxr_core import imaging

    return imaging.load(path).pixels


@pytest.mark.parametrize("path", KERMANY, ids=lambda p: p.name)
def test_same_size_is_exact_quantization(data_dir, path):
    pixels = _read(path)
    assert pixels.shape == (224, 224) and pixels.dtype == np.float32
    out = preprocess.prepare(pixels, 224)
    assert out.dtype == np.uint8 and out.shape == (224, 224)
    np.testing.assert_array_equal(out, np.rint(pixels * 255.0).astype(np.uint8))
    # Through PIL the 8-bit grey values come back exactly.
    with Image.open(path) as im:
        grey = np.asarray(im.convert("L"))
    np.testing.assert_array_equal(preprocess.prepare(_pil_pixels(path), 224), grey)


@pytest.mark.parametrize("path", LARGE, ids=lambda p: p.parent.name + "/" + p.name)
def test_large_image_shrinks_by_area_average(data_dir, path):
    pixels = _read(path)
    h, w = pixels.shape
    assert max(h, w) > 448 and pixels.min() >= 0.0 and pixels.max() <= 1.0
    # An exact 2x shrink of a 448 px crop is the mean of each 2x2 block.
    crop = pixels[:448, :448]
    blocks = crop.reshape(224, 2, 224, 2).mean(axis=(1, 3))
    out = preprocess.prepare(crop, 224)
    assert np.abs(out.astype(int) - np.rint(blocks * 255.0)).max() <= 1
    # The whole (non-square) image: 224 x 224, mean grey level kept within one level.
    full = preprocess.prepare(pixels, 224)
    assert full.shape == (224, 224) and full.dtype == np.uint8
    assert abs(full.mean() - pixels.mean() * 255.0) < 1.0
    # Anatomy stays where it was: the resized image correlates with the input resized by OpenCV directly.
    reference = cv2.resize(pixels, (224, 224), interpolation=cv2.INTER_AREA)
    np.testing.assert_allclose(full / 255.0, reference, atol=0.5 / 255 + 1e-6)


def test_to_batch_shape_type_channels(data_dir):
    images = [preprocess.prepare(_read(p), 64) for p in KERMANY + LARGE]
    batch = preprocess.to_batch(images)
    assert batch.shape == (4, 64, 64, 3) and batch.dtype == np.float32
    assert batch.min() >= 0.0 and batch.max() <= 255.0 and batch.max() > 200.0  # 0..255, not 0..1
    for c in (1, 2):
        np.testing.assert_array_equal(batch[..., c], batch[..., 0])
    np.testing.assert_array_equal(batch[2, ..., 0], images[2].astype(np.float32))
    single = preprocess.to_batch(images[0])
    assert single.shape == (1, 64, 64, 3)
    np.testing.assert_array_equal(preprocess.model_input(_read(KERMANY[0]), 64), single)


def test_checkerboard_shrinks_to_grey_not_aliases():
    board = (np.indices((64, 64)).sum(axis=0) % 2).astype(np.float32)
    out = preprocess.prepare(board, 32)
    # Area interpolation averages each 2x2 block to 0.5 -> 127.5 -> 128; nearest-neighbour would give 0 or 255.
    np.testing.assert_array_equal(out, np.full((32, 32), 128, np.uint8))
    # At a non-integer factor area stays within 120..135; bilinear would swing over 71..184.
    odd = preprocess.prepare(board, 24)
    assert odd.min() >= 115 and odd.max() <= 140


def test_enlarging_is_bilinear_and_values_are_clipped():
    ramp = np.array([[0.0, 1.0], [0.0, 1.0]], np.float32)
    # Bilinear with pixel-centre alignment: columns at 0, 1/4, 3/4, 1 of the ramp.
    np.testing.assert_array_equal(preprocess.prepare(ramp, 4), np.tile([0, 64, 191, 255], (4, 1)).astype(np.uint8))
    wild = np.array([[-0.5, 0.5], [1.5, 1.0]], np.float32)
    np.testing.assert_array_equal(preprocess.prepare(wild, 2), [[0, 128], [255, 255]])


@pytest.mark.parametrize(
    "bad",
    [np.zeros((8, 8, 3), np.float32), np.zeros(8, np.float32), np.zeros((1, 8, 8, 1), np.float32)],
    ids=["rgb", "1d", "4d"],
)
def test_prepare_rejects_non_2d(bad):
    with pytest.raises(ValueError, match="2-D"):
        preprocess.prepare(bad, 8)


def test_bad_size_and_batch_shapes_raise():
    with pytest.raises(ValueError, match="size"):
        preprocess.prepare(np.zeros((8, 8), np.float32), 0)
    with pytest.raises(ValueError, match="shape"):
        preprocess.to_batch(np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="shape"):
        preprocess.to_batch(np.zeros(8, np.uint8))
