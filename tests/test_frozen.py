"""qat.frozen_dtype: the student's frozen parts in bfloat16 while the latent weights and scales stay fp32.

bfloat16 keeps 8 significant bits: each frozen weight moves by at most 2^-9 (0.2 %) of itself, and the modules
holding them (embeddings, norms, lm_head) compute in bfloat16, so their outputs carry a few such roundings. On the
tiny model that moves the training losses by at most 0.8 % of the fp32 run's (measured), less than what 6 steps
take off the loss, so the bf16 run must stay within 2 % of the fp32 run at every step and still lower its loss.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli, tiny_llama_config
from safetensors.torch import load_file
from test_cli import assert_one_line_error
from test_qat import qat_args
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from qatcli.config import QATConfig
from qatcli.errors import QatcliError
from qatcli.formats.checkpoint import load_checkpoint
from qatcli.formats.export import export_gptq
from qatcli.formats.packed_model import load_gptq_model
from qatcli.qat.estimators import make_estimator
from qatcli.qat.fake_quant import prepare_qat
from qatcli.qat.frozen import lower_frozen, restore_frozen
from qatcli.quant.grid import QuantSpec
from qatcli.quant.rtn import quantize_rtn
from qatcli.quant.targets import find_targets

CPU = torch.device("cpu")


def _student(tie: bool = False) -> tuple[LlamaForCausalLM, LlamaForCausalLM, dict]:
    """A tiny Llama with fake-quantized layers, and an untouched copy of it."""
    config = tiny_llama_config()
    config.tie_word_embeddings = tie
    torch.manual_seed(0)
    source = LlamaForCausalLM(config).eval()
    model = LlamaForCausalLM(config).eval()
    model.load_state_dict(source.state_dict())
    layers = quantize_rtn(find_targets(model, [], []), QuantSpec(2, 32, True), "minmax")
    return model, source, prepare_qat(model, layers, make_estimator(QATConfig(), 0))


@pytest.mark.parametrize("tie", [False, True])
def test_the_frozen_parts_go_to_bf16_and_come_back(tie: bool) -> None:
    model, source, fakes = _student(tie)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
    handles = lower_frozen(model, torch.bfloat16)
    trained = {id(p) for f in fakes.values() for p in (f.weight, f.scales)}
    for name, param in model.named_parameters():
        assert param.dtype == (torch.float32 if id(param) in trained else torch.bfloat16), name
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie

    logits = model(ids).logits
    assert logits.dtype == torch.float32  # the stream between the frozen modules stays fp32
    # a few bf16 roundings (2^-9 each) of the embeddings, the norms and the logits
    assert (logits - expected).norm() < 1e-2 * expected.norm()
    logits.square().mean().backward()
    assert all(f.weight.grad.dtype == torch.float32 and f.scales.grad is not None for f in fakes.values())

    for handle in handles:
        handle.remove()
    restore_frozen(model, lambda: source)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    for name, param in model.named_parameters():
        if not name.endswith(".scales"):  # RTN leaves the latent weights the source's too
            assert param.dtype == torch.float32 and torch.equal(param, source.get_parameter(name)), name


def test_nothing_lowered_loads_no_source() -> None:
    model, _, _ = _student()
    restore_frozen(model, lambda: pytest.fail("loaded"))


def test_float16_refuses_values_beyond_its_range_in_one_line() -> None:
    model, _, _ = _student()
    with torch.no_grad():
        model.model.norm.weight[0] = 1e6
    with pytest.raises(QatcliError, match=r"^qat.frozen_dtype float16: model.norm.weight has values outside"):
        lower_frozen(model, torch.float16)


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _latent_keys(run: Path) -> set[str]:
    return set(load_file(str(run / "latent.safetensors")).keys())


def _args(model: Path, sotu: Path, out: Path, *extra: str) -> list[str]:
    evaluation = ("--eval-data", str(sotu / "test.txt"), "--max-windows", "4")
    return qat_args(model, sotu, out, "--steps", "6", *evaluation, *extra)


def test_a_bf16_run_trains_like_fp32_and_its_checkpoint_evaluates_and_exports(
    tiny_model_dir: Path, sotu: Path, tmp_path: Path
) -> None:
    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    assert run_cli(*_args(tiny_model_dir, sotu, fp32)).returncode == 0
    result = run_cli(*_args(tiny_model_dir, sotu, bf16, "--frozen-dtype", "bfloat16"))
    assert result.returncode == 0, result.stderr
    low, full = _losses(bf16), _losses(fp32)
    print("relative loss differences:", [f"{abs(a - b) / b:.1e}" for a, b in zip(low, full, strict=True)])
    torch.testing.assert_close(low, full, rtol=0.02, atol=0)
    assert low[-1] < low[0]

    meta = json.loads((bf16 / "qatcli.json").read_text())
    assert meta["recipe"]["qat"]["frozen_dtype"] == "bfloat16"
    # the frozen parts are the base model's: the checkpoint stores the latent weights alone, as the fp32 run's does
    assert "changed" not in meta and _latent_keys(bf16) == _latent_keys(fp32)
    ppl = meta["metrics"]["eval"]["ppl"]
    assert ppl == pytest.approx(json.loads((fp32 / "qatcli.json").read_text())["metrics"]["eval"]["ppl"], rel=0.02)

    reference, _, _, _ = load_checkpoint(bf16, CPU)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert torch.equal(reference.model.embed_tokens.weight, base.model.embed_tokens.weight)
    assert reference.model.norm.weight.dtype == torch.float32
    exported = tmp_path / "gptq"
    exported.mkdir()
    export_gptq(bf16, exported, dtype="float32")
    packed, _, _ = load_gptq_model(exported, CPU)
    ids = torch.randint(0, 500, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(packed(ids).logits, reference(ids).logits)


def test_a_bad_frozen_dtype_is_a_one_line_error(tiny_model_dir: Path, sotu: Path, tmp_path: Path) -> None:
    result = run_cli(*qat_args(tiny_model_dir, sotu, tmp_path / "q", "--frozen-dtype", "int8"))
    assert_one_line_error(result, "qat.frozen_dtype must be one of")
