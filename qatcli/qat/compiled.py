"""Compiled kernels for elementwise work over whole weights (fake quantization, jacobian's refresh): each
function is compiled once with symbolic shapes on first use, and runs as plain PyTorch where compiling fails."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from qatcli.progress import notify


class _Kernels:
    """The compiled kernels, made on first use (importing the compiler costs seconds); eager after a failure."""

    def __init__(self) -> None:
        self.compiled: dict[str, Callable[..., Any]] = {}
        self.failed = False

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self.failed:
            return fn(*args)
        if fn.__name__ not in self.compiled:
            self.compiled[fn.__name__] = torch.compile(fn, dynamic=True)
        try:
            return self.compiled[fn.__name__](*args)
        except Exception as err:  # any compiler failure: the same math runs eagerly below
            self.failed = True
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            notify(
                f"warning: fused fake-quantization kernels unavailable ({reason[:160]}); "
                "running plain PyTorch (set qat.fused to false to skip the attempt)"
            )
            return fn(*args)


_KERNELS = _Kernels()


def run_fused(fn: Callable[..., Any], fused: bool, *args: Any) -> Any:
    """fn(*args), as a compiled kernel where ``fused`` (and compiling works), else plain PyTorch."""
    return _KERNELS.run(fn, *args) if fused else fn(*args)
