"""Scoring a list of files into output rows: the one function both engines run (locally or in each Ray actor).

A row holds the Batch review CSV's columns and values (``cxr_core.review.table_row``, the same
code, familiarity fields included) plus ``path``, the content's ``sha256``, the model's name and weights
hash, and the time. A file that cannot be fetched or read is a row with its ``error``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

import pyarrow as pa

from cxr_core import errors, pipeline, quality, review
from cxr_core.card import ModelCard
from cxr_core.errors import ModelCardError
from scoring.sources import SourceError, read_bytes

# classify_many is called on this many model batches at a time: its reader thread overlaps reading with
# the model inside the slice; of each file only its colour sample (quality.colour_sample) is kept till the end.
SLICE_BATCHES = 8


@dataclass(frozen=True)
class Pending:
    """A file to score; ``known_sha256`` (on --resume) skips it when its content has not changed."""

    path: str
    file: str
    known_sha256: str = ""


def columns(class_names: Sequence[str]) -> list[str]:
    """Output columns, in order."""
    return ["path", *review.row_columns(class_names), "sha256", "model", "weights_sha256", "card_sha256", "engine",
            "scored_at"]


def schema(class_names: Sequence[str]) -> pa.Schema:
    """The Parquet schema of the output (every part and the final file)."""
    types = {"top_probability": pa.float64(), "positive": pa.bool_(), "low_confidence": pa.bool_(),
             "not_chest": pa.bool_(), "familiarity": pa.float64(), "unfamiliar": pa.bool_(),
             **{f"p_{c}": pa.float64() for c in class_names}}
    return pa.schema([(name, types.get(name, pa.string())) for name in columns(class_names)])


def now() -> str:
    """UTC time as ISO 8601 to the millisecond (the ``scored_at`` column)."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def make_row(path: str, item: Any, report: Any, card: ModelCard, sha256: str, engine: str = "") -> dict[str, Any]:
    """One output row from a ``pipeline.BatchItem`` and its quality report (None for unreadable files);
    ``engine``: the engine and precision that scored it (each Ray node chooses its own: bf16 where its CPU has
    it and the card records bf16 agreement, else f32), "" for a file that was not scored."""
    return {"path": path, **review.table_row(item, report, card.class_names), "sha256": sha256, "model": card.name,
            "weights_sha256": card.weights_sha256, "card_sha256": card.card_sha256,
            "engine": engine if item.prediction is not None else "", "scored_at": now()}


def error_row(path: str, file: str, error: str, card: ModelCard, sha256: str = "") -> dict[str, Any]:
    """The row of a file that was not scored."""
    return make_row(path, pipeline.BatchItem(file, None, error, None, None), None, card, sha256)


def same_model(classifier: Any, card_sha256: str, where: str) -> Any:
    """``classifier``, if its card is the one the run checked (``card_sha256``; "" accepts any); else a
    ModelCardError: a node with another copy of the model folder (an older version passes its own hash
    check) would put another model's scores into the same output."""
    found = classifier.card.card_sha256
    if card_sha256 and found != card_sha256:
        raise ModelCardError(f"the model folder {where} on {socket.gethostname()} holds another version of "
                             f"'{classifier.card.name}' (card {found[:12]}) than the one this run checked "
                             f"(card {card_sha256[:12]}): install the same model folder on every node")
    return classifier


def score(classifier: Any, pending: Sequence[Pending], batch_size: int = 16) -> Iterator[dict[str, Any]]:
    """Rows for ``pending`` in order (files whose content matches ``known_sha256`` give none).

    Files are read and hashed in ``pipeline.classify_many``'s reader thread while the model runs.
    """
    card = classifier.card
    label = getattr(classifier, "engine_label", "")
    it = iter(pending)
    while chunk := list(islice(it, SLICE_BATCHES * batch_size)):
        fetched: list[tuple[Any, str, str | None]] = []  # (colour sample, sha256, fetch error) per file

        def items(chunk: list[Pending] = chunk, fetched: list = fetched) -> Iterator[tuple[str, bytes]]:
            for p in chunk:
                try:
                    data = read_bytes(p.path)
                except SourceError as exc:
                    fetched.append((None, "", str(exc)))
                    continue
                sha = hashlib.sha256(data).hexdigest()
                changed = sha != p.known_sha256
                # The colour rule's thumbnail, not the bytes: a slice of 128 DX DICOMs would hold 4-8 GB.
                fetched.append((quality.colour_sample(data) if changed else None, sha, None))
                if changed:
                    yield p.file, data

        results = iter(pipeline.classify_many(classifier, items(), batch_size=batch_size))
        for p, (sample, sha, error) in zip(chunk, fetched, strict=True):
            if error is not None:
                yield error_row(p.path, p.file, error, card)
            elif sha != p.known_sha256:
                item = next(results)
                # A file that was read but not scored (the model failed on it: memory, an engine error), or not read
                # for a reason of this machine (memory, a decoder missing on this node, a bug) keeps no sha256, so
                # that --resume tries it again; an unreadable file's content will not change its answer.
                failed = item.prediction is None and (item.info is not None or errors.depends_on_machine(item.error))
                yield make_row(p.path, item, review.assess_item(item, sample), card, "" if failed else sha, label)
