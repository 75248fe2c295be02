"""Export to the GPTQ format: bit-exact round trips through qatcli's packed loader, integrity checks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import make_checkpoint, run_cli
from safetensors.torch import load_file, save_file

from qatcli.errors import QatcliError
from qatcli.formats.checkpoint import load_checkpoint
from qatcli.formats.export import export_gptq
from qatcli.formats.packed_model import PackedLinear, load_gptq_model
from qatcli.quant.grid import QuantSpec

CPU = torch.device("cpu")

CASES = [(bits, sym, method) for bits in (2, 3, 4, 8) for sym in (True, False) for method in ("rtn", "gptq-act")]


@pytest.mark.parametrize(("bits", "sym", "method"), CASES)
def test_export_round_trip_is_bit_exact(
    tiny_model_dir: Path, tmp_path: Path, bits: int, sym: bool, method: str
) -> None:
    act_order = method == "gptq-act"
    spec = QuantSpec(bits, 32 if bits != 8 else -1, sym)
    ckpt = make_checkpoint(tiny_model_dir, tmp_path / "ckpt", spec, "gptq" if act_order else "rtn", act_order)
    exported = tmp_path / "gptq"
    exported.mkdir()
    report = export_gptq(ckpt, exported, dtype="float32")
    assert report.fmt == ("gptq" if sym else "gptq_v2") and not report.dense

    reference, _, _, layers = load_checkpoint(ckpt, CPU)
    packed, _, qcfg = load_gptq_model(exported, CPU)
    assert qcfg["bits"] == bits and qcfg["sym"] is sym and qcfg["desc_act"] is act_order
    ref_modules, packed_modules = dict(reference.named_modules()), dict(packed.named_modules())
    for name in layers:
        module = packed_modules[name]
        assert isinstance(module, PackedLinear)
        assert torch.equal(module.dequantized_weight(), ref_modules[name].weight.detach()), name
        assert torch.equal(module.g_idx, layers[name].g_idx)
    ids = torch.randint(0, 500, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(packed(ids).logits, reference(ids).logits)


def test_v1_stores_zero_minus_one_and_v2_stores_zero(tiny_model_dir: Path, tmp_path: Path) -> None:
    ckpt = make_checkpoint(tiny_model_dir, tmp_path / "ckpt", QuantSpec(4, 32, sym=True), "rtn")
    for fmt in ("gptq", "gptq_v2"):
        out = tmp_path / fmt
        out.mkdir()
        export_gptq(ckpt, out, fmt=fmt)
        words = load_file(str(out / "model.safetensors"))["model.layers.0.mlp.down_proj.qzeros"]
        expected = 0x77777777 if fmt == "gptq" else 0x88888888
        assert all(int(w) & 0xFFFFFFFF == expected for w in words.flatten())
        config = json.loads((out / "config.json").read_text())["quantization_config"]
        assert config["checkpoint_format"] == config["format"] == fmt
        assert config["quant_method"] == "gptq" and config["meta"]["quantizer"][0].startswith("qatcli:")
        assert json.loads((out / "quantize_config.json").read_text()) == config


def test_asymmetric_v1_needs_clamping(tiny_model_dir: Path, tmp_path: Path) -> None:
    ckpt = make_checkpoint(tiny_model_dir, tmp_path / "ckpt", QuantSpec(2, 32, sym=False), "rtn")
    (tmp_path / "a").mkdir()
    with pytest.raises(QatcliError, match="zero points >= 1"):
        export_gptq(ckpt, tmp_path / "a", fmt="gptq")
    report = export_gptq(ckpt, tmp_path / "a", fmt="gptq", v1_clamp_zeros=True)
    model, _, _ = load_gptq_model(tmp_path / "a", CPU)
    assert report.fmt == "gptq"
    assert all(int(m.qzeros.min()) >= 0 for m in model.modules() if isinstance(m, PackedLinear))


def test_sharded_export_loads(tiny_model_dir: Path, tmp_path: Path) -> None:
    ckpt = make_checkpoint(tiny_model_dir, tmp_path / "ckpt", QuantSpec(4, 32), "rtn")
    out = tmp_path / "gptq"
    out.mkdir()
    report = export_gptq(ckpt, out, dtype="float32", max_shard_bytes=64 * 1024)
    assert "model.safetensors.index.json" in report.files and len(report.files) > 3
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f for f in report.files if f.endswith(".safetensors")}
    reference, _, _, _ = load_checkpoint(ckpt, CPU)
    packed, _, _ = load_gptq_model(out, CPU)
    ids = torch.arange(40).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(packed(ids).logits, reference(ids).logits)


def test_export_refuses_tensors_that_disagree_with_metadata(tiny_model_dir: Path, tmp_path: Path) -> None:
    ckpt = make_checkpoint(tiny_model_dir, tmp_path / "ckpt", QuantSpec(3, 32), "rtn")
    tensors = load_file(str(ckpt / "quant.safetensors"))
    name = "model.layers.0.self_attn.q_proj"
    tensors[f"{name}.zeros"] = torch.full_like(tensors[f"{name}.zeros"], 9)  # above maxq = 7
    save_file(tensors, str(ckpt / "quant.safetensors"))
    (tmp_path / "o").mkdir()
    with pytest.raises(QatcliError, match=f"layer {name}: zero points or g_idx outside"):
        export_gptq(ckpt, tmp_path / "o")
    tensors[f"{name}.zeros"] = tensors[f"{name}.zeros"][:, :1].clone()
    save_file(tensors, str(ckpt / "quant.safetensors"))
    with pytest.raises(QatcliError, match=re.escape("zeros is torch.uint8 (64, 1), expected torch.uint8 (64, 2)")):
        export_gptq(ckpt, tmp_path / "o")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("qweight", "qweight is torch.int32 \\(4, 64\\), expected torch.int32 \\(8, 64\\)"),
        ("scales", "scales is torch.float32"),
        ("bits", "GPTQ bits 5 not supported"),
        ("format", "checkpoint format 'marlin' not supported"),
        ("g_idx", "g_idx points outside"),
    ],
)
def test_loader_refuses_mismatched_directories(tiny_model_dir: Path, tmp_path: Path, change: str, message: str) -> None:
    ckpt = make_checkpoint(tiny_model_dir, tmp_path / "ckpt", QuantSpec(4, 32), "rtn")
    out = tmp_path / "gptq"
    out.mkdir()
    export_gptq(ckpt, out)
    tensors = load_file(str(out / "model.safetensors"))
    config = json.loads((out / "config.json").read_text())
    name = "model.layers.0.self_attn.q_proj"
    if change == "qweight":
        tensors[f"{name}.qweight"] = tensors[f"{name}.qweight"][:4].clone()
    elif change == "scales":
        tensors[f"{name}.scales"] = tensors[f"{name}.scales"].float()
    elif change == "g_idx":
        tensors[f"{name}.g_idx"] = tensors[f"{name}.g_idx"] + 5
    elif change == "bits":
        config["quantization_config"]["bits"] = 5
    else:
        config["quantization_config"]["checkpoint_format"] = "marlin"
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(QatcliError, match=message):
        load_gptq_model(out, CPU)


def test_layers_the_format_cannot_hold_stay_dense(odd_width_model_dir: Path, tmp_path: Path) -> None:
    """intermediate_size 80 is not a multiple of 32: gate/up/down stay dense, attention is packed."""
    ckpt = make_checkpoint(odd_width_model_dir, tmp_path / "ckpt", QuantSpec(4, 16), "rtn")
    out = tmp_path / "gptq"
    out.mkdir()
    report = export_gptq(ckpt, out, dtype="float32")
    assert sorted({n.rsplit(".", 1)[1] for n in report.dense}) == ["down_proj", "gate_proj", "up_proj"]
    assert sorted({n.rsplit(".", 1)[1] for n in report.packed}) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert len(qcfg["dynamic"]) == len(report.dense) and qcfg["modules_in_block_to_quantize"] == [report.packed]
    reference, _, _, _ = load_checkpoint(ckpt, CPU)
    packed, _, _ = load_gptq_model(out, CPU)
    assert not isinstance(packed.model.layers[0].mlp.down_proj, PackedLinear)
    ids = torch.arange(30).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(packed(ids).logits, reference(ids).logits)


def test_export_command_warns_about_slow_group_sizes_and_keeps_outputs(tiny_model_dir: Path, tmp_path: Path) -> None:
    fast = make_checkpoint(tiny_model_dir, tmp_path / "g32", QuantSpec(4, 32), "rtn")
    slow = make_checkpoint(tiny_model_dir, tmp_path / "g16", QuantSpec(4, 16), "rtn")
    out = tmp_path / "gptq"
    made = run_cli("export", str(fast), "-o", str(out))
    assert made.returncode == 0, made.stderr
    assert "warning" not in made.stderr
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in files and "config.json" in files

    again = run_cli("export", str(slow), "-o", str(out))
    assert again.returncode == 2 and "--force" in again.stderr
    assert sorted(p.name for p in out.iterdir()) == files

    forced = run_cli("export", str(slow), "-o", str(out), "--force")
    assert forced.returncode == 0, forced.stderr
    assert "warning: group size 16" in forced.stderr
    assert json.loads((out / "config.json").read_text())["quantization_config"]["group_size"] == 16


def test_export_warns_that_vllm_refuses_low_bit_gptq(tiny_model_dir: Path, tmp_path: Path) -> None:
    low = make_checkpoint(tiny_model_dir, tmp_path / "w3", QuantSpec(3, 32), "rtn")
    made = run_cli("export", str(low), "-o", str(tmp_path / "gptq"))
    assert made.returncode == 0, made.stderr
    assert "3-bit GPTQ format: vLLM's GPTQ path keeps only Marlin" in " ".join(made.stderr.split())
