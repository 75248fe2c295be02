"""The estimator interface and registry.

The forward pass is always the grid (grid.round_to_grid). An estimator only decides how much of the
gradient that reaches a quantized weight passes on to its latent weight: dL/dw = factor * dL/dW_q inside
the clamp range (0 outside). Estimators that keep state (jacobian) also get a setup call before training,
a call before every optimizer step, and save their state with the run.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from qatcli.errors import QatcliError

if TYPE_CHECKING:
    from qatcli.qat.fake_quant import FakeQuantLinear

ESTIMATORS: dict[str, type[Estimator]] = {}


def register(cls: type[Estimator]) -> type[Estimator]:
    ESTIMATORS[cls.name] = cls
    return cls


class Estimator(ABC):
    """Multiplier applied to the gradient of each latent weight inside the clamp range."""

    name: ClassVar[str]

    @abstractmethod
    def factor(self, v: torch.Tensor, layer: FakeQuantLinear) -> torch.Tensor | float:
        """dL/dw / dL/dW_q for the weights of ``layer`` at v = w / s, inside the range."""

    def describe(self) -> dict[str, object]:
        return {"name": self.name}

    def setup(self, fakes: dict[str, FakeQuantLinear], run_calibration: Callable[[], None]) -> None:
        """Called once before training with the layers it serves and a function that runs calibration data."""
        return

    def before_step(self, step: int) -> None:
        """Called before the forward pass of every training step (0-based)."""
        return

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return


def check_estimator(name: str) -> None:
    if name not in ESTIMATORS:
        raise QatcliError(f"unknown estimator '{name}' (known: {', '.join(ESTIMATORS)})")


def make_estimator(name: str, **options: object) -> Estimator:
    check_estimator(name)
    factory: Callable[..., Estimator] = ESTIMATORS[name]
    return factory(**options)
