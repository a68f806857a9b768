"""``python -m training {train,evaluate,rescore,compare} ...`` (``train`` is the default subcommand)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from cxr_core import csvsafe  # noqa: E402
from training import data  # noqa: E402  (after quieting TensorFlow's C++ logs)
from training.config import TrainConfig  # noqa: E402

COMMANDS = ("train", "evaluate", "compare", "rescore")
HELP = {
    "out": "model folder to write", "name": "model name in the card (default: the folder's name)",
    "negative_class": "class called when no positive class reaches its threshold",
    "architecture": "densenet169, densenet121, resnet50, vgg16, inceptionv3 (tiny: tests only)",
    "input_size": "model input in pixels", "weights": "none | imagenet | PATH.h5 | MODEL_DIR (fine-tune one of ours)",
    "epochs": "total epochs, frozen phase included",
    "freeze_epochs": "epochs with the backbone frozen (pretrained weights); -1 (auto): 0 when the starting "
                     "model's head is copied (one of ours, same classes), else 3",
    "unfreeze": "all | top:K layers | top:0.3 of them, for the fine-tune phase",
    "fine_tune_lr": "learning rate after unfreezing",
    "freeze_batchnorm": "from pretrained weights keep BatchNorm in inference mode (false: it trains when fine-tuning)",
    "weight_decay": "AdamW only",
    "patience": "EarlyStopping patience (val_loss)", "lr_patience": "ReduceLROnPlateau patience (factor 0.2)",
    "augment": "random augmentation while training", "flip": "none | horizontal (mirrors the heart: off by default)",
    "rotation": "fraction of a full turn", "blur": "RandomGaussianBlur factor (0 = off)",
    "sharpen": "RandomSharpness factor (0 = off)", "gamma": "gamma in [1/(1+g), 1+g], log-uniform (0 = off)",
    "noise": "std of additive Gaussian noise, 0..255 units (0 = off)",
    "holdout_source": "source name(s), comma-separated, kept out of train/val and scored as the 'external' split",
    "near_duplicate_threshold": "thumbnail correlation at which two films count as one (training.hygiene)",
    "familiarity_percentile": "validation percentile of the familiarity distance used as the flag threshold",
    "max_per_class": "at most N images per source and class (smoke runs)",
    "split_manifest": "reuse this split.csv instead of splitting", "cache_dir": "pixel cache; 'none' disables it",
    "target_sensitivity": "validation sensitivity the thresholds aim for",
    "threshold_rule": "sensitivity | argmax", "mixed_precision": "auto (GPU only) | off | float16 | bfloat16",
    "distribute": "data parallel over all local devices (JAX / TensorFlow)",
    "resume": "continue the run in --out from its last completed epoch",
    "time_budget": "minutes of training for this process: no epoch starts that the last epoch says would "
                   "end past them; the run scores and saves, and --resume continues it later (0 = no limit)",
    "verbose": "-1 auto, 0 silent, 1 progress bar, 2 one line per epoch",
    "note": "free text kept in the card's recipe (how and where the run was made, what to do next)",
}
CHOICES = {"architecture": ("densenet169", "densenet121", "resnet50", "vgg16", "inceptionv3", "tiny"),
           "optimizer": ("adam", "adamw", "adamax"), "class_weights": ("balanced", "source-class", "none"),
           "flip": ("none", "horizontal"), "threshold_rule": ("sensitivity", "argmax"),
           "mixed_precision": ("auto", "off", "float16", "bfloat16")}


def _fraction_triple(text: str) -> tuple[float, float, float]:
    parts = [float(p) for p in text.replace("/", ",").split(",")]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError("--split takes three fractions, e.g. 0.8,0.1,0.1")
    return parts[0], parts[1], parts[2]


def _bool(text: str) -> bool:
    """A yes/no flag's value; anything else is an error (``--augment DIR`` must not swallow a data folder)."""
    word = text.lower()
    if word not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise argparse.ArgumentTypeError(f"expected yes/no (true/false, on/off, 1/0), got {text!r}")
    return word in ("1", "true", "yes", "on")


def _train_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train a classifier on dataset folders",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter, description=(
        "Train, calibrate on the validation split and evaluate on the test split; writes a model folder."))
    p.add_argument("data", nargs="+", help="dataset folders: DIR/CLASS/* or DIR/{train,val,test}/CLASS/*")
    p.add_argument("--config", help="JSON file of settings (TrainConfig field names); flags override it")
    p.add_argument("--map", action="append", default=[], metavar="FOLDER=CLASS", help="class map entry (repeat)")
    p.add_argument("--map-file", help="class map file: one FOLDER=CLASS per line")
    defaults = TrainConfig(data=[])
    for field, value in defaults.to_dict().items():
        if field in ("data", "class_map", "split"):
            continue
        flags = ["--arch", "--architecture"] if field == "architecture" else ["--" + field.replace("_", "-")]
        extra = {"help": HELP.get(field) or field.replace("_", " "), "choices": CHOICES.get(field)}
        if isinstance(value, bool):
            p.add_argument(*flags, dest=field, nargs="?", const=True, default=value, type=_bool, **extra)
        else:
            p.add_argument(*flags, dest=field, type=type(value), default=value, **extra)
    p.add_argument("--split", type=_fraction_triple, default=defaults.split, help="train,val,test fractions")
    p.add_argument("--no-augment", dest="augment", action="store_false")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig for parsed ``train`` flags (a --config file supplies defaults; flags win)."""
    values = {k: v for k, v in vars(args).items() if k not in ("command", "config", "map", "map_file", "given")}
    if args.config:
        from_file = json.loads(Path(args.config).read_text())
        given = getattr(args, "given", None)
        defaults = TrainConfig(data=[]).to_dict()
        for key, value in from_file.items():
            # A flag on the command line wins, even one that repeats the default (``parse`` records which were).
            explicit = key in given if given is not None else values.get(key) != defaults.get(key)
            if key == "class_map" or key not in values or not explicit:
                values[key] = value
    class_map = dict(values.pop("class_map", {}) or {})
    if args.map_file:
        class_map.update(data.read_class_map(args.map_file))
    class_map.update(data.parse_class_map(args.map))
    return TrainConfig.from_dict({**values, "class_map": class_map})


def parse(argv: list[str]) -> argparse.Namespace:
    """Parse a command line; ``train`` is implied when the first word is not a subcommand."""
    argv = list(argv)
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
        argv.insert(0, "train")
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    ev = sub.add_parser("evaluate", help="score a model folder on a labelled image folder")
    ev.add_argument("model_dir")
    ev.add_argument("data_dir", help="DATA_DIR/<class folder>/** images")
    ev.add_argument("--out", required=True, help="folder for metrics.json and predictions.csv")
    ev.add_argument("--map", action="append", default=[], metavar="FOLDER=CLASS")
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--engine", choices=("auto", "tensorflow", "openvino"), default=None,
                    help="inference engine (default: env CXR_ENGINE, else openvino where installed)")
    ev.add_argument("--precision", choices=("f32", "bf16", "auto"), default=None,
                    help="inference precision (default: env CXR_PRECISION, else bf16 on a BF16 CPU for a model whose "
                         "card records bf16 agreement, else f32; bf16: OpenVINO only)")
    rs = sub.add_parser("rescore", help="redo a model folder's evaluation and familiarity check (no training)",
                        description=("Temperature, thresholds and familiarity threshold on its val split, the "
                                     "familiarity model on its train split, metrics of every split; --external "
                                     "folders are scored as the external split. The weights are not rewritten."))
    rs.add_argument("model_dir")
    rs.add_argument("--external", action="append", default=[], metavar="DIR",
                    help="labelled folder DIR/CLASS/** from a source the model never saw (repeat)")
    rs.add_argument("--map", action="append", default=[], metavar="FOLDER=CLASS")
    rs.add_argument("--data", action="append", default=[], metavar="DIR",
                    help="a training data folder where it is now, if it moved since training (repeat, one per "
                         "folder of the card's recipe, under the same folder names; default: the recipe's paths)")
    rs.add_argument("--cache-dir", default="")
    rs.add_argument("--batch-size", type=int, default=32)
    cmp = sub.add_parser("compare", help="side-by-side table of model folders or evaluation folders")
    cmp.add_argument("runs", nargs="+")
    cmp.add_argument("--csv", help="where to write the table (default: comparison.csv here)", default="comparison.csv")
    args = parser.parse_args(argv)
    if args.command == "train":  # which settings the command line gave, so that a --config file fills only the rest
        train = sub.choices["train"]
        saved = [(action, action.default) for action in train._actions]
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        try:
            args.given = set(vars(parser.parse_args(argv))) - {"command"}
        finally:
            for action, default in saved:
                action.default = default
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        return _run(args)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError) as exc:
        # bad settings, data or model folders: what was wrong and what to do, not a traceback
        # (ModelCardError and UnreadableImageError are ValueErrors)
        if os.environ.get("CXR_TRACEBACK"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "train":
        from training.train import run

        run(config_from_args(args))
    elif args.command == "evaluate":
        from cxr_core import evaluation_view, models
        from training import evaluate

        if Path(args.out).resolve() == Path(args.model_dir).resolve():
            raise ValueError(f"--out {args.out} is the model folder: its metrics.json and predictions.csv are the "
                             "training run's own. Write the evaluation to another folder")
        classifier = models.load(args.model_dir, engine=args.engine, precision=args.precision)
        print(f"inference: {classifier.engine_label}" + (f" ({classifier.runner.note})" if classifier.runner.note
                                                          else ""))
        result = evaluate.evaluate_folder(classifier, args.data_dir, data.parse_class_map(args.map),
                                          batch_size=args.batch_size)
        out = evaluate.write(result, args.out)
        m = result.metrics
        auc = "n/a" if m["auc"] is None else f"{m['auc']:.3f}"
        print(f"{m['n']} images: accuracy {m['accuracy']:.3f}, AUC {auc}; {len(result.skipped)} skipped; "
              f"unmatched folders {m['unmatched_folders'] or 'none'}; written to {out}")
        if m.get("familiarity"):
            print(evaluation_view.familiarity_sentence(m["familiarity"]))
        if overlap := evaluate.overlap_sentence(m.get("training_overlap")):
            print(f"warning: {overlap}")
        for item in result.skipped:
            print(f"skipped {item['path']}: {item['error']}")
    elif args.command == "rescore":
        from training import rescore

        rescore.run(args.model_dir, args.external, data.parse_class_map(args.map) or None, args.cache_dir,
                    args.batch_size, data_dirs=args.data)
    else:
        from training import compare

        table = compare.compare(args.runs)
        print(compare.format_table(table))
        csvsafe.to_csv(table, args.csv, index=False)
        print(f"written to {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
