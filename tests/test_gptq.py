"""GPTQ against RTN on a single Linear layer with correlated inputs, and its invariants."""

from __future__ import annotations

import pytest
import torch

from qatcli.config import GPTQOptions
from qatcli.errors import QatcliError
from qatcli.quant.gptq import HessianAccumulator, gptq_quantize, group_aware_order, inverse_cholesky
from qatcli.quant.gptq_model import quantize_gptq, sequential_groups
from qatcli.quant.grid import QuantSpec, default_g_idx, dequantize, fake_quantize, group_qparams, quantize

OUT, IN, TOKENS = 64, 256, 2048
ORDERS = {
    "plain": {"act_group_aware": False},
    "act_order": {"act_order": True},
    "group_aware": {"act_group_aware": True},
}


@pytest.fixture(scope="module")
def layer() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weights, correlated inputs (with one dead column) and their Hessian."""
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(IN, IN, generator=gen) / IN**0.5
    X = torch.randn(TOKENS, IN, generator=gen) @ mix + 0.3 * torch.randn(TOKENS, IN, generator=gen)
    X[:, 7] = 0
    W = torch.randn(OUT, IN, generator=gen) * 0.05
    acc = HessianAccumulator(IN, torch.device("cpu"))
    for chunk in X.split(500):
        acc.add(chunk)
    return W, X, acc.H


def test_hessian_is_two_over_n_sum_xxT(layer) -> None:
    _, X, H = layer
    torch.testing.assert_close(H, 2 / TOKENS * X.T @ X, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [-1, 32])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("static_groups", [False, True])
def test_gptq_reconstructs_the_output_better_than_rtn(layer, bits, group_size, order, static_groups) -> None:
    W, X, H = layer
    spec = QuantSpec(bits, group_size, sym=True)
    scales, zeros = group_qparams(W, spec)
    rtn = fake_quantize(W, scales, zeros, default_g_idx(IN, group_size), spec.maxq)
    result = gptq_quantize(W, H, spec, GPTQOptions(**ORDERS[order], static_groups=static_groups), "minmax")
    rtn_error = ((W - rtn) @ X.T).norm()
    gptq_error = ((W - result.weight) @ X.T).norm()
    assert gptq_error < 0.9 * rtn_error, (float(gptq_error), float(rtn_error))


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("group_size", [-1, 32, 64])
@pytest.mark.parametrize("sym", [True, False])
def test_weights_are_grid_points_of_the_recorded_grid(layer, order, group_size, sym) -> None:
    W, _, H = layer
    spec = QuantSpec(3, group_size, sym)
    result = gptq_quantize(W, H, spec, GPTQOptions(**ORDERS[order], block_size=48), "minmax")
    groups = spec.num_groups(IN)
    assert result.scales.shape == result.zeros.shape == (OUT, groups)
    assert sorted(torch.bincount(result.g_idx.long()).tolist()) == [spec.effective_group_size(IN)] * groups
    assert torch.equal(result.scales.half().float(), result.scales)
    codes = quantize(result.weight, result.scales, result.zeros, result.g_idx, spec.maxq)
    assert torch.equal(dequantize(codes, result.scales, result.zeros, result.g_idx), result.weight)
    assert bool((result.weight[:, 7] == 0).all())  # the dead column


def test_act_order_without_groups_changes_the_order_only(layer) -> None:
    W, _, H = layer
    result = gptq_quantize(W, H, QuantSpec(4, 32), GPTQOptions(act_order=True), "minmax")
    assert not torch.equal(result.g_idx, default_g_idx(IN, 32))  # groups follow the processing order


@pytest.mark.parametrize("group_size", [-1, 32])
def test_group_aware_order_is_plain_gptq_on_the_reordered_columns(layer, group_size) -> None:
    W, _, H = layer
    spec = QuantSpec(3, group_size)
    result = gptq_quantize(W, H, spec, GPTQOptions(act_group_aware=True, block_size=48), "minmax")
    assert torch.equal(result.g_idx, default_g_idx(IN, group_size).int())  # every kernel reads it
    perm, group_order = group_aware_order(torch.diag(H), spec.effective_group_size(IN))
    assert sorted(perm.tolist()) == list(range(IN)) and sorted(group_order.tolist()) == list(range(len(group_order)))
    plain_order = GPTQOptions(block_size=48, act_group_aware=False)
    plain = gptq_quantize(W[:, perm], H[perm][:, perm], spec, plain_order, "minmax")
    assert torch.equal(result.weight, plain.weight[:, torch.argsort(perm)])
    assert torch.equal(result.scales[:, group_order], plain.scales)


def test_dampening_is_raised_when_cholesky_fails() -> None:
    H = torch.ones(8, 8) * -1.0  # negative definite: no dampening of 1% can fix it quickly
    H.fill_diagonal_(1.0)
    U, damp = inverse_cholesky(H, 0.01)
    assert damp > 0.01 and bool(torch.isfinite(U).all())
    with pytest.raises(QatcliError, match="not positive definite"):
        inverse_cholesky(-torch.eye(4) * 1e3 - torch.ones(4, 4) * 1e3, 0.01)


def test_true_sequential_groups_follow_the_data() -> None:
    names = [
        f"model.layers.0.{n}"
        for n in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    ]
    groups = sequential_groups(names, true_sequential=True)
    assert [len(g) for g in groups] == [3, 1, 2, 1]
    assert sequential_groups(names, true_sequential=False) == [names]


def test_options_are_recorded_under_gptqmodel_names() -> None:
    fields = GPTQOptions(damp=0.05, act_order=True).quantization_fields()
    assert fields == {
        "damp_percent": 0.05,
        "desc_act": True,
        "act_group_aware": False,
        "static_groups": False,
        "true_sequential": True,
        "block_size": 128,
    }


def _ill_conditioned_hessian(columns: int = 576, tokens: int = 4096) -> torch.Tensor:
    """A Hessian like a transformer layer's: correlated inputs with a few outlier features, condition ~1e4-1e5."""
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(columns, columns, generator=g) / columns**0.5 + torch.eye(columns)
    x = torch.randn(tokens, columns, generator=g) @ mix
    x[:, :4] *= 30.0
    acc = HessianAccumulator(columns, torch.device("cpu"))
    acc.add(x)
    return acc.H


def test_gptq_codes_do_not_depend_on_the_thread_count() -> None:
    H = _ill_conditioned_hessian()
    W = torch.randn(256, H.shape[0], generator=torch.Generator().manual_seed(1))
    spec = QuantSpec(3, 64, False)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(gptq_quantize(W, H, spec, GPTQOptions(), "minmax"))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0].weight, results[1].weight)


def _tiny_gptq_weights(windows: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """True-sequential GPTQ of a tiny Llama on ``windows`` (batches of 2): the weights, and how often block 0's
    q_proj and gate_proj computed."""
    from transformers import LlamaForCausalLM

    from qatcli.quant.targets import find_targets
    from tests.conftest import tiny_llama_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    calls = {"q_proj": 0, "gate_proj": 0}
    block = model.model.layers[0]
    for name, layer in (("q_proj", block.self_attn.q_proj), ("gate_proj", block.mlp.gate_proj)):
        layer.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    targets = find_targets(model, [], [])
    spec, options = QuantSpec(3, 32, True), GPTQOptions(batch_size=2)
    quantize_gptq(model, targets, spec, options, "minmax", windows, torch.device("cpu"))
    return {n: t.weight.detach().clone() for n, t in targets.items()}, calls


def test_replaying_finished_submodules_leaves_the_codes_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    """True-sequential GPTQ computes a block's attention as o_proj on the inputs kept from the o pass, and its MLP
    as down_proj on those kept from the down pass, and replays the attention once its layers are quantized;
    computing everything again on every pass gives the very same weights. It must actually happen: in the first
    block, q_proj runs in the o pass, then only on the first batch of the gate/up pass, which checks the
    attention's shortcut (in the q/k/v pass, only for the first batch, which finds that q, k and v share their
    input); gate_proj runs in the down pass, then only on the first batch of the output pass (in the gate/up
    pass only on the first batch, as q_proj)."""
    from qatcli.quant.replay import FinishedOutputs

    windows = torch.randint(0, 512, (6, 32), generator=torch.Generator().manual_seed(0))
    replayed, replayed_calls = _tiny_gptq_weights(windows)
    monkeypatch.setattr(FinishedOutputs, "freeze", lambda self, module: None)
    monkeypatch.setattr(FinishedOutputs, "shortcut", lambda self, module, last: None)
    computed, computed_calls = _tiny_gptq_weights(windows)
    assert replayed.keys() == computed.keys()
    for name in replayed:
        assert torch.equal(replayed[name], computed[name]), name
    # 3 batches of 2 windows
    assert replayed_calls == {"q_proj": 1 + 3 + 1, "gate_proj": 1 + 3 + 1}
    assert computed_calls == {"q_proj": 1 + 3 * 4, "gate_proj": 1 + 3 + 3}


def test_the_mlp_shortcut_falls_back_where_down_proj_is_not_the_last_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """An MLP whose output is not down_proj's output: the first batch's check fails, and the output pass computes
    the MLP in full on every batch."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    plain = LlamaMLP.forward
    monkeypatch.setattr(LlamaMLP, "forward", lambda self, x: 0.5 * plain(self, x))
    windows = torch.randint(0, 512, (6, 32), generator=torch.Generator().manual_seed(0))
    _, calls = _tiny_gptq_weights(windows)
    assert calls["gate_proj"] == 1 + 3 + 3


def test_the_attention_shortcut_falls_back_where_the_attention_returns_more_than_its_output(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An attention that returns its weights too (as eager attention does) is not computed as o_proj alone: the
    gate/up pass computes it in full on every batch, and the passes after replay it."""
    from transformers.models.llama.modeling_llama import LlamaAttention

    plain = LlamaAttention.forward
    monkeypatch.setattr(
        LlamaAttention, "forward", lambda self, *args, **kwargs: (plain(self, *args, **kwargs)[0], torch.ones(1))
    )
    windows = torch.randint(0, 512, (6, 32), generator=torch.Generator().manual_seed(0))
    _, calls = _tiny_gptq_weights(windows)
    assert calls == {"q_proj": 1 + 3 + 3, "gate_proj": 1 + 3 + 1}


def test_inputs_are_not_kept_where_they_do_not_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    from qatcli.quant import replay

    windows = torch.randint(0, 512, (6, 32), generator=torch.Generator().manual_seed(0))
    with_room, _ = _tiny_gptq_weights(windows)
    monkeypatch.setattr(replay, "free_bytes", lambda device: 1000)
    without_room, calls = _tiny_gptq_weights(windows)
    assert calls == {"q_proj": 1 + 3 + 3, "gate_proj": 1 + 3 + 3}
    for name in with_room:
        assert torch.equal(with_room[name], without_room[name]), name


def test_group_aware_order_is_the_default_unless_act_order() -> None:
    assert GPTQOptions().group_aware and GPTQOptions().quantization_fields()["act_group_aware"] is True
    assert not GPTQOptions(act_order=True).group_aware  # desc_act takes the columns' order, as in GPTQModel
    assert not GPTQOptions(act_group_aware=False).group_aware
