"""``python -m scoring SOURCE --model DIR --out results.parquet [--engine local|ray] ...``"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from cxr_core.errors import ModelCardError  # noqa: E402  (after quieting TensorFlow's C++ logs)
from scoring.job import ENGINES, Config, RunState, run  # noqa: E402


def parse(argv: list[str]) -> Config:
    p = argparse.ArgumentParser(prog="python -m scoring", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Score an archive of chest X-rays with one model: one output row per "
                                            "input file (scores, decision, flags, or the reason it was not scored).")
    p.add_argument("source", help="a folder (searched recursively) or a CSV/Parquet manifest with a 'path' column "
                                  "(local paths or URLs)")
    p.add_argument("--model", default=Config.model, help="model folder (model_card.json + weights)")
    p.add_argument("--out", default=Config.out, help="output Parquet file")
    p.add_argument("--engine", choices=ENGINES, default="local",
                   help="local: this process; ray: Ray Data actors (a local Ray unless --address)")
    p.add_argument("--address", help="ray: the cluster to join: auto, HOST:PORT or ray://HOST:10001")
    p.add_argument("--actors", type=int, help="ray: model-holding actors (default: one per node)")
    p.add_argument("--batch-size", type=int, default=Config.batch_size, help="images per forward pass")
    p.add_argument("--part-size", type=int, default=Config.part_size,
                   help="rows per part file (the most a crash can lose)")
    p.add_argument("--resume", action="store_true",
                   help="score only files missing from --out and its parts (by path and content sha256)")
    p.add_argument("--csv", action="store_true", help="also write the output as CSV beside --out")
    a = p.parse_args(argv)
    return Config(source=a.source, model=a.model, out=a.out, engine=a.engine, address=a.address, actors=a.actors,
                  batch_size=a.batch_size, resume=a.resume, csv=a.csv, part_size=a.part_size)


def main(argv: list[str] | None = None) -> int:
    state = RunState()

    def then(fix: str) -> str:
        """What is left and what to do: parts are named only once this run has written some (or begun the output)."""
        if state.written:
            return f"the parts written so far are kept: {fix}rerun with --resume"
        return f"nothing was written and the output was left as it was: {fix}run the same command again"

    try:
        config = parse(sys.argv[1:] if argv is None else argv)
        run(config, state=state)
    except (ValueError, FileNotFoundError, ModelCardError, RuntimeError) as exc:
        print(f"scoring: {exc}", file=sys.stderr)
        return 2
    except ConnectionError as exc:  # Ray: no cluster at --address
        print(f"scoring: cannot reach the Ray cluster ({exc}); check --address, or leave it out to start a "
              "local Ray", file=sys.stderr)
        return 2
    except OSError as exc:  # a folder, file or disk problem (full disk, permissions) not foreseen above
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"scoring: {exc.strerror or exc}{where}; {then('fix it and ')}", file=sys.stderr)
        return 2
    except ImportError as exc:
        print(f"scoring: {exc.name or exc} is not installed (pip install -r requirements.txt)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"scoring: interrupted; {then('')}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
