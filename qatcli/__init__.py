"""qatcli: quantize Hugging Face causal LMs to 2-8 bits and measure what each method costs.

The Python API (qatcli/api.py): qatcli.build_recipe, qatcli.quantize, qatcli.evaluate, qatcli.export, qatcli.compare.
It is imported on first use, so that the command line does not load torch for --help.
"""

from typing import Any

from qatcli.version import __version__

__all__ = ["__version__"]
API = ("build_recipe", "quantize", "evaluate", "export", "compare")


def __getattr__(name: str) -> Any:
    if name in API:
        from qatcli import api

        return getattr(api, name)
    raise AttributeError(f"module 'qatcli' has no attribute '{name}'")
