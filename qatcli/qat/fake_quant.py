"""Fake-quantized Linear layers for QAT: latent weights, learnable per-group scales, integer zero points.

The forward pass is exactly the grid that eval and export use: scales are rounded to fp16 (with a
straight-through gradient for that rounding), q = round_to_grid(w, s, z), W_q = s (q - z). The backward
pass of rounding is the layer's estimator's; the scale gradient is LSQ's, scaled by 1 / sqrt(group numel * Qp).

prepare_qat swaps the target Linear layers for FakeQuantLinear; convert_qat swaps them back and returns
the grid of each, so the trained model is saved as an ordinary qatcli checkpoint.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qatcli.qat.estimators import Estimator, LayerEstimator, LayerGrid
from qatcli.quant.grid import default_g_idx, round_to_grid, to_fp16_grid
from qatcli.quant.layer import LayerQuant, make_layer_quant


def _grouped(
    w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, g_idx: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w with s and z broadcastable to it: [out, G, gs] views for contiguous groups (g_idx None), else per column."""
    if g_idx is None:
        return w.reshape(s.shape[0], s.shape[1], -1), s.unsqueeze(-1), z.unsqueeze(-1)
    return w, s.index_select(1, g_idx), z.index_select(1, g_idx)


class _FakeQuantize(torch.autograd.Function):
    """W_q = s (round_to_grid(w, s, z) - z); backward: the estimator's factor for w, LSQ for s.

    Only w (the parameter itself) and the [out, G] parameters are saved: v = w / s is recomputed in backward
    rather than kept, which would cost one more weight-sized tensor per layer for the whole step.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        w: torch.Tensor,
        s: torch.Tensor,
        z: torch.Tensor,
        g_idx: torch.Tensor | None,
        maxq: int,
        estimator: LayerEstimator,
        scale_grad_factor: float,
    ) -> torch.Tensor:
        w_g, s_g, z_g = _grouped(w, s, z, g_idx)
        ctx.save_for_backward(w, s, z)
        ctx.g_idx, ctx.maxq, ctx.estimator, ctx.factor = g_idx, maxq, estimator, scale_grad_factor
        # in place on round_to_grid's fresh result: each new weight-sized tensor costs page faults on CPU
        return round_to_grid(w_g, s_g, z_g, maxq).sub_(z_g).mul_(s_g).reshape(w.shape)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        w, s, z = ctx.saved_tensors
        w_g, s_g, z_g = _grouped(w, s, z, ctx.g_idx)
        grad = grad.reshape(w_g.shape)
        v = w_g / s_g
        rounded = torch.round(v)
        level = (rounded + z_g).clamp_(0, ctx.maxq).sub_(z_g)  # q - z: round(v) inside the range, the clamp outside
        inside = level == rounded
        factor = ctx.estimator.grad_factor(v)
        grad_w = grad * inside if isinstance(factor, float) and factor == 1.0 else (grad * factor).mul_(inside)
        grad_w = grad_w.reshape(w.shape)
        # d W_q / d s = level - v inside the range, level outside (in place: v is not needed any more)
        grad_s_elem = level.sub_(v.mul_(inside)).mul_(grad)
        if ctx.g_idx is None:
            grad_s = grad_s_elem.sum(-1)
        else:
            grad_s = torch.zeros(s.shape, device=w.device, dtype=grad.dtype)
            grad_s.index_add_(1, ctx.g_idx, grad_s_elem)
        return grad_w, grad_s * ctx.factor, None, None, None, None, None


class FakeQuantLinear(nn.Module):
    """A Linear computing with its fake-quantized weight. Build it on its device: its estimator holds its tensors."""

    def __init__(self, linear: nn.Linear, lq: LayerQuant, estimator: Estimator, name: str) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        device = linear.weight.device
        self.spec = lq.spec
        self.act_order = lq.act_order
        self.scales = nn.Parameter(lq.scales.float().to(device))
        self.register_buffer("zeros", lq.zeros.float().to(device))
        self.register_buffer("g_idx", lq.g_idx.long().to(device))
        groups = self.scales.shape[1]
        group_numel = self.in_features // groups
        # contiguous groups take the reshaped path: no per-column gather of scales and zeros
        self.contiguous = torch.equal(self.g_idx, default_g_idx(self.in_features, group_numel, device).long())
        positive_levels = self.spec.maxq - (self.spec.maxq + 1) // 2 if self.spec.sym else self.spec.maxq
        self.scale_grad_factor = 1 / math.sqrt(group_numel * max(positive_levels, 1))
        # not kept here: under FSDP this layer's weight is replaced by its shard, and a reference would keep the
        # whole weight alive (only the jacobian estimator holds the grid, and it runs in one process)
        self.estimator = estimator.for_layer(name, self.grid())
        # "train": the fake-quantized weight; "latent": the latent weight itself; "probe": the quantized
        # weight as a leaf whose .grad is dL/dW_q (the landscape recorder's inward gradient)
        self.mode = "train"
        self.probe_weight: torch.Tensor | None = None

    def grid(self) -> LayerGrid:
        """The layer's weight and grid, as an estimator reads them (made anew, not kept: see __init__)."""
        return LayerGrid(self.weight, self.scales, self.zeros, self.g_idx, self.spec.maxq)

    def quantized_weight(self) -> torch.Tensor:
        s = self.scales + (to_fp16_grid(self.scales) - self.scales).detach()
        g_idx = None if self.contiguous else self.g_idx
        return _FakeQuantize.apply(
            self.weight, s, self.zeros, g_idx, self.spec.maxq, self.estimator, self.scale_grad_factor
        )

    def weight_for(self, x: torch.Tensor) -> torch.Tensor:
        """The weight the forward pass multiplies ``x`` by, in the current mode (the estimator sees ``x`` in
        "train"). The chunked output head (qatcli/data/head.py) takes lm_head's weight once per batch from here."""
        if self.mode == "latent":
            return self.weight
        if self.mode == "probe":
            self.probe_weight = self.quantized_weight().detach().requires_grad_(True)
            return self.probe_weight
        self.estimator.observe(x)
        return self.quantized_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight_for(x).to(x.dtype), bias)

    def codes(self) -> torch.Tensor:
        """The integer codes of the current latent weights on the current grid."""
        with torch.no_grad():
            return self.layer_quant().codes(self.weight.detach())

    def layer_quant(self) -> LayerQuant:
        return make_layer_quant(self.spec, to_fp16_grid(self.scales.detach()), self.zeros, self.g_idx, self.act_order)


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def prepare_qat(model: nn.Module, layers: dict[str, LayerQuant], estimator: Estimator) -> dict[str, FakeQuantLinear]:
    """Replace each layer in ``layers`` by a FakeQuantLinear sharing its weight (with its own per-layer estimator
    from ``estimator``); return them by name."""
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
