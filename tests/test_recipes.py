"""Data recipes under ``training/recipes`` on real films: what they add to a split, and what they keep out."""

from __future__ import annotations

import dataclasses
import io
import shutil
from pathlib import Path

import pandas as pd
from conftest import DATA
from PIL import Image

from training import data
from training.recipes import cxr3_more

COVID = DATA / "covid19_radiography"


def _films(folder: Path, n: int, offset: int = 0) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpeg", ".jpg"))[offset:offset + n]


def test_cxr3_more_adds_unlisted_films_as_train_but_no_copy_of_a_listed_film(tmp_path):
    """The shipped split stays row for row; of the films it does not name, a byte copy and a re-encoded near-copy
    of listed films (one of them a validation film) stay out, and the rest join train up to the cap per cell."""
    root = tmp_path / "covid19_radiography"
    for cls, folder in (("Covid", COVID / "COVID"), ("Normal", COVID / "Normal")):
        (root / cls).mkdir(parents=True)
        for path in _films(folder, 8):
            shutil.copyfile(path, root / cls / path.name)
    normals = sorted((root / "Normal").iterdir())
    listed = [p for cls in ("Covid", "Normal") for p in sorted((root / cls).iterdir())[:3]]
    # Unlisted: a byte copy of a listed train film, and a re-encoded (JPEG q90) copy of the listed val film.
    shutil.copyfile(listed[0], root / "Covid" / "zz-byte-copy.png")
    buffer = io.BytesIO()
    Image.open(normals[2]).convert("L").save(buffer, format="JPEG", quality=90)
    (root / "Normal" / "zz-near-copy.jpeg").write_bytes(buffer.getvalue())
    records = data.scan([root], cxr3_more.CLASS_MAP).records
    split_of = {p.relative_to(root).as_posix(): ("val" if p == normals[2] else "train") for p in listed}
    rows = [data._hashed(r) for r in records if r.rel in split_of]
    manifest = tmp_path / "split.csv"
    data.write_manifest([dataclasses.replace(r, split=split_of[r.rel]) for r in rows], manifest)

    out = tmp_path / "more.csv"
    counts = cxr3_more.build(out, cap=6, manifest=manifest, roots=[root], add=("covid19_radiography",),
                             cache_dir=str(tmp_path / "cache"))
    before = pd.read_csv(manifest, keep_default_na=False)
    after = pd.read_csv(out, keep_default_na=False)
    pd.testing.assert_frame_equal(after.iloc[:len(before)], before)  # every listed row as it was
    added = after.iloc[len(before):]
    assert set(added["split"]) == {"train"}
    assert "Covid/zz-byte-copy.png" not in set(added["path"]) and "Normal/zz-near-copy.jpeg" not in set(added["path"])
    # 5 unlisted films per class, cap 6 train films per cell, 3 (COVID-19) and 2 (NORMAL) listed as train already
    assert dict(counts) == {("covid19_radiography", "COVID-19"): 3, ("covid19_radiography", "NORMAL"): 4}
    assert added.groupby("class").size().to_dict() == {"COVID-19": 3, "NORMAL": 4}
    assert not set(added["path"]) & set(before["path"])
