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
import math
from typing import Any

import torch

from qatcli.config import JacobianConfig, QATConfig
from qatcli.errors import QatcliError
from qatcli.qat.compiled import run_fused
from qatcli.qat.estimators.base import Calibrate, Estimator, LayerEstimator, LayerGrid, register
from qatcli.quant.grid import round_to_grid, to_fp16_grid


def dither_slope(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, maxq: int, width: float) -> torch.Tensor:
    """d/dw E_u[Q(w + u)] for u ~ U(-width s/2, width s/2), elementwise (s and z broadcast to w).

    Q(w) = s (q(w) - z), so (Q(w + half) - Q(w - half)) / (width s) is the change of the integer level over width.
    """
    half = width * s / 2
    return (round_to_grid(w + half, s, z, maxq) - round_to_grid(w - half, s, z, maxq)) / width


def _dither_group_slope(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, maxq: int, width: float) -> torch.Tensor:
    return dither_slope(w, s, z, maxq, width).mean(-1)


def group_order(g_idx: torch.Tensor) -> torch.Tensor:
    """Column order that puts each group's columns next to each other (groups may be scattered by act-order)."""
    return torch.argsort(g_idx.long(), stable=True)


SIGN_BITS = 31  # random bits in one draw of the generator (int32, non-negative)


def random_signs(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Independent +1 / -1 with equal odds: float32 of ``shape``.

    Each draw of the generator gives SIGN_BITS signs: one draw per sign was most of a refresh's time on the CPU.
    """
    total = math.prod(shape)
    draws = torch.randint(0, 2**SIGN_BITS, (-(-total // SIGN_BITS), 1), generator=generator, device=device)
    shifts = torch.arange(SIGN_BITS, device=device)
    bits = (draws.int() >> shifts.int()) & 1
    return bits.reshape(-1)[:total].reshape(shape).float().mul_(2).sub_(1)


def _probe_terms(
    w: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor,
    maxq: int,
    eps: float,
    signs: torch.Tensor,
    h_signs: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One probe's numerator and denominator sums of probe_slope, per (row, group), in units of s."""
    change = round_to_grid(w + eps * s * signs, s, z, maxq) - round_to_grid(w, s, z, maxq)
    return (change * h_signs).sum(-1), eps * (signs * h_signs).sum(-1)


def probe_slope(
    w: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor,
    maxq: int,
    gram: torch.Tensor,
    eps: float,
    probes: int,
    generator: torch.Generator,
    fused: bool = False,
) -> torch.Tensor:
    """Least-squares slope of the output change against its linearization, per (row, group): [out, G].

    w is [out, G, gs] (each group's columns together), s and z [out, G, 1]; ``gram`` is [G, gs, gs], the Gram
    X^T X of each group's input columns. A probe d moves w by eps s d. Since Q(w) = s (q(w) - z), the output
    changes by s (q(w + eps s d) - q(w)) X against the linear eps s d X, and s, constant over a group, cancels
    from the slope. Groups whose inputs are all zero get 1.
    """
    num = torch.zeros(w.shape[:2], device=w.device)
    den = torch.zeros(w.shape[:2], device=w.device)
    for _ in range(probes):
        signs = random_signs(tuple(w.shape), generator, w.device)
        h_signs = torch.einsum("gij,ogj->ogi", gram, signs)
        n, d = run_fused(_probe_terms, fused, w, s, z, maxq, eps, signs, h_signs)
        num += n
        den += d
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
        order = group_order(grid.g_idx)
        # contiguous groups (no act-order) need no gather: a reshape puts each group's columns together
        self.order = None if torch.equal(order, torch.arange(order.numel(), device=order.device)) else order
        self.gram: torch.Tensor | None = None
        self.capturing = False

    def grad_factor(self, v: torch.Tensor) -> torch.Tensor:
        return self.b.unsqueeze(-1) if v.dim() == 3 else self.b.index_select(1, self.grid.g_idx)

    def grouped(self, x: torch.Tensor) -> torch.Tensor:
        """x ([..., in]) with each group's columns together: [..., G, gs]."""
        if self.order is not None:
            x = x[..., self.order]
        return x.reshape(*x.shape[:-1], self.b.shape[1], -1)

    def start_capture(self) -> None:
        groups, columns = self.b.shape[1], self.grid.g_idx.numel()
        size = columns // groups
        self.gram = torch.zeros(groups, size, size, device=self.b.device)
        self.capturing = True

    def observe(self, x: torch.Tensor) -> None:
        if not self.capturing or self.gram is None:
            return
        x = self.grouped(x.detach().reshape(-1, x.shape[-1]).float())
        self.gram += torch.einsum("ngi,ngj->gij", x, x)

    @torch.no_grad()
    def estimate(self, c: JacobianConfig, dither: bool, probe: bool, probe_seed: int) -> torch.Tensor:
        """This refresh's clipped blend of Dither and Probe: [out, G]."""
        g = self.grid
        w = self.grouped(g.weight.detach().float())
        s = to_fp16_grid(g.scales.detach()).unsqueeze(-1)
        z = g.zeros.unsqueeze(-1)
        new = torch.zeros_like(self.b)
        if dither:
            new += c.blend * run_fused(_dither_group_slope, g.fused, w, s, z, g.maxq, c.dither_width)
        if probe:
            if self.gram is None:
                raise RuntimeError("jacobian: Probe needs the calibration Gram, collected at the first refresh")
            generator = torch.Generator(device=w.device)
            generator.manual_seed(probe_seed)
            slope = probe_slope(w, s, z, g.maxq, self.gram, c.probe_step, c.probes, generator, g.fused)
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
