"""OpenVINO against TensorFlow on the shipped models' whole test splits:
``python -m benchmarks.engine_agreement [--record] [MODEL_DIR ...]``.

For each model folder under ``models/`` (or those given), every held-out test image listed in its
``predictions.csv`` is read once through the serving path and scored by TensorFlow f32, OpenVINO f32
and, where the CPU has BF16, OpenVINO bf16. Prints one JSON object: per model and precision, the
largest probability difference from TensorFlow, the share of equal decisions (the card's rule), the
macro AUC, and the AUC difference from f32. The tests check a 64-image sample of the same
(tests/test_engine_shipped.py); this is the full measurement behind benchmarks/README.md.

Besides the batches, every film is also scored alone (the single-film path the Classify and PACS pages use, a
separate OpenVINO compilation), its low-confidence flag compared, and the Grad-CAM of the first 64 films.

``--record`` (on a CPU with BF16) writes the bf16 figures into each card's ``metrics.engine_agreement``, under
the key of this CPU's bf16 kind (``cxr_core.engine.BF16_KINDS``: ``bf16`` for AVX-512 BF16, ``bf16_amx`` for AMX;
the other kind's record stays), with ``passes`` (decisions equal on both paths, flags and AUC within
``cxr_core.engine.BF16_BOUNDS``) and the fingerprint of the weights and decision rule they hold for: a model whose
bf16 passes is then served at bf16 by default on CPUs of that kind (``cxr_core.engine.default_precision``); one
that misses, whose card changed since, or a CPU of the other kind stays at f32.
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


HEATMAP_FILMS = 64  # films whose Grad-CAM at the card's layer is compared (the maps are 224 x 224 each)


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

    def scored(classifier: models.Classifier) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
        served = [p for b in _batches(batch) for p in classifier.predict(b)]  # as served: familiarity flag included
        probs = np.array([p.probabilities for p in served])
        decided = np.array([classes.index(p.decision) for p in served])
        flags = np.array([bool(p.unfamiliar) for p in served])
        return probs, decided, metrics.evaluate(y_true, probs, classes, decided)["auc"], flags

    def single(classifier: models.Classifier) -> tuple[np.ndarray, np.ndarray]:
        """Film by film, as the Classify and PACS pages serve (OpenVINO's batch-1 LATENCY compilation, not the
        THROUGHPUT one batches use): decisions and low-confidence flags."""
        served = [classifier.predict(batch[i:i + 1])[0] for i in range(len(batch))]
        return (np.array([classes.index(p.decision) for p in served]),
                np.array([bool(p.low_confidence) for p in served]))

    def heatmaps(classifier: models.Classifier) -> np.ndarray:
        """Grad-CAM at the card's layer for the called class, on the first HEATMAP_FILMS films."""
        from cxr_core import explain

        sample = batch[:HEATMAP_FILMS]
        called = [classes.index(p.decision) for p in classifier.predict(sample)]
        return explain.Explainer(classifier).gradcam(sample, called)[1]

    tf_probs, tf_decided, tf_auc, tf_flags = scored(reference)
    tf_single, tf_low = single(reference)
    tf_maps = heatmaps(reference)
    stored = test[[f"p_{c}" for c in classes]].to_numpy()
    out: dict = {"n": len(test), "tensorflow": {"auc": round(tf_auc, 5),
                                                "max_abs_diff_vs_stored": float(np.abs(tf_probs - stored).max())}}
    precisions = ["f32"] + (["bf16"] if engine.bf16_supported() else [])
    f32_auc = None
    for precision in precisions:
        classifier = models.Classifier(card, reference.model, folder, engine="openvino", precision=precision,
                                       familiarity=reference.familiarity)
        probs, decided, auc, flags = scored(classifier)
        one_decided, low = single(classifier)
        f32_auc = auc if precision == "f32" else f32_auc
        out[f"openvino_{precision}"] = {
            "precision": classifier.precision,
            "max_abs_diff_vs_tensorflow": float(np.abs(probs - tf_probs).max()),
            "decisions_equal": round(float((decided == tf_decided).mean()), 5),
            "decisions_differ": int((decided != tf_decided).sum()),
            "familiarity_flags_equal": round(float((flags == tf_flags).mean()), 5),
            "single_film_decisions_equal": round(float((one_decided == tf_single).mean()), 5),
            "low_confidence_equal": round(float((low == tf_low).mean()), 5),
            "heatmap_max_abs_diff": round(float(np.abs(heatmaps(classifier) - tf_maps).max()), 5),
            "auc": round(auc, 5),
            "auc_minus_f32": round(auc - f32_auc, 5),
        }
    return out


def record(folder: Path, figures: dict, cpu: dict | None = None) -> dict:
    """Write ``figures``' bf16 agreement into the card of ``folder``; returns it. ``cpu``: the measuring CPU's flags
    (``{"flags": [...]}``, ``benchmarks.serving.cpu_flags``); the record goes under its bf16 kind's key in
    ``metrics.engine_agreement`` (``engine.BF16_KINDS``), beside any record of the other kind."""
    import datetime

    from cxr_core import card as card_lib
    from cxr_core import engine

    bf16 = figures.get("openvino_bf16")
    if bf16 is None or bf16.get("precision") != "bf16":
        raise ValueError("no bf16 figures to record: this CPU has no BF16 (OpenVINO ran f32)")
    if cpu is None:  # this CPU's
        from benchmarks.serving import cpu_flags

        cpu = cpu_flags()
    kind = engine.bf16_kind(cpu.get("flags"))
    if kind is None:
        raise ValueError("no bf16 kind to record under: the CPU flags list neither amx_bf16 nor avx512_bf16")
    card = card_lib.load(folder)
    # Decisions must agree on both paths that serve them: batches (Batch review, scoring) and single films.
    decisions_equal = min(bf16["decisions_equal"], bf16.get("single_film_decisions_equal", 0.0))
    entry = {"n": figures["n"], "decisions_equal": decisions_equal,
             "batch_decisions_equal": bf16["decisions_equal"],
             "single_film_decisions_equal": bf16.get("single_film_decisions_equal"),
             "low_confidence_equal": bf16.get("low_confidence_equal"),
             "heatmap_max_abs_diff": bf16.get("heatmap_max_abs_diff"),
             "familiarity_flags_equal": bf16.get("familiarity_flags_equal"), "auc_f32": figures["openvino_f32"]["auc"],
             "auc_bf16": bf16["auc"], "auc_delta": abs(bf16["auc_minus_f32"]),
             "max_abs_diff_vs_tensorflow": round(bf16["max_abs_diff_vs_tensorflow"], 6),
             "passes": engine.bf16_within_bounds(decisions_equal, bf16["auc_minus_f32"],
                                                 bf16.get("familiarity_flags_equal")),
             "bounds": dict(engine.BF16_BOUNDS), "fingerprint": engine.agreement_fingerprint(card),
             "measured": datetime.date.today().isoformat(), "cpu": cpu}
    kept = card.metrics.get("engine_agreement")
    kept = {k: v for k, v in kept.items() if k in engine.BF16_KINDS.values()} if isinstance(kept, dict) else {}
    card.metrics = {**card.metrics, "engine_agreement": {**kept, engine.BF16_KINDS[kind]: entry}}
    card_lib.save(card, folder)
    return entry


def main(argv: list[str]) -> int:
    from cxr_core import card as card_lib

    keep = "--record" in argv
    argv = [a for a in argv if a != "--record"]
    folders = [Path(a) for a in argv] or sorted(p.parent for p in (REPO / "models").glob(f"*/{card_lib.CARD_FILE}"))
    result = {folder.name: agreement(folder) for folder in folders}
    if keep:
        from benchmarks.serving import cpu_flags

        cpu = cpu_flags()
        for folder in folders:
            result[folder.name]["recorded"] = record(folder, result[folder.name], cpu)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
