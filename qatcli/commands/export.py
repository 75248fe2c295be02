"""qatcli export: write the export, print the format's serving notes and the export's row."""

from __future__ import annotations

from qatcli.config import Recipe
from qatcli.exporters import format_for
from qatcli.pipeline.export import export_checkpoint
from qatcli.report.progress import stderr_console
from qatcli.report.table import human_bytes, print_table


def run_export(recipe: Recipe, checkpoint_arg: str | None, force: bool) -> None:
    output, report = export_checkpoint(recipe, checkpoint_arg, force)
    for note in format_for(recipe.export.format).serving_notes(report):
        stderr_console.print(f"[yellow]warning: {note}")
    print_table(
        f"qatcli export -> {output}",
        ["checkpoint", "format", "dtype", "packed layers", "dense layers", "files", "size on disk"],
        [
            [
                str(checkpoint_arg or recipe.output),
                report.fmt,
                report.dense_dtype or recipe.export.dtype,
                len(report.packed),
                len(report.dense),
                len(report.files),
                human_bytes(sum(report.files.values())),
            ]
        ],
    )
