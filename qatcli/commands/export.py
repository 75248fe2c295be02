"""qatcli export: a qatcli checkpoint to a deployable GPTQ-format directory."""

from __future__ import annotations

from pathlib import Path

from qatcli.errors import QatcliError
from qatcli.formats.checkpoint import is_checkpoint
from qatcli.formats.export import FAST_KERNEL_GROUP_SIZES, export_gptq
from qatcli.outputs import atomic_dir, check_writable
from qatcli.recipe import Recipe
from qatcli.report.progress import stderr_console
from qatcli.report.table import human_bytes, print_table


def run_export(recipe: Recipe, checkpoint_arg: str | None, force: bool) -> None:
    checkpoint_spec = checkpoint_arg or recipe.output
    if checkpoint_spec is None:
        raise QatcliError("no checkpoint: give CHECKPOINT or set 'output' (the ptq/qat output) in the recipe")
    if recipe.export.output is None:
        raise QatcliError("no export directory: pass -o DIR or set export.output in the recipe")
    checkpoint, output = Path(checkpoint_spec), Path(recipe.export.output)
    if not is_checkpoint(checkpoint):
        raise QatcliError(f"'{checkpoint}' is not a qatcli checkpoint directory (no qatcli.json)")
    check_writable(output, force)
    e = recipe.export
    with atomic_dir(output, force) as tmp:
        report = export_gptq(checkpoint, tmp, e.format, e.dtype, e.max_shard_mib * 2**20, e.v1_clamp_zeros)
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
                str(checkpoint),
                report.fmt,
                e.dtype,
                len(report.packed),
                len(report.dense),
                len(report.files),
                human_bytes(sum(report.files.values())),
            ]
        ],
    )
