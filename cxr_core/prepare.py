"""Prepare the served models once, at install: ``python -m cxr_core.prepare [MODELS_DIR]``.

Loads every model folder under MODELS_DIR (default: env ``CXR_MODELS_DIR``, else ``models/`` beside
this package) the way the app does, so that the OpenVINO conversion (about 3.5 s per DenseNet169 on
2 cores with the Keras load; 15-25 s where ``ov.convert_model`` is needed) lands in the engine cache
(``cxr_core.engine.cache_dir``) now rather than in the app's first start. Prints one line per model;
exits 1 if a model could not be loaded or its conversion not cached (the others are still done). Nothing is
written into the model folders.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported: no CPU-feature banner

from cxr_core import card as card_lib  # noqa: E402
from cxr_core import engine, models  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cxr_core.prepare", description=__doc__.splitlines()[0])
    parser.add_argument("models_dir", nargs="?", type=Path, default=None,
                        help="folder of model folders (default: env CXR_MODELS_DIR, else models/)")
    args = parser.parse_args(argv)
    root = args.models_dir or card_lib.models_root()
    folders = card_lib.model_folders(root)
    if not folders:
        print(f"no model folders (with {card_lib.CARD_FILE}) in {root}", file=sys.stderr)
        return 1
    if engine.cache_dir() is None:
        print(f"the engine cache is off (CXR_ENGINE_CACHE={os.environ.get('CXR_ENGINE_CACHE', '')}): nothing to "
              "prepare")
        return 0
    failed = 0
    for folder in folders:
        start = time.perf_counter()
        try:
            classifier = models.load(folder)
        except Exception as exc:  # noqa: BLE001  (one bad folder must not stop the others)
            failed += 1
            print(f"{folder.name}: cannot be loaded ({type(exc).__name__}: {exc})")
            continue
        what = {"cache": "already prepared", "converted": "converted"}.get(classifier.runner.source,
                                                                          f"runs on {classifier.engine}")
        if unused := getattr(classifier.runner, "cache_unused", ""):  # every start would convert it again
            failed += 1
            print(f"{folder.name}: converted but NOT cached: {unused}")
            continue
        print(f"{folder.name}: {what} ({classifier.engine_label}) in {time.perf_counter() - start:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
