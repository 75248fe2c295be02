"""Run a `qatcli compare` matrix and publish it: a method x bits table of perplexity and one of wall time.

    python benchmarks/compare_matrix.py benchmarks/matrix_smollm2.yaml --title 'Full matrix on smollm2-135m'

Runs `qatcli compare RECIPE` (finished cells are reused, so on a finished matrix this only publishes), prints
the two tables and appends them, with the command, machine and date, to docs/results.md; the compare figure is
copied to docs/figures/<output directory name>.png and linked under the tables.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from common import REPO, machine, publish

from qatcli.recipe import load_recipe


def ppl_text(ppl: float) -> str:
    """Three decimals (the estimators differ in the second), three significant digits once a cell collapses."""
    return f"{ppl:.3f}" if ppl < 1000 else f"{ppl:.4g}"


def pivot(rows: list[dict[str, Any]], value: str, text: Callable[[float], str]) -> list[str]:
    """Markdown rows: one per series (method, estimator, init, steps; group size if several), one column per bits."""
    several_groups = len({r["group_size"] for r in rows}) > 1
    bits = sorted({r["bits"] for r in rows}, reverse=True)
    table: dict[str, dict[int, float]] = defaultdict(dict)
    for r in rows:
        series = r["series"] + (f", g{r['group_size']}" if several_groups else "")
        table[series][r["bits"]] = r[value]
    lines = ["| method | " + " | ".join(f"{b} bits" for b in bits) + " |", "|---" * (len(bits) + 1) + "|"]
    for series, cells in table.items():
        lines.append(f"| {series} | " + " | ".join(text(cells[b]) if b in cells else "-" for b in bits) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--title", required=True)
    parser.add_argument("--note", default="", help="A line under the machine line: what the recipe holds fixed.")
    parser.add_argument("--results", type=Path, default=REPO / "docs" / "results.md")
    args = parser.parse_args()

    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "qatcli", "compare", str(args.recipe)], cwd=REPO)
    if run.returncode != 0:
        sys.exit(run.returncode)
    seconds = time.perf_counter() - start

    output = REPO / str(load_recipe(args.recipe, {}).output)
    report = json.loads((output / "compare.json").read_text())
    fp, rows = report["rows"][0], report["rows"][1:]
    new = [r for r in rows if r["status"] == "new"]
    figure = REPO / "docs" / "figures" / f"{output.name}.png"
    shutil.copyfile(output / "compare.png", figure)

    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    command = " ".join(shlex.quote(a) for a in ["python", *sys.argv])
    cells_seconds = sum(r["quantize_seconds"] + r["export_seconds"] + r["eval_seconds"] for r in rows)
    lines = [
        f"### {args.title} ({date})",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine()}  ",
    ]
    if args.note:
        lines.append(f"{args.note}  ")
    lines += [
        f"Model `{report['model']}`; every cell evaluated from its GPTQ export on `{Path(report['data']).name}`, "
        f"{report['windows']} windows x {report['seqlen']} tokens; fp ppl {fp['ppl']:.3f}. This run: {len(new)} of "
        f"{len(rows)} cells made, {seconds:.0f} s; the cells' own times (make, export, evaluate) sum to "
        f"{cells_seconds:.0f} s.",
        "",
        "Perplexity:",
        "",
        *pivot(rows, "ppl", ppl_text),
        "",
        "Wall time of making each checkpoint (s; PTQ or QAT, model loading included; export and evaluation apart):",
        "",
        *pivot(rows, "quantize_seconds", lambda s: f"{s:.1f}"),
        "",
        f"![perplexity against bits and against packed size](figures/{figure.name})",
    ]
    publish("\n".join(lines) + "\n", args.results)


if __name__ == "__main__":
    main()
