"""qatcli ptq: make the checkpoint and print its row."""

from __future__ import annotations

from typing import Any

from qatcli.config import Recipe
from qatcli.pipeline.ptq import make_ptq_checkpoint
from qatcli.report.table import domain_cells, domain_columns, human_bytes, mixed, print_table


def run_ptq(recipe: Recipe, force: bool) -> dict[str, Any]:
    made = make_ptq_checkpoint(recipe, force)
    m, q, specs = made.metrics, made.meta["quantization"], made.specs.values()
    ev = m.get("eval")
    ppl = domain_columns([ev])
    print_table(
        f"qatcli ptq -> {made.output}",
        ["model", "method", "bits", "group", "sym", "layers", "quantized size", "fp16 size", "quantize s", *ppl],
        [
            [
                made.meta["base_model"]["spec"],
                made.meta["method"],
                mixed(q["bits"], [s.bits for s in specs]),
                mixed(q["group_size"], [s.group_size for s in specs]),
                mixed(q["sym"], [s.sym for s in specs]),
                m["quantized_layers"],
                human_bytes(m["quantized_bytes"]),
                human_bytes(m["fp16_bytes"]),
                m["quantize_seconds"],
                *domain_cells(ev, ppl),
            ]
        ],
    )
    return m
