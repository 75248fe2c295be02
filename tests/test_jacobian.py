"""The jacobian estimator: Dither and Probe against their definitions, B's shape and range, ste when B = 1,
act-order groups, and the compiled refresh against plain PyTorch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qatcli.config import JacobianConfig
from qatcli.errors import QatcliError
from qatcli.qat.estimators import STE, Jacobian
from qatcli.qat.estimators.jacobian import dither_slope, probe_slope
from qatcli.qat.fake_quant import FakeQuantLinear, prepare_qat
from qatcli.quant.grid import QuantSpec, default_g_idx, fake_quantize_dense, group_qparams
from qatcli.quant.layer import make_layer_quant


def grid_quantizer(s: torch.Tensor, z: torch.Tensor, maxq: int):
    return lambda x: fake_quantize_dense(x, s, z, maxq)


@pytest.mark.parametrize("width", [0.5, 1.5])
def test_dither_closed_form_equals_monte_carlo_slope(width: float) -> None:
    s, z, maxq = torch.tensor(0.2), torch.tensor(2.0), 3
    q = grid_quantizer(s, z, maxq)
    # v = w / s: inside, next to a boundary, at a grid point, and clamped at either end
    v = torch.tensor([0.0, 0.3, 0.9, -1.2, -0.45, 1.1, 2.4, -3.0])
    w = v * s
    gen = torch.Generator().manual_seed(0)
    u = (torch.rand(400_000, 1, generator=gen) - 0.5) * width * s
    h = 0.02 * s
    mc = (q(w + h + u) - q(w - h + u)).mean(0) / (2 * h)  # slope of E_u[Q(w + u)], common random numbers
    closed = dither_slope(w, s, z, maxq, width)
    torch.testing.assert_close(closed, mc, atol=0.04, rtol=0.03)
    assert closed[0] == 0 if width < 1 else closed[0] > 0  # a grid point is out of reach of a narrow dither


def group_gram(x: torch.Tensor, groups: int) -> torch.Tensor:
    xs = x.reshape(x.shape[0], groups, -1)
    return torch.einsum("ngi,ngj->gij", xs, xs)


def test_probes_of_whole_steps_inside_the_range_have_slope_one() -> None:
    # a probe of exactly one scale moves every level by one, so the output change is its linearization
    gen = torch.Generator().manual_seed(1)
    s = torch.rand(8, 4, 1, generator=gen) + 0.1
    z = torch.full((8, 4, 1), 64.0)
    w = (torch.randint(-8, 9, (8, 4, 8), generator=gen) + torch.rand(8, 4, 8, generator=gen) * 0.8 - 0.4) * s
    gram = group_gram(torch.randn(100, 32, generator=gen), 4)
    b = probe_slope(w, s, z, 127, gram, 1.0, 3, gen)
    assert b.shape == (8, 4)
    torch.testing.assert_close(b, torch.ones(8, 4))


def test_probe_is_zero_when_no_weight_can_move() -> None:
    s, z = torch.full((4, 2, 1), 0.1), torch.full((4, 2, 1), 1.0)
    w = (torch.randint(-1, 2, (4, 2, 8)).float()) * 0.1  # exactly on grid points
    gram = torch.eye(8).expand(2, 8, 8).contiguous()
    b = probe_slope(w, s, z, 3, gram, 0.4, 2, torch.Generator().manual_seed(0))
    assert torch.equal(b, torch.zeros(4, 2))


def test_groups_with_no_input_get_one() -> None:
    s, z = torch.full((4, 2, 1), 0.1), torch.full((4, 2, 1), 1.0)
    w = torch.randn(4, 2, 8, generator=torch.Generator().manual_seed(3)) * 0.1
    gram = torch.zeros(2, 8, 8)
    b = probe_slope(w, s, z, 3, gram, 0.4, 2, torch.Generator().manual_seed(0))
    assert torch.equal(b, torch.ones(4, 2))


def jacobian_layer(
    spec: QuantSpec, weight: torch.Tensor | None = None, g_idx: torch.Tensor | None = None, fused: bool = True, **knobs
) -> tuple[FakeQuantLinear, Jacobian, torch.Tensor]:
    torch.manual_seed(0)
    linear = nn.Linear(64, 16, bias=False)
    with torch.no_grad():
        if weight is None:
            linear.weight.mul_(3)
        else:
            linear.weight.copy_(weight)
    g_idx = default_g_idx(64, spec.group_size) if g_idx is None else g_idx
    w = linear.weight.detach()
    ordered = w[:, torch.argsort(g_idx, stable=True)]  # each group's columns together, for their qparams
    lq = make_layer_quant(spec, *group_qparams(ordered, spec), g_idx)
    est = Jacobian(JacobianConfig(**knobs), seed=0)
    layer = FakeQuantLinear(linear, lq, est, "layer", fused=fused)
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(2))
    est.setup(lambda batches: [layer(x) for _ in range(batches)])
    return layer, est, x


def grads(layer: FakeQuantLinear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    layer.zero_grad()
    (layer(x) ** 2).sum().backward()
    return layer.weight.grad.clone(), layer.scales.grad.clone()


def with_ste(layer: FakeQuantLinear) -> FakeQuantLinear:
    layer.estimator = STE().for_layer("layer", layer.grid())
    return layer


@pytest.mark.parametrize("bits", [2, 4])
def test_jacobian_with_b_fixed_at_one_is_ste(bits: int) -> None:
    spec = QuantSpec(bits, 16)
    layer, est, x = jacobian_layer(spec, clip_min=1.0, clip_max=1.0, update_every=1)
    est.before_step(0)
    got = grads(layer, x)
    expected = grads(with_ste(layer), x)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.mark.parametrize("blend", [0.0, 0.5, 1.0])
def test_b_has_the_group_shape_stays_in_range_and_scales_the_gradient(blend: float) -> None:
    spec = QuantSpec(2, 16)
    layer, est, x = jacobian_layer(spec, blend=blend, clip_min=0.2, clip_max=1.5, update_every=2, ema=0.5)
    for step in range(5):
        est.before_step(step)
        b = est.layers["layer"].b
        assert b.shape == layer.scales.shape and b.min() >= 0.2 and b.max() <= 1.5
    assert est.refreshes == 3 and (est.layers["layer"].gram is not None) == (blend < 1)
    assert not torch.allclose(b, torch.ones_like(b))  # it measured something
    got, _ = grads(layer, x)
    ste, _ = grads(with_ste(layer), x)
    torch.testing.assert_close(got, ste * b[:, layer.g_idx])


def test_the_gram_is_the_calibration_inputs_block_diagonal() -> None:
    layer, est, x = jacobian_layer(QuantSpec(2, 16), update_every=1, calib_batches=3)
    est.before_step(0)
    xs = x.reshape(8, 4, 16)
    torch.testing.assert_close(est.layers["layer"].gram, 3 * torch.einsum("ngi,ngj->gij", xs, xs))
    layer(x)  # training forward passes are not recorded
    torch.testing.assert_close(est.layers["layer"].gram, 3 * torch.einsum("ngi,ngj->gij", xs, xs))


def test_ema_smooths_refreshes() -> None:
    layer, est, _ = jacobian_layer(QuantSpec(2, 16), ema=0.75, update_every=1)
    est.before_step(0)
    first = est.layers["layer"].b.clone()
    with torch.no_grad():
        layer.weight.add_(0.3 * torch.randn_like(layer.weight))
    fresh = est.estimate("layer", 1)
    est.before_step(1)
    torch.testing.assert_close(est.layers["layer"].b, 0.75 * first + 0.25 * fresh)


def test_state_round_trip() -> None:
    layer, est, _ = jacobian_layer(QuantSpec(2, 16), update_every=1)
    est.before_step(0)
    state = est.state_dict()
    other = Jacobian(JacobianConfig(update_every=1), seed=0)
    other.for_layer("layer", layer.grid())
    other.load_state_dict(state)
    assert torch.equal(other.layers["layer"].b, est.layers["layer"].b) and other.refreshes == 1
    assert torch.equal(other.layers["layer"].gram, est.layers["layer"].gram)
    est.before_step(1)
    other.before_step(1)  # no second calibration pass: it has none to run
    assert torch.equal(other.layers["layer"].b, est.layers["layer"].b)


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"blend": 1.5}, "blend must be in"),
        ({"clip_min": 2.0, "clip_max": 1.0}, "clip_min <= clip_max"),
        ({"update_every": 0}, "update_every must be positive"),
        ({"ema": 1.0}, "ema must be in"),
        ({"dither_width": 0.0}, "dither_width must be positive"),
    ],
)
def test_invalid_settings_are_refused(knobs: dict, message: str) -> None:
    with pytest.raises(QatcliError, match=message):
        Jacobian(JacobianConfig(**knobs), seed=0)


def test_prepare_qat_names_the_layers() -> None:
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    spec = QuantSpec(2, 16)
    layers = {
        n: make_layer_quant(spec, *group_qparams(model.get_submodule(n).weight.detach(), spec), default_g_idx(32, 16))
        for n in ("0", "2")
    }
    est = Jacobian(JacobianConfig(update_every=1), seed=0)
    fakes = prepare_qat(model, layers, est)
    x = torch.randn(16, 32)
    est.setup(lambda batches: model(x))
    est.before_step(0)
    assert set(est.layers) == {"0", "2"} and est.layers["0"].gram.shape == (2, 16, 16)
    assert fakes["0"].estimator is est.layers["0"]
    model(x).sum().backward()
    assert model[0].weight.grad is not None


def test_act_order_groups_get_the_estimate_of_the_same_groups_kept_together() -> None:
    spec = QuantSpec(2, 16)
    contiguous, est, x = jacobian_layer(spec, update_every=1)
    # column j of the scattered layer is column (j % 4) * 16 + j // 4 of the contiguous one: group j % 4, with
    # each group's columns in their original order
    j = torch.arange(64)
    perm = (j % 4) * 16 + j // 4
    scattered, other, _ = jacobian_layer(spec, contiguous.weight.detach()[:, perm], j % 4, update_every=1)
    assert not scattered.contiguous
    other.setup(lambda batches: [scattered(x[:, perm]) for _ in range(batches)])
    est.before_step(0)
    other.before_step(0)
    torch.testing.assert_close(other.layers["layer"].gram, est.layers["layer"].gram)
    torch.testing.assert_close(other.layers["layer"].b, est.layers["layer"].b)


def test_the_compiled_refresh_computes_what_plain_pytorch_does(monkeypatch: pytest.MonkeyPatch) -> None:
    from qatcli.qat import compiled

    kernels = compiled._Kernels()  # a fallback an earlier test caused (stand-in devices defeat dynamo) sticks
    monkeypatch.setattr(compiled, "_KERNELS", kernels)
    b = {}
    for fused in (True, False):
        _, est, _ = jacobian_layer(QuantSpec(2, 16), fused=fused, update_every=1, clip_min=0.0, clip_max=10.0)
        est.before_step(0)
        b[fused] = est.layers["layer"].b
    assert {"_dither_group_slope", "_probe_terms"} <= set(kernels.compiled) and not kernels.failed
    torch.testing.assert_close(b[True], b[False])
