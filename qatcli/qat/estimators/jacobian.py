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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from qatcli.errors import QatcliError
from qatcli.qat.estimators.base import Estimator, register
from qatcli.quant.grid import fake_quantize_dense, to_fp16_grid

if TYPE_CHECKING:
    from qatcli.qat.fake_quant import FakeQuantLinear

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


def collect_grams(fakes: dict[str, FakeQuantLinear], run_calibration: Callable[[], None]) -> dict[str, torch.Tensor]:
    """Block-diagonal input Gram of every layer ([G, gs, gs], groups in group_order) over the calibration passes."""
    grams: dict[str, torch.Tensor] = {}

    def hook(name: str, fake: FakeQuantLinear) -> Callable[..., None]:
        order = group_order(fake.g_idx)
        groups = fake.scales.shape[1]

        def capture(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().reshape(-1, fake.in_features).float()[:, order]
            x = x.reshape(x.shape[0], groups, -1)
            gram = torch.einsum("ngi,ngj->gij", x, x)
            grams[name] = grams[name] + gram if name in grams else gram

        return capture

    handles = [fake.register_forward_pre_hook(hook(name, fake)) for name, fake in fakes.items()]
    try:
        with torch.no_grad():
            run_calibration()
    finally:
        for handle in handles:
            handle.remove()
    return grams


@register
class Jacobian(Estimator):
    name = "jacobian"

    def __init__(
        self,
        update_every: int = 10,
        dither_width: float = 0.5,
        probes: int = 2,
        probe_step: float = 0.5,
        blend: float = 0.5,
        ema: float = 0.5,
        clip_min: float = 0.05,
        clip_max: float = 2.0,
        calib_batches: int = 4,
        seed: int = 0,
    ) -> None:
        checks = [
            (update_every >= 1, f"update_every must be positive, got {update_every}"),
            (dither_width > 0, f"dither_width must be positive, got {dither_width}"),
            (probes >= 1, f"probes must be positive, got {probes}"),
            (probe_step > 0, f"probe_step must be positive, got {probe_step}"),
            (0 <= blend <= 1, f"blend must be in [0, 1], got {blend}"),
            (0 <= ema < 1, f"ema must be in [0, 1), got {ema}"),
            (0 <= clip_min <= clip_max, f"need 0 <= clip_min <= clip_max, got {clip_min} and {clip_max}"),
            (calib_batches >= 1, f"calib_batches must be positive, got {calib_batches}"),
        ]
        for ok, message in checks:
            if not ok:
                raise QatcliError(f"jacobian: {message}")
        self.update_every, self.dither_width = update_every, dither_width
        self.probes, self.probe_step = probes, probe_step
        self.blend, self.ema, self.clip_min, self.clip_max = blend, ema, clip_min, clip_max
        self.calib_batches, self.seed = calib_batches, seed
        self.fakes: dict[str, FakeQuantLinear] = {}
        self.run_calibration: Callable[[], None] = lambda: None
        self.b: dict[str, torch.Tensor] = {}
        self.grams: dict[str, torch.Tensor] = {}
        self.refreshes = 0

    @property
    def uses_probe(self) -> bool:
        return self.blend < 1 and self.clip_min < self.clip_max

    @property
    def uses_dither(self) -> bool:
        return self.blend > 0 and self.clip_min < self.clip_max

    def describe(self) -> dict[str, object]:
        keys = ("update_every", "dither_width", "probes", "probe_step", "blend", "ema", "clip_min", "clip_max")
        return {"name": self.name, **{k: getattr(self, k) for k in (*keys, "calib_batches")}}

    def setup(self, fakes: dict[str, FakeQuantLinear], run_calibration: Callable[[], None]) -> None:
        self.fakes, self.run_calibration = fakes, run_calibration
        start = min(max(1.0, self.clip_min), self.clip_max)  # ste until the first refresh
        self.b = {name: torch.full_like(fake.scales, start, dtype=torch.float32) for name, fake in fakes.items()}
        self.grams = {}

    def factor(self, v: torch.Tensor, layer: FakeQuantLinear) -> torch.Tensor:
        return self.b[layer.name].index_select(1, layer.g_idx)

    def before_step(self, step: int) -> None:
        if step % self.update_every == 0:
            self.refresh(step)

    @torch.no_grad()
    def refresh(self, step: int) -> None:
        if self.uses_probe and not self.grams:  # first refresh of a run (a resumed run loads them)
            self.grams = collect_grams(self.fakes, self.run_calibration)
        for name, fake in self.fakes.items():
            new = self.estimate(name, fake, step)
            self.b[name] = new if self.refreshes == 0 else self.ema * self.b[name] + (1 - self.ema) * new
        self.refreshes += 1

    def estimate(self, name: str, fake: FakeQuantLinear, step: int) -> torch.Tensor:
        """This refresh's clipped blend of Dither and Probe for one layer: [out, G]."""
        w = fake.weight.detach().float()
        s = to_fp16_grid(fake.scales.detach()).index_select(1, fake.g_idx)
        z = fake.zeros.index_select(1, fake.g_idx)

        def quantizer(x: torch.Tensor) -> torch.Tensor:
            return fake_quantize_dense(x, s, z, fake.spec.maxq)

        groups = fake.scales.shape[1]
        new = torch.zeros(w.shape[0], groups, device=w.device)
        if self.uses_dither:
            new += self.blend * group_mean(dither_slope(quantizer, w, s, self.dither_width), fake.g_idx, groups)
        if self.uses_probe:
            generator = torch.Generator(device=w.device)
            generator.manual_seed(self.seed * 1_000_003 + step)
            order = group_order(fake.g_idx)
            probe = probe_slope(quantizer, w, s, self.grams[name], order, self.probe_step, self.probes, generator)
            new += (1 - self.blend) * probe
        return new.clamp(self.clip_min, self.clip_max)

    def state_dict(self) -> dict[str, Any]:
        return {
            "b": {k: v.cpu() for k, v in self.b.items()},
            "grams": {k: v.cpu() for k, v in self.grams.items()},
            "refreshes": self.refreshes,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = next(iter(self.fakes.values())).weight.device
        self.b = {k: v.to(device) for k, v in state["b"].items()}
        self.grams = {k: v.to(device) for k, v in state["grams"].items()}
        self.refreshes = state["refreshes"]
