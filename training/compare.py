"""Side-by-side table of runs: architecture, data, recipe and held-out metrics per model folder.

Accepts model folders (``model_card.json`` + ``metrics.json``) and evaluation folders
(``metrics.json`` only, from ``python -m training evaluate``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr_core import card as card_lib
from cxr_core.errors import ModelCardError


def _rates(folder: Path, recipe: dict[str, Any]) -> str | None:
    """The learning rates the epochs ran at, in order ("0.0001 -> 2e-05"), from history.csv; else the recipe's
    rate for its first phase (``lr`` alone misreports a run that only fine-tuned, at ``fine_tune_lr``)."""
    try:
        rates = pd.read_csv(folder / "history.csv")["lr"].dropna().tolist()
    except (OSError, KeyError, ValueError):
        rates = []
    if rates:
        distinct = [r for i, r in enumerate(rates) if i == 0 or not np.isclose(r, rates[i - 1], rtol=1e-6)]
        return " -> ".join(f"{r:.3g}" for r in distinct)
    pretrained = str(recipe.get("weights", "none")).lower() != "none"  # the recipe keeps weights, not pretrained
    fine_tune_only = pretrained and recipe.get("freeze_epochs") == 0
    return recipe.get("fine_tune_lr" if fine_tune_only else "lr")


def _row(folder: Path) -> dict[str, Any]:
    metrics_path = folder / "metrics.json"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{folder} has no metrics.json: train or evaluate it first")
    m = json.loads(metrics_path.read_text())
    row: dict[str, Any] = {"run": folder.name, "model": m.get("model")}
    try:
        # An evaluation folder names the model folder it scored.
        card_dir = Path(folder if (folder / card_lib.CARD_FILE).is_file() else m.get("model_dir", folder))
        card = card_lib.read(card_dir)
        row["model"] = card.name
        recipe = card.recipe
        row.update({"architecture": card.architecture, "input_size": card.input_size, "weights": recipe.get("weights"),
                    "optimizer": recipe.get("optimizer"), "lr": _rates(card_dir, recipe),
                    "epochs": recipe.get("epochs_run"),
                    "train_images": card.training_data.get("images", {}).get("train"),
                    "temperature": round(card.temperature, 3)})
    except ModelCardError:
        pass
    row.update({"split": m.get("split", "evaluation"), "n": m.get("n"), "accuracy": m.get("accuracy"),
                "auc": m.get("auc"), "ece": m.get("ece")})
    for cls, values in m.get("per_class", {}).items():
        for key in ("sensitivity", "specificity", "f1"):
            row[f"{cls} {key}"] = values.get(key)
    return row


def compare(folders: Sequence[str | Path]) -> pd.DataFrame:
    """One row per run, in the order given; metrics columns follow the run's classes."""
    return pd.DataFrame([_row(Path(f)) for f in folders], dtype=object)


def format_table(table: pd.DataFrame) -> str:
    """The table as aligned text, floats to 3 decimals, runs as columns (like the seeds' results charts)."""
    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and v != v):
            return "-"
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    return table.set_index("run").T.map(cell).to_string()
