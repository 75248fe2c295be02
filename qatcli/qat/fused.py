"""Fake quantization's elementwise work, run as plain PyTorch or as torch.compile'd kernels.

Plain PyTorch makes one pass over a weight-sized tensor per operation (division, rounding, clamp, the range mask,
the estimator's factor, the scale gradient), about ten a layer in each step; compiled, the forward and the
backward are one pass each. That difference was most of what QAT added to a training step on the CPU (docs/
results.md, step time). Both ways run the functions below, so they compute the same thing: the forward bit for
bit, the backward up to the order of the scale gradient's sums and the math library's cos (fourier).

Compiled kernels take shapes as symbols (one compilation per estimator class, not per layer shape). Where
compiling fails (no C++ compiler on a CPU-only machine, say), a one-line warning says so and plain PyTorch runs.
"""

from __future__ import annotations

import torch

from qatcli.qat.compiled import run_fused
from qatcli.qat.estimators import LayerEstimator
from qatcli.quant.grid import fake_quantize_dense


def fake_quantize_backward(
    w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, grad: torch.Tensor, maxq: int, estimator: LayerEstimator
) -> tuple[torch.Tensor, torch.Tensor]:
    """dL/dw (the estimator's factor inside the clamp range, 0 outside) and dL/ds per element, both w's shape.

    v = w / s is recomputed here rather than kept from the forward, which would hold one more weight-sized tensor
    per layer for the whole step.
    """
    v = w / s
    rounded = torch.round(v)
    level = (rounded + z).clamp_(0, maxq).sub_(z)  # q - z: round(v) inside the range, the clamp outside
    inside = level == rounded
    factor = estimator.grad_factor(v)
    grad_w = grad * inside if isinstance(factor, float) and factor == 1.0 else (grad * factor).mul_(inside)
    # d W_q / d s = level - v inside the range, level outside (in place: v is not needed any more)
    grad_s = level.sub_(v.mul_(inside)).mul_(grad)
    return grad_w, grad_s


def _grouped_backward(
    w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, grad: torch.Tensor, maxq: int, estimator: LayerEstimator
) -> tuple[torch.Tensor, torch.Tensor]:
    """fake_quantize_backward on [out, G, gs] groups, with the scale gradient summed over each group: [out, G]."""
    grad_w, grad_s = fake_quantize_backward(w, s, z, grad, maxq, estimator)
    return grad_w, grad_s.sum(-1)


def grouped_forward(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, maxq: int, fused: bool) -> torch.Tensor:
    """The grid's fake_quantize_dense on [out, G, gs] groups with [out, G, 1] scales and zeros, compiled where
    ``fused``."""
    return run_fused(fake_quantize_dense, fused, w, s, z, maxq)


def grouped_backward(
    w: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor,
    grad: torch.Tensor,
    maxq: int,
    estimator: LayerEstimator,
    fused: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dL/dw ([out, G, gs]) and dL/ds ([out, G]) on contiguous groups, compiled where ``fused``."""
    return run_fused(_grouped_backward, fused, w, s, z, grad, maxq, estimator)
