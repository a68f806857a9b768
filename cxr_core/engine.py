"""Inference engines for a loaded Keras classifier: one forward pass gives logits and a feature map.

    choice = engine.choose()                  # Choice("openvino", "f32", note) where OpenVINO is installed
    runner = engine.create(model, "relu", choice.engine, choice.precision, cache_key=models.cache_key(card))
    logits, features = runner(batch)          # float32 (N, C) and (N, h, w, K)

Engines:

- ``tensorflow``: Keras' own compiled ``predict_on_batch`` on a two-output view of the model (whichever
  Keras backend is loaded; TensorFlow when serving).
- ``openvino``: the Keras model converted once at load time and compiled for the CPU. Converted means
  written layer by layer as an OpenVINO graph (``cxr_core.ov_graph``, under a second), or, for a layer
  that module does not know, ``ov.convert_model`` (which traces the model through TensorFlow: 13-19 s
  for DenseNet169 on two cores). The converted model is kept in a user cache folder keyed by the
  verified weights' sha256 and the card fields that build the model (env ``CXR_ENGINE_CACHE``: a folder,
  or ``off``; default ``$XDG_CACHE_HOME/cxr/openvino``), never in the model folder, so a restart skips
  the conversion (an entry is written only once its model compiled with the outputs the runner needs, and
  served only while its files' sha256, kept beside them, still match). Beside it go the feature layer's
  name and shape and the Dense head's weights, so that
  ``cached`` can serve the forward pass and CAM from the cache alone: no Keras model built, not even
  Keras imported (``cxr_core.models.load`` builds the Keras model only when an explanation needs
  gradients).

Which engine: the argument, else env ``CXR_ENGINE``, else ``openvino`` where it imports and Keras runs on
TensorFlow, else ``tensorflow``. Which precision: the argument, else env ``CXR_PRECISION``, else
(``default_precision``) ``auto`` for a model whose card records that bf16 agrees with TensorFlow within
``BF16_BOUNDS`` on its test split (``python -m benchmarks.engine_agreement --record``, for these very weights,
temperature and thresholds, on a CPU of this one's bf16 kind: AMX or AVX-512 BF16), else ``f32``. ``bf16`` (or
``auto``: bf16 where supported) is honoured on OpenVINO only where the CPU lists BF16 in
``OPTIMIZATION_CAPABILITIES``; otherwise f32 and ``Choice.note`` says why. A model without that record is served
at f32, the only precision that reproduces TensorFlow's probabilities and Grad-CAM to 1e-5 (OpenVINO's own
default on a BF16-capable CPU is bf16, so the precision is always asked for explicitly)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cxr_core.card import sha256_of

if TYPE_CHECKING:  # imported where used: the cached OpenVINO path runs without Keras (and TensorFlow)
    import keras

ENGINES = ("tensorflow", "openvino")
PRECISIONS = ("f32", "bf16")
_CONVERTER_VERSION = 3  # bump when the conversion changes, so cached models are converted afresh


def keras_backend() -> str:
    """Keras' backend name, without importing Keras when it is not loaded yet (env, then keras.json)."""
    if "keras" in sys.modules:
        return sys.modules["keras"].backend.backend()
    name = os.environ.get("KERAS_BACKEND", "").strip()
    if name:
        return name
    config = Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras") / "keras.json"
    try:
        return str(json.loads(config.read_text()).get("backend", "tensorflow"))
    except (OSError, ValueError, AttributeError):
        return "tensorflow"


@dataclass(frozen=True)
class Choice:
    """The engine and precision to run, and why they differ from what was asked (empty if they do not)."""

    engine: str
    precision: str
    note: str = ""


def openvino_available() -> bool:
    """True when OpenVINO imports and Keras runs on TensorFlow (what ``ov.convert_model`` converts)."""
    if keras_backend() != "tensorflow":
        return False
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def bf16_supported() -> bool:
    """Whether OpenVINO's CPU plugin reports BF16 among the CPU's OPTIMIZATION_CAPABILITIES."""
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


# Where bf16 may be a model's default (issue 14): decisions (and familiarity flags) equal to TensorFlow's on at
# least this share of the test split, and the macro AUC within this much of float32's.
BF16_BOUNDS = {"decisions_equal": 0.995, "auc_delta": 0.002}


def bf16_within_bounds(decisions_equal: float, auc_delta: float, flags_equal: float | None) -> bool:
    """Whether measured bf16 agreement meets ``BF16_BOUNDS``: decisions and familiarity flags (served too; none
    measured counts as a miss) equal to TensorFlow's on enough of the test split, AUC within the bound of f32's."""
    least = BF16_BOUNDS["decisions_equal"]
    return decisions_equal >= least and abs(auc_delta) <= BF16_BOUNDS["auc_delta"] and (flags_equal or 0) >= least


def agreement_fingerprint(card) -> str:
    """What a recorded engine agreement holds for: the weights, the model's input, the decision rule (temperature,
    thresholds, negative class, classes) and the familiarity check (a rescored card decides otherwise, so its record
    no longer counts)."""
    text = json.dumps({"weights": card.weights_sha256, "temperature": card.temperature,
                       "thresholds": card.thresholds, "classes": list(card.class_names),
                       "negative": card.negative_class, "input_size": card.input_size,
                       "preprocessing": card.preprocessing, "familiarity": card.familiarity}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's instruction-set flags as Linux lists them (``/proc/cpuinfo``); empty where that cannot be read."""
    try:
        with open("/proc/cpuinfo") as fh:
            return next((frozenset(line.split(":", 1)[1].split()) for line in fh if line.startswith("flags")),
                        frozenset())
    except OSError:
        return frozenset()


# Which arithmetic OpenVINO's bf16 kernels use, by the CPU flag that offers it: AMX tiles (Xeon since Sapphire
# Rapids) or AVX-512 dot products (AMD Zen 4+, Cooper Lake). They sum in another order and may leave other
# operations in bf16, so a bf16 agreement measured with one says nothing for the other: a record counts only
# on the kind of CPU it was measured on. The card keeps one record per kind under these keys.
BF16_KINDS = {"amx_bf16": "bf16_amx", "avx512_bf16": "bf16"}
_KIND_NAMES = {"amx_bf16": "AMX", "avx512_bf16": "AVX-512 BF16 (no AMX)"}


def bf16_kind(flags) -> str | None:
    """``amx_bf16``, ``avx512_bf16`` (the first of them in ``flags``) or None: neither listed or flags unknown."""
    # a card's record is data from a file: a number or text where a list of flags belongs states no kind
    flags = {f for f in flags if isinstance(f, str)} if isinstance(flags, list | tuple | set | frozenset) else set()
    return next((kind for kind in BF16_KINDS if kind in flags), None)


def bf16_record(card, kind: str | None) -> dict | None:
    """The card's bf16 agreement record for CPUs of ``kind`` (``bf16_kind``), or None. A record counts only if the
    flags it was measured with are of that kind too (one written before records were kept per kind sits under
    ``bf16`` whatever CPU measured it)."""
    records = (card.metrics or {}).get("engine_agreement")
    record = records.get(BF16_KINDS[kind]) if isinstance(records, dict) and kind in BF16_KINDS else None
    if not isinstance(record, dict):
        return None
    measured = record.get("cpu", {}).get("flags") if isinstance(record.get("cpu"), dict) else None
    return record if bf16_kind(measured) == kind else None


def _record_holds(card, record: dict | None) -> bool:
    """Whether ``record`` is for the card's current weights and decision rule and its figures meet today's bounds
    (not the verdict stored with them: bounds may have tightened since)."""
    if not (isinstance(record, dict) and record.get("fingerprint") == agreement_fingerprint(card)):
        return False
    try:
        return record.get("passes") is True and bf16_within_bounds(
            float(record["decisions_equal"]), float(record["auc_delta"]), record.get("familiarity_flags_equal"))
    except (KeyError, TypeError, ValueError, OverflowError):  # 10**400 in a JSON file is an int float() refuses
        return False


def bf16_verified(card, flags=None) -> bool:
    """Whether the card records bf16 agreement within ``BF16_BOUNDS`` for its current weights and decision rule,
    measured on a CPU of this one's bf16 kind (``flags``: this CPU's, ``cpu_flags()``, unless given); written by
    ``python -m benchmarks.engine_agreement --record`` into ``metrics.engine_agreement``."""
    return _record_holds(card, bf16_record(card, bf16_kind(cpu_flags() if flags is None else flags)))


def bf16_elsewhere_note(card, flags=None) -> str:
    """Why a model whose bf16 agreement holds on another kind of CPU is served at f32 here ('' otherwise)."""
    flags = cpu_flags() if flags is None else flags
    here = bf16_kind(flags)
    if _record_holds(card, bf16_record(card, here)):
        return ""
    measured = [_KIND_NAMES[kind] for kind in BF16_KINDS
                if kind != here and _record_holds(card, bf16_record(card, kind))]
    if not measured:
        return ""
    if here is None and not flags:
        return (f"f32: this model's bf16 agreement with TensorFlow was measured on {' and '.join(measured)} CPUs, "
                "and this CPU's instruction sets cannot be read here (/proc/cpuinfo: Linux only) to match them")
    return (f"f32: this model's bf16 agreement with TensorFlow was measured on {' and '.join(measured)} CPUs, "
            f"not on this kind ({_KIND_NAMES.get(here, 'no BF16 instructions listed')}); "
            "python -m benchmarks.engine_agreement --record measures it here")


def default_precision(precision: str | None, card=None) -> str:
    """The precision to ask ``choose`` for: the argument, else env ``CXR_PRECISION``, else ``auto`` (bf16 where the
    CPU has it) for a model whose bf16 agreement is on record (``bf16_verified``), else ``f32``. An explicit
    ``auto`` means the same default, checked the same way: only ``bf16`` forces bf16 on a model without a record."""
    given = (precision or os.environ.get("CXR_PRECISION") or "").strip()
    if given and given.lower() != "auto":
        return given
    return "auto" if card is not None and bf16_verified(card) else "f32"


def choose(engine: str | None = None, precision: str | None = None) -> Choice:
    """Resolve engine (``tensorflow``, ``openvino``, ``auto``) and precision (``f32``, ``bf16``, ``auto``).

    None reads env ``CXR_ENGINE`` / ``CXR_PRECISION``, then falls back to ``auto`` / ``f32``.
    Raises ValueError for an unknown name or for ``openvino`` where it cannot run.
    """
    engine = (engine or os.environ.get("CXR_ENGINE") or "auto").strip().lower()
    precision = (precision or os.environ.get("CXR_PRECISION") or "f32").strip().lower()
    if engine not in (*ENGINES, "auto"):
        raise ValueError(f"unknown engine {engine!r}; choose one of {ENGINES} or 'auto' (env CXR_ENGINE)")
    if precision not in (*PRECISIONS, "auto"):
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS} or 'auto' (env CXR_PRECISION)")
    if engine == "auto":
        engine = "openvino" if openvino_available() else "tensorflow"
    elif engine == "openvino" and not openvino_available():
        raise ValueError("the openvino engine needs the openvino package and the TensorFlow Keras backend "
                         f"(backend here: {keras_backend()}); install openvino or choose 'tensorflow'")
    if precision == "f32":
        return Choice(engine, "f32")
    if engine == "tensorflow":
        return Choice(engine, "f32", "" if precision == "auto" else "bf16 runs on OpenVINO only; using f32")
    if bf16_supported():
        return Choice(engine, "bf16")
    return Choice(engine, "f32", "" if precision == "auto" else "this CPU has no BF16 support; using f32")


def _two_outputs(model: keras.Model, feature_layer: str | None) -> keras.Model:
    """A view of ``model`` returning [logits] or [logits, the feature map of ``feature_layer``] (shared weights)."""
    import keras

    outputs = [model.output] + ([model.get_layer(feature_layer).output] if feature_layer else [])
    return keras.Model(model.inputs, outputs, name=f"{model.name}_forward")


class TensorFlowRunner:
    """Keras' compiled forward pass: float32 (N, S, S, 3) in [0, 255] -> (logits, features or None)."""

    name = "tensorflow"
    precision = "f32"

    def __init__(self, model: keras.Model, feature_layer: str | None, note: str = ""):
        import keras

        self._model = _two_outputs(model, feature_layer)
        self._features = feature_layer is not None
        self.note = note
        self.source = "keras"
        version = keras.backend.backend()
        if version == "tensorflow":
            import tensorflow as tf

            self.label = f"TensorFlow {tf.__version__} · f32"
        else:
            self.label = f"Keras {keras.__version__} ({version}) · f32"

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        out = self._model.predict_on_batch(batch)
        if not self._features:
            return np.asarray(out[0] if isinstance(out, list | tuple) else out), None
        return np.asarray(out[0]), np.asarray(out[1], dtype=np.float32)


CACHE_OFF = ("off", "0", "false", "no", "none")  # CXR_ENGINE_CACHE values that turn the cache off


def cache_dir() -> Path | None:
    """Folder for converted OpenVINO models (env CXR_ENGINE_CACHE, ``~`` expanded; 'off', '0', 'false', 'no' or
    'none' disable it), or None."""
    value = os.environ.get("CXR_ENGINE_CACHE", "").strip()
    if value.lower() in CACHE_OFF:
        return None
    if value:
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cxr" / "openvino"


@dataclass(frozen=True)
class CachedModel:
    """What the cache keeps beside the converted model: enough to serve without the Keras model."""

    feature_layer: str | None
    feature_shape: tuple[int, ...] | None  # (h, w, K)
    head: np.ndarray | None  # the Dense kernel (K, C) of a GAP + Dense head (cxr_core.models.head_weights)


def _cache_path(cache_key: str | None) -> tuple[Path | None, str]:
    """``<cache>/<hash>.xml`` for a key (``.bin`` and ``.npz`` beside it), and why the cache folder is not used
    (``cache_problem``); (None, "") with no key or the cache off."""
    folder = cache_dir() if cache_key else None
    problem = cache_problem(folder) if folder is not None else ""
    if folder is None or problem:
        return None, problem
    import openvino as ov

    key = json.dumps([cache_key, ov.__version__, _CONVERTER_VERSION])
    return folder / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.xml", ""


def cache_problem(folder: Path) -> str:
    """Make the cache folder (mode 0700) when it is missing; why the cache is not used there ("" when it is): it
    cannot be made, another user owns it, or others may write in it (an entry there could be anyone's graph,
    served under this model's name: the sha256 in an entry's side file only shows that its files were not damaged
    since they were written)."""
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        info = folder.stat()
    except OSError as exc:
        return f"the folder {folder} cannot be made or read ({exc.strerror or type(exc).__name__})"
    if info.st_uid != os.getuid():
        return f"the folder {folder} belongs to another user"
    if info.st_mode & 0o022:
        return (f"others may write in the folder {folder} (mode {info.st_mode & 0o777:o}): "
                f"chmod 700 {folder}, or choose another with CXR_ENGINE_CACHE")
    return ""


def _write_entry(ov, ov_model, side: CachedModel, path: Path) -> str:
    """The cache entry at ``path``: the graph, its weights and the side file with their sha256. Written in a
    temporary folder and moved in file by file, the ``.xml`` last (an entry counts only when all three are
    there, and only with matching hashes). A cache that cannot be written only costs the next start a
    conversion; why it could not be is returned ("" when it was written)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            tmp_xml = Path(tmp) / path.name
            ov.save_model(ov_model, tmp_xml, compress_to_fp16=False)  # keep f32 weights
            head = side.head if side.head is not None else np.zeros((0, 0), np.float32)
            np.savez(tmp_xml.with_suffix(".npz"), feature_layer=np.str_(side.feature_layer or ""),
                     feature_shape=np.asarray(side.feature_shape or (), np.int64), head=head,
                     xml_sha256=np.str_(sha256_of(tmp_xml)), bin_sha256=np.str_(sha256_of(tmp_xml.with_suffix(".bin"))))
            for suffix in (".npz", ".bin", ".xml"):
                os.replace(tmp_xml.with_suffix(suffix), path.with_suffix(suffix))
    except (OSError, RuntimeError) as exc:  # OpenVINO reports a failed write (a full disk) as RuntimeError
        return f"the converted model could not be written to {path.parent} ({type(exc).__name__})"
    _prune(path.parent, cache_keep())
    return ""


def _remove_entry(path: Path) -> None:
    for suffix in (".xml", ".bin", ".npz"):
        path.with_suffix(suffix).unlink(missing_ok=True)


CACHE_KEEP = 6  # converted models kept (the most recently used); env CXR_ENGINE_CACHE_KEEP
_STALE_S = 3600.0  # a half-written entry or a temporary folder this old belongs to no running conversion


def cache_keep() -> int:
    """How many converted models the cache keeps (env CXR_ENGINE_CACHE_KEEP, at least 1; default CACHE_KEEP)."""
    try:
        return max(1, int(os.environ.get("CXR_ENGINE_CACHE_KEEP", CACHE_KEEP)))
    except ValueError:
        return CACHE_KEEP


def _prune(folder: Path, keep: int, now: float | None = None) -> list[Path]:
    """Remove all but the ``keep`` most recently used entries (an entry's ``.xml`` time is its last use:
    ``_read_entry`` touches it), the parts of entries whose ``.xml`` never arrived (a conversion killed
    mid-write) and leftover temporary folders, so that the cache holds a bounded set of models (a DenseNet169
    entry is ~50 MB: each new weights version would otherwise add one for good). Parts younger than an
    hour are left alone: another process may be writing them. Returns the removed entries' ``.xml`` paths."""
    now = time.time() if now is None else now
    try:
        entries = sorted(folder.glob("*.xml"), key=lambda p: p.stat().st_mtime, reverse=True)
        removed = entries[keep:]
        for path in removed:
            _remove_entry(path)
        for part in [*folder.glob("*.bin"), *folder.glob("*.npz"), *folder.glob("tmp*")]:
            if not part.with_suffix(".xml").is_file() and now - part.stat().st_mtime > _STALE_S:
                shutil.rmtree(part) if part.is_dir() else part.unlink()
    except OSError:  # another process pruned first, or the folder is read-only: the next write tries again
        return []
    return removed


def _read_entry(core, path: Path | None) -> tuple[object, CachedModel] | None:
    """The cache entry at ``path`` (ov.Model, its side file), or None when it is missing or damaged.

    The side file holds the sha256 of the graph and its weights as written: a ``.bin`` changed since (a
    flipped bit, a crash between the write and the disk, another user's file in a shared cache folder) is
    a damaged entry, not weights to serve under the model card's verified hash (0.1 s for DenseNet169).
    """
    if path is None or not all(path.with_suffix(s).is_file() for s in (".xml", ".bin", ".npz")):
        return None
    try:
        side, digests = _read_side(path)
        if digests != (sha256_of(path), sha256_of(path.with_suffix(".bin"))):
            return None
        entry = core.read_model(path), side
    except Exception:  # noqa: BLE001 - a damaged entry (a bad zip, a truncated graph...): the next conversion overwrites it
        return None
    with contextlib.suppress(OSError):  # its last use, which pruning keeps by (a read-only cache is not pruned)
        os.utime(path)
    return entry


def _read_side(path: Path) -> tuple[CachedModel, tuple[str, str]]:
    """The side file: what it keeps for serving, and the sha256 of the ``.xml`` and ``.bin`` it was written with."""
    with np.load(path.with_suffix(".npz"), allow_pickle=False) as side:
        layer = str(side["feature_layer"]) or None
        shape = tuple(int(v) for v in side["feature_shape"]) or None
        head = np.asarray(side["head"], dtype=np.float32)
        digests = (str(side["xml_sha256"]), str(side["bin_sha256"]))  # KeyError: an entry written before them
    if shape is not None and len(shape) != 3 or head.ndim != 2 or (layer is None) != (shape is None):
        raise ValueError("damaged cache entry")
    return CachedModel(layer, shape, head if head.size else None), digests


class OpenVINORunner:
    """The model converted by ``ov.convert_model`` and compiled for the CPU at ``precision`` (f32 or bf16).

    Built from a Keras model (converted, or read from the cache when ``cache_key`` has an entry) or by
    ``cached`` from the cache alone. ``side`` says the feature layer, its shape and the Dense head.
    """

    name = "openvino"

    def __init__(self, model: keras.Model | None, feature_layer: str | None, precision: str = "f32",
                 cache_key: str | None = None, note: str = "", head: np.ndarray | None = None, *,
                 _cached: tuple[object, CachedModel] | None = None):
        import openvino as ov

        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
        self.note = note
        core = ov.Core()
        path, unused = _cache_path(cache_key)
        if _cached is not None:
            ov_model, self.side = _cached
            self.source = "cache"
        else:
            if model is None:
                raise ValueError("a Keras model is needed to convert")
            shape = tuple(model.get_layer(feature_layer).output.shape[1:]) if feature_layer else None
            self.side = CachedModel(feature_layer, shape, head)
            ov_model, self.source = self._convert(ov, core, model, self.side, path)
        try:
            compiled = self._compile(core, ov_model, precision, model)
        except Exception:
            if path is not None and self.source == "cache":
                _remove_entry(path)  # an entry that cannot be served is not found again on the next start
            raise
        if self.source != "converted":
            unused = ""  # served from the cache: it is used
        elif path is not None:
            unused = _write_entry(ov, ov_model, self.side, path)  # only a model that compiled and was right
        if unused:  # said where the engine is named (the sidebar, python -m cxr_core.prepare): each start converts
            self.note = "; ".join(x for x in (note, f"engine cache not used: {unused}") if x)
        self.cache_unused = unused
        self.precision = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()  # what it runs at
        self._request = compiled.create_infer_request()
        self._core, self._ov_model, self._requests = core, ov_model, None
        self.label = f"OpenVINO {ov.__version__.split('-')[0]} · {self.precision}"

    def _compile(self, core, ov_model, precision: str, model: keras.Model | None):
        """``ov_model`` at batch 1, compiled for the CPU; finds the logits and feature outputs and checks their
        shapes against the Keras model (when there is one) and the side file. Raises ValueError otherwise."""
        # Every request holds one film (batches run film by film, ``_many``), so the shape is fixed at
        # batch 1: a static shape compiles to kernels about 7 % faster than the dynamic batch axis.
        ov_model.reshape([1, *(d.get_length() for d in list(ov_model.input(0).get_partial_shape())[1:])])
        # LATENCY: one request uses every core for one film (the Classify page; the Classifier runs one
        # call at a time). Batches go to a THROUGHPUT compilation made on first use (``_many``).
        compiled = core.compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": precision,
                                                        "PERFORMANCE_HINT": "LATENCY"})
        # The converter may order the outputs differently from Keras: logits are the rank-2 one.
        shapes = [tuple(out.get_partial_shape().to_shape()) for out in compiled.outputs]
        ranks = [len(shape) for shape in shapes]
        wanted = [2] + ([4] if self.side.feature_layer is not None else [])
        if sorted(ranks) != sorted(wanted):
            raise ValueError(f"the converted model's outputs have shapes {shapes}: expected (1, classes) logits"
                             + (" and a (1, h, w, K) feature map" if len(wanted) == 2 else ""))
        self._logits = ranks.index(2)
        self.classes = shapes[self._logits][1]  # logits per film
        self._features = ranks.index(4) if self.side.feature_layer is not None else None
        if model is not None and self.classes != model.output.shape[-1]:
            raise ValueError(f"the converted model gives {self.classes} logits, the model "
                             f"{model.output.shape[-1]}")
        if self._features is not None and shapes[self._features][1:] != tuple(self.side.feature_shape):
            raise ValueError(f"the converted model's feature map is {shapes[self._features][1:]}, expected "
                             f"{tuple(self.side.feature_shape)}")
        return compiled

    @classmethod
    def cached(cls, cache_key: str, precision: str = "f32", note: str = "") -> OpenVINORunner | None:
        """The runner from the cache entry of ``cache_key`` alone, or None when there is none (or it is damaged)."""
        import openvino as ov

        entry = _read_entry(ov.Core(), _cache_path(cache_key)[0])
        if entry is None:
            return None  # the full load converts (again) and writes the entry
        return cls(None, entry[1].feature_layer, precision, cache_key, note=note, _cached=entry)

    @staticmethod
    def _convert(ov, core, model: keras.Model, side: CachedModel, path: Path | None) -> tuple[object, str]:
        """(ov.Model, "cache" or "converted"): read from the cache entry at ``path``, else convert (the
        caller writes the entry once the model has compiled)."""
        entry = _read_entry(core, path)
        if entry is not None:
            return entry[0], "cache"
        from cxr_core import ov_graph

        try:
            return ov_graph.write(model, side.feature_layer), "converted"  # the weights are copied: no aliasing
        except ov_graph.Unsupported:
            size = tuple(model.input_shape[1:])
            # share_weights=False: the compiled model must not alias Keras' variables, which explanations use.
            return ov.convert_model(_two_outputs(model, side.feature_layer), input=[(-1, *size)],
                                    share_weights=False), "converted"

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if len(batch) > 1:
            return self._many(batch)
        result = self._request.infer([batch])
        features = None if self._features is None else np.asarray(result[self._features], dtype=np.float32)
        return np.asarray(result[self._logits]), features

    def _many(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """A batch film by film on OpenVINO's throughput streams (one per core pair or so, each film on one).

        On two cores two streams of one film each run DenseNet169 about 15-20 % faster than one request
        on the whole batch with both cores (``python -m benchmarks``): each stream keeps its own data in
        its core's cache. The numbers are the same graph's, film by film, in input order.

        No Python callback: OpenVINO's own threads never enter Python (an ``AsyncInferQueue`` callback runs
        there under a thread state of its own). This thread waits for the requests in the order it started
        them, takes each one's outputs and hands it the next film.
        """
        if self._requests is None:
            compiled = self._core.compile_model(self._ov_model, "CPU", {
                "INFERENCE_PRECISION_HINT": self.precision, "PERFORMANCE_HINT": "THROUGHPUT"})
            # Two requests per stream: a stream starts its next film as soon as one ends, instead of idling while
            # Python takes the finished film's outputs and hands it another (2 cores: 19.0 vs 15.5 films/s).
            count = 2 * int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
            self._requests = [compiled.create_infer_request() for _ in range(count)]
        requests = self._requests
        logits: list[np.ndarray] = []
        features: list[np.ndarray] = []
        started = 0
        try:
            while started < min(len(requests), len(batch)):
                requests[started].start_async([batch[started:started + 1]])  # the input is copied in
                started += 1
            for i in range(len(batch)):  # film i is on request i % len(requests); the next one it takes is `started`
                request = requests[i % len(requests)]
                request.wait()
                logits.append(np.array(request.get_output_tensor(self._logits).data))
                if self._features is not None:
                    features.append(np.array(request.get_output_tensor(self._features).data, dtype=np.float32))
                if started < len(batch):
                    request.start_async([batch[started:started + 1]])
                    started += 1
        finally:  # nothing runs on after the call, not even when it failed part way
            for request in requests:
                request.wait()
        return np.concatenate(logits), None if self._features is None else np.concatenate(features)


Runner = TensorFlowRunner | OpenVINORunner


def create(model: keras.Model, feature_layer: str | None, engine: str | None = None, precision: str | None = None,
           cache_key: str | None = None, head: np.ndarray | None = None) -> Runner:
    """The runner for ``model``; ``engine``/``precision`` as in ``choose``. ``cache_key``: a string naming
    the model exactly (``cxr_core.models.cache_key``: verified weights' sha256 and the card fields that
    build it), or None to convert without the cache. ``head``: the Dense kernel kept in the cache entry.

    With engine ``auto``, a model OpenVINO cannot convert runs on TensorFlow and ``runner.note`` says so.
    """
    explicit = (engine or os.environ.get("CXR_ENGINE") or "auto").strip().lower() != "auto"
    choice = choose(engine, precision)
    if choice.engine == "tensorflow":
        return TensorFlowRunner(model, feature_layer, choice.note)
    try:
        return OpenVINORunner(model, feature_layer, choice.precision, cache_key, choice.note, head)
    except Exception as exc:  # noqa: BLE001  (any conversion failure: serve on TensorFlow instead)
        if explicit:
            raise
        return TensorFlowRunner(model, feature_layer,
                                f"OpenVINO could not run this model ({type(exc).__name__}: {exc}); using TensorFlow")


def cached(cache_key: str, engine: str | None = None, precision: str | None = None) -> OpenVINORunner | None:
    """The OpenVINO runner straight from the cache entry of ``cache_key``, without a Keras model, when the
    engine chosen (as in ``choose``) is OpenVINO and the cache holds a sound entry; else None (then build the
    Keras model and ``create``, which also reports a bad choice)."""
    try:
        choice = choose(engine, precision)
    except ValueError:
        return None
    if choice.engine != "openvino":
        return None
    try:
        return OpenVINORunner.cached(cache_key, choice.precision, choice.note)
    except Exception:  # noqa: BLE001  (the cache is a shortcut: on any failure the full load decides)
        return None
