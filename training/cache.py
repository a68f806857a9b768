"""Decode each image once through cxr_core and keep the model-size uint8 pixels on disk.

Cache entries are keyed by the reader, the file's sha256 and the input size:
``CACHE/<reader>/<size>/<sha[:2]>/<sha>.npy`` holds ``cxr_core.preprocess.prepare(pixels, size)``
(uint8 (S, S)). ``<reader>`` is a hash of the code and libraries that turn a file into those
pixels (``reader_key``): when the reader changes (a windowing or inversion fix, a new decoder),
every film is decoded again, so what trains is what is served. An unreadable file is not
remembered (a decoder installed later may read it). A file whose bytes no longer match the sha256
a split manifest gave it is refused. Only pixels are written: no DICOM tags.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from cxr_core import imaging, limits, preprocess
from cxr_core.errors import UnreadableImageError
from training.data import Record, file_sha256

DEFAULT_CACHE = Path(os.environ.get("CXR_CACHE_DIR", Path.home() / ".cache" / "cxr_toolkit"))


def directory(setting: str) -> Path | None:
    """The pixel cache a ``--cache-dir`` setting names: "" the default, "none" no cache, else that folder."""
    return None if setting == "none" else Path(setting or DEFAULT_CACHE)


@dataclass
class Decoded:
    """The records that decoded, their pixels uint8 (N, S, S) in record order, and the ones that did not."""

    records: list[Record]
    images: np.ndarray
    skipped: list[dict[str, str]]  # {"path": "source/rel", "error": reason}
    cache_note: str = ""  # why the cache could not be written, and for how many films ("" when it could)


@lru_cache(maxsize=1)
def reader_key() -> str:
    """12 hex digits naming the pixels' reader: the source of the cxr_core modules that read, window and
    prepare a film, and the versions of the libraries that decode it."""
    import importlib.metadata as meta

    from cxr_core import windowing

    digest = hashlib.sha256()
    for module in (imaging, preprocess, windowing, limits):
        digest.update(Path(module.__file__).read_bytes())
    for package in ("numpy", "pillow", "pydicom", "opencv-python-headless", "pylibjpeg", "pylibjpeg-libjpeg",
                    "pylibjpeg-openjpeg", "pyjpegls"):
        try:
            digest.update(f"{package}={meta.version(package)};".encode())
        except meta.PackageNotFoundError:
            digest.update(f"{package}=none;".encode())
    return digest.hexdigest()[:12]


def _entry(cache_dir: Path, sha: str, size: int) -> Path:
    return cache_dir / reader_key() / str(size) / sha[:2] / sha


class CacheWriteError(OSError):
    """The pixel cache could not be written (a full disk, a read-only folder): the film itself was read."""


def _atomic_save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npy")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(tmp, array)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)  # no torn file left behind on a full disk
        raise CacheWriteError(exc.errno, f"the pixel cache at {path.parents[3]} could not be written "
                                         f"({exc.strerror or exc})") from exc


def pixels(record: Record, size: int, cache_dir: Path | None = DEFAULT_CACHE,
           cache_failed: Callable[[CacheWriteError], None] | None = None) -> np.ndarray:
    """uint8 (size, size) pixels of one file, from the cache or decoded once and cached.

    Raises ``UnreadableImageError``, also for a file whose bytes are not the sha256 its record carries (a
    split manifest's film replaced on disk since: its place in the split was decided on other pixels).
    A cache that cannot be written costs only the caching: the pixels are returned, and ``cache_failed`` (if
    given, else nothing) is told why; it never makes the film count as unreadable.
    """
    sha = file_sha256(record.path) if cache_dir is not None or record.sha256 else ""
    if record.sha256 and sha != record.sha256:
        raise UnreadableImageError("the file changed since the split manifest was written (its sha256 differs); "
                                   "write the split again or restore the file")
    entry = _entry(cache_dir, sha, size) if cache_dir is not None else None
    if entry is not None:
        npy = entry.with_suffix(".npy")
        if npy.is_file():
            try:
                return np.load(npy)
            except (OSError, ValueError):
                npy.unlink(missing_ok=True)  # a torn write from an interrupted run: decode again
    image = imaging.load(record.path, record.path.name)
    prepared = preprocess.prepare(image.pixels, size)
    if entry is not None:
        try:
            _atomic_save(entry.with_suffix(".npy"), prepared)
        except CacheWriteError as exc:
            if cache_failed is not None:
                cache_failed(exc)
    return prepared


def decode(records: Sequence[Record], size: int, cache_dir: Path | None = DEFAULT_CACHE,
           progress: Callable[[int, int], None] | None = None) -> Decoded:
    """Pixels for every record that can be read; unreadable files are reported, never raised."""
    kept: list[Record] = []
    images: list[np.ndarray] = []
    skipped: list[dict[str, str]] = []
    failed: list[CacheWriteError] = []
    for i, record in enumerate(records):
        try:
            images.append(pixels(record, size, cache_dir, failed.append))
            kept.append(record)
        except UnreadableImageError as exc:
            skipped.append({"path": record.key, "error": str(exc)})
        except OSError as exc:  # vanished or unreadable on disk
            skipped.append({"path": record.key, "error": f"could not read the file ({exc.strerror or exc})"})
        if progress is not None:
            progress(i + 1, len(records))
    stacked = np.stack(images) if images else np.zeros((0, size, size), np.uint8)
    note = (f"{failed[0].strerror}: {len(failed)} film(s) were read but not cached, so the next run decodes them "
            "again (free space there, or give another --cache-dir)") if failed else ""
    return Decoded(kept, stacked, skipped, note)
