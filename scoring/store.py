"""The output: rows go to part files as they come, and one atomic commit writes the final Parquet (and CSV).

``OUT.parquet.parts/`` holds ``part-<run>-<n>.parquet`` files (runs numbered in order), each written under a temporary
name and renamed, so a crash leaves whole parts or nothing. ``commit`` merges the previous output
(on --resume) and every part in the order written (a later row for a path replaces an earlier one),
puts the rows in input order, writes ``OUT.parquet`` the same way (temporary file, then rename) and
removes the parts. An interrupted run therefore never leaves a half-written output, and --resume
knows from the output and the parts which (path, sha256) pairs are done.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cxr_core import review
from scoring import rows as rows_lib
from scoring.sources import Entry


def _durable_replace(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` over ``final`` once its bytes are on disk: a power cut leaves the old file or the new one,
    never a truncated file that --resume would have to be told to ignore."""
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)


class Store:
    """Parts and the final output for ``out`` (a ``.parquet`` path)."""

    def __init__(self, out: str | Path, class_names: Sequence[str]):
        self.out = Path(out)
        if self.out.suffix != ".parquet":
            raise ValueError(f"--out must name a .parquet file, got {out!r} (add --csv for a CSV copy beside it)")
        if self.out.is_dir():
            raise ValueError(f"--out {out} is a folder: name a .parquet file (in it, or elsewhere)")
        folder = self.out.parent
        if not folder.is_dir():
            what = "is not a folder" if folder.exists() else "does not exist"
            raise ValueError(f"--out {out}: {folder} {what}; create the folder or choose another --out")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ValueError(f"--out {out}: {folder} is not writable; choose another --out")
        self.parts = self.out.with_name(self.out.name + ".parts")
        if self.parts.exists() and not self.parts.is_dir():
            raise ValueError(f"--out {out}: {self.parts} (where the parts go) is a file; move it or choose "
                             "another --out")
        self.class_names = list(class_names)
        self.schema = rows_lib.schema(class_names)
        self._run = 1  # this run's number in its parts' names: one past the parts already there (``start``)
        self._count = 0
        self._resume = False
        self._lock: Any = None
        self.written = False  # whether this run has written a part or begun the commit (--resume goes on from it)

    def start(self, resume: bool, card_sha256: str = "") -> dict[str, str]:
        """Prepare for a run; on ``resume`` the done (path -> sha256) pairs, else remove earlier parts.

        A row that another model scored is not done: this run scores it again and replaces it, so that one output
        never mixes models. Another model is another card: its hash covers the weights' hash, and the same weights
        under another card (temperature, thresholds, familiarity model) give other probabilities and decisions.

        Takes the output's lock first (``close`` or the end of the process gives it back): a second run into the
        same ``--out`` would remove this one's parts on its start and merge its own rows into this one's commit.
        """
        self._lock_output()
        self._resume = resume
        self._clear_temporaries()
        if not resume:
            shutil.rmtree(self.parts, ignore_errors=True)
            return {}
        # Numbered after the parts already there, not by the clock: a clock set back since the interrupted run (a
        # driver on another machine, a reboot) made this run's parts sort first, so that its fresh rows lost to
        # the old ones at the commit (a file scored now listed as not found, a replaced film with its old score).
        numbers = [int(m.group(1)) for p in self.parts.glob("part-*.parquet")
                   if (m := re.fullmatch(r"part-(\d+)-\d+\.parquet", p.name))]
        self._run = max(numbers, default=0) + 1
        latest: dict[str, tuple[str, str]] = {}  # path -> (sha256, card) of its last row, as commit keeps it
        for table in self._previous():
            latest.update(zip(table["path"].to_pylist(), zip(table["sha256"].to_pylist(),
                                                             table["card_sha256"].to_pylist(), strict=True),
                              strict=True))
        # A file that could not be fetched has no sha256: it is tried again.
        return {path: sha for path, (sha, card) in latest.items()
                if path and sha and (not card_sha256 or card == card_sha256)}

    def _lock_output(self) -> None:
        if self._lock is not None:
            return
        path = self.out.with_name(f".{self.out.name}.lock")
        lock = open(path, "a")  # noqa: SIM115 - held until close(): the lock lives as long as the file is open
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise ValueError(f"another scoring run is writing {self.out} (its lock {path.name} is held); wait "
                             "for it to finish, or choose another --out") from None
        self._lock = lock

    def _temporaries(self) -> list[Path]:
        """This output's temporary files (``.OUT.parquet.<pid>.tmp``, its CSV copy's, and parts being written)."""
        csv = self.out.with_suffix(".csv")
        # exactly ``.NAME.<pid>.tmp``: ``.NAME.*.tmp`` also matched another output's (``NAME.v2.parquet``), whose
        # own run, under its own lock, may be writing it
        mine = re.compile(rf"\.(?:{re.escape(self.out.name)}|{re.escape(csv.name)})\.\d+\.tmp")
        return [*(p for p in self.out.parent.glob(".*.tmp") if mine.fullmatch(p.name)),
                *self.parts.glob(".part-*.parquet.tmp")]

    def _clear_temporaries(self) -> None:
        """Remove the temporary files a killed run left (each holds paths and scores); under the output's lock,
        so that none is another run's."""
        for tmp in self._temporaries():
            tmp.unlink(missing_ok=True)

    def close(self) -> None:
        """Give the output's lock back (the end of the process does too)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _previous(self) -> list[pa.Table]:
        """The earlier output (only on --resume: without it a run starts afresh) and every part, in order.

        A path listed twice in a manifest has its scored row first and the 'duplicate' error row after it in
        the output: only the first row of a path counts there (parts hold one row per path).
        """
        tables = []
        if self._resume and self.out.exists():
            earlier = pq.read_table(self.out)
            first = earlier.to_pandas().drop_duplicates("path", keep="first").index.to_numpy()
            tables.append(earlier.take(first))
        tables += [pq.read_table(p) for p in sorted(self.parts.glob("part-*.parquet"))]
        wanted = set(self.schema.names)
        for i, table in enumerate(tables):
            # Columns added since an output was written: "" (an empty card_sha256 is no model's: its rows score again).
            for column in ("card_sha256", "engine", "reading_notes"):
                if column not in table.column_names:
                    tables[i] = table = table.append_column(column, pa.array([""] * len(table), pa.string()))
            if not wanted <= set(table.column_names):
                raise ValueError(f"{self.out} (or a part of it) was written for other classes or by another "
                                 "version; score into a new --out")
        return tables

    def write_part(self, rows: list[dict[str, Any]]) -> None:
        """Write ``rows`` as one part file, atomically."""
        if not rows:
            return
        self.parts.mkdir(parents=True, exist_ok=True)
        name = f"part-{self._run:020d}-{self._count:06d}.parquet"
        self._count += 1
        tmp = self.parts / f".{name}.tmp"
        self.written = True
        try:
            pq.write_table(pa.Table.from_pylist(rows, schema=self.schema), tmp)
            _durable_replace(tmp, self.parts / name)
        finally:
            tmp.unlink(missing_ok=True)  # a write that failed (a full disk) leaves no rows under a hidden name

    @staticmethod
    def _kept(latest: pd.DataFrame, entries: Sequence[Entry]) -> pd.DataFrame:
        """The rows (on --resume: the earlier output's and parts') of files below a folder that could not be listed
        this time, each placed after that folder's row: its files are not known to be gone, and a folder unreadable
        for a moment must not cost their results."""
        listed = {e.path for e in entries}
        kept = []
        for i, entry in enumerate(entries):
            if not entry.unlisted:
                continue
            below = latest[latest["path"].str.startswith(entry.path) & ~latest["path"].isin(listed)]
            below = below.sort_index()  # by path
            # Between this entry (i) and the next (i + 1), in path order.
            below.index = [i + (k + 1) / (len(below) + 1) for k in range(len(below))]
            if len(below):
                kept.append(below)
        return pd.concat(kept) if kept else latest.iloc[:0]

    def commit(self, entries: Sequence[Entry], card: Any, csv: bool = False) -> pd.DataFrame:
        """Write the final output in ``entries`` order (one row per entry); returns it as a DataFrame.

        Raises RuntimeError, writing nothing, if an entry has no row (the run did not finish).
        """
        tables = self._previous()
        merged = (pa.concat_tables([t.select(self.schema.names).cast(self.schema) for t in tables])
                  if tables else self.schema.empty_table())
        rows = merged.to_pandas()
        # Only this run's model: a row of another card (an earlier run's output, a node with another copy of
        # the model folder) never reaches the output; its file counts as not scored.
        rows = rows[rows["card_sha256"] == card.card_sha256]
        latest = rows.drop_duplicates("path", keep="last").set_index("path", drop=False)
        order = pd.DataFrame({"path": [e.path for e in entries], "bad": [e.problem is not None for e in entries]})
        found = latest.reindex(order.loc[~order["bad"], "path"])
        missing = int(found["path"].isna().sum())
        if missing:
            raise RuntimeError(f"{missing} of {len(entries)} files have no result yet; run again with --resume")
        found.index = order.index[~order["bad"]]
        problems = pd.DataFrame([rows_lib.error_row(e.path, e.file, e.problem, card) for e in entries if e.problem],
                                index=order.index[order["bad"]], columns=self.schema.names)
        frame = pd.concat([piece for piece in (found, problems, self._kept(latest, entries)) if len(piece)] or [found])
        table = pa.Table.from_pandas(frame.sort_index()[self.schema.names], schema=self.schema, preserve_index=False)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.written = True
        tmp = self.out.with_name(f".{self.out.name}.{os.getpid()}.tmp")
        csv_path = self.out.with_suffix(".csv")
        csv_tmp = csv_path.with_name(f".{csv_path.name}.{os.getpid()}.tmp")
        try:
            pq.write_table(table, tmp)
            frame = table.to_pandas()
            if csv:
                with open(csv_tmp, "w", newline="", encoding="utf-8") as fh:  # spreadsheet-safe, as Batch review's
                    fh.write(review.export_csv(frame))
                _durable_replace(csv_tmp, csv_path)
            _durable_replace(tmp, self.out)
        finally:  # a commit that failed (a full disk, a folder where the CSV goes) leaves no copy of the rows
            tmp.unlink(missing_ok=True)
            csv_tmp.unlink(missing_ok=True)
        shutil.rmtree(self.parts, ignore_errors=True)
        return frame
