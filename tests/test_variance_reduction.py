"""MARS-style gradient correction: c_t = g_t + gamma * beta1 / (1 - beta1) * (g_t - g_{t-1})."""

from __future__ import annotations

import torch

from qatcli.qat.variance_reduction import GradientCorrection


def test_correction_formula_and_state() -> None:
    p = torch.zeros(3, requires_grad=True)
    vr = GradientCorrection([p], gamma=0.025, beta1=0.9)
    first, second = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.5, 1.0, 0.5])
    p.grad = first.clone()
    vr.apply()
    assert torch.equal(p.grad, first)  # no previous gradient: unchanged
    state = vr.state_dict()
    p.grad = second.clone()
    vr.apply()
    torch.testing.assert_close(p.grad, second + 0.025 * 9 * (second - first))

    resumed = GradientCorrection([p], gamma=0.025, beta1=0.9)
    resumed.load_state_dict(state)
    p.grad = second.clone()
    resumed.apply()
    torch.testing.assert_close(p.grad, second + 0.225 * (second - first))


def test_zero_gamma_changes_nothing() -> None:
    p = torch.zeros(2, requires_grad=True)
    vr = GradientCorrection([p], gamma=0.0, beta1=0.9)
    for g in (torch.tensor([1.0, 2.0]), torch.tensor([-3.0, 4.0])):
        p.grad = g.clone()
        vr.apply()
        assert torch.equal(p.grad, g)
