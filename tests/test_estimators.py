"""Estimators and the fake-quantized Linear: forward equals the grid, backward equals the formulas."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import qatcli.qat.estimators as estimators_package
from qatcli.config import JacobianConfig, QATConfig
from qatcli.errors import QatcliError
from qatcli.qat.estimators import FOURIER_C, STE, Estimator, Fourier, fourier_factor, make_estimator
from qatcli.qat.fake_quant import FakeQuantLinear, convert_qat, prepare_qat
from qatcli.quant.grid import QuantSpec, default_g_idx, fake_quantize, group_qparams
from qatcli.quant.layer import make_layer_quant


def fake_linear(estimator: Estimator, spec: QuantSpec, scattered: bool = False) -> FakeQuantLinear:
    """A 64 -> 16 layer; ``scattered`` permutes the columns' groups, as an act-order checkpoint does."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 16, bias=False)
    with torch.no_grad():
        linear.weight.mul_(3)
    scales, zeros = group_qparams(linear.weight.detach(), spec)
    g_idx = default_g_idx(64, spec.group_size)
    if scattered:
        g_idx = g_idx[torch.randperm(64, generator=torch.Generator().manual_seed(5))]
    return FakeQuantLinear(linear, make_layer_quant(spec, scales, zeros, g_idx, scattered), estimator, "layer")


def grads(layer: FakeQuantLinear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    layer.zero_grad()
    (layer(x) ** 2).sum().backward()
    return layer.weight.grad.clone(), layer.scales.grad.clone()


@pytest.mark.parametrize("scattered", [False, True])
@pytest.mark.parametrize("sym", [True, False])
def test_forward_is_the_grid(sym: bool, scattered: bool) -> None:
    spec = QuantSpec(2, 16, sym)
    layer = fake_linear(STE(), spec, scattered)
    assert layer.contiguous is not scattered
    lq = layer.layer_quant()
    expected = fake_quantize(layer.weight.detach(), lq.scales, lq.zeros, lq.g_idx, spec.maxq)
    assert torch.equal(layer.quantized_weight().detach(), expected)


def test_contiguous_groups_take_the_same_gradients_as_the_per_column_path() -> None:
    layer = fake_linear(Fourier([0.21]), QuantSpec(3, 16, sym=False))
    layer.fused = False  # both paths in plain PyTorch: the compiled one differs in cos's last bits
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(4))
    reshaped = grads(layer, x)
    forward = layer.quantized_weight().detach()
    layer.contiguous = False
    assert torch.equal(layer.quantized_weight().detach(), forward)
    gathered = grads(layer, x)
    assert torch.equal(reshaped[0], gathered[0])
    torch.testing.assert_close(reshaped[1], gathered[1])  # sums over a group in another order


@pytest.mark.parametrize("estimator", [STE(), Fourier([0.21])], ids=["ste", "fourier"])
@pytest.mark.parametrize("sym", [True, False])
def test_compiled_kernels_compute_what_plain_pytorch_does(
    estimator: Estimator, sym: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qatcli.qat import compiled

    kernels = compiled._Kernels()  # a fallback an earlier test caused (stand-in devices defeat dynamo) sticks
    monkeypatch.setattr(compiled, "_KERNELS", kernels)
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(6))
    layer = fake_linear(estimator, QuantSpec(2, 16, sym))
    assert layer.fused
    compiled_forward, compiled = layer.quantized_weight().detach(), grads(layer, x)
    layer.fused = False
    assert torch.equal(compiled_forward, layer.quantized_weight().detach())
    plain = grads(layer, x)
    torch.testing.assert_close(compiled[0], plain[0], rtol=1e-5, atol=1e-6)  # fourier: cos's last bits
    torch.testing.assert_close(compiled[1], plain[1])
    assert not kernels.failed and len(kernels.compiled) == 2  # both passes ran compiled


def test_auto_compiles_only_for_models_of_real_size() -> None:
    assert [QATConfig().fused_for(n) for n in (2**24 - 1, 2**24)] == [False, True]
    assert QATConfig(fused=False).fused_for(2**30) is False and QATConfig(fused=True).fused_for(1) is True


def test_a_compiler_failure_falls_back_to_plain_pytorch_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from qatcli.qat import compiled

    def no_compiler(fn, **kwargs):
        def fail(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

        return fail

    kernels = compiled._Kernels()
    monkeypatch.setattr(compiled, "_KERNELS", kernels)
    monkeypatch.setattr(torch, "compile", no_compiler)
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(6))
    layer = fake_linear(STE(), QuantSpec(3, 16))
    first = grads(layer, x)
    second = grads(layer, x)
    layer.fused = False
    assert torch.equal(first[0], grads(layer, x)[0]) and torch.equal(first[0], second[0])
    assert kernels.failed
    err = capsys.readouterr().err
    assert err.count("fused fake-quantization kernels unavailable (InvalidCxxCompiler") == 1


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_fourier_with_zero_amplitude_is_ste(bits: int) -> None:
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    spec = QuantSpec(bits, 32, sym=True)
    ste = grads(fake_linear(STE(), spec), x)
    fourier = grads(fake_linear(Fourier([0.0]), spec), x)
    assert torch.equal(ste[0], fourier[0]) and torch.equal(ste[1], fourier[1])


def test_fourier_factor_matches_the_formula() -> None:
    v = torch.tensor([0.0, 1.0, -2.0, 0.5, -1.5, 0.25, 2.7, -0.1])
    delta = v - torch.round(v)
    s = 0.21 * torch.cos(math.pi * delta)
    expected = (1 - FOURIER_C * s) / (1 + FOURIER_C * s)
    torch.testing.assert_close(fourier_factor(v, [0.21]), expected)
    assert fourier_factor(torch.tensor([0.0, 3.0]), [0.21]).tolist() == pytest.approx([0.0347] * 2, abs=1e-3)
    assert fourier_factor(torch.tensor([0.5, -1.5]), [0.21]).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    s2 = 0.1 * torch.cos(math.pi * delta) + 0.05 * torch.cos(3 * math.pi * delta)
    torch.testing.assert_close(fourier_factor(v, [0.1, 0.05]), (1 - FOURIER_C * s2) / (1 + FOURIER_C * s2))


@pytest.mark.parametrize("scattered", [False, True])
def test_latent_gradient_is_factor_times_incoming_inside_the_range(scattered: bool) -> None:
    spec = QuantSpec(2, 16, sym=True)
    layer = fake_linear(Fourier([0.21]), spec, scattered)
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(2))
    w_q = layer.quantized_weight()
    w_q.retain_grad()
    (torch.nn.functional.linear(x, w_q) ** 2).sum().backward()
    s = layer.layer_quant().scales.float()[:, layer.g_idx]
    z = layer.zeros[:, layer.g_idx]
    v = layer.weight.detach() / s
    inside = ((torch.round(v) + z) >= 0) & ((torch.round(v) + z) <= spec.maxq)
    assert 0 < inside.float().mean() < 1  # both cases present
    expected = w_q.grad * fourier_factor(v, [0.21]) * inside
    torch.testing.assert_close(layer.weight.grad, expected)


@pytest.mark.parametrize("scattered", [False, True])
def test_scale_gradient_is_lsq(scattered: bool) -> None:
    spec = QuantSpec(3, 32, sym=False)
    layer = fake_linear(STE(), spec, scattered)
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
    expected = torch.zeros(16, 2).index_add_(1, layer.g_idx, per_weight) / math.sqrt(32 * spec.maxq)
    torch.testing.assert_close(layer.scales.grad, expected)


@pytest.mark.parametrize("amplitudes", [[0.23], [0.2, 0.05], [-0.1], []])
def test_invalid_amplitudes_are_refused(amplitudes: list[float]) -> None:
    with pytest.raises(QatcliError, match="fourier amplitudes"):
        Fourier(amplitudes)


def test_unknown_estimator() -> None:
    with pytest.raises(QatcliError, match="unknown estimator 'magic'"):
        make_estimator(QATConfig(estimator="magic"), seed=0)


def test_make_estimator_reads_the_recipe_section() -> None:
    assert make_estimator(QATConfig(), seed=0).describe() == {"name": "ste"}
    fourier = make_estimator(QATConfig(estimator="fourier", amplitudes=[0.1, 0.05]), seed=0)
    assert fourier.describe() == {"name": "fourier", "amplitudes": [0.1, 0.05]}
    knobs = JacobianConfig(update_every=3, blend=1.0)
    jacobian = make_estimator(QATConfig(estimator="jacobian", jacobian=knobs), seed=7)
    assert jacobian.describe() == {"name": "jacobian", **vars(knobs)}


def test_the_estimators_do_not_import_fake_quant() -> None:
    for path in Path(estimators_package.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.module is None or not node.module.startswith("qatcli.qat.fake_quant"), path
                assert node.module != "qatcli.qat" or "fake_quant" not in [a.name for a in node.names], path


def test_prepare_and_convert_round_trip() -> None:
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    spec = QuantSpec(4, 16)
    layers = {}
    for name in ("0", "2"):
        w = model.get_submodule(name).weight.detach()
        layers[name] = make_layer_quant(spec, *group_qparams(w, spec), default_g_idx(32, 16))
    weight = model[0].weight
    fakes = prepare_qat(model, layers, STE())
    assert isinstance(model[0], FakeQuantLinear) and model[0].weight is weight
    back = convert_qat(model, fakes)
    assert type(model[0]) is nn.Linear and model[0].weight is weight
    assert all(torch.equal(back[n].scales, layers[n].scales) for n in layers)
