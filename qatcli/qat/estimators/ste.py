"""ste: clipped straight-through."""

from __future__ import annotations

import torch

from qatcli.config import QATConfig
from qatcli.qat.estimators.base import Estimator, LayerEstimator, LayerGrid, register


class StraightThrough(LayerEstimator):
    """The gradient passes unchanged inside the range."""

    def grad_factor(self, v: torch.Tensor) -> float:
        return 1.0


@register
class STE(Estimator):
    name = "ste"

    @classmethod
    def from_config(cls, qat: QATConfig, seed: int) -> STE:
        return cls()

    def for_layer(self, name: str, grid: LayerGrid) -> LayerEstimator:
        return StraightThrough()
