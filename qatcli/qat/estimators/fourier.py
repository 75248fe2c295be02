"""fourier: StableQAT's Fourier surrogate of the rounding staircase."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from qatcli.config import QATConfig
from qatcli.errors import QatcliError
from qatcli.qat.estimators.base import Estimator, LayerEstimator, LayerGrid, register

FOURIER_C = math.sqrt(2) * math.pi


def fourier_factor(v: torch.Tensor, amplitudes: Sequence[float]) -> torch.Tensor:
    """g(v) = (1 - c S(v)) / (1 + c S(v)), S(v) = sum_k A_k cos((2k+1) pi (v + round(v))), c = sqrt(2) pi.

    g is 1 at decision boundaries and smallest at grid points; it stays in (0, 1] while the amplitudes are
    non-negative and sum to less than 1/c. A = 0 gives g = 1, i.e. ``ste``.
    """
    # in place wherever possible: each temporary is weight-sized
    phase = torch.round(v).add_(v).mul_(math.pi)
    if len(amplitudes) == 1:
        s = phase.cos_().mul_(amplitudes[0])
    else:
        s = torch.zeros_like(v)
        for k, a in enumerate(amplitudes):
            s.add_(torch.cos(phase * (2 * k + 1)).mul_(a))
    # (1 - cS) / (1 + cS) = 2 / (1 + cS) - 1
    return s.mul_(FOURIER_C).add_(1).reciprocal_().mul_(2).sub_(1)


class FourierLayer(LayerEstimator):
    def __init__(self, amplitudes: tuple[float, ...]) -> None:
        self.amplitudes = amplitudes

    def grad_factor(self, v: torch.Tensor) -> torch.Tensor:
        return fourier_factor(v, self.amplitudes)


@register
class Fourier(Estimator):
    name = "fourier"

    def __init__(self, amplitudes: Sequence[float]) -> None:
        values = tuple(float(a) for a in amplitudes)
        if not values or any(a < 0 for a in values) or sum(values) >= 1 / FOURIER_C:
            raise QatcliError(
                f"fourier amplitudes must be non-negative with a sum below 1/(sqrt(2)*pi) = {1 / FOURIER_C:.4f}, "
                f"got {list(values)}"
            )
        self.amplitudes = values

    @classmethod
    def from_config(cls, qat: QATConfig, seed: int) -> Fourier:
        return cls(qat.amplitudes)

    def for_layer(self, name: str, grid: LayerGrid) -> LayerEstimator:
        return FourierLayer(self.amplitudes)

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "amplitudes": list(self.amplitudes)}
