"""Post-training quantization methods as registered parts (qatcli/methods/base.py); importing this package
registers the built-in ones, in the order listings show them."""

# isort: off
from qatcli.methods import rtn  # noqa: F401  (each registers itself)
from qatcli.methods import gptq  # noqa: F401
from qatcli.methods import awq  # noqa: F401

# isort: on
from qatcli.methods.base import METHODS, Job, PTQMethod, Quantized, get_method, init_names, method_names, register

__all__ = ["METHODS", "Job", "PTQMethod", "Quantized", "get_method", "init_names", "method_names", "register"]
