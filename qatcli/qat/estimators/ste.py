"""ste: clipped straight-through."""

from __future__ import annotations

import torch

from qatcli.qat.estimators.base import Estimator, register


@register
class STE(Estimator):
    """The gradient passes unchanged inside the range."""

    name = "ste"

    def factor(self, v: torch.Tensor, layer: object) -> float:
        return 1.0
