"""jacobian: a learned group-wise surrogate B of the quantizer's local sensitivity (this project's reading of JacQuant).

dL/dw = B[row, group] * dL/dW_q inside the clamp range. B has the shape of the scales and is refreshed every
``update_every`` steps from two estimates per (row, group):

- Dither: the slope of the dithered quantizer E_u[Q(w + u)], u ~ U(-delta s/2, delta s/2), whose closed form is
  (Q(w + delta s/2) - Q(w - delta s/2)) / (delta s), averaged over the group: how many of its weights sit
  close enough to a decision boundary to move.
- Probe: random sign probes d of size eps * s; the least-squares slope, per (row, group), of the actual change
  of the layer's output, (Q(W + eps s d) - Q(W)) X, against the linear change eps s d X, on cached calibration
  inputs X. The slope only needs X^T X restricted to each group, so that block-diagonal Gram is what is cached.

The new estimate blend * dither + (1 - blend) * probe is clipped to [clip_min, clip_max] and smoothed across
refreshes: B = ema * B + (1 - ema) * new. B starts at 1 (ste) and clip_min = clip_max = 1 keeps it there.

Each layer's B and Gram live in its JacobianLayer; the Jacobian estimator owns the refresh schedule, the
calibration pass and the run's state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from qatcli.config import JacobianConfig, QATConfig
from qatcli.errors import QatcliError
from qatcli.qat.estimators.base import Calibrate, Estimator, LayerEstimator, LayerGrid, register
from qatcli.quant.grid import fake_quantize_dense, to_fp16_grid

Quantizer = Callable[[torch.Tensor], torch.Tensor]


def dither_slope(quantizer: Quantizer, w: torch.Tensor, s: torch.Tensor, width: float) -> torch.Tensor:
    """d/dw E_u[Q(w + u)] for u ~ U(-width s/2, width s/2), elementwise (s broadcast to w)."""
    half = width * s / 2
    return (quantizer(w + half) - quantizer(w - half)) / (width * s)


def group_order(g_idx: torch.Tensor) -> torch.Tensor:
    """Column order that puts each group's columns next to each other (groups may be scattered by act-order)."""
    return torch.argsort(g_idx.long(), stable=True)


def group_mean(x: torch.Tensor, g_idx: torch.Tensor, groups: int) -> torch.Tensor:
    """Mean of x ([out, in]) over the columns of each group: [out, groups]."""
    total = torch.zeros(x.shape[0], groups, device=x.device, dtype=x.dtype)
    total.index_add_(1, g_idx.long(), x)
    return total / (x.shape[1] // groups)


def probe_slope(
    quantizer: Quantizer,
    w: torch.Tensor,
    s: torch.Tensor,
    gram: torch.Tensor,
    order: torch.Tensor,
    eps: float,
    probes: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Least-squares slope of the output change against its linearization, per (row, group): [out, G].

    ``gram`` is [G, gs, gs], the Gram X^T X of each group's input columns (columns in ``order``). Groups whose
    inputs are all zero have no slope to measure and get 1.
    """
    out_features = w.shape[0]
    groups, size = gram.shape[0], gram.shape[1]
    base = quantizer(w)
    num = torch.zeros(out_features, groups, device=w.device)
    den = torch.zeros(out_features, groups, device=w.device)
    for _ in range(probes):
        signs = torch.randint(0, 2, w.shape, generator=generator, device=w.device).float() * 2 - 1
        step = eps * s * signs
        change = (quantizer(w + step) - base)[:, order].reshape(out_features, groups, size)
        linear = step[:, order].reshape(out_features, groups, size)
        h_linear = torch.einsum("gij,ogj->ogi", gram, linear)
        num += (change * h_linear).sum(-1)
        den += (linear * h_linear).sum(-1)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.ones_like(den))


def check_config(c: JacobianConfig) -> None:
    checks = [
        (c.update_every >= 1, f"update_every must be positive, got {c.update_every}"),
        (c.dither_width > 0, f"dither_width must be positive, got {c.dither_width}"),
        (c.probes >= 1, f"probes must be positive, got {c.probes}"),
        (c.probe_step > 0, f"probe_step must be positive, got {c.probe_step}"),
        (0 <= c.blend <= 1, f"blend must be in [0, 1], got {c.blend}"),
        (0 <= c.ema < 1, f"ema must be in [0, 1), got {c.ema}"),
        (0 <= c.clip_min <= c.clip_max, f"need 0 <= clip_min <= clip_max, got {c.clip_min} and {c.clip_max}"),
        (c.calib_batches >= 1, f"calib_batches must be positive, got {c.calib_batches}"),
    ]
    for ok, message in checks:
        if not ok:
            raise QatcliError(f"jacobian: {message}")


class JacobianLayer(LayerEstimator):
    """One layer's B ([out, G]) and the block-diagonal Gram of its calibration inputs ([G, gs, gs])."""

    def __init__(self, grid: LayerGrid, start: float) -> None:
        self.grid = grid
        self.b = torch.full(grid.scales.shape, start, dtype=torch.float32, device=grid.scales.device)
        self.order = group_order(grid.g_idx)
        self.gram: torch.Tensor | None = None
        self.capturing = False

    def grad_factor(self, v: torch.Tensor) -> torch.Tensor:
        return self.b.unsqueeze(-1) if v.dim() == 3 else self.b.index_select(1, self.grid.g_idx)

    def start_capture(self) -> None:
        groups, columns = self.b.shape[1], self.grid.g_idx.numel()
        size = columns // groups
        self.gram = torch.zeros(groups, size, size, device=self.b.device)
        self.capturing = True

    def observe(self, x: torch.Tensor) -> None:
        if not self.capturing or self.gram is None:
            return
        x = x.detach().reshape(-1, x.shape[-1]).float()[:, self.order]
        x = x.reshape(x.shape[0], self.gram.shape[0], -1)
        self.gram += torch.einsum("ngi,ngj->gij", x, x)

    @torch.no_grad()
    def estimate(self, c: JacobianConfig, dither: bool, probe: bool, probe_seed: int) -> torch.Tensor:
        """This refresh's clipped blend of Dither and Probe: [out, G]."""
        g = self.grid
        w = g.weight.detach().float()
        s = to_fp16_grid(g.scales.detach()).index_select(1, g.g_idx)
        z = g.zeros.index_select(1, g.g_idx)

        def quantizer(x: torch.Tensor) -> torch.Tensor:
            return fake_quantize_dense(x, s, z, g.maxq)

        new = torch.zeros_like(self.b)
        if dither:
            new += c.blend * group_mean(dither_slope(quantizer, w, s, c.dither_width), g.g_idx, self.b.shape[1])
        if probe:
            if self.gram is None:
                raise RuntimeError("jacobian: Probe needs the calibration Gram, collected at the first refresh")
            generator = torch.Generator(device=w.device)
            generator.manual_seed(probe_seed)
            slope = probe_slope(quantizer, w, s, self.gram, self.order, c.probe_step, c.probes, generator)
            new += (1 - c.blend) * slope
        return new.clamp(c.clip_min, c.clip_max)


@register
class Jacobian(Estimator):
    name = "jacobian"

    def __init__(self, config: JacobianConfig, seed: int) -> None:
        check_config(config)
        self.config, self.seed = config, seed
        self.layers: dict[str, JacobianLayer] = {}
        self.calibrate: Calibrate = lambda batches: None
        self.refreshes = 0

    @classmethod
    def from_config(cls, qat: QATConfig, seed: int) -> Jacobian:
        return cls(qat.jacobian, seed)

    @property
    def uses_probe(self) -> bool:
        return self.config.blend < 1 and self.config.clip_min < self.config.clip_max

    @property
    def uses_dither(self) -> bool:
        return self.config.blend > 0 and self.config.clip_min < self.config.clip_max

    def describe(self) -> dict[str, object]:
        return {"name": self.name, **dataclasses.asdict(self.config)}

    def for_layer(self, name: str, grid: LayerGrid) -> JacobianLayer:
        start = min(max(1.0, self.config.clip_min), self.config.clip_max)  # ste until the first refresh
        self.layers[name] = JacobianLayer(grid, start)
        return self.layers[name]

    def setup(self, calibrate: Calibrate) -> None:
        self.calibrate = calibrate

    def before_step(self, step: int) -> None:
        if step % self.config.update_every == 0:
            self.refresh(step)

    @torch.no_grad()
    def collect_grams(self) -> None:
        """Pass the calibration windows through the model once, every layer recording its input Gram."""
        for layer in self.layers.values():
            layer.start_capture()
        try:
            self.calibrate(self.config.calib_batches)
        finally:
            for layer in self.layers.values():
                layer.capturing = False

    def estimate(self, name: str, step: int) -> torch.Tensor:
        """Layer ``name``'s fresh estimate at ``step``, before smoothing."""
        probe_seed = self.seed * 1_000_003 + step
        return self.layers[name].estimate(self.config, self.uses_dither, self.uses_probe, probe_seed)

    @torch.no_grad()
    def refresh(self, step: int) -> None:
        if self.uses_probe and any(layer.gram is None for layer in self.layers.values()):
            self.collect_grams()  # first refresh of a run (a resumed run loads them)
        ema = self.config.ema
        for name, layer in self.layers.items():
            new = self.estimate(name, step)
            layer.b = new if self.refreshes == 0 else ema * layer.b + (1 - ema) * new
        self.refreshes += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "b": {name: layer.b.cpu() for name, layer in self.layers.items()},
            "grams": {name: layer.gram.cpu() for name, layer in self.layers.items() if layer.gram is not None},
            "refreshes": self.refreshes,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, layer in self.layers.items():
            layer.b = state["b"][name].to(layer.b.device)
            gram = state["grams"].get(name)
            layer.gram = None if gram is None else gram.to(layer.b.device)
        self.refreshes = state["refreshes"]
