"""Resident memory of a fresh serving process: ``python -m benchmarks.rss_probe MODEL_DIR IMAGE...``.

Loads one model as the app does (Classifier + Explainer on the default engine), classifies each
image 20 times in total through the classify page's path (read, predict + Grad-CAM, overlay) and
once through batch review (``classify_many``, which compiles OpenVINO's throughput model), then
classifies the same with a TensorFlow classifier on the same Keras model (both engines loaded:
``rss_both_engines_mb``) and runs the batch on it too (``rss_both_engines_tf_batch_mb``; with TensorFlow as the
default, the second engine is OpenVINO: ``rss_both_engines_openvino_batch_mb``), and prints
one JSON object with VmRSS in MiB at each step. Run in its own process so nothing else the
benchmark loaded (tf-keras-vis' clone of the model, batches) counts.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv: list[str]) -> int:
    from benchmarks.machine import rss_mb
    from benchmarks.serving import classify_once, load_seconds

    folder, images = Path(argv[0]), [Path(p) for p in argv[1:]]
    baseline = rss_mb()
    _, classifier, explainer = load_seconds(folder)
    loaded = rss_mb()
    uploads = [(p.read_bytes(), p.name) for p in images]
    for i in range(20):
        data, name = uploads[i % len(uploads)]
        classify_once(classifier, explainer, data, name)
    served = rss_mb()
    from cxr_core import pipeline

    batch = [(f"{i}-{p.name}", p) for i, p in enumerate(images * 16)][:16]
    pipeline.classify_many(classifier, batch, batch_size=16)
    batched = rss_mb()
    # Both engines at once: TensorFlow's forward pass on the same Keras model, beside the default engine.
    from cxr_core import engine, explain, models

    # The engine the default is not (TensorFlow beside OpenVINO, or OpenVINO beside a TensorFlow default);
    # without OpenVINO both are TensorFlow and ``rss_engines`` says so (the both-engines target is not met then).
    second = "tensorflow" if classifier.engine == "openvino" or not engine.openvino_available() else "openvino"
    other = models.Classifier(classifier.card, classifier.model, folder, engine=second)
    other_explainer = explain.Explainer(other)
    for i in range(20):
        data, name = uploads[i % len(uploads)]
        classify_once(other, other_explainer, data, name)
    both = rss_mb()
    # TensorFlow's allocator keeps the activations of its largest batch: a batch review on the second engine too,
    # named after it (when TensorFlow is the default, the second engine is OpenVINO's).
    pipeline.classify_many(other, batch, batch_size=16)
    second_batch = "rss_both_engines_tf_batch_mb" if other.engine == "tensorflow" else \
        f"rss_both_engines_{other.engine}_batch_mb"
    print(json.dumps({"rss_start_mb": round(baseline, 1), "rss_loaded_mb": round(loaded, 1),
                      "rss_mb": round(served, 1), "rss_batch_mb": round(batched, 1),
                      "rss_both_engines_mb": round(both, 1), second_batch: round(rss_mb(), 1),
                      "rss_engines": sorted({classifier.engine, other.engine})}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
