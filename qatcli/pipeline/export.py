"""A qatcli checkpoint to a deployable directory: the GPTQ format or compressed-tensors (export.format)."""

from __future__ import annotations

from pathlib import Path

from qatcli.config import Recipe
from qatcli.formats.checkpoint import is_checkpoint
from qatcli.formats.compressed_tensors import FORMAT as CT_FORMAT
from qatcli.formats.export import ExportReport, export_model
from qatcli.outputs import atomic_dir
from qatcli.pipeline.inputs import Problems


def check_export(recipe: Recipe, checkpoint: str | None, force: bool) -> tuple[Path, Path]:
    problems = Problems()
    if checkpoint is None:
        problems.add("no checkpoint: give CHECKPOINT or set 'output' (the ptq/qat output) in the recipe")
    elif not is_checkpoint(Path(checkpoint)):
        problems.add(f"'{checkpoint}' is not a qatcli checkpoint directory (no qatcli.json)")
    missing = "no export directory: pass -o DIR or set export.output in the recipe"
    problems.output(recipe.export.output, force, missing, inputs=(checkpoint,))
    if recipe.export.format == CT_FORMAT and recipe.export.v1_clamp_zeros:
        problems.add("--v1-clamp-zeros applies to format gptq only, not compressed-tensors")
    problems.raise_if_any()
    assert checkpoint is not None and recipe.export.output is not None
    return Path(checkpoint), Path(recipe.export.output)


def export_checkpoint(recipe: Recipe, checkpoint_arg: str | None, force: bool) -> tuple[Path, ExportReport]:
    """Write the export of ``checkpoint_arg`` (default: the recipe's output) into ``export.output``."""
    checkpoint, output = check_export(recipe, checkpoint_arg or recipe.output, force)
    e = recipe.export
    with atomic_dir(output, force) as tmp:
        report = export_model(checkpoint, tmp, e.format, e.dtype, e.max_shard_mib * 2**20, e.v1_clamp_zeros)
    return output, report
