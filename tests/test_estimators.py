"""Estimators and the fake-quantized Linear: forward equals the grid, backward equals the formulas."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from qatcli.errors import QatcliError
from qatcli.qat.estimators import FOURIER_C, Fourier, make_estimator
from qatcli.qat.fake_quant import FakeQuantLinear, convert_qat, prepare_qat
from qatcli.quant.grid import QuantSpec, default_g_idx, fake_quantize, group_qparams
from qatcli.quant.layer import make_layer_quant


def fake_linear(estimator_name: str, spec: QuantSpec, **options) -> FakeQuantLinear:
    torch.manual_seed(0)
    linear = nn.Linear(64, 16, bias=False)
    with torch.no_grad():
        linear.weight.mul_(3)
    scales, zeros = group_qparams(linear.weight.detach(), spec)
    lq = make_layer_quant(spec, scales, zeros, default_g_idx(64, spec.group_size))
    return FakeQuantLinear(linear, lq, make_estimator(estimator_name, **options))


def grads(layer: FakeQuantLinear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    layer.zero_grad()
    (layer(x) ** 2).sum().backward()
    return layer.weight.grad.clone(), layer.scales.grad.clone()


@pytest.mark.parametrize("sym", [True, False])
def test_forward_is_the_grid(sym: bool) -> None:
    spec = QuantSpec(2, 16, sym)
    layer = fake_linear("ste", spec)
    lq = layer.layer_quant()
    expected = fake_quantize(layer.weight.detach(), lq.scales, lq.zeros, lq.g_idx, spec.maxq)
    assert torch.equal(layer.quantized_weight().detach(), expected)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_fourier_with_zero_amplitude_is_ste(bits: int) -> None:
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    spec = QuantSpec(bits, 32, sym=True)
    ste = grads(fake_linear("ste", spec), x)
    fourier = grads(fake_linear("fourier", spec, amplitudes=[0.0]), x)
    assert torch.equal(ste[0], fourier[0]) and torch.equal(ste[1], fourier[1])


def test_fourier_factor_matches_the_formula() -> None:
    est = Fourier([0.21])
    v = torch.tensor([0.0, 1.0, -2.0, 0.5, -1.5, 0.25, 2.7, -0.1])
    delta = v - torch.round(v)
    s = 0.21 * torch.cos(math.pi * delta)
    expected = (1 - FOURIER_C * s) / (1 + FOURIER_C * s)
    torch.testing.assert_close(est.factor(v, None), expected)
    assert est.factor(torch.tensor([0.0, 3.0]), None).tolist() == pytest.approx([0.0347] * 2, abs=1e-3)  # grid points
    assert est.factor(torch.tensor([0.5, -1.5]), None).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)  # boundaries
    two = Fourier([0.1, 0.05])
    s2 = 0.1 * torch.cos(math.pi * delta) + 0.05 * torch.cos(3 * math.pi * delta)
    torch.testing.assert_close(two.factor(v, None), (1 - FOURIER_C * s2) / (1 + FOURIER_C * s2))


def test_latent_gradient_is_factor_times_incoming_inside_the_range() -> None:
    spec = QuantSpec(2, 16, sym=True)
    layer = fake_linear("fourier", spec)
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(2))
    w_q = layer.quantized_weight()
    w_q.retain_grad()
    (torch.nn.functional.linear(x, w_q) ** 2).sum().backward()
    s = layer.layer_quant().scales.float()[:, layer.g_idx]
    z = layer.zeros[:, layer.g_idx]
    v = layer.weight.detach() / s
    inside = ((torch.round(v) + z) >= 0) & ((torch.round(v) + z) <= spec.maxq)
    assert 0 < inside.float().mean() < 1  # both cases present
    expected = w_q.grad * Fourier([0.21]).factor(v, None) * inside
    torch.testing.assert_close(layer.weight.grad, expected)


def test_scale_gradient_is_lsq() -> None:
    spec = QuantSpec(3, 32, sym=False)
    layer = fake_linear("ste", spec)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(3))
    w_q = layer.quantized_weight()
    w_q.retain_grad()
    (torch.nn.functional.linear(x, w_q) ** 2).sum().backward()
    s = layer.layer_quant().scales.float()[:, layer.g_idx]
    z = layer.zeros[:, layer.g_idx]
    v = layer.weight.detach() / s
    r = torch.round(v) + z
    inside = (r >= 0) & (r <= spec.maxq)
    per_weight = w_q.grad * torch.where(inside, torch.round(v) - v, r.clamp(0, spec.maxq) - z)
    expected = per_weight.reshape(16, 2, 32).sum(dim=2) / math.sqrt(32 * spec.maxq)
    torch.testing.assert_close(layer.scales.grad, expected)


@pytest.mark.parametrize("amplitudes", [[0.23], [0.2, 0.05], [-0.1], []])
def test_invalid_amplitudes_are_refused(amplitudes: list[float]) -> None:
    with pytest.raises(QatcliError, match="fourier amplitudes"):
        Fourier(amplitudes)


def test_unknown_estimator() -> None:
    with pytest.raises(QatcliError, match="unknown estimator 'magic'"):
        make_estimator("magic")


def test_prepare_and_convert_round_trip() -> None:
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    spec = QuantSpec(4, 16)
    layers = {}
    for name in ("0", "2"):
        w = model.get_submodule(name).weight.detach()
        layers[name] = make_layer_quant(spec, *group_qparams(w, spec), default_g_idx(32, 16))
    weight = model[0].weight
    fakes = prepare_qat(model, layers, make_estimator("ste"))
    assert isinstance(model[0], FakeQuantLinear) and model[0].weight is weight
    back = convert_qat(model, fakes)
    assert type(model[0]) is nn.Linear and model[0].weight is weight
    assert all(torch.equal(back[n].scales, layers[n].scales) for n in layers)
