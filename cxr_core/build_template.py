"""Build ``chest_template.png``: the mean upright chest film at 32x32 for ``cxr_core.quality``.

    python -m cxr_core.build_template [--data ../shared/data] [--per-set 400]

Averages standardised 32x32 rank thumbnails (``quality.thumbnail``) of a fixed random sample of real chest films
(Kermany, COVID-19 Radiography, COVID-19 Image Dataset) and writes the mean as an 8-bit
grey PNG (about 1 KB). Correlation is unaffected by the 8-bit rescaling. The images used
are the even positions of each set's shuffled list; ``sample(..., odd=True)`` gives the
disjoint images used to calibrate and test the rules.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
from PIL import Image

from cxr_core.quality import TEMPLATE_FILE, thumbnail

SETS = ("kermany/train", "covid19_radiography", "covid19_image_dataset/train")
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def sample(data: Path, subset: str, n: int, odd: bool = False, seed: int = 0) -> list[Path]:
    """``n`` JPEGs of one data set, from the even (template) or odd (calibration) positions of a seeded shuffle."""
    files = sorted(p for p in (data / subset).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    random.Random(seed).shuffle(files)
    return files[int(odd)::2][:n]


def grey(path: Path) -> np.ndarray:
    """A JPEG/PNG file as float32 HxW in [0, 1]."""
    with Image.open(path) as im:
        return np.asarray(im.convert("L"), dtype=np.float32) / 255.0


def build(data: Path, per_set: int) -> np.ndarray:
    """The mean standardised thumbnail over ``per_set`` images of each set, float32 (32, 32)."""
    thumbs = [thumbnail(grey(p)) for s in SETS for p in sample(data, s, per_set)]
    return np.mean(thumbs, axis=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--per-set", type=int, default=400)
    args = parser.parse_args()
    mean = build(args.data, args.per_set)
    scaled = (mean - mean.min()) / (mean.max() - mean.min())
    Image.fromarray(np.rint(scaled * 255).astype(np.uint8)).save(TEMPLATE_FILE, optimize=True)
    print(f"wrote {TEMPLATE_FILE} ({TEMPLATE_FILE.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
