"""``python -m benchmarks [--quick] [--model DIR] [--no-app | --app-only | --engines-only]``: measure, print one
JSON object."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@dataclass(frozen=True)
class Config:
    repeat: int = 30  # timed calls per latency figure, after warm-up
    tfkv_repeat: int = 10
    batch_images: int = 256  # real images through the batch-review path (at least 200)
    forward_images: int = 256
    batch_size: int = 16
    model: str | None = None
    app: bool = True
    app_only: bool = False
    engines_only: bool = False


QUICK = Config(repeat=5, tfkv_repeat=3, batch_images=48, forward_images=48)


def parse(argv: list[str]) -> Config:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="few repetitions and 48 images (a smoke run)")
    parser.add_argument("--model", help="model folder to measure (default: models/densenet169-pneumonia, "
                        "else a random-weight DenseNet169 at 224 px)")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--no-app", action="store_true", help="skip the cold app start (streamlit + Chromium)")
    what.add_argument("--app-only", action="store_true",
                      help="only the cold app start, first upload and method switch (streamlit + Chromium)")
    what.add_argument("--engines-only", action="store_true",
                      help="only the engines side by side and the TensorFlow forward throughput they are compared to")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else Config()
    return Config(**{**base.__dict__, "model": args.model, "app": not args.no_app, "app_only": args.app_only,
                     "engines_only": args.engines_only})


def log(message: str) -> None:
    print(f"[benchmarks] {message}", file=sys.stderr, flush=True)


class MissingData(Exception):
    """The real films the figures are measured on are not there."""


def check_data(config: Config) -> None:
    """Refuse at once (not after minutes of measuring) when the real films are missing."""
    from benchmarks import bombs, serving

    needed = [serving.JPEG] if config.app_only else [serving.JPEG, serving.FOLDER]
    if not (config.app_only or config.engines_only):
        needed += [serving.DICOM, bombs.JPEG_DICOM]
    missing = [str(p) for p in needed if not p.exists()]
    if not missing and not config.app_only:
        from cxr_core.paths import list_images

        if not list_images(serving.FOLDER, recursive=False, limit=1):
            missing.append(f"the images in {serving.FOLDER}")
    if missing:
        raise MissingData(f"missing: {', '.join(missing)}. The benchmarks measure the real films of "
                          f"../shared/data (its README says where they come from); put them there and run again.")


def stage(figures: dict, name: str, measure) -> None:
    """Run one stage; a failure is logged and recorded under ``errors`` so that the other figures survive."""
    try:
        figures.update(measure())
    except Exception as exc:  # noqa: BLE001  (any failure of one stage must not lose the run)
        log(f"{name} failed: {type(exc).__name__}: {exc}")
        figures.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"


def child(module: str, *args: str) -> dict:
    """A ``python -m module args`` in a fresh process; its last line of output is a JSON object of figures.
    A failing child raises with its own error output (its last lines), not only its exit status."""
    from benchmarks import serving

    done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          cwd=serving.REPO)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"{module} exited with {done.returncode}: {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def engines(config: Config, folder, paths: list) -> dict:
    """Each engine measured in this run (TensorFlow, OpenVINO f32, and OpenVINO bf16 where the CPU has it)."""
    from benchmarks import serving
    from cxr_core import engine

    runs = {"tensorflow": ("tensorflow", "f32")}
    if engine.openvino_available():
        runs["openvino"] = ("openvino", "f32")
        if engine.bf16_supported():
            runs["openvino_bf16"] = ("openvino", "bf16")
    log(f"engines {', '.join(runs)}")
    return serving.engines_side_by_side(folder, runs, config.repeat, paths, config.batch_size)


def result(figures: dict, config: Config, model: dict) -> dict:
    """The printed JSON: the figures, each target's pass/fail, the model, the run's settings and the machine."""
    from benchmarks import check_targets
    from benchmarks.machine import machine_info

    return {**figures, "targets": check_targets(figures), "model": model, "config": config.__dict__,
            "machine": machine_info(), "date": time.strftime("%Y-%m-%d %H:%M:%S %z")}


def run(config: Config) -> dict:
    """Every figure, measured in this one run, with the machine and the targets."""
    from benchmarks import serving
    from benchmarks.machine import rss_mb
    from cxr_core.paths import list_images

    folder, origin = serving.model_folder(config.model)
    log(f"model {folder} ({origin})")
    figures: dict = {}
    if config.app_only:
        from benchmarks.app_render import first_render

        log("cold app start, first upload, method switch")
        figures.update(first_render(folder))
        return result(figures, config, {"folder": str(folder), "origin": origin})
    if config.engines_only:
        from cxr_core import models

        log("forward throughput (TensorFlow), then engines side by side")
        reference = models.load(folder, engine="tensorflow")
        figures["forward_images_per_s"] = round(
            serving.forward_images_per_s(reference.model, config.forward_images, config.batch_size), 2)
        del reference
        paths = list_images(serving.FOLDER, recursive=False, limit=config.batch_images)
        figures["cpu"] = serving.cpu_flags()
        figures["engines"] = engines(config, folder, paths)
        return result(figures, config, {"folder": str(folder), "origin": origin})
    load_s, classifier, explainer = serving.load_seconds(folder)
    figures["model_load_s"] = round(load_s, 2)
    figures["first_prediction_s"] = round(serving.warm_up_seconds(classifier, explainer), 2)
    log("forward pass")
    figures["forward_ms_p50"] = round(serving.forward_ms(classifier.model, config.repeat), 1)
    figures["engine_forward_ms_p50"] = round(serving.engine_forward_ms(classifier, config.repeat), 1)
    log("classify JPEG")
    figures["classify_ms_p50"] = round(serving.classify_ms(classifier, explainer, serving.JPEG, config.repeat), 1)
    figures["classify_breakdown_ms"] = serving.classify_breakdown(classifier, explainer, serving.JPEG, config.repeat)
    figures["familiarity_ms_p50"] = round(serving.familiarity_ms(classifier, config.repeat), 2)
    log("classify DICOM")
    figures["classify_dicom_ms_p50"] = round(
        serving.classify_ms(classifier, explainer, serving.DICOM, max(3, config.repeat // 3)), 1)
    log("PACS retrieve + classify (local Orthanc) vs disk")
    from benchmarks.pacs import pacs_figures

    stage(figures, "pacs", lambda: pacs_figures(classifier, explainer, max(3, config.repeat // 3)))
    log("tf-keras-vis Gradcam")
    figures["tfkv_gradcam_ms_p50"] = round(serving.tfkv_gradcam_ms(classifier, serving.JPEG, config.tfkv_repeat), 1)
    log("forward throughput")
    figures["forward_images_per_s"] = round(
        serving.forward_images_per_s(classifier.model, config.forward_images, config.batch_size), 2)
    figures["engine_forward_images_per_s"] = round(
        serving.engine_forward_images_per_s(classifier, config.forward_images, config.batch_size), 2)
    log("batch review throughput")
    paths = list_images(serving.FOLDER, recursive=False, limit=config.batch_images)
    per_s, scored = serving.batch_images_per_s(classifier, paths, config.batch_size)
    # A batch whose films were not all scored measured reading and errors, not the engine: no figure.
    figures["batch_images_per_s"] = round(per_s, 2) if scored == len(paths) else None
    figures["batch_images"] = len(paths)
    figures["batch_scored"] = scored
    log("engines side by side")
    figures["engine"] = classifier.engine_label
    figures["cpu"] = serving.cpu_flags()
    figures["engines"] = engines(config, folder, paths)
    figures["bench_process_rss_mb"] = round(rss_mb(), 1)
    log("resident memory (fresh process)")
    stage(figures, "rss_probe",
          lambda: child("benchmarks.rss_probe", str(folder), str(serving.JPEG), *map(str, paths[:19])))
    log("hostile input: DICOM bombs and 100 MB of zeros (fresh process)")
    stage(figures, "bombs", lambda: child("benchmarks.bombs"))
    if config.app:
        from benchmarks.app_render import first_render

        log("cold app start")
        stage(figures, "app", lambda: first_render(folder))
    else:
        figures["app_first_render_s"] = None
    return result(figures, config, {"folder": str(folder), "origin": origin,
                                    "architecture": classifier.card.architecture,
                                    "input_size": classifier.input_size})


def main(argv: list[str] | None = None) -> int:
    import tempfile

    # Converted models go to a folder of this run (the model may be a random one), not the user's cache.
    config = parse(sys.argv[1:] if argv is None else argv)
    try:
        check_data(config)
    except MissingData as exc:
        print(f"python -m benchmarks: {exc}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="cxr-bench-cache-") as cache:
        os.environ["CXR_ENGINE_CACHE"] = cache
        result = run(config)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
