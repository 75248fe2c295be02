"""qatcli qat: train (or continue training) and print the run's row."""

from __future__ import annotations

from typing import Any

from qatcli.config import Recipe
from qatcli.pipeline.qat import train_qat
from qatcli.report.table import domain_cells, domain_columns, mixed, print_table


def run_qat(recipe: Recipe, force: bool, resume: bool, stop_after: int | None) -> dict[str, Any] | None:
    made = train_qat(recipe, force, resume, stop_after)
    if made is None:
        return None
    m, q, t, specs = made.metrics, made.meta["quantization"], made.meta["qat"], made.specs.values()
    ev = m.get("eval", {})
    after = [f"ppl after {c}" if c != "ppl" else "ppl after" for c in domain_columns([ev])]
    print_table(
        f"qatcli qat -> {made.output}",
        [
            "estimator",
            "init",
            "loss",
            "bits",
            "group",
            "steps",
            "final loss",
            "s/step",
            "ppl before",
            "ppl after blocks",
            *after,
        ],
        [
            [
                t["estimator"]["name"],
                t["init"],
                t["loss"],
                mixed(q["bits"], [s.bits for s in specs]),
                mixed(q["group_size"], [s.group_size for s in specs]),
                m["steps"],
                m["final_loss"],
                m["mean_step_seconds"],
                ev.get("ppl_before"),
                ev.get("ppl_after_blocks"),
                *domain_cells(ev, domain_columns([ev])),
            ]
        ],
    )
    return m
