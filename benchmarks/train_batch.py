"""Training speed by batch size: ``python -m benchmarks.train_batch [--size 224] [--batches 8,16,32]``.

DenseNet169 with the cxr3 recipe's augmentation in front (``training.build``), every layer and BatchNorm
training (a fine-tune at a new input size), ``train_on_batch`` on random films, 3 classes. Prints films
per second for each batch size (after one warm-up step), measured in this one process: on a CPU the
per-film cost can grow with the batch, which sets ``--batch-size`` for long runs.
"""

from __future__ import annotations

import argparse
import time

import keras
import numpy as np

from cxr_core import models
from training import build
from training.config import TrainConfig


def films_per_second(batch: int, size: int, steps: int) -> float:
    config = TrainConfig(data=["-"], input_size=size)  # the default augmentation, which the cxr3 runs use
    rng = np.random.default_rng(batch)
    x = rng.uniform(0, 255, (batch, size, size, 3)).astype("float32")
    y, w = rng.integers(0, 3, batch), np.ones(batch, "float32")
    model = models.build("densenet169", 3, size)
    build.set_phase(model, "fine-tune", "all", pretrained=True, freeze_batchnorm=False)
    wrapper = build.training_model(model, config)
    wrapper.compile(optimizer=keras.optimizers.Adamax(1e-4),
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    wrapper.train_on_batch(x, y, sample_weight=w)
    start = time.perf_counter()
    for _ in range(steps):
        wrapper.train_on_batch(x, y, sample_weight=w)
    return batch * steps / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_batch", description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batches", default="8,16,32")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    for batch in (int(b) for b in args.batches.split(",")):
        print(f"batch {batch}: {films_per_second(batch, args.size, args.steps):.2f} films/s", flush=True)


if __name__ == "__main__":
    main()
