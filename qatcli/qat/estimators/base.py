"""The estimator interface and registry.

The forward pass is always the grid (grid.round_to_grid). An estimator only decides how much of the
gradient that reaches a quantized weight passes on to its latent weight: dL/dw = factor * dL/dW_q inside
the clamp range (0 outside).

Two levels, as in torchao's config / fake-quantizer split:

- ``Estimator`` is the recipe's choice. prepare_qat asks it for one ``LayerEstimator`` per quantized layer,
  and the training loop calls its run-level hooks: ``setup`` before training, ``before_step`` before every
  step, ``state_dict``/``load_state_dict`` with the run's state.
- ``LayerEstimator`` is what the backward pass of one layer asks for the factor. Estimators that measure the
  layer (jacobian) keep their per-layer state in it and read the layer's tensors through a ``LayerGrid``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from qatcli.config import QATConfig
from qatcli.errors import QatcliError

# Runs that many forward passes of calibration windows through the fake-quantized model.
Calibrate = Callable[[int], None]


@dataclass(frozen=True)
class LayerGrid:
    """The tensors of one fake-quantized layer, shared with it (not copied): they follow its training."""

    weight: torch.Tensor  # latent weights [out, in]
    scales: torch.Tensor  # learnable scales [out, G], before their rounding to fp16
    zeros: torch.Tensor  # zero points [out, G]
    g_idx: torch.Tensor  # group of each input column [in] (long)
    maxq: int
    fused: bool = False  # the layer runs compiled kernels (qatcli/qat/compiled.py); an estimator's own work may too


class LayerEstimator(ABC):
    """The backward rule of one quantized layer."""

    @abstractmethod
    def grad_factor(self, v: torch.Tensor) -> torch.Tensor | float:
        """dL/dw / dL/dW_q at v = w / s inside the clamp range, broadcastable to v.

        v is [out, in], or [out, G, gs] where the layer's groups are contiguous runs of columns (g_idx = i // gs).
        """

    def observe(self, x: torch.Tensor) -> None:
        """Sees the layer's input on every forward pass; estimators that calibrate record it."""
        return


ESTIMATORS: dict[str, type[Estimator]] = {}


def register(cls: type[Estimator]) -> type[Estimator]:
    ESTIMATORS[cls.name] = cls
    return cls


class Estimator(ABC):
    """Makes the per-layer estimators of a run and drives whatever they share (refresh schedule, state)."""

    name: ClassVar[str]

    @classmethod
    @abstractmethod
    def from_config(cls, qat: QATConfig, seed: int) -> Estimator:
        """The estimator the recipe's qat section describes."""

    @abstractmethod
    def for_layer(self, name: str, grid: LayerGrid) -> LayerEstimator:
        """The estimator of the layer called ``name`` in the model."""

    def describe(self) -> dict[str, object]:
        return {"name": self.name}

    def setup(self, calibrate: Calibrate) -> None:
        """Called once before training with a function that runs calibration windows through the model."""
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


def make_estimator(qat: QATConfig, seed: int) -> Estimator:
    """The estimator ``qat.estimator`` names, with its options from the same section; checks them."""
    check_estimator(qat.estimator)
    return ESTIMATORS[qat.estimator].from_config(qat, seed)
