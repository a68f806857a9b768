"""Speed and memory figures for the serving path: ``python -m benchmarks [--quick]``.

One run measures everything on the real DenseNet169 at 224 px (the shipped model folder if
``models/densenet169-pneumonia`` exists, else the same architecture with random weights) and
prints one JSON object: the figures, the machine they were taken on, and each target with
pass/fail. ``benchmarks/README.md`` holds the table of the last full run.

Figures (medians after warm-up; ms are wall-clock milliseconds):

- ``forward_ms_p50``         raw compiled forward pass, batch 1
- ``classify_ms_p50``        cxr_core's whole path for one 224 px JPEG: read, preprocess, predict,
                             Grad-CAM, overlay
- ``classify_dicom_ms_p50``  the same on the real 1955x1841 JPEG 2000 DICOM
- ``tfkv_gradcam_ms_p50``    tf-keras-vis ``Gradcam`` on the same input (the reference library)
- ``forward_images_per_s``   raw compiled forward over preloaded batches
- ``batch_images_per_s``     ``cxr_core.pipeline.classify_many`` over a folder of real images
- ``model_load_s``           ``models.load`` (hash check, build, weights) plus the ``Explainer``
- ``first_prediction_s``     the first prediction and Grad-CAM after loading (graph tracing)
- ``classify_breakdown_ms``  ``classify_ms_p50``'s steps: read, preprocess, Grad-CAM pass, overlay
- ``app_first_render_s``     cold ``streamlit run app.py`` until the classify page is shown
- ``rss_mb``                 resident memory of a fresh process after loading one model and
                             classifying 20 images
- ``bomb_peak_extra_mb``     peak resident memory above baseline while the worst DICOM decompression
                             bomb of the corpus is refused (``benchmarks.bombs``, a fresh process)
- ``zeros_refuse_s``         seconds to refuse 100 MB of zero bytes named ``x.dcm``
"""

TARGETS = {
    "classify_vs_forward": "classify_ms_p50 <= 1.5 x forward_ms_p50",
    "tfkv_speedup": "tfkv_gradcam_ms_p50 / classify_ms_p50 >= 10",
    "batch_vs_forward": "batch_images_per_s >= 0.85 x forward_images_per_s",
    "rss": "rss_mb <= 1500",
    "bomb_memory": "bomb_peak_extra_mb <= 300",
    "zeros_refuse": "zeros_refuse_s < 1",
}


def check_targets(figures: dict) -> dict[str, dict]:
    """Each target's rule, the ratio or value it tests, and whether it passed (None if not measured)."""

    def ratio(a: str, b: str) -> float | None:
        x, y = figures.get(a), figures.get(b)
        return None if x is None or y in (None, 0) else x / y

    tests = {
        "classify_vs_forward": (ratio("classify_ms_p50", "forward_ms_p50"), lambda v: v <= 1.5),
        "tfkv_speedup": (ratio("tfkv_gradcam_ms_p50", "classify_ms_p50"), lambda v: v >= 10),
        "batch_vs_forward": (ratio("batch_images_per_s", "forward_images_per_s"), lambda v: v >= 0.85),
        "rss": (figures.get("rss_mb"), lambda v: v <= 1500),
        "bomb_memory": (figures.get("bomb_peak_extra_mb"), lambda v: v <= 300),
        "zeros_refuse": (figures.get("zeros_refuse_s"), lambda v: v < 1),
    }
    return {
        key: {"rule": TARGETS[key], "value": None if v is None else round(v, 3), "pass": None if v is None else ok(v)}
        for key, (v, ok) in tests.items()
    }
