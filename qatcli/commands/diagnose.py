"""qatcli diagnose: print one row per quantized model, write the JSON and the figure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qatcli.config import Recipe
from qatcli.outputs import atomic_file, check_output, write_json_atomic
from qatcli.pipeline.diagnose import diagnose, recorded_landscape
from qatcli.report.landscape_figure import plot_profiles, plot_recorded
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
                Path(r["name"]).name,
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
    records = recorded_landscape(run) or []
    print_table(
        f"{run}: the landscape recorded during QAT (probe batch)",
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
            for r in records
        ],
    )
    result = {"run": str(run), "records": records}
    if json_path is not None:
        write_json_atomic(json_path, result, force)
    if png_path is not None:
        with atomic_file(png_path) as tmp:
            plot_recorded(records, f"{run.name}: QAT in the fp loss landscape", tmp)
    return result
