"""MARS-style variance reduction for any optimizer (Yuan et al., "MARS", 2024; its approximate form).

Before the optimizer step each gradient g_t is replaced by the corrected c_t = g_t + gamma * beta1 / (1 - beta1)
* (g_t - g_{t-1}): the difference of consecutive stochastic gradients acts as a control variate (MARS evaluates
it on the same batch; the approximate form reuses the previous step's gradient, which costs no extra pass).
Gradient clipping then applies to c_t, as MARS clips the corrected gradient.
"""

from __future__ import annotations

from typing import Any

import torch


class GradientCorrection:
    def __init__(self, params: list[torch.Tensor], gamma: float, beta1: float) -> None:
        self.params = params
        self.weight = gamma * beta1 / (1 - beta1)
        self.previous: list[torch.Tensor | None] = [None] * len(params)

    @torch.no_grad()
    def apply(self) -> None:
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            current = p.grad.clone()
            if self.previous[i] is not None:
                p.grad.add_(current - self.previous[i], alpha=self.weight)
            self.previous[i] = current

    def state_dict(self) -> dict[str, Any]:
        return {"previous": [None if g is None else g.cpu() for g in self.previous]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.previous = [
            None if g is None else g.to(p.device) for g, p in zip(state["previous"], self.params, strict=True)
        ]
