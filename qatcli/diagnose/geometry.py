"""The basin measurements of a quantized point, for any loss over a set of weight tensors.

A point is a dict name -> tensor (the quantized layers' weights). ``loss`` gives the loss with the weights
set to a point; ``loss_and_grad`` also its gradient with respect to them. The measurements:

- the profile of the loss along the segment w(t) = w_fp + t (w_q - w_fp), t from 0 past 1, which shows
  whether rounding left the full-precision basin (a rise towards t = 1) or stayed inside it;
- the gap L(w_q) - L(w_fp);
- each layer's Hessian-weighted distance tr(dW H dW^T), H = 2/N sum x x^T of the layer's inputs (GPTQ's
  objective: the output error the layer's rounding causes);
- the inward component of the gradient at w_q: the cosine between the descent direction -g and the way back
  d = w_fp - w_q, and the length of -g along d. A positive cosine means that training from w_q moves it
  back towards the full-precision basin.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Point = dict[str, torch.Tensor]
LossFn = Callable[[Point], float]
LossGradFn = Callable[[Point], tuple[float, Point]]


def along(start: Point, end: Point, t: float) -> Point:
    """The point start + t (end - start)."""
    return {name: start[name] + t * (end[name] - start[name]) for name in start}


def segment_profile(loss: LossFn, start: Point, end: Point, ts: list[float]) -> list[float]:
    """The loss at start + t (end - start) for each t."""
    return [loss(along(start, end, t)) for t in ts]


@dataclass(frozen=True)
class Inward:
    cosine: float  # cos(-g, w_fp - w_q)
    projected: float  # <-g, w_fp - w_q> / |w_fp - w_q|
    grad_norm: float
    distance: float  # |w_fp - w_q|


def _dot(a: Point, b: Point) -> float:
    return sum(float((a[k].double() * b[k].double()).sum()) for k in a)


def inward_component(loss_and_grad: LossGradFn, fp: Point, quantized: Point) -> Inward:
    """How much of the descent direction at ``quantized`` points back to ``fp``."""
    _, grad = loss_and_grad(quantized)
    back = {name: fp[name] - quantized[name] for name in fp}
    descent = {name: -grad[name] for name in grad}
    distance, grad_norm = _dot(back, back) ** 0.5, _dot(descent, descent) ** 0.5
    along_back = _dot(descent, back)
    if distance == 0 or grad_norm == 0:
        return Inward(0.0, 0.0, grad_norm, distance)
    return Inward(along_back / (grad_norm * distance), along_back / distance, grad_norm, distance)


def hessian_distance(fp: Point, quantized: Point, hessians: dict[str, torch.Tensor]) -> dict[str, float]:
    """tr(dW H dW^T) per layer, dW = W_q - W_fp: the expected squared output error of the layer's rounding."""
    out = {}
    for name, H in hessians.items():
        dw = (quantized[name] - fp[name]).to(H.device, torch.float64)
        out[name] = float(((dw @ H.double()) * dw).sum())
    return out
