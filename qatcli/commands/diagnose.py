"""qatcli diagnose: print one row per quantized model, write the JSON and the figure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qatcli.config import Recipe
from qatcli.outputs import atomic_file, check_output, write_json_atomic
from qatcli.pipeline.diagnose import diagnose, recorded_landscape
from qatcli.report.landscape_figure import plot_profiles, plot_recorded, short_name
from qatcli.report.table import print_table


def run_diagnose(
    recipe: Recipe, fp: str | None, quantized: list[str], json_path: Path | None, png_path: Path | None, force: bool
) -> dict[str, Any]:
    for path in (json_path, png_path):
        if path is not None:
            check_output(path, force, "file")
    if fp is not None and not quantized and recorded_landscape(Path(fp)) is not None:
        return _show_recorded(Path(fp), json_path, png_path, force)
    result = diagnose(recipe, fp, quantized)
    print_table(
        f"{result['model']}: loss (mean token NLL) on {result['data']}, {result['windows']} x {result['seqlen']}",
        ["model", "kind", "L(fp)", "L(Q)", "gap", "lowest at t", "L(latent)", "H-distance", "inward cos", "|-g| on d"],
        [
            [
                short_name(r["name"], [q["name"] for q in result["results"]]),
                r["kind"],
                r["loss_fp"],
                r["loss_quantized"],
                r["loss_gap"],
                r["t_lowest"],
                r["loss_latent"],
                r["hessian_distance"],
                r["inward_cosine"],
                r["inward_projected"],
            ]
            for r in result["results"]
        ],
    )
    if json_path is not None:
        write_json_atomic(json_path, result, force)
    if png_path is not None:
        with atomic_file(png_path) as tmp:
            plot_profiles(result, tmp)
    return result


def _show_recorded(run: Path, json_path: Path | None, png_path: Path | None, force: bool) -> dict[str, Any]:
    recorded = recorded_landscape(run)
    assert recorded is not None
    if recorded.blocks:
        by_block: dict[int, list[dict[str, Any]]] = {}
        for r in recorded.blocks:
            by_block.setdefault(r["block"], []).append(r)
        print_table(
            f"{run}: the landscape recorded in the block stage (each block's first batch, output MSE)",
            [
                "block",
                "steps",
                "L(Q(w)) first",
                "L(Q(w)) last",
                "L(fp)",
                "|w - Q(w)| last",
                "inward cos first",
                "inward cos last",
                "codes changed",
            ],
            [
                [
                    block,
                    rs[-1]["step"],
                    rs[0]["landscape"]["loss_quantized"],
                    rs[-1]["landscape"]["loss_quantized"],
                    rs[0]["landscape"]["loss_fp"],
                    rs[-1]["landscape"]["latent_to_grid"],
                    rs[0]["landscape"]["inward_cosine"],
                    rs[-1]["landscape"]["inward_cosine"],
                    sum(r["landscape"]["codes_changed"] or 0.0 for r in rs),
                ]
                for block, rs in sorted(by_block.items())
            ],
        )
    if recorded.steps:
        print_table(
            f"{run}: the landscape recorded in the end-to-end stage (probe batch)",
            ["step", "L(Q(w))", "L(w)", "L(fp)", "gap", "|w - Q(w)|", "inward cos", "codes changed"],
            [
                [
                    r["step"],
                    (m := r["landscape"])["loss_quantized"],
                    m["loss_latent"],
                    m["loss_fp"],
                    m["loss_quantized"] - m["loss_fp"],
                    m["latent_to_grid"],
                    m["inward_cosine"],
                    m["codes_changed"],
                ]
                for r in recorded.steps
            ],
        )
    result = {"run": str(run), "records": recorded.steps, "block_records": recorded.blocks}
    if json_path is not None:
        write_json_atomic(json_path, result, force)
    if png_path is not None:
        with atomic_file(png_path) as tmp:
            plot_recorded(recorded.steps, recorded.blocks, f"{run.name}: QAT in the fp loss landscape", tmp)
    return result
