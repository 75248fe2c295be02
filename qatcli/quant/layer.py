"""The quantized-layer type: a Linear's grid (spec, per-group scales, zero points, g_idx).

RTN, GPTQ and QAT produce it; checkpoints store it; eval applies it. The rounding rule itself lives in
grid.py, so a LayerQuant only carries the parameters and calls that one definition.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from qatcli.quant.grid import QuantSpec, fake_quantize, packed_bytes, quantize


@dataclass
class LayerQuant:
    """The grid of one quantized Linear: its spec and per-group parameters."""

    spec: QuantSpec
    scales: torch.Tensor  # fp16 [out, G]
    zeros: torch.Tensor  # uint8 [out, G]
    g_idx: torch.Tensor  # int32 [in]
    act_order: bool = False

    def codes(self, weight: torch.Tensor) -> torch.Tensor:
        return quantize(weight, self.scales, self.zeros, self.g_idx, self.spec.maxq)

    def fake_quant(self, weight: torch.Tensor) -> torch.Tensor:
        """The quantized value of ``weight``, computed on its device."""
        dev = weight.device
        return fake_quantize(weight, self.scales.to(dev), self.zeros.to(dev), self.g_idx.to(dev), self.spec.maxq)


def make_layer_quant(
    spec: QuantSpec, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor, act_order: bool = False
) -> LayerQuant:
    """Store parameters in their checkpoint dtypes (the scales are already on the fp16 grid)."""
    return LayerQuant(
        spec=spec,
        scales=scales.to(torch.float16).cpu(),
        zeros=zeros.round().to(torch.uint8).cpu(),
        g_idx=g_idx.to(torch.int32).cpu(),
        act_order=act_order,
    )


@torch.no_grad()
def apply_fake_quant(model: nn.Module, layers: dict[str, LayerQuant]) -> dict[str, torch.Tensor]:
    """Replace each quantized layer's weight by its quantized value; return the latent weights it held."""
    modules = dict(model.named_modules())
    latent = {}
    for name, lq in layers.items():
        weight = modules[name].weight
        latent[name] = weight.detach().clone()
        weight.copy_(lq.fake_quant(weight).to(weight.device))
    return latent


@contextmanager
def fake_quantized(model: nn.Module, layers: dict[str, LayerQuant]) -> Iterator[nn.Module]:
    """The model computing with quantized weights inside the block, its latent weights restored after."""
    latent = apply_fake_quant(model, layers)
    try:
        yield model
    finally:
        modules = dict(model.named_modules())
        with torch.no_grad():
            for name, weight in latent.items():
                modules[name].weight.copy_(weight)


def quantized_bytes(layers: dict[str, LayerQuant]) -> int:
    """Size of the quantized layers in the GPTQ export (qweight, qzeros, scales, g_idx)."""
    return sum(packed_bytes(lq.scales.shape[0], lq.g_idx.numel(), lq.spec) for lq in layers.values())


def average_bits(layers: dict[str, LayerQuant]) -> float:
    """Bits per quantized weight: sum of bits x weights over the layers / their weights (scales not counted)."""
    weights = {name: lq.scales.shape[0] * lq.g_idx.numel() for name, lq in layers.items()}
    total = sum(weights.values())
    return sum(layers[name].spec.bits * n for name, n in weights.items()) / total if total else 0.0
