"""qatcli eval: evaluate every model on the same windows and print one table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qatcli.config import Recipe
from qatcli.outputs import check_output, write_json_atomic
from qatcli.pipeline.evaluate import evaluate_models
from qatcli.report.table import human_bytes, print_table


def run_eval(recipe: Recipe, models: list[str], json_path: Path | None, force: bool) -> list[dict[str, Any]]:
    models = models or recipe.eval.models or ([recipe.model] if recipe.model else [])
    if json_path is not None:
        check_output(json_path, force, "file", tuple(Path(m) for m in models if Path(m).exists()))
    rows = evaluate_models(recipe, models)
    print_table(
        f"perplexity on {recipe.eval.data}",
        ["name", "method", "format", "bits", "group", "ppl", "windows x seqlen", "linear weights", "time s"],
        [
            [
                r["name"],
                r["method"],
                r["format"],
                r["bits"],
                r["group_size"],
                r["ppl"],
                f"{r['windows']} x {r['seqlen']}",
                human_bytes(r["weight_bytes"]),
                r["seconds"],
            ]
            for r in rows
        ],
    )
    if json_path is not None:
        write_json_atomic(json_path, rows, force)
    return rows
