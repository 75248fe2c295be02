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
from qatcli.qat.fused import fake_quantize_backward, grouped_backward, grouped_forward
from qatcli.quant.grid import default_g_idx, fake_quantize_dense, to_fp16_grid
from qatcli.quant.layer import LayerQuant, make_layer_quant


class _FakeQuantize(torch.autograd.Function):
    """W_q = s (round_to_grid(w, s, z) - z); backward: the estimator's factor for w, LSQ for s.

    Only w (the parameter itself) and the [out, G] parameters are saved (qatcli/qat/fused.py recomputes the rest).
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
        fused: bool,
    ) -> torch.Tensor:
        ctx.save_for_backward(w, s, z)
        ctx.g_idx, ctx.maxq, ctx.estimator, ctx.factor, ctx.fused = g_idx, maxq, estimator, scale_grad_factor, fused
        if g_idx is None:
            s_g, z_g = s.unsqueeze(-1), z.unsqueeze(-1)
            return grouped_forward(w.reshape(*s.shape, -1), s_g, z_g, maxq, fused).reshape(w.shape)
        return fake_quantize_dense(w, s.index_select(1, g_idx), z.index_select(1, g_idx), maxq)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        w, s, z = ctx.saved_tensors
        g_idx = ctx.g_idx
        if g_idx is None:
            w_g = w.reshape(*s.shape, -1)
            grad_w, grad_s = grouped_backward(
                w_g, s.unsqueeze(-1), z.unsqueeze(-1), grad.reshape(w_g.shape), ctx.maxq, ctx.estimator, ctx.fused
            )
        else:  # columns in act-order groups: per-column scales, and the scale gradient gathered back per group
            s_c, z_c = s.index_select(1, g_idx), z.index_select(1, g_idx)
            grad_w, grad_s_elem = fake_quantize_backward(w, s_c, z_c, grad, ctx.maxq, ctx.estimator)
            grad_s = torch.zeros(s.shape, device=w.device, dtype=grad.dtype).index_add_(1, g_idx, grad_s_elem)
        return grad_w.reshape(w.shape), grad_s * ctx.factor, None, None, None, None, None, None


class FakeQuantLinear(nn.Module):
    """A Linear computing with its fake-quantized weight. Build it on its device: its estimator holds its tensors."""

    def __init__(self, linear: nn.Linear, lq: LayerQuant, estimator: Estimator, name: str, fused: bool = True) -> None:
        super().__init__()
        self.fused = fused  # compiled elementwise kernels (qatcli/qat/fused.py)
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
        return LayerGrid(self.weight, self.scales, self.zeros, self.g_idx, self.spec.maxq, self.fused)

    def quantized_weight(self) -> torch.Tensor:
        s = self.scales + (to_fp16_grid(self.scales) - self.scales).detach()
        g_idx = None if self.contiguous else self.g_idx
        return _FakeQuantize.apply(
            self.weight, s, self.zeros, g_idx, self.spec.maxq, self.estimator, self.scale_grad_factor, self.fused
        )

    def weight_for(self, x: torch.Tensor) -> torch.Tensor:
        """The weight the forward pass multiplies ``x`` by, in the current mode (the estimator sees ``x`` in
        "train"). The chunked output head (qatcli/evaluation/head.py) takes lm_head's weight once per batch from
        here."""
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


def quantized_weights(layers: dict[str, LayerQuant]) -> int:
    """How many weights the layers hold (out x in each)."""
    return sum(lq.scales.shape[0] * lq.g_idx.numel() for lq in layers.values())


def prepare_qat(
    model: nn.Module, layers: dict[str, LayerQuant], estimator: Estimator, fused: bool = True
) -> dict[str, FakeQuantLinear]:
    """Replace each layer in ``layers`` by a FakeQuantLinear sharing its weight (with its own per-layer estimator
    from ``estimator``, and compiled kernels where ``fused``); return them by name."""
    fakes = {}
    for name, lq in layers.items():
        fakes[name] = FakeQuantLinear(model.get_submodule(name), lq, estimator, name, fused)
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
