"""The model card: the single description of a trained model.

A card is saved as ``model_card.json`` beside the weights. It holds everything needed to
serve the model (architecture, input size, class names, preprocessing, Grad-CAM target
layer, thresholds, temperature) and everything needed to judge it (data summary,
metrics, recipe, versions), plus the sha256 of the weights file, which ``load`` checks.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import re
import stat
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxr_core import limits
from cxr_core.errors import ModelCardError

CARD_FILE = "model_card.json"
WEIGHTS_FILE = "model.weights.h5"
RESEARCH_USE = (
    "Research and teaching use only. Not a medical device; never use it for diagnosis "
    "or to guide patient care."
)


CLASS_NAME = re.compile(r"[^\W_][\w .+()/-]{0,63}")  # letters, digits, spaces and - _ . + ( ) /


def class_name_problem(name: str) -> str:
    """Why ``name`` cannot be a class name ("" when it can). A class name is shown on every page, in captions,
    headings and labels that Streamlit reads as Markdown, and names CSV columns (``p_<CLASS>``): so it holds
    letters, digits, spaces and - _ . + ( ) / only (at most 64), starting with a letter or digit; ``*``, a
    backtick, ``$`` or brackets would turn into emphasis, code, maths or links there."""
    name = unicodedata.normalize("NFC", name)  # a folder made on macOS spells É as E + a combining accent
    if CLASS_NAME.fullmatch(name) and name == name.strip():
        return ""
    return ("a class name holds letters, digits, spaces and - _ . + ( ) / only (at most 64 characters), starting "
            "with a letter or digit; rename the class folder, or map it to such a name (--map FOLDER=NAME)")


# A temperature outside this range is no calibration (1e-310 overflowed every softmax to NaN, so every prediction
# failed as "the model or its inference engine is broken"); training.fit_temperature searches 0.05-20.
TEMPERATURE_RANGE = (1e-3, 1e3)


@dataclass
class ModelCard:
    """What a model is, how to feed it and how good it is.

    ``thresholds`` maps a *positive* class to the probability at or above which it is
    called; ``negative_class`` (e.g. NORMAL) is called when no positive class reaches its
    threshold. Without thresholds the decision is the top class.
    """

    name: str
    architecture: str
    input_size: int
    class_names: list[str]
    target_layer: str
    negative_class: str | None = None
    thresholds: dict[str, float] = field(default_factory=dict)
    temperature: float = 1.0
    low_confidence: float = 0.6
    preprocessing: dict[str, Any] = field(
        default_factory=lambda: {
            "grayscale": "float32 HxW in [0, 1], lungs dark, bone bright (cxr_core.imaging)",
            "resize": "cv2.INTER_AREA to input_size x input_size (aspect ratio not kept)",
            "quantize": "uint8 0..255",
            "channels": 3,
            "model_input": "float32 0..255; scaling and normalisation are inside the model",
        }
    )
    training_data: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)
    weights_file: str = WEIGHTS_FILE
    weights_sha256: str = ""
    created: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    version: str = "1"
    intended_use: str = RESEARCH_USE
    limitations: list[str] = field(default_factory=list)
    # The familiarity check (cxr_core.familiarity): file, sha256 (filled by save, checked by load), threshold...
    familiarity: dict[str, Any] = field(default_factory=dict)
    card_sha256: str = ""  # sha256 of every other field (see content_sha256), written by save()

    def __post_init__(self) -> None:
        """Every field a forger could set is checked here, so a card that loads is safe to serve."""
        for key in ("name", "architecture", "target_layer", "weights_file"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key).strip():
                raise ModelCardError(f"{key} must be a non-empty string, got {getattr(self, key)!r}")
        names = self.class_names
        if (not isinstance(names, list) or not 2 <= len(names) <= limits.MAX_CLASSES
                or not all(isinstance(n, str) and n.strip() for n in names) or len(set(names)) != len(names)):
            raise ModelCardError(f"class_names must be 2 to {limits.MAX_CLASSES} unique non-empty strings, "
                                 f"got {names!r}")
        odd = [n for n in names if class_name_problem(n)]
        if odd:
            raise ModelCardError(f"class name {odd[0]!r}: {class_name_problem(odd[0])}")
        size = self.input_size
        if isinstance(size, bool) or not isinstance(size, int):
            raise ModelCardError(f"input_size has the wrong type: a whole number of pixels expected, got {size!r}")
        if not limits.MIN_INPUT_SIZE <= size <= limits.MAX_INPUT_SIZE:
            raise ModelCardError(f"input_size must be at least {limits.MIN_INPUT_SIZE} pixels and at most "
                                 f"{limits.MAX_INPUT_SIZE}, got {size!r}")
        if not isinstance(self.thresholds, dict):
            raise ModelCardError(f"thresholds must map class names to probabilities, got {self.thresholds!r}")
        unknown = set(self.thresholds) - set(names)
        if self.negative_class is not None and self.negative_class not in names:
            unknown.add(self.negative_class)
        if unknown:
            raise ModelCardError(f"card names classes that are not in class_names: {sorted(map(str, unknown))}")
        for name, value in self.thresholds.items():
            if not _is_number(value) or not 0.0 <= value <= 1.0:
                raise ModelCardError(f"the threshold for {name} must be a probability in [0, 1], got {value!r}")
        if not _is_number(self.low_confidence) or not 0.0 <= self.low_confidence <= 1.0:
            raise ModelCardError(f"low_confidence must be a probability in [0, 1], got {self.low_confidence!r}")
        low, high = TEMPERATURE_RANGE
        if not _is_number(self.temperature) or not low <= self.temperature <= high:
            raise ModelCardError(f"temperature must be a number from {low:g} to {high:g} (training fits it within "
                                 f"0.05-20), got {self.temperature!r}")
        weights = self.weights_file
        if weights in (".", "..") or "/" in weights or "\\" in weights or "\0" in weights or ":" in weights:
            raise ModelCardError(f"weights_file must be a plain file name inside the model folder, got {weights!r}")
        # The descriptive fields every page, the sidebar and the report read: their types, so that a hand-edited
        # card is this clear error rather than a crash later (the sidebar reads cards without the hash check).
        for key in ("weights_sha256", "created", "version", "intended_use", "card_sha256"):
            if not isinstance(getattr(self, key), str):
                raise ModelCardError(f"{key} must be a string, got {type(getattr(self, key)).__name__}")
        for key in ("preprocessing", "training_data", "metrics", "recipe", "versions"):
            if not isinstance(getattr(self, key), dict):
                raise ModelCardError(f"{key} must be an object, got {type(getattr(self, key)).__name__}")
        if not isinstance(self.limitations, list) or not all(isinstance(x, str) for x in self.limitations):
            raise ModelCardError(f"limitations must be a list of sentences, got {self.limitations!r}"[:200])
        if not isinstance(self.familiarity, dict):
            raise ModelCardError(f"familiarity must be an object, got {type(self.familiarity).__name__}")
        if self.familiarity:
            name = self.familiarity.get("file")
            if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\\0:"):
                raise ModelCardError(f"familiarity.file must be a plain file name in the model folder, got {name!r}")
            threshold = self.familiarity.get("threshold")
            if not _is_number(threshold) or not threshold > 0:
                raise ModelCardError(f"familiarity.threshold must be a positive finite number, got {threshold!r}")
            percentile = self.familiarity.get("percentile", 99)
            if not _is_number(percentile) or not 0 < percentile <= 100:
                raise ModelCardError(f"familiarity.percentile must be a number in (0, 100], got {percentile!r}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        names = {f.name for f in dataclasses.fields(cls)}
        missing = {"name", "architecture", "input_size", "class_names", "target_layer"} - set(data)
        if missing:
            raise ModelCardError(f"model card lacks required fields: {sorted(missing)}")
        return cls(**{k: v for k, v in data.items() if k in names})


def _is_number(value: object) -> bool:
    """A finite int or float (JSON number), not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def content_sha256(data: dict[str, Any]) -> str:
    """Hex sha256 of a card's fields as JSON (sorted keys, compact), ``card_sha256`` itself left out."""
    fields = {k: v for k, v in data.items() if k != "card_sha256"}
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape a model's numbers (no TensorFlow import forced)."""
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for pkg in ("keras", "tensorflow", "jax", "torch", "numpy", "opencv-python-headless", "pillow", "pydicom"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    return versions


def save(card: ModelCard, folder: str | Path) -> Path:
    """Write ``card`` as ``folder/model_card.json``, filling in the weights hash, time, versions."""
    folder = Path(folder)
    weights = folder / card.weights_file
    if not weights.is_file():
        raise ModelCardError(f"cannot write a card for {folder}: weights file {card.weights_file} is missing")
    card.weights_sha256 = sha256_of(weights)
    if card.familiarity:
        fam = folder / str(card.familiarity.get("file", ""))
        if not card.familiarity.get("file") or not fam.is_file():
            raise ModelCardError(f"cannot write a card for {folder}: its familiarity file is missing")
        card.familiarity = {**card.familiarity, "sha256": sha256_of(fam)}
    card.created = card.created or _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    card.versions = card.versions or library_versions()
    # Hash what a reader will get back: the fields after a JSON round trip (tuples as lists, etc.).
    data = json.loads(json.dumps(card.to_dict()))
    card.card_sha256 = data["card_sha256"] = content_sha256(data)
    path = folder / CARD_FILE
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path


def read(folder: str | Path) -> ModelCard:
    """Read ``folder/model_card.json`` without checking any hash (cheap; for listings)."""
    return _read(folder)[1]


def _read(folder: str | Path) -> tuple[dict[str, Any], ModelCard]:
    """The card file's JSON object as written (what its content hash covers) and the card built from it."""
    path = Path(folder) / CARD_FILE
    if not path.is_file():
        raise ModelCardError(f"{folder} is not a model folder: it has no {CARD_FILE}.")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelCardError(f"{path} is not valid JSON ({exc}); restore it from the release.") from exc
    if not isinstance(data, dict):
        raise ModelCardError(f"{path} does not hold a JSON object; restore it from the release.")
    try:
        return data, ModelCard.from_dict(data)
    except TypeError as exc:
        raise ModelCardError(f"{path} has fields of the wrong type ({exc}).") from exc


def load(folder: str | Path) -> ModelCard:
    """Read the card, verify its own content hash and that the weights file matches its sha256.

    Raises ``ModelCardError`` when the card is missing, invalid or edited since it was written
    (class order, input size, thresholds...), the weights are missing, or the weights' hash
    differs from the card's (a tampered or mismatched file).
    """
    folder = Path(folder)
    data, card = _read(folder)
    if data.get("card_sha256") != content_sha256(data):
        what = "has no content hash" if not data.get("card_sha256") else "was changed after it was written"
        raise ModelCardError(
            f"model '{card.name}': its model card {what} (the card_sha256 field does not match the card's "
            "fields), so its classes, input size or thresholds cannot be trusted. Reinstall the model folder; "
            "a card edited on purpose must be written again with cxr_core.card.save."
        )
    weights = weights_path(folder, card)
    if sha256_of(weights) != card.weights_sha256:
        # Nothing about the file's content in the message: only the card's own value.
        raise ModelCardError(
            f"model '{card.name}': the weights file does not match its model card (expected sha256 "
            f"{card.weights_sha256[:12]}...). The file was changed or replaced; reinstall the model folder "
            "rather than using it."
        )
    if card.familiarity:
        fam = familiarity_path(folder, card)
        if sha256_of(fam) != card.familiarity.get("sha256"):
            raise ModelCardError(f"model '{card.name}': the familiarity file does not match its model card (it was "
                                 "changed or replaced). Reinstall the model folder rather than using it.")
    return card


def models_root() -> Path:
    """Folder holding one sub-folder per model: env CXR_MODELS_DIR, default ``models/`` in the repository."""
    return Path(os.environ.get("CXR_MODELS_DIR") or Path(__file__).resolve().parents[1] / "models")


def model_folders(root: str | Path) -> list[Path]:
    """The model folders (those holding a model card) directly under ``root``, sorted by name; [] if none."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / CARD_FILE).is_file())


def weights_path(folder: str | Path, card: ModelCard) -> Path:
    """The card's weights file: a regular file directly inside ``folder``, not a link to anything.

    The messages name only the card's own field, never what lies outside the folder.
    """
    path = Path(folder) / card.weights_file
    try:
        info = os.lstat(path)
    except OSError:
        info = None
    if info is None or not stat.S_ISREG(info.st_mode):
        what = "is missing" if info is None else "is a link or not a regular file"
        raise ModelCardError(f"model '{card.name}': its weights file {card.weights_file} {what}; the weights must "
                             "be a plain file inside the model folder. Reinstall the model folder.")
    return path


def familiarity_path(folder: str | Path, card: ModelCard) -> Path:
    """The card's familiarity file: a regular file directly inside ``folder`` (a plain name, no link)."""
    name = str(card.familiarity.get("file", ""))
    path = Path(folder) / name
    try:
        info = os.lstat(path) if name and Path(name).name == name and name not in (".", "..") else None
    except OSError:
        info = None
    if info is None or not stat.S_ISREG(info.st_mode):
        raise ModelCardError(f"model '{card.name}': its familiarity file {name!r} is missing from the model folder "
                             "or is not a plain file in it. Reinstall the model folder.")
    return path
