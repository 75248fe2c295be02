"""A qatcli checkpoint to a deployable export in the registered format export.format selects (qatcli/exporters)."""

from __future__ import annotations

from pathlib import Path

from qatcli.config import Recipe
from qatcli.exporters import ExportFormat, format_for
from qatcli.formats.checkpoint import is_checkpoint
from qatcli.formats.export import ExportReport
from qatcli.outputs import atomic_dir, atomic_file
from qatcli.pipeline.inputs import Problems


def check_export(recipe: Recipe, checkpoint: str | None, force: bool) -> tuple[Path, Path, ExportFormat]:
    problems = Problems()
    if checkpoint is None:
        problems.add("no checkpoint: give CHECKPOINT or set 'output' (the ptq/qat output) in the recipe")
    elif not is_checkpoint(Path(checkpoint)):
        problems.add(f"'{checkpoint}' is not a qatcli checkpoint directory (no qatcli.json)")
    fmt = format_for(recipe.export.format)
    kind = "file" if fmt.writes_file else "directory"
    missing = f"no export {kind}: pass -o {'FILE' if fmt.writes_file else 'DIR'} or set export.output in the recipe"
    problems.output(
        recipe.export.output, force, missing, inputs=(checkpoint,), kind="file" if fmt.writes_file else "directory"
    )
    for problem in fmt.problems(recipe.export):
        problems.add(problem)
    problems.raise_if_any()
    assert checkpoint is not None and recipe.export.output is not None
    return Path(checkpoint), Path(recipe.export.output), fmt


def export_checkpoint(recipe: Recipe, checkpoint_arg: str | None, force: bool) -> tuple[Path, ExportReport]:
    """Write the export of ``checkpoint_arg`` (default: the recipe's output) at ``export.output``."""
    checkpoint, output, fmt = check_export(recipe, checkpoint_arg or recipe.output, force)
    if fmt.writes_file:
        with atomic_file(output) as tmp:
            report = fmt.write(checkpoint, tmp, recipe.export)
    else:
        with atomic_dir(output, force) as tmp:
            report = fmt.write(checkpoint, tmp, recipe.export)
    return output, report
