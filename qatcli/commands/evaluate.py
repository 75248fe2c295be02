"""qatcli eval: evaluate every model on the same windows and tasks and print one table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qatcli.config import EvalConfig, Recipe
from qatcli.data.mix import shown
from qatcli.outputs import check_output, write_json_atomic
from qatcli.pipeline.evaluate import evaluate_models
from qatcli.report.table import domain_cells, domain_columns, human_bytes, print_table, task_cell


def _title(cfg: EvalConfig, rows: list[dict[str, Any]], tasks: list[str]) -> str:
    parts = [f"perplexity on {shown(cfg.data)}"] if cfg.data is not None else []
    if tasks:
        shots = sorted({t.get("num_fewshot") for r in rows for t in r["tasks"].values()} - {None})
        how = f"{shots[0]}-shot" if len(shots) == 1 else f"{', '.join(map(str, shots))} shots"
        limit = "" if cfg.limit is None else f", at most {cfg.limit} items each"
        parts.append(f"{', '.join(tasks)} ({how}{limit})")
    return "; ".join(parts)


def bits_cell(row: dict[str, Any]) -> str | None:
    """The bit width, with the average over the quantized weights where layers differ (mixed precision)."""
    bits, avg = row["bits"], row.get("avg_bits")
    if bits is None or avg is None or abs(avg - bits) < 1e-9:
        return None if bits is None else str(bits)
    return f"{bits} (avg {avg:.2f})"


def run_eval(recipe: Recipe, models: list[str], json_path: Path | None, force: bool) -> list[dict[str, Any]]:
    models = models or recipe.eval.models or ([recipe.model] if recipe.model else [])
    if json_path is not None:
        check_output(json_path, force, "file", tuple(Path(m) for m in models if Path(m).exists()))
    rows = evaluate_models(recipe, models)
    ppl = domain_columns(rows) if recipe.eval.data is not None else []
    tasks = list(dict.fromkeys(name for r in rows for name in r.get("tasks", {})))
    metrics = {name: next(r["tasks"][name]["metric"] for r in rows if name in r.get("tasks", {})) for name in tasks}
    print_table(
        _title(recipe.eval, rows, tasks),
        [
            "name",
            "method",
            "format",
            "bits",
            "group",
            *([*ppl, "windows x seqlen"] if ppl else []),
            *(f"{name} {metrics[name]}" for name in tasks),
            "linear weights",
            "time s",
        ],
        [
            [
                r["name"],
                r["method"],
                r["format"],
                bits_cell(r),
                r["group_size"],
                *([*domain_cells(r, ppl), f"{r['windows']} x {r['seqlen']}"] if ppl else []),
                *(task_cell(r.get("tasks", {}).get(name)) for name in tasks),
                human_bytes(r["weight_bytes"]),
                r["seconds"],
            ]
            for r in rows
        ],
    )
    if json_path is not None:
        write_json_atomic(json_path, rows, force)
    return rows
