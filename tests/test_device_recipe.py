"""The GPU-machine recipe end to end on this CPU: pack, stage part by part, train under JAX, unpack, check.

``training/recipes/device_run.sh`` runs here as it would there (``KERAS_BACKEND=jax``, a tiny model),
each "call" seeing only the part it carries, as a device call does.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import DATA

from cxr_core import models
from training.config import TrainConfig
from training.recipes import device
from training.train import run

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "training" / "recipes" / "device_run.sh"
KERMANY = DATA / "kermany" / "train"


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("device")
    films = root / "data" / "cxr"
    for cls in ("NORMAL", "PNEUMONIA"):
        (films / cls).mkdir(parents=True)
        for src in sorted((KERMANY / cls).iterdir())[:24]:
            (films / cls / src.name).symlink_to(src)
    start = root / "start"
    run(TrainConfig(data=[str(films)], out=str(start), architecture="tiny", input_size=32, batch_size=16, epochs=1,
                    cache_dir=str(root / "cache"), verbose=0), log=lambda _: None)
    return {"root": root, "films": films, "start": start}


def _call(setup: dict[str, Path], carried: list[Path], *args: str) -> subprocess.CompletedProcess:
    """One device call: a fresh .device folder holding payload.json and the parts this call carries."""
    root = setup["root"]
    call = root / f"call-{len(list(root.glob('call-*')))}"
    (call / "out").mkdir(parents=True)
    for path in [root / "packed" / device.PAYLOAD, *carried]:
        shutil.copy(path, call / path.name)
    env = {**os.environ, "CXR_DEVICE_DIR": str(call), "CXR_STAGE": str(root / "stage"), "OUT": str(call / "out"),
           "CXR_DATA_LINK": str(root / "linked" / "data"),
           "PYTHON": sys.executable, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    result.out = call / "out"  # type: ignore[attr-defined]
    return result


def test_pack_stage_train_under_jax_unpack_and_check(setup):
    root, films, start = setup["root"], setup["films"], setup["start"]
    info = device.pack(start / "split.csv", [films], root / "data", root / "packed", part_mib=0.2, start=start)
    parts = sorted((root / "packed").glob(f"{device.PART}*"))
    assert len(parts) == len(info["parts"]) >= 3  # the weights alone are larger than a part here
    assert all(p.stat().st_size <= 0.2 * 2**20 for p in parts)
    assert info["films"] == 48 and info["start"] is True
    with tarfile.open(fileobj=io.BytesIO(b"".join(p.read_bytes() for p in parts))) as tar:
        assert "start/split.csv" in tar.getnames()  # there, the run leaves out what the start trained on

    first = _call(setup, parts[:1], "stage")
    assert first.returncode == 0, first.stderr
    assert f"staged 1 of {len(parts)} parts" in first.stdout
    early = _call(setup, parts[-1:], "train", "@data/cxr")  # a part never sent: refused before any work
    assert early.returncode != 0 and "parts are missing" in early.stderr
    assert not list(early.out.iterdir())
    for part in parts[1:-1]:
        assert _call(setup, [part], "stage").returncode == 0

    trained = _call(setup, parts[-1:], "train", "@data/cxr", "--arch", "tiny", "--input-size", "32",
                    "--batch-size", "16", "--epochs", "1", "--weights", "@start", "--split-manifest", "@manifest",
                    "--verbose", "0")
    assert trained.returncode == 0, trained.stdout + trained.stderr
    log = (trained.out / "train.log").read_text()
    assert "copied" in log and "done: 1 epochs" in log
    returned = sorted(p.name for p in trained.out.iterdir())
    assert len(returned) <= 8 and all((trained.out / n).stat().st_size <= 16 * 2**20 for n in returned)

    folder = device.unpack(trained.out, root / "runs" / "from-device")
    card = models.load(folder).card  # hash-checked, loads under TensorFlow
    assert card.recipe["hardware"]["backend"] == "jax" and card.recipe["precision_policy"] == "float32"
    assert not (folder / ".ckpt").exists()
    # Trained from the carried model folder (outside the repository: start/ of the payload), on the films
    # linked where the data lies here, so the recipe names paths that exist here.
    assert card.recipe["weights"] == str(root / "stage" / "x" / "start")
    assert card.recipe["data"] == [str(root / "linked" / "data" / "cxr")]
    assert (root / "linked" / "data").resolve() == (root / "stage" / "x" / "data").resolve()
    val = sum(1 for r in csv.DictReader((folder / "predictions.csv").open()) if r["split"] == "val")
    assert val > 0
    worst, compared = device.check(folder, [films], "val", 64)
    assert worst < 1e-4 and compared == val  # TensorFlow here scores the JAX run's weights the same

    # The check is a real comparison: a predictions.csv that is off by 0.01 is reported as such.
    rows = list(csv.DictReader((folder / "predictions.csv").open()))
    name = f"p_{card.class_names[0]}"
    for r in rows:
        r[name] = str(float(r[name]) + 0.01)
    with (folder / "predictions.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert device.check(folder, [films], "val", 64)[0] == pytest.approx(0.01, abs=1e-4)


def test_pack_refuses_a_start_folder_without_its_split(setup, tmp_path):
    """Without the starting model's split.csv the run there could not leave out the films it trained on."""
    start = tmp_path / "start"
    shutil.copytree(setup["start"], start)
    (start / "split.csv").unlink()
    with pytest.raises(FileNotFoundError, match="split.csv"):
        device.pack(setup["start"] / "split.csv", [setup["films"]], setup["root"] / "data", tmp_path / "p", 0.2,
                    start=start)


def test_unpack_refuses_an_existing_folder_and_an_empty_result(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.log"):
        device.unpack(tmp_path, tmp_path / "x")
    (tmp_path / f"{device.RESULT}00").write_bytes(b"")
    (tmp_path / "x").mkdir()
    with pytest.raises(FileExistsError):
        device.unpack(tmp_path, tmp_path / "x")


def test_payload_json_lists_every_part_with_its_hash(setup, tmp_path):
    info = device.pack(setup["start"] / "split.csv", [setup["films"]], setup["root"] / "data", tmp_path,
                       part_mib=0.5)
    saved = json.loads((tmp_path / device.PAYLOAD).read_text())
    assert saved == info and info["start"] is False
    assert [p["name"] for p in info["parts"]] == sorted(p.name for p in tmp_path.glob(f"{device.PART}*"))
    joined = b"".join((tmp_path / p["name"]).read_bytes() for p in info["parts"])
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(joined)) as tar:
        names = tar.getnames()
    assert "manifest.csv" in names and sum(n.startswith("data/cxr/") for n in names) == 48
    first = next(n for n in names if n.startswith("data/cxr/NORMAL/"))
    with tarfile.open(fileobj=io.BytesIO(joined)) as tar:
        packed = tar.extractfile(first).read()
    assert packed == (setup["films"] / first.removeprefix("data/cxr/")).read_bytes()  # the film, not a link


def test_a_starting_model_inside_the_repository_keeps_its_path_there(tmp_path):
    """So that the card of a run made there names --weights as a run made here would."""
    assert device._repo_relative(REPO / "models" / "densenet169-cxr3") == "models/densenet169-cxr3"
    assert device._repo_relative(tmp_path) == ""
    assert device._repo_relative(None) == ""


def test_exclude_and_include_weights_round_trip_in_a_repository(tmp_path, monkeypatch):
    """The calls' tree leaves out the shipped weights, and afterwards git's index is as committed."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True, text=True).stdout

    git("init", "-q")
    weights = tmp_path / "models" / "m" / "model.weights.h5"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"w" * 100)
    (tmp_path / "models" / "m" / "model_card.json").write_text("{}")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    monkeypatch.chdir(tmp_path)
    assert device.exclude_weights() == ["models/m/model.weights.h5"]
    assert git("ls-files").split() == ["models/m/model_card.json"]
    # a staged deletion, and not untracked either (ignored): the tool's tree holds it only where carried
    assert git("status", "--porcelain", "--untracked-files=all") == "D  models/m/model.weights.h5\n"
    assert weights.read_bytes() == b"w" * 100  # the file itself stays
    assert device.include_weights() == ["models/m/model.weights.h5"]
    assert git("status", "--porcelain", "--untracked-files=all") == ""
    assert device.WEIGHTS_GLOB not in (tmp_path / ".git" / "info" / "exclude").read_text()
