"""Serving notes that more than one format gives."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qatcli.formats.export import ExportReport


def fused_group_note(report: ExportReport) -> list[str]:
    """vLLM runs q/k/v and gate/up as one module each, which needs one grid for the group."""
    if not report.unfused:
        return []
    return [
        "vLLM runs q/k/v and gate/up as one module each, which needs one grid; these differ: "
        + ", ".join(report.unfused)
    ]
