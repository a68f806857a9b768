"""OpenVINO against TensorFlow on the shipped models' whole test splits: ``python -m benchmarks.engine_agreement``.

For each model folder under ``models/`` (or those given), every held-out test image listed in its
``predictions.csv`` is read once through the serving path and scored by TensorFlow f32, OpenVINO f32
and, where the CPU has BF16, OpenVINO bf16. Prints one JSON object: per model and precision, the
largest probability difference from TensorFlow, the share of equal decisions (the card's rule), the
macro AUC, and the AUC difference from f32. The tests check a 64-image sample of the same
(tests/test_engine_shipped.py); this is the full measurement behind benchmarks/README.md.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
# predictions.csv paths are relative to the dataset folder that training named each source after.
SOURCES = {"kermany": DATA / "kermany" / "train", "covid19_radiography": DATA / "covid19_radiography",
           "covid19_image_dataset": DATA / "covid19_image_dataset" / "train",
           "nih_chestxray14": DATA / "nih_chestxray14"}


def _batches(batch: np.ndarray, size: int = 32):
    for start in range(0, len(batch), size):
        yield batch[start:start + size]


def agreement(folder: Path) -> dict:
    """The figures for one model folder (see the module docstring)."""
    import pandas as pd

    from cxr_core import engine, imaging, metrics, models, preprocess

    test = pd.read_csv(folder / "predictions.csv").query("split == 'test'")
    reference = models.load(folder, engine="tensorflow")
    card = reference.card
    batch = preprocess.to_batch([preprocess.prepare(imaging.load(SOURCES[r.source] / r.path).pixels,
                                                    card.input_size) for r in test.itertuples()])
    classes = list(card.class_names)
    y_true = np.array([classes.index(c) for c in test["true_class"]])

    def scored(classifier: models.Classifier) -> tuple[np.ndarray, np.ndarray, float]:
        probs = np.concatenate([classifier.probabilities(b) for b in _batches(batch)])
        decided = np.array([classes.index(models.decide(card, p).decision) for p in probs])
        return probs, decided, metrics.evaluate(y_true, probs, classes, decided)["auc"]

    tf_probs, tf_decided, tf_auc = scored(reference)
    stored = test[[f"p_{c}" for c in classes]].to_numpy()
    out: dict = {"n": len(test), "tensorflow": {"auc": round(tf_auc, 5),
                                                "max_abs_diff_vs_stored": float(np.abs(tf_probs - stored).max())}}
    precisions = ["f32"] + (["bf16"] if engine.bf16_supported() else [])
    f32_auc = None
    for precision in precisions:
        classifier = models.Classifier(card, reference.model, folder, engine="openvino", precision=precision)
        probs, decided, auc = scored(classifier)
        f32_auc = auc if precision == "f32" else f32_auc
        out[f"openvino_{precision}"] = {
            "precision": classifier.precision,
            "max_abs_diff_vs_tensorflow": float(np.abs(probs - tf_probs).max()),
            "decisions_equal": round(float((decided == tf_decided).mean()), 5),
            "decisions_differ": int((decided != tf_decided).sum()),
            "auc": round(auc, 5),
            "auc_minus_f32": round(auc - f32_auc, 5),
        }
    return out


def main(argv: list[str]) -> int:
    from cxr_core import card as card_lib

    folders = [Path(a) for a in argv] or sorted(p.parent for p in (REPO / "models").glob(f"*/{card_lib.CARD_FILE}"))
    result = {folder.name: agreement(folder) for folder in folders}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
