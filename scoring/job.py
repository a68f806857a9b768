"""One scoring run: list the source, skip what is done (--resume), score with an engine, commit, summarise."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import pandas as pd

from cxr_core import card as card_lib
from scoring import rows as rows_lib
from scoring import sources
from scoring.store import Store

ENGINES = ("local", "ray")


@dataclass(frozen=True)
class Config:
    """A run's settings (see ``python -m scoring --help``)."""

    source: str
    model: str = "models/densenet169-pneumonia"
    out: str = "results.parquet"
    engine: str = "local"
    address: str | None = None  # ray only: "auto", "HOST:PORT" or "ray://HOST:10001"; None starts a local Ray
    actors: int | None = None  # ray only: model-holding actors (default: one per node)
    batch_size: int = 16  # images per forward pass
    resume: bool = False
    csv: bool = False  # also write OUT with a .csv suffix
    part_size: int = 1000  # rows per part file: at most this much work is lost to a crash

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r}; choose one of {ENGINES}")
        if self.batch_size < 1 or self.part_size < 1 or (self.actors is not None and self.actors < 1):
            raise ValueError("--batch-size, --part-size and --actors must be positive")
        if self.address and self.engine != "ray":
            raise ValueError("--address needs --engine ray")


@dataclass(frozen=True)
class Summary:
    """What a run did: rows in the output, files this run read and finished, flags over the output, wall time in s."""

    files: int
    scored: int  # rows this run finished (a scored film, or one that cannot be read: its content decides)
    skipped: int  # done by an earlier run with the same content (--resume)
    errors: int
    positive: int
    low_confidence: int
    not_chest: int
    unfamiliar: int
    seconds: float
    first_s: float = 0.0  # until the first rows came back (listing, model loading, actors starting)
    retry: int = 0  # rows of this run for files not fetched or not scored (the model or this machine failed)
    later_per_s: float | None = None  # images/s after the first results came back (None: all came at once)

    @property
    def images_per_s(self) -> float:
        return self.scored / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        retry = f" ({self.retry} not fetched or not scored: --resume tries them again)" if self.retry else ""
        later = ("all in the first results" if self.later_per_s is None
                 else f"{self.later_per_s:.2f} images/s after them")
        return (f"scoring: {self.files} files, {self.scored} scored now, {self.skipped} already done, "
                f"{self.errors} errors{retry}, {self.positive} positive, {self.low_confidence} low confidence, "
                f"{self.not_chest} probably not a chest, {self.unfamiliar} unfamiliar; "
                f"{self.seconds:.1f} s, {self.images_per_s:.2f} images/s overall; first results after "
                f"{self.first_s:.1f} s, {later}")


@dataclass
class RunState:
    """How far a run got, for the message of one that fails: ``written`` once it has written a part or begun to
    write the output (before that, a failure leaves the output and parts as they were)."""

    written: bool = False


def _progress(total: int, log: Callable[[str], None]) -> Callable[[int], None]:
    """A tqdm bar on a terminal, else a plain line at most every 10 s."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total, unit="file", desc="scoring")

        def update_bar(n: int) -> None:
            bar.update(n)
            if bar.n >= total:
                bar.close()

        return update_bar
    state = {"done": 0, "last": time.monotonic()}

    def update(n: int) -> None:
        state["done"] += n
        if time.monotonic() - state["last"] >= 10 or state["done"] == total:
            state["last"] = time.monotonic()
            log(f"scoring: {state['done']} of {total} files")

    return update


def _blocks(rows: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    it = iter(rows)
    while block := list(islice(it, size)):
        yield block


def engine_rows(config: Config, pending: list[rows_lib.Pending], card_sha256: str = ""
                ) -> Iterator[list[dict[str, Any]]]:
    """Blocks of rows from the configured engine (the local one never imports Ray), from the model whose card
    hash is ``card_sha256`` (the one the run checked; "" takes whatever the folder holds)."""
    if config.engine == "ray":
        from scoring import cluster

        yield from cluster.score(config.model, pending, batch_size=config.batch_size, actors=config.actors,
                                 address=config.address, card_sha256=card_sha256)
        return
    from cxr_core import models

    classifier = rows_lib.same_model(models.load(config.model), card_sha256, config.model)
    yield from _blocks(rows_lib.score(classifier, pending, config.batch_size), config.batch_size)


def summarise(table: pd.DataFrame, scored: int, skipped: int, seconds: float, first_s: float, retry: int = 0,
              later_per_s: float | None = None) -> Summary:
    """Counts over the committed output; ``first_s``: when the first rows came back."""
    errors = table["error"].astype(str) != ""
    return Summary(files=len(table), scored=scored, skipped=skipped,
                   errors=int(errors.sum()), positive=int(table["positive"].astype(bool).sum()),
                   low_confidence=int(table["low_confidence"].astype(bool).sum()),
                   not_chest=int(table["not_chest"].astype(bool).sum()),
                   unfamiliar=int(table["unfamiliar"].eq(True).sum()), seconds=seconds, first_s=first_s,
                   retry=retry, later_per_s=later_per_s)


def run(config: Config, log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
        state: RunState | None = None) -> Summary:
    """Score ``config.source`` into ``config.out``; returns the summary (also logged). ``state`` (if given) says,
    when the run fails, whether it had begun writing."""
    start = time.monotonic()
    card = card_lib.load(config.model)
    store = Store(config.out, card.class_names)
    outputs = [store.out, *([store.out.with_suffix(".csv")] if config.csv else [])]
    local = None if sources.is_url(config.source) else Path(config.source.removeprefix("file://"))  # as it is read
    if local is not None and local.resolve() in [o.resolve() for o in outputs]:
        raise ValueError(f"the output {config.out}{' (and its .csv copy)' if config.csv else ''} would overwrite "
                         f"the source {config.source}: choose another --out")
    entries = sources.list_entries(config.source)
    if not entries:  # an unmounted share is an empty folder: committing would replace the output with nothing
        raise ValueError(f"{sources.shown_source(config.source)} lists no image files (is the archive mounted, the "
                         "manifest complete?); nothing was scored and the output was left as it was")
    try:
        return _score(config, card, store, entries, start, log)
    finally:
        if state is not None:
            state.written = store.written
        store.close()


def _score(config: Config, card: card_lib.ModelCard, store: Store, entries: list, start: float,
           log: Callable[[str], None]) -> Summary:
    done = store.start(config.resume, card.card_sha256)
    pending = [rows_lib.Pending(e.path, e.file, done.get(e.path, "")) for e in entries if e.problem is None]
    log(f"scoring: {len(entries)} files from {sources.shown_source(config.source)} with {card.name} on the "
        f"{config.engine} engine"
        + (f", {sum(1 for p in pending if p.known_sha256)} done before (checked by content)" if done else ""))
    update = _progress(len(pending), log)
    buffer: list[dict[str, Any]] = []
    rows = finished = retry = 0  # rows from the engine; of them, finished (with a sha256) and to try again
    first_s = last_s = 0.0
    first_finished = 0
    # The first results end with the first slice (rows.SLICE_BATCHES batches), which an engine scores at once and
    # hands over batch by batch: timed from its first batch, the rate after it counted 7 batches in no time.
    # Ray's actors each score their first slice side by side: the first results are one slice per actor (when
    # their number is given; as python -m benchmarks times it).
    workers = max(1, config.actors or 1) if config.engine == "ray" else 1
    first_rows = min(len(pending), rows_lib.SLICE_BATCHES * config.batch_size * workers)
    first_block_s = None
    for block in engine_rows(config, pending, card.card_sha256):
        last_s = time.monotonic() - start
        first_block_s = last_s if first_block_s is None else first_block_s
        done_now = sum(1 for r in block if r["sha256"])
        if rows < first_rows <= rows + len(block):
            first_s, first_finished = last_s, finished + done_now
        buffer.extend(block)
        rows += len(block)
        finished += done_now
        retry += len(block) - done_now
        update(len(block))
        if len(buffer) >= config.part_size:
            store.write_part(buffer)
            buffer = []
    store.write_part(buffer)
    if first_block_s is not None and rows < first_rows:  # fewer rows than a first slice (files done before)
        first_s, first_finished = first_block_s, finished
    if len(pending) > rows:
        update(len(pending) - rows)  # files found unchanged since an earlier run
    table = store.commit(entries, card, csv=config.csv)
    later = finished - first_finished
    later_per_s = later / (last_s - first_s) if later and last_s > first_s else None
    summary = summarise(table, finished, len(pending) - rows, time.monotonic() - start, first_s, retry, later_per_s)
    log(summary.line())
    return summary
