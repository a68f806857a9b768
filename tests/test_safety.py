"""Path and model safety, end to end: the batch page keeps to its data root, tampered models are refused.

cxr_core.paths and cxr_core.card have their own unit tests; these drive the same refusals
through the pages (AppTest) and through ``models.load``, the way a user or an attacker meets them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

import ui
from cxr_core import card as card_lib
from cxr_core import models
from cxr_core.errors import ModelCardError

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 120


def _edit_card(rehash: bool = False, **changes: object) -> Callable[[Path], None]:
    """Edit card fields; ``rehash`` also rewrites its content hash, as a careful forger would."""

    def edit(folder: Path) -> None:
        path = folder / card_lib.CARD_FILE
        data = json.loads(path.read_text())
        data.update(changes)
        if rehash:
            data["card_sha256"] = card_lib.content_sha256(data)
        path.write_text(json.dumps(data))

    return edit


def _flip_weight_byte(folder: Path) -> None:
    path = folder / card_lib.WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _foreign_weights(other: Path) -> Callable[[Path], None]:
    def swap(folder: Path) -> None:
        shutil.copyfile(other / card_lib.WEIGHTS_FILE, folder / card_lib.WEIGHTS_FILE)

    return swap


# (tamper id, what a clear message must contain)
REFUSED = {
    "one weight byte flipped": "does not match its model card",
    "weights of another model": "does not match its model card",
    "weights hash edited in the card": "was changed after it was written",
    "weights hash edited, card re-hashed": "does not match its model card",
    "a class added to the card": "was changed after it was written",
    "a class added, card re-hashed": "do not fit the model",
    "architecture changed, card re-hashed": "do not fit the model",
    "card hash removed": "has no content hash",
    "card is not JSON": "not valid json",
    "weights deleted": "is missing",
}
# Edits the weights hash cannot see (the weights still fit, the card now lies about them): the
# card's own content hash catches them.
CARD_ONLY_EDITS = {
    "class names swapped": _edit_card(class_names=["PNEUMONIA", "NORMAL"]),
    "input size changed": _edit_card(input_size=96),
    "threshold changed": _edit_card(thresholds={"PNEUMONIA": 0.99}),
    "temperature changed": _edit_card(temperature=0.2),
}


def _tampers(other_model: Path) -> dict[str, Callable[[Path], None]]:
    def not_json(folder: Path) -> None:
        (folder / card_lib.CARD_FILE).write_text("{ this is not json")

    def delete_weights(folder: Path) -> None:
        (folder / card_lib.WEIGHTS_FILE).unlink()

    return {
        "one weight byte flipped": _flip_weight_byte,
        "weights of another model": _foreign_weights(other_model),
        "weights hash edited in the card": _edit_card(weights_sha256="0" * 64),
        "weights hash edited, card re-hashed": _edit_card(rehash=True, weights_sha256="0" * 64),
        "a class added to the card": _edit_card(class_names=["NORMAL", "PNEUMONIA", "COVID-19"]),
        "a class added, card re-hashed": _edit_card(rehash=True, class_names=["NORMAL", "PNEUMONIA", "COVID-19"]),
        "architecture changed, card re-hashed": _edit_card(rehash=True, architecture="densenet121",
                                                           target_layer="relu"),
        "card hash removed": _edit_card(card_sha256=""),
        "card is not JSON": not_json,
        "weights deleted": delete_weights,
    }


@pytest.fixture()
def models_root(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    root.mkdir()
    return root


def _copy(model_dir: Path, root: Path, name: str) -> Path:
    return Path(shutil.copytree(model_dir, root / name))


@pytest.mark.parametrize("tamper", list(REFUSED))
def test_tampered_model_is_refused_by_cxr_core(tamper, tiny_model_dir, tiny_model3_dir, models_root):
    folder = _copy(tiny_model_dir, models_root, "tampered")
    _tampers(tiny_model3_dir)[tamper](folder)
    with pytest.raises(ModelCardError) as err:
        models.load(folder)
    message = str(err.value)
    assert REFUSED[tamper] in message.lower()
    assert "reinstall" in message.lower() or "restore" in message.lower() or "missing" in message.lower()


def test_untampered_copy_loads(tiny_model_dir, models_root):
    """The control: the same copy, untouched, loads and predicts two probabilities summing to 1."""
    classifier = models.load(_copy(tiny_model_dir, models_root, "intact"))
    probs = classifier.probabilities(np.full((1, 64, 64, 3), 128, np.float32))
    assert probs.shape == (1, 2) and abs(probs.sum() - 1) < 1e-9


@pytest.mark.parametrize("tamper", list(CARD_ONLY_EDITS))
def test_weight_compatible_card_edit_is_refused(tamper, tiny_model_dir, models_root):
    folder = _copy(tiny_model_dir, models_root, "edited")
    models.load(folder)  # untouched, it loads
    CARD_ONLY_EDITS[tamper](folder)
    with pytest.raises(ModelCardError, match="was changed after it was written"):
        models.load(folder)


def _app(models_dir: Path, monkeypatch, data_root: Path | None = None):
    monkeypatch.setenv("CXR_MODELS_DIR", str(models_dir))
    if data_root is not None:
        monkeypatch.setenv("CXR_DATA_ROOT", str(data_root))
    return AppTest.from_file(str(REPO / "app.py"), default_timeout=TIMEOUT)


@pytest.mark.parametrize("tamper", ["one weight byte flipped", "weights hash edited in the card",
                                    "a class added to the card", "a class added, card re-hashed",
                                    "card is not JSON"])
def test_app_sidebar_refuses_tampered_model(tamper, tiny_model_dir, tiny_model3_dir, models_root, monkeypatch):
    folder = _copy(tiny_model_dir, models_root, f"tampered-{tamper.replace(' ', '-')}")
    _tampers(tiny_model3_dir)[tamper](folder)
    at = _app(models_root, monkeypatch).run()
    assert not at.exception, [e.value for e in at.exception]
    # Weights that pass every card check but do not fit the model fail in the background load (the page draws
    # without waiting for it); once it has failed, every rerun says why in the sidebar.
    for load in list(ui._LOADS):
        load.loaded.wait(timeout=TIMEOUT)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    errors = " ".join(e.value for e in at.sidebar.error).lower()
    assert REFUSED[tamper] in errors


@pytest.fixture()
def escape_tree(tmp_path: Path, data_dir: Path) -> tuple[Path, Path]:
    """root/eval/{NORMAL,PNEUMONIA} with two real images each, and two links out of the root:
    NORMAL/linked.jpeg -> an outside image, PNEUMONIA/linked_dir -> the outside folder."""
    kermany = data_dir / "kermany" / "train"
    root, outside = tmp_path / "root", tmp_path / "outside"
    for cls in ("NORMAL", "PNEUMONIA"):
        (root / "eval" / cls).mkdir(parents=True)
        for path in sorted((kermany / cls).glob("*.jpeg"))[:2]:
            shutil.copyfile(path, root / "eval" / cls / path.name)
    outside.mkdir()
    for path in sorted((kermany / "PNEUMONIA").glob("*.jpeg"))[2:4]:
        shutil.copyfile(path, outside / f"secret-{path.name}")
    (root / "eval" / "NORMAL" / "linked.jpeg").symlink_to(outside / sorted(os.listdir(outside))[0])
    (root / "eval" / "PNEUMONIA" / "linked_dir").symlink_to(outside, target_is_directory=True)
    return root, outside


def _record_reads(monkeypatch) -> list[Path]:
    """Every path cxr_core.imaging.load is asked to read, resolved."""
    from cxr_core import imaging

    reads: list[Path] = []
    original = imaging.load

    def load(source, filename=None, **kwargs):
        if not isinstance(source, bytes | bytearray | memoryview):
            reads.append(Path(source).resolve())
        return original(source, filename, **kwargs)

    monkeypatch.setattr(imaging, "load", load)
    return reads


def test_batch_page_never_reads_through_links_out_of_the_root(escape_tree, tiny_model_dir, models_root,
                                                              monkeypatch):
    root, outside = escape_tree
    _copy(tiny_model_dir, models_root, "tiny")
    reads = _record_reads(monkeypatch)
    at = _app_page("batch.py", models_root, root, monkeypatch)
    at.radio(key="batch_source").set_value("Folder on the server").run()
    at.text_input(key="batch_path").set_value("eval").run()
    at.button(key="batch_score_folder").click().run()
    assert not at.exception, [e.value for e in at.exception]
    files = [d.value for d in at.dataframe if "file" in d.value.columns][0]["file"].tolist()
    assert sorted(files) == sorted(p.relative_to(root / "eval").as_posix() for p in (root / "eval").rglob("*.jpeg")
                                   if not p.is_symlink())
    assert len(reads) == 4 and all(root.resolve() in p.parents for p in reads), reads


@pytest.mark.parametrize("path", ["~", "//etc", "eval/./../..", "eval/NORMAL/../../../outside", "eval\x00"])
def test_batch_page_refuses_odd_path_forms(path, escape_tree, tiny_model_dir, models_root, monkeypatch):
    """Forms a user might paste: home, doubled slash, dot segments, a NUL byte: each refused, none read."""
    root, _ = escape_tree
    _copy(tiny_model_dir, models_root, "tiny")
    reads = _record_reads(monkeypatch)
    at = _app_page("batch.py", models_root, root, monkeypatch)
    at.radio(key="batch_source").set_value("Folder on the server").run()
    at.text_input(key="batch_path").set_value(path).run()
    at.button(key="batch_score_folder").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert len(at.error) == 1 and "Only folders inside the configured data root" in at.error[0].value, path
    assert not reads and not [d for d in at.dataframe if "file" in d.value.columns]


def _app_page(page: str, models_dir: Path, data_root: Path, monkeypatch) -> AppTest:
    monkeypatch.setenv("CXR_MODELS_DIR", str(models_dir))
    monkeypatch.setenv("CXR_DATA_ROOT", str(data_root))
    return AppTest.from_file(str(REPO / "pages" / page), default_timeout=TIMEOUT).run()


@pytest.mark.parametrize("path", ["..", "/etc", "eval/../../outside"])
def test_metrics_page_evaluation_refuses_paths_out_of_the_root(path, escape_tree, tiny_model_dir, models_root,
                                                               monkeypatch):
    root, _ = escape_tree
    _copy(tiny_model_dir, models_root, "tiny")
    at = _app_page("metrics.py", models_root, root, monkeypatch)
    at.text_input(key="eval_path").set_value(path).run()
    at.button(key="eval_run").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("outside the data root" in e.value for e in at.error), [e.value for e in at.error]


def test_metrics_page_evaluation_refuses_a_folder_with_links_out_of_the_root(escape_tree, tiny_model_dir,
                                                                           models_root, monkeypatch):
    """training.evaluate lists with rglob (which follows file links), so the page must refuse such a folder."""
    root, _ = escape_tree
    _copy(tiny_model_dir, models_root, "tiny")
    reads = _record_reads(monkeypatch)
    at = _app_page("metrics.py", models_root, root, monkeypatch)
    at.text_input(key="eval_path").set_value("eval").run()
    at.button(key="eval_run").click().run()
    assert not at.exception, [e.value for e in at.exception]
    errors = [re.sub(r"\\(.)", r"\1", e.value) for e in at.error]  # as shown: names are escaped for Markdown
    assert any("symlinks that lead outside the data root" in e and "linked.jpeg" in e and "linked_dir" in e
               for e in errors), errors
    assert not reads
    # The control: without the links the same folder is evaluated, all four images read from inside.
    (root / "eval" / "NORMAL" / "linked.jpeg").unlink()
    (root / "eval" / "PNEUMONIA" / "linked_dir").unlink()
    at.button(key="eval_run").click().run()
    assert [re.sub(r"\\(.)", r"\1", s.value) for s in at.success] == [
        f"Evaluated 4 images under {(root / 'eval').resolve()}."]
    assert len(reads) == 4 and all(root.resolve() in p.parents for p in reads)
