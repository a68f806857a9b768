"""Model folders and data roots for the app page tests, built in tmp from the tiny models and real images.

Nothing here is written inside the repository: model folders are copies of the conftest tiny
models with evaluation files computed by the training package on real radiographs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
from conftest import DATA

KERMANY = DATA / "kermany" / "train"
BAD_JPEG = b"\xff\xd8\xff\xe0 this is not really a JPEG"


def labelled_folder(root: Path, per_class: int = 4, bad: bool = True) -> Path:
    """``root/NORMAL`` and ``root/PNEUMONIA`` with real Kermany images, plus one damaged file in NORMAL."""
    for cls in ("NORMAL", "PNEUMONIA"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for path in sorted((KERMANY / cls).glob("*.jpeg"))[:per_class]:
            shutil.copyfile(path, root / cls / path.name)
    if bad:
        (root / "NORMAL" / "broken.jpeg").write_bytes(BAD_JPEG)
    return root


def evaluated_model(source_model: Path, models_root: Path, images: Path) -> tuple[Path, pd.DataFrame]:
    """A copy of ``source_model`` under ``models_root`` with metrics.json, predictions.csv (split "test"),
    history.csv and split.csv computed from the model itself on the labelled folder ``images``."""
    from cxr_core import models
    from training import evaluate

    folder = models_root / source_model.name
    shutil.copytree(source_model, folder, dirs_exist_ok=True)
    classifier = models.load(folder)
    result = evaluate.evaluate_folder(classifier, images)
    predictions = result.predictions.assign(split="test")
    predictions.to_csv(folder / "predictions.csv", index=False)
    (folder / "metrics.json").write_text(json.dumps(result.metrics))
    pd.DataFrame({"epoch": [0, 1, 2], "loss": [0.9, 0.7, 0.6], "val_loss": [1.0, 0.8, 0.75],
                  "accuracy": [0.5, 0.6, 0.7], "val_accuracy": [0.45, 0.55, 0.6], "lr": [1e-3, 1e-3, 1e-4],
                  "phase": ["head", "head", "fine"]}).to_csv(folder / "history.csv", index=False)
    split = pd.DataFrame({"path": predictions["path"], "source": predictions["source"],
                          "class": predictions["true_class"], "split": "test",
                          "patient": predictions["path"].str.split("/").str[-1], "sha256": "",
                          "duplicate_of": ""})
    split.to_csv(folder / "split.csv", index=False)
    return folder, predictions
