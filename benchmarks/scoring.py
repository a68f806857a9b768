"""``python -m benchmarks.scoring [--quick] [--model DIR] [--images N]``: python -m scoring's throughput.

Prints one JSON object: the raw forward throughput (TensorFlow's, and the serving engine's that the
local loop is compared with), ``--engine local`` (the scoring loop alone, warm,
and whole runs), and ``--engine ray`` on a two-node Ray cluster started on 127.0.0.1 for the run,
with one actor and with two. Each run's ``steady`` rate is taken from the output's ``scored_at``
times: the rows after the first slice, over the time from the first slice to the last row, so it
leaves out model loading and actor start-up (see scoring/README.md for the last figures).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

TARGETS = {"local_vs_forward": 0.85, "ray_one_actor_vs_local": 0.8}


def log(message: str) -> None:
    print(f"[benchmarks.scoring] {message}", file=sys.stderr, flush=True)


def steady_images_per_s(times: list[str], workers: int = 1, slice_gap_s: float = 0.5) -> float:
    """Rows per second once every worker has finished its first slice, from ISO ``scored_at`` times (a slice's
    rows share a time; times within ``slice_gap_s`` count as one slice).

    The clock starts when the ``workers``-th slice ends: with two actors working side by side, the second one's
    first slice was scored almost wholly before the first one's ended, so counting it after that end would rate
    the run up to 1.5x too fast (and by chance, as the two ends fall more or less than the gap apart)."""
    import pandas as pd

    t = pd.to_datetime(pd.Series(times)).sort_values().reset_index(drop=True)
    seconds = (t - t.iloc[0]).dt.total_seconds()
    ends = [0.0]  # the slices' times, each a gap away from the one before
    for s in seconds:
        if s - ends[-1] > slice_gap_s:
            ends.append(float(s))
    if len(ends) <= workers:
        return 0.0
    start = ends[workers - 1]
    later = int((seconds > start + slice_gap_s).sum())
    return later / (float(seconds.iloc[-1]) - start)


def _run(config, label: str, workers: int = 1) -> dict:
    import pandas as pd

    from scoring.job import run

    log(label)
    s = run(config, log=lambda _: None)
    steady = steady_images_per_s(pd.read_parquet(config.out, columns=["scored_at"])["scored_at"].tolist(), workers)
    return {"files": s.files, "seconds": round(s.seconds, 1), "first_results_s": round(s.first_s, 1),
            "images_per_s": round(s.images_per_s, 2), "steady_images_per_s": round(steady, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scoring", description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="128 images (a smoke run; two slices, so a steady rate exists)")
    parser.add_argument("--images", type=int, default=256, help="real Kermany JPEGs to score")
    parser.add_argument("--batch-size", type=int, default=8, help="8: slices of 64 files, several per run")
    parser.add_argument("--model", help="model folder (default: as python -m benchmarks chooses)")
    parser.add_argument("--no-ray", action="store_true", help="local figures only")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    n = 128 if args.quick else args.images
    # Converted models and the outputs go to folders of this run (the model may be a random one).
    from benchmarks.serving import engine_cache

    with tempfile.TemporaryDirectory(prefix="cxr-bench-scoring-") as work, engine_cache(Path(work) / "engine-cache"):
        result = measure(args, n, Path(work))
    print(json.dumps(result, indent=2))
    return 0


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def measure(args, n: int, work: Path) -> dict:
    """Every figure and ratio of one run, its files under ``work``."""
    import pandas as pd

    from benchmarks import serving
    from benchmarks.machine import machine_info
    from cxr_core import models
    from cxr_core.paths import list_images
    from scoring import rows
    from scoring.job import Config
    from scoring.localcluster import LocalCluster

    folder, origin = serving.model_folder(args.model)
    classifier = models.load(folder)
    paths = list_images(serving.FOLDER, recursive=False, limit=n)
    manifest = work / "manifest.csv"
    pd.DataFrame({"path": [str(p) for p in paths]}).to_csv(manifest, index=False)
    figures: dict = {"images": len(paths), "batch_size": args.batch_size}

    log("forward throughput")
    figures["forward_images_per_s"] = round(serving.forward_images_per_s(classifier.model, n, args.batch_size), 2)
    figures["engine"] = classifier.engine_label
    figures["engine_forward_images_per_s"] = round(
        serving.engine_forward_images_per_s(classifier, n, args.batch_size), 2)
    log("local scoring loop (warm model)")
    pending = [rows.Pending(str(p), p.name) for p in paths]
    list(rows.score(classifier, pending[: args.batch_size], args.batch_size))
    start = time.perf_counter()
    scored = list(rows.score(classifier, pending, args.batch_size))
    figures["local_loop_images_per_s"] = round(len(scored) / (time.perf_counter() - start), 2)
    base = {"source": str(manifest), "model": str(folder), "batch_size": args.batch_size}
    figures["local_run"] = _run(Config(**base, out=str(work / "local.parquet")), "python -m scoring, local engine")
    if not args.no_ray:
        log("starting a two-node Ray cluster on 127.0.0.1")
        with LocalCluster(nodes=2, cpus_per_node=1) as cluster:
            ray_base = {**base, "engine": "ray", "address": cluster.address}
            for actors in (1, 2):
                figures[f"ray_{actors}_actor_run"] = _run(
                    Config(**ray_base, actors=actors, out=str(work / f"ray{actors}.parquet")),
                    f"python -m scoring, ray engine, {actors} actor(s) on two nodes", workers=actors)
    local = figures["local_run"]["steady_images_per_s"]
    # The scoring loop against the same engine's raw throughput (both OpenVINO, or both TensorFlow).
    ratios = {"local_vs_forward": _ratio(figures["local_loop_images_per_s"], figures["engine_forward_images_per_s"])}
    if not args.no_ray:  # a steady rate of 0 (one slice only) gives no ratio, not a division by zero
        ratios["ray_one_actor_vs_local"] = _ratio(figures["ray_1_actor_run"]["steady_images_per_s"], local)
        ratios["ray_two_actors_vs_local"] = _ratio(figures["ray_2_actor_run"]["steady_images_per_s"], local)
    rounded = {k: None if v is None else round(v, 3) for k, v in ratios.items()}
    return {**figures, "ratios": rounded,
            "targets": {k: {"target": t, "value": rounded[k], "pass": None if rounded[k] is None else rounded[k] >= t}
                        for k, t in TARGETS.items() if k in ratios},
              "model": {"folder": str(folder), "origin": origin, "architecture": classifier.card.architecture,
                        "input_size": classifier.input_size},
              "machine": machine_info(), "date": time.strftime("%Y-%m-%d %H:%M:%S %z")}


if __name__ == "__main__":
    sys.exit(main())
