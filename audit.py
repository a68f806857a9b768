"""The audit trail: who did what and when, as JSON lines, with no patient data.

One file per UTC day, ``audit-YYYY-MM-DD.jsonl``, in the folder the operator sets (``CXR_AUDIT_DIR``
or ``[audit] dir`` in secrets). A line is ``{"time", "user", "role", "action", ...}`` plus only the
keyword fields of ``AuditLog.record``: model name and weights hash, the kind of source, integer counts.
File names, folder paths and study UIDs are never written: a server folder and each study UID are
written as a keyed hash (HMAC-SHA256 with the operator's secret), so lines about the same study can be
matched by whoever holds the key, and by nobody else. Standard library only (no streamlit).
"""

from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import hmac
import json
import os
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

ACTIONS = ("sign_in", "sign_out", "classify", "batch", "evaluate", "pacs_search", "pacs_classify", "pacs_write",
           "model_change", "refused", "export")  # export: a report or a results table downloaded
# Where the images of an action came from: a fixed vocabulary, never a path or a name.
SOURCES = ("upload", "folder_upload", "server_folder", "held_out", "data_root", "pacs")
_LOCK = threading.Lock()


def keyed_hash(key: bytes, value: str) -> str:
    """HMAC-SHA256 of ``value`` under ``key``, as 64 hex digits (the same value always gives the same hash)."""
    return hmac.new(key, value.encode("utf-8"), hashlib.sha256).hexdigest()


class AuditLog:
    """Appends audit lines to ``folder``; ``key`` (bytes) keys the hashes of study UIDs and folders."""

    def __init__(self, folder: str | os.PathLike, key: bytes | None = None) -> None:
        self.folder = Path(folder)
        self.key = key or None

    def path(self, when: _dt.datetime) -> Path:
        return self.folder / f"audit-{when:%Y-%m-%d}.jsonl"

    def record(self, user: str, role: str | None, action: str, *, model: str | None = None,
               weights_sha256: str | None = None, source: str | None = None,
               counts: Mapping[str, int] | None = None, study_uids: Iterable[str] = (),
               folder: str | None = None, refused: str | None = None) -> dict[str, Any]:
        """Write one line and return it as a dict.

        ``counts`` maps a short name to an integer (files, unreadable, positive, studies...);
        ``study_uids`` and ``folder`` are hashed with the key, or left out (counted only) without one;
        ``refused`` names the action a ``refused`` line was about. Raises ``ValueError`` for an unknown
        action or source, or a count that is not an integer.
        """
        if action not in ACTIONS:
            raise ValueError(f"unknown audit action {action!r}; expected one of {', '.join(ACTIONS)}")
        if source is not None and source not in SOURCES:
            raise ValueError(f"unknown audit source {source!r}; expected one of {', '.join(SOURCES)}")
        now = _dt.datetime.now(_dt.UTC)
        line: dict[str, Any] = {"time": now.isoformat(timespec="seconds"), "user": user, "role": role,
                                "action": action}
        if model is not None:
            line["model"] = model
        if weights_sha256 is not None:
            line["weights_sha256"] = weights_sha256
        if source is not None:
            line["source"] = source
        if refused is not None:
            line["refused"] = refused
        counts = dict(counts or {})
        for name, value in counts.items():
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"audit count {name!r} must be an integer, not {type(value).__name__}")
        uids = [str(u) for u in study_uids]
        if uids:
            counts.setdefault("studies", len(uids))
            if self.key:
                line["study_refs"] = [keyed_hash(self.key, u) for u in uids]
        if folder is not None and self.key:
            line["folder_ref"] = keyed_hash(self.key, folder)
        if counts:
            line["counts"] = counts
        text = json.dumps(line, ensure_ascii=True, separators=(",", ":")) + "\n"
        with _LOCK:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)  # made here: only this user reads it
            fd = os.open(self.path(now), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                start = os.fstat(fd).st_size
                data = text.encode("ascii")
                rest = memoryview(data)
                try:
                    while rest:  # a short write (a full disk, a signal) must not leave half a line for the next
                        written = os.write(fd, rest)
                        if written == 0:
                            raise OSError(errno.ENOSPC, "the audit line could not be written whole")
                        rest = rest[written:]
                except OSError:
                    # Undo the part written, unless another process appended after it (truncating would drop
                    # its line too; the cut line then stays, a rare case on a disk that is full anyway).
                    if os.fstat(fd).st_size == start + len(data) - len(rest):
                        os.ftruncate(fd, start)
                    raise
            finally:
                os.close(fd)
        return line


def read(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """Every line of every audit file in ``folder``, oldest file first."""
    lines = []
    for path in sorted(Path(folder).glob("audit-*.jsonl")):
        lines += [json.loads(t) for t in path.read_text().splitlines() if t.strip()]
    return lines
