"""Train on the lent GPU machine (the ``device`` tool): pack here, stage and train there, unpack and check here.

The GPU machine has no TensorFlow, no Keras and no network, and a call carries at most 64 MiB of working
tree, stays warm only about 30 s between calls, and brings back at most 8 files of 16 MiB. So:

1. here: ``python -m training.recipes.device pack MANIFEST --weights MODEL_DIR --wheels .whl`` writes one
   tar (the manifest's films, the starting model folder, the wheels) cut into parts of ``--part-mib``
   under ``.device/`` with ``payload.json`` (each part's size and sha256);
2. there, one call per part, back to back: ``bash training/recipes/device_run.sh stage`` keeps the parts
   it carries in ``/tmp/cxr-stage``; the last call, ``... train ARGS``, checks that every part is there,
   unpacks, installs the wheels, trains under ``KERAS_BACKEND=jax`` in float32 and cuts the model folder
   into ``$OUT/result.part-*``;
3. here: ``python -m training.recipes.device unpack FILES_AT runs/NAME`` joins and unpacks them, and
   ``python -m training.recipes.device check runs/NAME`` loads the model under TensorFlow and compares
   its probabilities on real films with the run's own ``predictions.csv``.

``exclude-weights`` / ``include-weights`` take the shipped weights out of git's index for the calls (the
tracked tree is over 64 MiB with them) and put them back. training/README.md has the whole sequence.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from cxr_core.card import sha256_of

PAYLOAD = "payload.json"
PART = "payload.part-"
RESULT = "result.part-"
# split.csv: the films the starting weights trained on, which every run leaves out of val/test/external
# (dataset.not_seen_by_start); without it there the check would pass silently and the held-out figures flatter.
START_FILES = ("model_card.json", "model.weights.h5", "familiarity.npz", "split.csv")
WEIGHTS_GLOB = "models/*/model.weights.h5"


def _members(manifest: Path, roots: list[Path], data_root: Path, start: Path | None,
             wheels: Path | None) -> list[tuple[str, Path]]:
    """(name in the archive, file here): data/<path under data_root>, start/<model files>, wheels/, manifest.csv."""
    from training import data

    data_root = data_root.resolve()
    members = [("manifest.csv", manifest)]
    for record in data.read_manifest(manifest, roots):
        if record.duplicate_of:
            continue  # a manifest's duplicates are never read by the run
        try:
            name = record.path.relative_to(data_root)  # read_manifest resolved the root, not a linked film
        except ValueError as exc:
            raise ValueError(f"{record.path} is not under --data-root {data_root}") from exc
        members.append((f"data/{name.as_posix()}", record.path))
    if start is not None:
        for file in START_FILES:
            if (start / file).is_file():
                members.append((f"start/{file}", start / file))
        if not (start / "model.weights.h5").is_file():
            raise FileNotFoundError(f"{start} holds no model.weights.h5 (is it a model folder?)")
        if not (start / "split.csv").is_file():
            raise FileNotFoundError(f"{start} holds no split.csv: the run could not leave out of its held-out "
                                    "splits the films these weights trained on; use a model folder with its split")
    if wheels is not None:
        found = sorted(wheels.glob("*.whl"))
        if not found:
            raise FileNotFoundError(f"no .whl files in {wheels}")
        members += [(f"wheels/{w.name}", w) for w in found]
    return members


class _Parts(io.RawIOBase):
    """A write-only stream cut into files of at most ``size`` bytes: ``folder/prefixNN``."""

    def __init__(self, folder: Path, prefix: str, size: int):
        self.folder, self.prefix, self.size = folder, prefix, size
        self.paths: list[Path] = []
        self._fh = None
        self._left = 0

    def writable(self) -> bool:
        return True

    def write(self, chunk) -> int:
        view = memoryview(chunk)
        while len(view):
            if self._left == 0:
                if self._fh is not None:
                    self._fh.close()
                path = self.folder / f"{self.prefix}{len(self.paths):02d}"
                self.paths.append(path)
                self._fh, self._left = path.open("wb"), self.size
            n = min(self._left, len(view))
            self._fh.write(view[:n])
            self._left -= n
            view = view[n:]
        return len(chunk)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        super().close()


def _repo_relative(path: Path | None) -> str:
    if path is None:
        return ""
    repo = Path(__file__).resolve().parents[2]
    try:
        return path.resolve().relative_to(repo).as_posix()
    except ValueError:
        return ""


def pack(manifest: Path, roots: list[Path], data_root: Path, out: Path, part_mib: float,
         start: Path | None = None, wheels: Path | None = None) -> dict:
    """Write the payload's parts and ``payload.json`` into ``out`` (emptied of earlier parts first)."""
    members = _members(manifest, roots, data_root, start, wheels)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(f"{PART}*"):
        old.unlink()
    parts = _Parts(out, PART, max(1, int(part_mib * 2**20)))
    with tarfile.open(fileobj=parts, mode="w|", dereference=True) as tar:
        for name, path in members:
            tar.add(path, arcname=name, recursive=False)
    parts.close()
    info = {"parts": [{"name": p.name, "bytes": p.stat().st_size, "sha256": sha256_of(p)} for p in parts.paths],
            "files": len(members), "films": sum(1 for name, _ in members if name.startswith("data/")),
            "start": start is not None, "wheels": sum(1 for name, _ in members if name.startswith("wheels/")),
            # where the run there finds the starting model (the same relative path as here, so that its card
            # reads like a run made here), or "" for start/ in the payload
            "start_path": _repo_relative(start)}
    (out / PAYLOAD).write_text(json.dumps(info, indent=1))
    return info


def unpack(files_at: Path, dest: Path) -> Path:
    """Join ``result.part-*`` from ``files_at`` and unpack the model folder into ``dest`` (which must not exist)."""
    parts = sorted(files_at.glob(f"{RESULT}*"))
    if not parts:
        raise FileNotFoundError(f"no {RESULT}* files in {files_at}: did the train call finish? (see train.log)")
    if dest.exists():
        raise FileExistsError(f"{dest} exists: choose another folder")
    joined = io.BytesIO(b"".join(p.read_bytes() for p in parts))
    staging = dest.parent / f".{dest.name}.unpacking"
    if staging.exists():  # left by an unpack that failed
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    with tarfile.open(fileobj=joined, mode="r:") as tar:
        tar.extractall(staging, filter="data")
    folders = [p for p in staging.iterdir() if p.is_dir()]
    if len(folders) != 1:
        raise ValueError(f"the result holds {len(folders)} folders, expected one model folder")
    folders[0].rename(dest)
    staging.rmdir()
    return dest


def check(folder: Path, roots: list[Path], split: str, n: int) -> tuple[float, int]:
    """Largest |probability difference| between TensorFlow here and the run's ``predictions.csv`` on up to ``n``
    films of ``split``, and how many films were compared."""
    import csv

    from cxr_core import models
    from training import data, evaluate

    classifier = models.load(folder, engine="tensorflow")
    root_of = data.roots_by_source(roots)
    with (folder / "predictions.csv").open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == split][:n]
    if not rows:
        raise ValueError(f"{folder}/predictions.csv has no {split} rows")
    missing = sorted({r["source"] for r in rows} - set(root_of))
    if missing:
        raise ValueError(f"no --root for source(s) {missing}; give every dataset folder the run trained on")
    items = [(r["path"], root_of[r["source"]] / r["path"]) for r in rows]
    scored = evaluate._read_and_predict(classifier, items, 32, None)
    worst = 0.0
    for row, (_, probs, error) in zip(rows, scored, strict=True):
        if error is not None:
            raise ValueError(f"{row['path']}: {error}")
        for name, p in zip(classifier.card.class_names, probs.probabilities, strict=True):
            worst = max(worst, abs(float(row[f"p_{name}"]) - float(p)))
    return worst, len(rows)


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], check=True, capture_output=True, text=True).stdout


def exclude_weights() -> list[str]:
    """Take the shipped weights out of git's index (files stay) and ignore them, so the calls can carry the tree."""
    tracked = _git("ls-files", "--", WEIGHTS_GLOB).split()
    if tracked:
        _git("rm", "-q", "--cached", "--", *tracked)
    exclude = Path(_git("rev-parse", "--git-path", "info/exclude").strip())
    lines = exclude.read_text().splitlines() if exclude.is_file() else []
    if WEIGHTS_GLOB not in lines:
        exclude.parent.mkdir(parents=True, exist_ok=True)
        exclude.write_text("\n".join([*lines, WEIGHTS_GLOB]) + "\n")
    return tracked


def include_weights() -> list[str]:
    """Undo ``exclude_weights``: the weights back in the index as committed, the ignore line gone."""
    exclude = Path(_git("rev-parse", "--git-path", "info/exclude").strip())
    if exclude.is_file():
        exclude.write_text("".join(f"{line}\n" for line in exclude.read_text().splitlines() if line != WEIGHTS_GLOB))
    _git("reset", "-q", "--", "models")
    return _git("ls-files", "--", WEIGHTS_GLOB).split()


def main(argv: list[str] | None = None) -> int:
    from training.recipes.cxr3_split import DATA, ROOTS

    parser = argparse.ArgumentParser(prog="python -m training.recipes.device", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="write the payload's parts into --out")
    p.add_argument("manifest", type=Path)
    p.add_argument("--weights", type=Path, help="the starting model folder (carried as start/)")
    p.add_argument("--wheels", type=Path, help="folder of Python 3.12 wheels (keras, namex, optree, pydicom)")
    p.add_argument("--root", type=Path, action="append", help="dataset folders (default: the cxr3 recipe's)")
    p.add_argument("--data-root", type=Path, default=DATA, help="the folder the films are stored under")
    p.add_argument("--out", type=Path, default=Path(".device"))
    p.add_argument("--part-mib", type=float, default=48.0, help="size of each part (one call carries one)")
    u = sub.add_parser("unpack", help="join result.part-* into a model folder")
    u.add_argument("files_at", type=Path)
    u.add_argument("dest", type=Path)
    c = sub.add_parser("check", help="TensorFlow here vs the run's predictions.csv")
    c.add_argument("folder", type=Path)
    c.add_argument("--root", type=Path, action="append")
    c.add_argument("--split", default="val")
    c.add_argument("--n", type=int, default=64)
    c.add_argument("--tolerance", type=float, default=1e-4)
    sub.add_parser("exclude-weights", help="take models/*/model.weights.h5 out of git's index for the calls")
    sub.add_parser("include-weights", help="put them back")
    args = parser.parse_args(argv)
    if args.command == "pack":
        info = pack(args.manifest, args.root or ROOTS, args.data_root, args.out, args.part_mib, args.weights,
                    args.wheels)
        for part in info["parts"]:
            print(f"{args.out / part['name']}: {part['bytes'] / 2**20:.1f} MiB")
        print(f"{info['films']} films, start model: {info['start']}, {info['wheels']} wheels; "
              f"{len(info['parts'])} calls: each carries {args.out / PAYLOAD} and one part")
    elif args.command == "unpack":
        print(f"model folder: {unpack(args.files_at, args.dest)}")
    elif args.command == "check":
        worst, compared = check(args.folder, args.root or ROOTS, args.split, args.n)
        ok = worst <= args.tolerance
        print(f"{compared} {args.split} films: largest probability difference TensorFlow vs the run {worst:.2e} "
              f"({'within' if ok else 'over'} {args.tolerance:g})"
              + ("" if ok else f"; rescore here: python -m training rescore {args.folder}"))
        return 0 if ok else 1
    elif args.command == "exclude-weights":
        print("out of git's index (files kept; do not commit now):", *exclude_weights())
    else:
        print("back in git's index:", *include_weights())
    return 0


if __name__ == "__main__":
    sys.exit(main())
