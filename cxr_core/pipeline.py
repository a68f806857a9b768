"""The serving path: file -> image -> model input -> prediction (+ heatmap).

    result = classify(classifier, explainer, "chest.dcm")     # one image, prediction + Grad-CAM
    rows = classify_many(classifier, [(name, data), ...])     # a folder or upload batch

Both read through ``imaging.load`` and ``preprocess.model_input``/``prepare``, the same path the
model was trained on. ``classify_many`` never loses a batch to one bad file: an unreadable file
becomes a row with the reader's message, and the next batch is read while the current one runs.
Neither writes anything to disk or logs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from os import PathLike

import numpy as np

from cxr_core import imaging, models, overlay, preprocess, quality
from cxr_core.errors import UNEXPECTED, UnreadableImageError
from cxr_core.explain import METHODS, Explainer

Source = str | PathLike | bytes


@dataclass(frozen=True)
class Result:
    """One classified image: what was read, the prediction, and the heatmap (S, S) in [0, 1] for ``class_index``."""

    image: imaging.LoadedImage
    prediction: models.Prediction
    heatmap: np.ndarray
    class_index: int
    method: str


@dataclass(frozen=True)
class BatchItem:
    """One row of a batch run: a prediction, or the reason the file could not be read."""

    name: str
    prediction: models.Prediction | None
    error: str | None
    info: imaging.ImageInfo | None
    thumbnail: np.ndarray | None  # uint8 grayscale, longer side 96 px
    image_scores: dict[str, float] | None = None  # quality.pixel_scores of the full film (the quality rules')


def classify(
    classifier: models.Classifier,
    explainer: Explainer,
    source: Source,
    filename: str | None = None,
    *,
    window: tuple[float, float] | None = None,
    class_index: int | None = None,
    method: str = "gradcam",
    layer: str | None = None,
) -> Result:
    """Read, predict and explain one image; ``class_index`` None explains the class called (the decision at the
    card's thresholds, which can be less probable than the top class).

    Grad-CAM gives prediction and heatmap from one pass (on the classifier's engine); other methods (see
    ``explain.METHODS``) take the prediction from the classifier and then explain.
    ``layer`` (default: the card's target layer) is one of ``explainer.layer_choices()``.
    Raises UnreadableImageError for a file that cannot be read, ValueError for a bad method, layer or class.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    image = imaging.load(source, filename, window=window)
    batch = preprocess.model_input(image.pixels, classifier.input_size)
    if method == "gradcam":
        predictions, heatmaps = explainer.gradcam_predictions(batch, class_index, layer)
        prediction = predictions[0]
        if class_index is not None:
            return Result(image, prediction, heatmaps[0], int(class_index), method)
        called = prediction.class_names.index(prediction.decision)
        if called != int(np.argmax(prediction.probabilities)):  # a threshold called a less probable class: its map
            heatmaps = explainer.gradcam(batch, called, layer)[1]
        return Result(image, prediction, heatmaps[0], called, method)
    prediction = classifier.predict(batch)[0]
    index = prediction.class_names.index(prediction.decision) if class_index is None else class_index
    explanation = explainer.explain(batch, method, index, layer)
    return Result(image, prediction, explanation.heatmap, explanation.class_index, method)


@dataclass(frozen=True)
class _Read:
    name: str
    image: np.ndarray | None  # uint8 (S, S), prepared for the model
    error: str | None
    info: imaging.ImageInfo | None
    thumbnail: np.ndarray | None
    image_scores: dict[str, float] | None = None


def _read(name: str, source: Source, size: int) -> _Read:
    """One file read and prepared; any failure, expected or not, becomes the file's error (defence in depth)."""
    try:
        loaded = imaging.load(source, name)
        return _Read(name, preprocess.prepare(loaded.pixels, size), None, loaded.info,
                     overlay.thumbnail(loaded.pixels), quality.pixel_scores(loaded.pixels))
    except UnreadableImageError as exc:
        return _Read(name, None, str(exc), None, None)
    except Exception as exc:  # noqa: BLE001 - one file must never lose the batch
        return _Read(name, None, UNEXPECTED.format(kind=type(exc).__name__), None, None)


def _predict(classifier: models.Classifier, reads: list[_Read]) -> list[models.Prediction | str]:
    """Predictions for the readable files, in order; if the batch fails, each file alone, failures as messages."""
    try:
        return list(classifier.predict(preprocess.to_batch([r.image for r in reads])))
    except Exception:  # noqa: BLE001 - retried one by one so only the file at fault gets the error
        out: list[models.Prediction | str] = []
        for r in reads:
            try:
                out.append(classifier.predict(preprocess.to_batch([r.image]))[0])
            except Exception as exc:  # noqa: BLE001
                out.append(UNEXPECTED.format(kind=type(exc).__name__))
        return out


def classify_many(
    classifier: models.Classifier,
    items: Iterable[tuple[str, Source]],
    *,
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> list[BatchItem]:
    """Score (name, path-or-bytes) pairs in batches; rows in input order, bad files as error rows.

    ``progress(done, total)`` is called after each batch (total is -1 when ``items`` has no length).
    One worker thread reads and preprocesses the next batch while the model runs on this one.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    total = len(items) if hasattr(items, "__len__") else -1
    size = classifier.input_size
    stopped = threading.Event()

    def until_stopped() -> Iterator[_Read]:
        # Checked before each file is pulled and before it is decoded: ``items`` may be a generator that reads
        # files lazily (a URL can take a minute), a DX DICOM takes a while to decode, and a Ctrl-C must not wait
        # for the rest of the batch being read ahead.
        it = iter(items)
        while not stopped.is_set():
            try:
                name, source = next(it)
            except StopIteration:
                return
            if stopped.is_set():
                return
            yield _read(name, source, size)

    reads_ahead = until_stopped()

    def read_next() -> list[_Read]:
        # Pulled in the worker too: ``items`` may be a generator that reads files lazily.
        return list(islice(reads_ahead, batch_size))

    rows: list[BatchItem] = []
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cxr-read")
    try:
        pending = pool.submit(read_next)
        while True:
            reads = pending.result()
            if not reads:
                break
            pending = pool.submit(read_next)
            good = [r for r in reads if r.image is not None]
            predictions = iter(_predict(classifier, good) if good else [])
            for r in reads:
                prediction = next(predictions) if r.image is not None else None
                if isinstance(prediction, str):
                    rows.append(BatchItem(r.name, None, prediction, r.info, r.thumbnail))
                else:
                    rows.append(BatchItem(r.name, prediction, r.error, r.info, r.thumbnail, r.image_scores))
            if progress is not None:
                progress(len(rows), total)
    except BaseException:  # Ctrl-C, a stopped app run: the reader ends after the file it is on
        stopped.set()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return rows
