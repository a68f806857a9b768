"""training.hygiene: near-copies of films across sources and splits, on the real data and on made copies."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA
from PIL import Image

from cxr_core import imaging, preprocess
from training import data, hygiene

KERMANY = DATA / "kermany" / "train"
COVID_NORMAL = DATA / "covid19_radiography" / "Normal"


def _pixels(records: list[data.Record], size: int = 64) -> np.ndarray:
    return np.stack([preprocess.prepare(imaging.load(r.path, r.path.name).pixels, size) for r in records])


@pytest.fixture(scope="module")
def kermany_and_covid_normals() -> tuple[list[data.Record], np.ndarray]:
    found = data.scan([KERMANY, COVID_NORMAL.parent], {"Normal": "NORMAL", "PNEUMONIA": "PNEUMONIA", "COVID": ""})
    return found.records, _pixels(found.records)


def test_finds_the_kermany_films_inside_covid19_radiography(kermany_and_covid_normals):
    records, images = kermany_and_covid_normals
    assert {r.source for r in records} == {"kermany", "covid19_radiography"} and len(records) == 5216 + 4000
    kept, dropped = hygiene.collapse(records, images)
    by_key = {r.key: r for r in records}
    from_covid = [d for d in dropped if d.source == "covid19_radiography"]
    # The data's README: 523 of the 4000 covid19_radiography/Normal films are Kermany films.
    assert 515 <= len(from_covid) <= 530
    # The copy kept is the Kermany original (its name carries the patient), never the compilation's copy.
    assert all(by_key[d.duplicate_of].source != "covid19_radiography" for d in from_covid)
    assert all(by_key[d.duplicate_of].patient for d in from_covid)
    assert all(d.duplicate_kind == "near" for d in dropped)
    assert len(kept) + len(dropped) == len(records)
    # Each dropped copy really is the kept film: thumbnails correlate at >= 0.99 ...
    index = {r.key: i for i, r in enumerate(records)}
    vectors = hygiene.thumbnails(images)
    for d in from_covid[:50]:
        assert float(vectors[index[d.key]] @ vectors[index[d.duplicate_of]]) >= hygiene.THRESHOLD
    # ... while the covid19_radiography normals that stay are not copies of any Kermany film.
    covid_kept = [i for i in kept if records[i].source == "covid19_radiography"]
    kermany_idx = [i for i, r in enumerate(records) if r.source != "covid19_radiography"]
    best = (vectors[covid_kept] @ vectors[kermany_idx].T).max(axis=1)
    assert best.max() < hygiene.THRESHOLD
    assert len(covid_kept) + len(from_covid) == 4000


def _reencode(path: Path, size: int, quality: int) -> np.ndarray:
    """The film saved again as a redistributor would: other size, other JPEG quality."""
    img = Image.open(path).convert("L").resize((size, size), Image.BILINEAR)
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())), dtype=np.float32) / 255.0


def test_a_reencoded_copy_is_found_and_a_different_film_is_not(tmp_path):
    files = sorted((KERMANY / "NORMAL").iterdir())[:3]
    pixels = [preprocess.prepare(imaging.load(p, p.name).pixels, 64) for p in files]
    copy = preprocess.prepare(_reencode(files[0], 299, 70), 64)
    flat = np.full((64, 64), 128, np.uint8)
    images = np.stack([*pixels, copy, flat])
    records = [data.Record(p, p.name, "kermany", "NORMAL", patient=data.patient_id(p.name)) for p in files]
    records += [data.Record(tmp_path / "Normal-1.png", "Normal/Normal-1.png", "compilation", "NORMAL"),
                data.Record(tmp_path / "flat.png", "Normal/flat.png", "compilation", "NORMAL")]
    kept, dropped = hygiene.collapse(records, images)
    assert [d.key for d in dropped] == ["compilation/Normal/Normal-1.png"]
    assert dropped[0].duplicate_of == records[0].key
    assert kept == [0, 1, 2, 4]
    assert hygiene.summary(dropped, records) == {"compilation (copy of kermany)": 1}
    # Above the real pairs' correlation nothing is a copy; the threshold decides.
    assert hygiene.collapse(records, images, threshold=0.99999)[1] == []


def test_groups_join_chains_and_keep_the_training_side():
    pairs = np.array([[0, 1], [1, 2], [4, 5]])
    assert hygiene.groups(6, pairs) == [[0, 1, 2], [4, 5]]
    root = Path("/x")
    records = [data.Record(root / "a", "a", "s", "N", split="test"),
               data.Record(root / "b", "b", "s", "N", split="train"),
               data.Record(root / "c", "c", "s", "N", split="external")]
    base = np.random.default_rng(0).integers(0, 255, (32, 32)).astype(np.uint8)
    kept, dropped = hygiene.collapse(records, np.stack([base] * 3))
    assert kept == [1] and {d.rel for d in dropped} == {"a", "c"}
