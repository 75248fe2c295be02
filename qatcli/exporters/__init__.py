"""Export formats as registered parts (qatcli/exporters/base.py); importing this package registers the built-in
ones, in the order listings show them."""

# isort: off
from qatcli.exporters import gptq  # noqa: F401  (each registers itself)
from qatcli.exporters import compressed_tensors  # noqa: F401
from qatcli.exporters import gguf  # noqa: F401

# isort: on
from qatcli.exporters.base import (
    DEFAULT_FORMAT,
    FORMATS,
    ExportFormat,
    LoadedExport,
    detect_format,
    format_for,
    format_values,
    register,
)

__all__ = [
    "DEFAULT_FORMAT",
    "FORMATS",
    "ExportFormat",
    "LoadedExport",
    "detect_format",
    "format_for",
    "format_values",
    "register",
]
