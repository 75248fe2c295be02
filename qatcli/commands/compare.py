"""qatcli compare: run the matrix and print its table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qatcli.config import Recipe
from qatcli.data.mix import shown
from qatcli.pipeline.compare import OUTPUTS, compare_matrix
from qatcli.report.progress import stderr_console
from qatcli.report.table import domain_cells, domain_columns, print_table, task_cell


def _change(ppl: float, fp_ppl: float) -> str:
    """+0.358 (+0.26%), +22.290 (+55.2%); a collapsed model's in three digits: +2.48e+06 (6.15e+04x)."""
    delta, ratio = ppl - fp_ppl, ppl / fp_ppl
    if ratio >= 10:
        return f"{delta:+.3g} ({ratio:.3g}x)"
    percent = 100 * (ratio - 1)
    return f"{delta:+.3f} ({percent:+.{2 if abs(percent) < 10 else 1}f}%)"


def _print_table(title: str, fp: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    mib = 2**20
    tasks = {name: result["metric"] for name, result in fp.get("tasks", {}).items()}
    ppl = domain_columns([fp])

    def line(r: dict[str, Any]) -> list[Any]:
        change = "-" if r is fp else _change(r["ppl"], fp["ppl"])
        export = None if r["export_bytes"] is None else r["export_bytes"] / mib
        return [
            r["cell"],
            r["method"],
            "fp16" if r is fp else r["bits"],
            "16" if r is fp else f"{r['avg_bits']:.2f}" if r.get("avg_bits") is not None else None,
            r["group_size"],
            *domain_cells(r, ppl),
            change,
            *(task_cell(r.get("tasks", {}).get(name)) for name in tasks),
            r["quantized_bytes"] / mib,
            export,
            r["quantize_seconds"],
            r["status"],
        ]

    columns = ["cell", "method", "bits", "avg bits", "group", *ppl, "vs fp", *(f"{n} {m}" for n, m in tasks.items())]
    columns += ["layers MiB", "export MiB", "wall s", "status"]
    print_table(title, columns, [line(fp), *(line(r) for r in rows)])


def run_compare(recipe: Recipe, recipe_path: Path, force: bool) -> list[dict[str, Any]]:
    result = compare_matrix(recipe, recipe_path, force)
    fp, rows = result.fp, result.rows
    data = shown(recipe.eval.data or [])
    title = f"{recipe.model}: perplexity on {data}, {fp['windows']} windows x {fp['seqlen']} tokens"
    _print_table(title, fp, rows)
    reused = sum(r["status"] == "reused" for r in rows)
    stderr_console.print(
        f"{len(rows)} cells ({reused} reused) in {result.seconds:.0f} s; "
        f"{', '.join(str(result.output / name) for name in OUTPUTS)}"
    )
    return rows
