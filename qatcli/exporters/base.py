"""The export format interface and registry: a format is one module and one ``@register``.

A format owns its writer, how an export of it is recognised on disk, how `qatcli eval` loads one, which
export options apply to it, and what it tells the user about serving it (which engines and kernels read it).
commands/export.py prints the notes; it decides nothing about engines itself.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from qatcli.errors import QatcliError

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from qatcli.config import ExportConfig
    from qatcli.formats.export import ExportReport


@dataclass
class LoadedExport:
    """An export ready to evaluate and the fields of its result row (method, format, bits, group_size, sym,
    weight_bytes, base_model, ...)."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    info: dict[str, Any]


class ExportFormat(ABC):
    name: ClassVar[str]  # the family, as tables and docs name it
    values: ClassVar[tuple[str, ...]]  # the export.format values that select it
    writes_file: ClassVar[bool] = False  # one file (GGUF) rather than a directory
    runs_tasks: ClassVar[bool] = True  # its loaded model is a transformers model lm-evaluation-harness can run
    summary: ClassVar[str] = ""

    def problems(self, e: ExportConfig) -> list[str]:
        """Export options that do not apply to this format, each as one line."""
        return []

    @abstractmethod
    def write(self, checkpoint: Path, output: Path, e: ExportConfig) -> ExportReport:
        """Write the export of ``checkpoint`` at ``output`` (a temporary path the caller moves into place)."""

    @abstractmethod
    def detect(self, path: Path) -> bool:
        """Whether ``path`` holds an export of this format."""

    @abstractmethod
    def load(self, path: Path, device: torch.device) -> LoadedExport:
        """The export at ``path`` as a model `qatcli eval` runs, with its result row's fields."""

    def serving_notes(self, report: ExportReport) -> list[str]:
        """Warnings about where this export runs fast, slowly or not at all."""
        return []


FORMATS: dict[str, ExportFormat] = {}
DEFAULT_FORMAT = "gptq"  # the family an unset export.format selects


def register(cls: type[ExportFormat]) -> type[ExportFormat]:
    """Class decorator: make ``cls`` available under each of its export.format values."""
    fmt = cls()
    for value in cls.values:
        if value in FORMATS:
            raise ValueError(f"export format '{value}' registered twice")
        FORMATS[value] = fmt
    return cls


def format_values() -> tuple[str, ...]:
    return tuple(FORMATS)


def format_for(value: str | None) -> ExportFormat:
    """The format an export.format value selects (None: the default family, which picks its variant)."""
    key = DEFAULT_FORMAT if value is None else value
    if key not in FORMATS:
        raise QatcliError(f"export.format must be one of {', '.join(FORMATS)}, got '{value}'")
    return FORMATS[key]


def detect_format(path: Path) -> ExportFormat | None:
    """The registered format whose export ``path`` holds, if any."""
    return next((f for f in dict.fromkeys(FORMATS.values()) if f.detect(path)), None)
