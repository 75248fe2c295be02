"""fourier: StableQAT's Fourier surrogate of the rounding staircase."""

from __future__ import annotations

import math

import torch

from qatcli.errors import QatcliError
from qatcli.qat.estimators.base import Estimator, register

FOURIER_C = math.sqrt(2) * math.pi


@register
class Fourier(Estimator):
    """g(v) = (1 - c S(v)) / (1 + c S(v)), S(v) = sum_k A_k cos((2k+1) pi (v + round(v))), c = sqrt(2) pi.

    g is 1 at decision boundaries and smallest at grid points; it stays in (0, 1] while the amplitudes are
    non-negative and sum to less than 1/c. A = 0 gives g = 1, i.e. ``ste``.
    """

    name = "fourier"

    def __init__(self, amplitudes: list[float] | tuple[float, ...] = (0.21,)) -> None:
        amplitudes = [float(a) for a in amplitudes]
        if not amplitudes or any(a < 0 for a in amplitudes) or sum(amplitudes) >= 1 / FOURIER_C:
            raise QatcliError(
                f"fourier amplitudes must be non-negative with a sum below 1/(sqrt(2)*pi) = {1 / FOURIER_C:.4f}, "
                f"got {amplitudes}"
            )
        self.amplitudes = amplitudes

    def factor(self, v: torch.Tensor, layer: object) -> torch.Tensor:
        phase = math.pi * (v + torch.round(v))
        s = sum(a * torch.cos((2 * k + 1) * phase) for k, a in enumerate(self.amplitudes))
        return (1 - FOURIER_C * s) / (1 + FOURIER_C * s)

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "amplitudes": self.amplitudes}
