"""The machine a benchmark ran on, resident memory, and a median timer."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable


def rss_mb() -> float:
    """This process's resident set size (VmRSS) in MiB, from /proc/self/status."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gb() -> float | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def machine_info() -> dict[str, object]:
    """CPU model, usable cores, memory (GiB), accelerators, library versions."""
    import keras
    import tensorflow as tf

    return {
        "cpu": _cpu_model(),
        "cores": len(os.sched_getaffinity(0)),
        "mem_gb": _mem_total_gb(),
        "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
        "os": platform.platform(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "keras_backend": keras.backend.backend(),
    }


def median_ms(fn: Callable[[], object], repeat: int, warmup: int = 2) -> float:
    """Median wall-clock time of ``fn()`` in milliseconds over ``repeat`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)
