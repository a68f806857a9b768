"""The Ray engine: Ray Data streams the pending files through a pool of model-holding actors.

The driver builds a dataset of (path, file, known_sha256) rows, cut into blocks of a few model
batches; ``map_batches`` sends each block to one of ``actors`` ``Scorer`` actors (the model is
loaded once per actor) which reads, hashes and scores the files with ``scoring.rows.score``, the
same function as the local engine, so both give the same rows. Results stream back to the driver
as they finish (in any order; the commit puts them in input order).

Fault tolerance is Ray's: a dead actor process is restarted (``max_restarts``) and the block it
was scoring is sent again (``max_task_retries``); Ray Data emits a block's rows only once its task
has finished, so a file is never scored twice into the output. Files that fail to read are rows
with an error, not task failures, so they are never retried by Ray.
"""

from __future__ import annotations

import math
import os
import socket
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from scoring import rows as rows_lib

MAX_RESTARTS = 4  # per actor: a worker process that dies is started again this many times
MAX_TASK_RETRIES = 4  # per block: sent again to a (restarted) actor after its actor died


class Scorer:
    """One Ray Data actor: the model loaded once, then ``__call__`` per block of pending files."""

    def __init__(self, model: str, batch_size: int, card_sha256: str = ""):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        from cxr_core import models

        self.classifier = rows_lib.same_model(models.load(model), card_sha256, model)
        self.batch_size = batch_size
        self.schema = rows_lib.schema(self.classifier.card.class_names)

    def __call__(self, batch: pd.DataFrame) -> pa.Table:
        pending = [rows_lib.Pending(p, f, k) for p, f, k in
                   zip(batch["path"], batch["file"], batch["known_sha256"], strict=True)]
        return pa.Table.from_pylist(list(rows_lib.score(self.classifier, pending, self.batch_size)),
                                    schema=self.schema)


def _this_machine_only() -> None:
    """Keep Ray on loopback in this process and the ones it starts.

    Ray 2.60 turns 127.0.0.1 / localhost into the machine's network address, so that other machines could
    join, and then listens on every interface. For the Ray that a run starts for itself that exposes it
    for nothing. ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` is
    Ray's own switch for that case (its default on Windows and macOS): the local address stays loopback.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # read when Ray is imported (and by its children)
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # this process, in case Ray was imported before


def reachable(address: str, timeout: float = 10.0) -> None:
    """Raise ConnectionError when nothing accepts a connection at ``address`` ("HOST:PORT" or
    "ray://HOST:PORT"; "auto" is Ray's to find). Ray itself retries an address that does not answer for
    minutes without end, so a mistyped --address would hang the run instead of saying so."""
    if address == "auto":
        return
    rest = address.split("://", 1)[-1]
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--address {address!r}: give auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConnectionError(f"nothing answers at {host}:{port} ({exc.strerror or exc})") from exc


FORWARDED = ("CXR_ENGINE", "CXR_PRECISION")  # the driver's engine choice, for the workers on every node


def connect(address: str | None) -> None:
    """Join the cluster at ``address`` ("auto", "HOST:PORT", "ray://HOST:10001"), or start a local one
    (``address="local"``: never a cluster that happens to run on this machine; stopped after the run).
    The workers get the driver's ``FORWARDED`` settings (a cluster's nodes started with their own environment
    would otherwise ignore ``CXR_PRECISION=f32 python -m scoring ...``)."""
    import ray

    env = {name: os.environ[name] for name in FORWARDED if name in os.environ}
    if address:  # (a cluster's own processes decide where it listens; scoring.localcluster: loopback)
        reachable(address)
        ray.init(address=address, logging_level="WARNING", log_to_driver=False,
                 runtime_env={"env_vars": env} if env else None)
    else:
        _this_machine_only()
        ray.init(address="local", include_dashboard=False, logging_level="WARNING", log_to_driver=False)


def score(model: str | Path, pending: Sequence[rows_lib.Pending], *, batch_size: int = 16,
          actors: int | None = None, address: str | None = None, card_sha256: str = ""
          ) -> Iterator[list[dict[str, Any]]]:
    """Rows for ``pending``, in blocks as the actors finish them; a local Ray is started and stopped
    around the run when ``address`` is None. ``actors`` defaults to one per node of the cluster; each
    refuses a model folder whose card is not ``card_sha256`` (the one the driver checked).

    An actor that cannot start (its node's model folder is missing, damaged or another version) ends the
    run with that error's own message, not Ray's traceback."""
    import ray

    if not pending:
        return
    connect(address)
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = sys.stderr.isatty()
        nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
        block = rows_lib.SLICE_BATCHES * batch_size
        dataset = ray.data.from_items(
            [{"path": p.path, "file": p.file, "known_sha256": p.known_sha256} for p in pending],
            override_num_blocks=max(1, math.ceil(len(pending) / block)))
        with warnings.catch_warnings():  # Ray 2.60 names no other way to bound restarts and retries
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
            scored = dataset.map_batches(
                Scorer, fn_constructor_kwargs={"model": str(Path(model).resolve()), "batch_size": batch_size,
                                               "card_sha256": card_sha256},
                batch_size=block, batch_format="pandas", num_cpus=1,
                compute=ray.data.ActorPoolStrategy(size=actors or max(1, nodes)),
                max_restarts=MAX_RESTARTS, max_task_retries=MAX_TASK_RETRIES)
        try:
            for batch in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
                yield batch.to_pylist()
        except ray.exceptions.RayError as exc:
            raise _worker_error(exc) from None
    finally:
        ray.shutdown()


def _worker_error(exc: BaseException) -> Exception:
    """The error a worker raised (its ModelCardError, ValueError, OSError...), found in Ray's wrapping; else a
    RuntimeError with Ray's first line: the driver prints it as any other error, the parts kept."""
    from cxr_core.errors import ModelCardError

    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        error = todo.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, ModelCardError | ValueError | OSError) and not _is_ray(error):
            return error
        todo += [getattr(error, "cause", None), error.__cause__, error.__context__]
    for kind, error_type in (("ModelCardError", ModelCardError), ("ValueError", ValueError)):
        for line in str(exc).splitlines():  # an actor's constructor: its error comes back as text only
            if f"{kind}: " in line:
                return error_type(f"a Ray worker failed: {line.split(f'{kind}: ', 1)[1].strip()}")
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return RuntimeError(f"a Ray worker failed ({type(exc).__name__}: {first[:300]}); the parts written so far "
                        "are kept: fix it and rerun with --resume")


def _is_ray(error: BaseException) -> bool:
    return type(error).__module__.startswith("ray.")
