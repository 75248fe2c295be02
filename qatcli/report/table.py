"""Result tables for people (rich, on stdout) next to the JSON written for machines."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

_probe = Console()
# Redirected output gets a wide table rather than rich's 80-column default that truncates cells.
console = _probe if _probe.is_terminal else Console(width=200)


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    if n < 1024:
        return f"{n} B"
    exponent = min(int(math.log(n, 1024)), 3)
    return f"{n / 1024**exponent:.2f} {('B', 'KiB', 'MiB', 'GiB')[exponent]}"


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if value < 1e4 else f"{value:.3e}"
    return str(value)


def task_cell(result: dict[str, Any] | None) -> str:
    """A task's main metric and its standard error (qatcli.evaluation.tasks' summary of it): 0.438 ± 0.128."""
    if result is None or result["value"] is None:
        return "-"
    stderr = "" if result["stderr"] is None else f" ± {result['stderr']:.3f}"
    return f"{result['value']:.3f}{stderr}"


def domain_columns(rows: Sequence[dict[str, Any] | None]) -> list[str]:
    """The perplexity columns of result rows: each evaluation domain and their geometric mean where a row has
    several domains, else the one ``ppl``."""
    for row in rows:
        if row and "domains" in row:
            return [*row["domains"], "geo mean"]
    return ["ppl"]


def domain_cells(row: dict[str, Any] | None, columns: Sequence[str]) -> list[Any]:
    """``row``'s values in ``domain_columns`` order (None where it lacks one)."""
    if row is None:
        return [None] * len(columns)
    if columns == ["ppl"]:
        return [row.get("ppl")]
    domains = row.get("domains", {})
    return [row.get("ppl") if c == "geo mean" else domains.get(c, {}).get("ppl") for c in columns]


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    table = Table(title=title)
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(fmt(v) for v in row))
    console.print(table)


def mixed(default: Any, values: Sequence[Any]) -> str:
    """A per-layer setting: the default with the layers that differ counted, 2 (4 for 14 layers); 2 if none do."""
    others = Counter(v for v in values if v != default)
    if not others:
        return fmt(default)
    counts = ", ".join(f"{fmt(v)} for {n} layer{'s' if n != 1 else ''}" for v, n in others.items())
    return f"{fmt(default)} ({counts})"
