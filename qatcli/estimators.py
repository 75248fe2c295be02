"""Backward-pass estimators for rounding in quantization-aware training.

The forward pass is always the grid (grid.round_to_grid). An estimator only decides how much of the
gradient that reaches a quantized weight passes on to its latent weight: dL/dw = factor(v) * dL/dW_q inside
the clamp range (0 outside), where v = w / s is the weight in units of its scale.

Adding an estimator is one class registered with ``@register``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import torch

from qatcli.errors import QatcliError

ESTIMATORS: dict[str, type[Estimator]] = {}


def register(cls: type[Estimator]) -> type[Estimator]:
    ESTIMATORS[cls.name] = cls
    return cls


class Estimator(ABC):
    """Multiplier applied to the gradient of each latent weight inside the clamp range."""

    name: ClassVar[str]

    @abstractmethod
    def factor(self, v: torch.Tensor) -> torch.Tensor | float:
        """dL/dw / dL/dW_q for weights at v = w / s inside the range."""

    def describe(self) -> dict[str, object]:
        return {"name": self.name}


@register
class STE(Estimator):
    """Clipped straight-through: the gradient passes unchanged inside the range."""

    name = "ste"

    def factor(self, v: torch.Tensor) -> float:
        return 1.0


FOURIER_C = math.sqrt(2) * math.pi


@register
class Fourier(Estimator):
    """StableQAT's surrogate: g(v) = (1 - c S(v)) / (1 + c S(v)), S(v) = sum_k A_k cos((2k+1) pi (v + round(v))).

    c = sqrt(2) pi. g is 1 at decision boundaries and smallest at grid points; it stays in (0, 1] while the
    amplitudes are non-negative and sum to less than 1/c. A = 0 gives g = 1, i.e. ``ste``.
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

    def factor(self, v: torch.Tensor) -> torch.Tensor:
        phase = math.pi * (v + torch.round(v))
        s = sum(a * torch.cos((2 * k + 1) * phase) for k, a in enumerate(self.amplitudes))
        return (1 - FOURIER_C * s) / (1 + FOURIER_C * s)

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "amplitudes": self.amplitudes}


def make_estimator(name: str, **options: object) -> Estimator:
    if name not in ESTIMATORS:
        raise QatcliError(f"unknown estimator '{name}' (known: {', '.join(ESTIMATORS)})")
    factory: Callable[..., Estimator] = ESTIMATORS[name]
    return factory(**options)
