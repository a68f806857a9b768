"""Which Keras backend and devices a run uses, mixed precision, and data parallelism.

TensorFlow is imported only on the TensorFlow backend and only here, lazily, so training runs
under ``KERAS_BACKEND=jax`` or ``torch`` on machines without TensorFlow.
"""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Iterator
from typing import Any

import keras


def accelerators() -> list[str]:
    """Names of the GPUs the current backend sees (empty on CPU)."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return [str(getattr(d, "device_kind", d)) for d in jax.devices() if d.platform == "gpu"]
    if backend == "torch":
        import torch

        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        return [tf.config.experimental.get_device_details(g).get("device_name", g.name) for g in gpus]
    return []


def describe() -> dict[str, Any]:
    """Backend, platform and devices, for the card's recipe."""
    gpus = accelerators()
    return {
        "backend": keras.backend.backend(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "devices": gpus or ["cpu"],
    }


def set_precision(mode: str) -> str:
    """Set Keras's global dtype policy; "auto" = mixed_float16 on a GPU, float32 on CPU. Returns the policy."""
    if mode == "auto":
        policy = "mixed_float16" if accelerators() else "float32"
    elif mode == "off":
        policy = "float32"
    else:
        policy = f"mixed_{mode}"
    keras.mixed_precision.set_global_policy(policy)
    return policy


@contextlib.contextmanager
def distributed(enabled: bool) -> Iterator[str]:
    """Data parallelism over all local devices while the block builds, compiles and fits.

    JAX: ``keras.distribution.DataParallel``; TensorFlow: ``tf.distribute.MirroredStrategy``.
    Yields a short description (``"none"`` when disabled).
    """
    if not enabled:
        yield "none"
        return
    backend = keras.backend.backend()
    if backend == "jax":
        devices = keras.distribution.list_devices()
        previous = keras.distribution.distribution()
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
        try:
            yield f"keras.distribution.DataParallel over {len(devices)} device(s)"
        finally:
            keras.distribution.set_distribution(previous)
    elif backend == "tensorflow":
        import tensorflow as tf

        strategy = tf.distribute.MirroredStrategy()
        with strategy.scope():
            yield f"tf.distribute.MirroredStrategy over {strategy.num_replicas_in_sync} replica(s)"
    else:
        raise ValueError(f"--distribute supports the jax and tensorflow backends, not {backend}")
