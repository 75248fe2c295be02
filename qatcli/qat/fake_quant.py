"""Fake-quantized Linear layers for QAT: latent weights, learnable per-group scales, integer zero points.

The forward pass is exactly the grid that eval and export use: scales are rounded to fp16 (with a
straight-through gradient for that rounding), q = round_to_grid(w, s, z), W_q = s (q - z). The backward
pass of rounding is the estimator's; the scale gradient is LSQ's, scaled by 1 / sqrt(group numel * Qp).

prepare_qat swaps the target Linear layers for FakeQuantLinear; convert_qat swaps them back and returns
the grid of each, so the trained model is saved as an ordinary qatcli checkpoint.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qatcli.qat.estimators import Estimator
from qatcli.quant.grid import round_to_grid, to_fp16_grid
from qatcli.quant.layer import LayerQuant, make_layer_quant


class _FakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        w: torch.Tensor,
        s: torch.Tensor,
        z: torch.Tensor,
        g_idx: torch.Tensor,
        maxq: int,
        layer: FakeQuantLinear,
        scale_grad_factor: float,
    ) -> torch.Tensor:
        s_col, z_col = s[:, g_idx], z[:, g_idx]
        q = round_to_grid(w, s_col, z_col, maxq)
        ctx.save_for_backward(w, s_col, z_col, g_idx)
        ctx.maxq, ctx.layer, ctx.factor, ctx.groups = maxq, layer, scale_grad_factor, s.shape[1]
        return s_col * (q - z_col)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        w, s_col, z_col, g_idx = ctx.saved_tensors
        v = w / s_col
        r = torch.round(v) + z_col
        inside = (r >= 0) & (r <= ctx.maxq)
        grad_w = grad * ctx.layer.estimator.factor(v, ctx.layer) * inside
        level = torch.clamp(r, 0, ctx.maxq) - z_col
        grad_s_elem = grad * torch.where(inside, torch.round(v) - v, level)
        grad_s = torch.zeros(w.shape[0], ctx.groups, device=w.device, dtype=grad.dtype)
        grad_s.index_add_(1, g_idx, grad_s_elem)
        return grad_w, grad_s * ctx.factor, None, None, None, None, None


class FakeQuantLinear(nn.Module):
    def __init__(self, linear: nn.Linear, lq: LayerQuant, estimator: Estimator, name: str = "") -> None:
        super().__init__()
        self.name = name  # the layer's name in the model: estimators with per-layer state key on it
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        device = linear.weight.device
        self.spec = lq.spec
        self.act_order = lq.act_order
        self.estimator = estimator
        self.scales = nn.Parameter(lq.scales.float().to(device))
        self.register_buffer("zeros", lq.zeros.float().to(device))
        self.register_buffer("g_idx", lq.g_idx.long().to(device))
        group_numel = self.in_features // self.scales.shape[1]
        positive_levels = self.spec.maxq - (self.spec.maxq + 1) // 2 if self.spec.sym else self.spec.maxq
        self.scale_grad_factor = 1 / math.sqrt(group_numel * max(positive_levels, 1))

    def quantized_weight(self) -> torch.Tensor:
        s = self.scales + (to_fp16_grid(self.scales) - self.scales).detach()
        return _FakeQuantize.apply(self.weight, s, self.zeros, self.g_idx, self.spec.maxq, self, self.scale_grad_factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def layer_quant(self) -> LayerQuant:
        return make_layer_quant(self.spec, to_fp16_grid(self.scales.detach()), self.zeros, self.g_idx, self.act_order)


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def prepare_qat(model: nn.Module, layers: dict[str, LayerQuant], estimator: Estimator) -> dict[str, FakeQuantLinear]:
    """Replace each layer in ``layers`` by a FakeQuantLinear sharing its weight; return them by name."""
    fakes = {}
    for name, lq in layers.items():
        fakes[name] = FakeQuantLinear(model.get_submodule(name), lq, estimator, name)
        _swap(model, name, fakes[name])
    return fakes


def convert_qat(model: nn.Module, fakes: dict[str, FakeQuantLinear]) -> dict[str, LayerQuant]:
    """Put plain Linear layers (holding the latent weights) back; return the learned grid of each."""
    layers = {}
    for name, fake in fakes.items():
        linear = nn.Linear(fake.in_features, fake.out_features, bias=fake.bias is not None)
        linear.weight = fake.weight
        linear.bias = fake.bias
        _swap(model, name, linear)
        layers[name] = fake.layer_quant()
    return layers
