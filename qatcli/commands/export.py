"""qatcli export: write the GPTQ-format directory, warn where fast kernels will not apply, print its row."""

from __future__ import annotations

from qatcli.config import Recipe
from qatcli.formats.export import FAST_KERNEL_GROUP_SIZES
from qatcli.pipeline.export import export_checkpoint
from qatcli.report.progress import stderr_console
from qatcli.report.table import human_bytes, print_table


def run_export(recipe: Recipe, checkpoint_arg: str | None, force: bool) -> None:
    output, report = export_checkpoint(recipe, checkpoint_arg, force)
    if report.dense:
        stderr_console.print(
            f"[yellow]warning: {len(report.dense)} layers stay dense (in/out not multiples of 32): "
            + ", ".join(report.dense)
        )
    if report.group_size not in FAST_KERNEL_GROUP_SIZES:
        stderr_console.print(
            f"[yellow]warning: group size {report.group_size}: the fast GPU kernels (Marlin, ExLlamaV2, vLLM's "
            f"gptq_marlin) take {', '.join(map(str, FAST_KERNEL_GROUP_SIZES))}; loaders fall back to slower ones"
        )
    if report.clamped_zero_points:
        stderr_console.print(f"[yellow]warning: {report.clamped_zero_points} zero points clamped to 1 for format v1")
    print_table(
        f"qatcli export -> {output}",
        ["checkpoint", "format", "dtype", "packed layers", "dense layers", "files", "size on disk"],
        [
            [
                str(checkpoint_arg or recipe.output),
                report.fmt,
                recipe.export.dtype,
                len(report.packed),
                len(report.dense),
                len(report.files),
                human_bytes(sum(report.files.values())),
            ]
        ],
    )
