"""Export to compressed-tensors' pack-quantized format, read back by the compressed-tensors package itself.

Nothing of qatcli reads the export here: the weights come out of compressed-tensors' own dequantizer (the
model-free CompressedTensorsDequantizer, which parses config.json and runs PackedQuantizationCompressor) and
out of transformers' compressed-tensors loader, and are compared with the weights of qatcli's checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_checkpoint, run_cli
from safetensors.torch import load_file

from qatcli.errors import QatcliError
from qatcli.formats.checkpoint import load_checkpoint
from qatcli.formats.export import export_compressed_tensors
from qatcli.quant.grid import QuantSpec

# compressed-tensors 0.20.1 needs Python >= 3.11 (pyproject's dev extra installs it there)
ct_dequantizer = pytest.importorskip("compressed_tensors.entrypoints.convert.converters.ct_dequantizer")
from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402

from qatcli.formats.packing import pack_any  # noqa: E402

CPU = torch.device("cpu")
CASES = [(bits, sym) for bits in (2, 3, 4, 8) for sym in (True, False)]


def _reference(checkpoint: Path) -> tuple[torch.nn.Module, dict]:
    """qatcli's own model of the checkpoint: its quantized weights W = s (q - z), in float32."""
    model, _, _, layers = load_checkpoint(checkpoint, CPU)
    return model, layers


def _dequantized(export: Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Every tensor of the export, the packed layers dequantized by compressed-tensors."""
    dequantizer = ct_dequantizer.CompressedTensorsDequantizer(export, dtype=dtype)
    return dequantizer.validate(load_file(str(export / "model.safetensors")))  # fails on any leftover qparam


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_is_compressed_tensors_packing_for_any_length(bits: int) -> None:
    """compressed-tensors packs signed values plus 2^(b-1); qatcli packs its unsigned codes: the same words."""
    gen = torch.Generator().manual_seed(bits)
    for length in (5, 32, 80, 97):
        codes = torch.randint(0, 2**bits, (3, length), generator=gen)
        signed = (codes - 2 ** (bits - 1)).to(torch.int8)
        assert torch.equal(pack_any(codes, bits, dim=1), pack_to_int32(signed, bits, packed_dim=1)), length
        assert torch.equal(pack_any(codes.T, bits, dim=0), pack_to_int32(signed.T, bits, packed_dim=0)), length


@pytest.mark.parametrize(("bits", "sym"), CASES)
def test_compressed_tensors_dequantizes_to_qatcli_weights(
    tiny_model_dir: Path, tmp_path: Path, bits: int, sym: bool
) -> None:
    spec = QuantSpec(bits, 32 if bits != 8 else -1, sym)
    ckpt = make_checkpoint(tiny_model_dir, tmp_path / "ckpt", spec, "rtn")
    out = tmp_path / "ct"
    out.mkdir()
    report = export_compressed_tensors(ckpt, out, dtype="float32")

    reference, layers = _reference(ckpt)
    assert report.packed == list(layers) and not report.dense
    tensors = load_file(str(out / "model.safetensors"))
    weights = _dequantized(out)
    ref = reference.state_dict()
    for name in layers:
        assert tensors[f"{name}.weight_packed"].dtype == torch.int32
        assert tensors[f"{name}.weight_scale"].dtype == torch.float32
        assert (f"{name}.weight_zero_point" in tensors) is not sym
        assert torch.equal(weights[f"{name}.weight"], ref[f"{name}.weight"]), name
    assert torch.equal(weights["lm_head.weight"], ref["lm_head.weight"])  # left dense, in --dtype

    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    config = QuantizationConfig.model_validate(qcfg)
    args = config.config_groups["group_0"].weights
    assert (config.quant_method, config.format, config.ignore) == ("compressed-tensors", "pack-quantized", ["lm_head"])
    assert (args.num_bits, args.type, args.symmetric) == (bits, "int", sym)
    assert (args.strategy, args.group_size) == (("group", 32) if bits != 8 else ("channel", None))


@pytest.mark.parametrize(("bits", "sym"), [(3, False), (4, True)])
def test_float16_scales_give_the_float16_rounding_of_qatcli_weights(
    tiny_model_dir: Path, tmp_path: Path, bits: int, sym: bool
) -> None:
    """Scales are stored in fp16 (qatcli's grid holds fp16 values); compressed-tensors then dequantizes in fp16,
    and s * (q - z) rounded once to fp16 is the fp16 cast of qatcli's exact float32 weight."""
    ckpt = make_checkpoint(tiny_model_dir, tmp_path / "ckpt", QuantSpec(bits, 64, sym), "rtn")
    out = tmp_path / "ct"
    out.mkdir()
    export_compressed_tensors(ckpt, out)  # dtype float16
    reference, layers = _reference(ckpt)
    tensors = load_file(str(out / "model.safetensors"))
    qcfg = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    scheme = qcfg.config_groups["group_0"]
    compressor = BaseCompressor.get_value_from_registry(qcfg.format)
    ref = reference.state_dict()
    for name in layers:
        assert tensors[f"{name}.weight_scale"].dtype == torch.float16
        state = {key: tensors[f"{name}.{key}"] for key in compressor.compression_param_names(scheme)}
        weight = compressor.decompress(state, scheme)["weight"]
        assert weight.dtype == torch.float16
        assert torch.equal(weight, ref[f"{name}.weight"].half()), name


@pytest.mark.parametrize(("bits", "sym"), [(3, True), (4, False), (8, True)])
def test_compressed_tensors_own_compressor_writes_the_same_tensors(
    tiny_model_dir: Path, tmp_path: Path, bits: int, sym: bool
) -> None:
    """Given qatcli's weights, scales and (signed) zero points, compressed-tensors' compressor produces the very
    tensors the export holds: same packing, same sign and zero-point convention."""
    ckpt = make_checkpoint(tiny_model_dir, tmp_path / "ckpt", QuantSpec(bits, 32, sym), "rtn")
    out = tmp_path / "ct"
    out.mkdir()
    export_compressed_tensors(ckpt, out, dtype="float32")
    reference, layers = _reference(ckpt)
    tensors = load_file(str(out / "model.safetensors"))
    qcfg = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    scheme = qcfg.config_groups["group_0"]
    compressor = BaseCompressor.get_value_from_registry(qcfg.format)
    ref = reference.state_dict()
    for name, lq in layers.items():
        state = {"weight": ref[f"{name}.weight"], "weight_scale": lq.scales.float()}
        if not sym:
            state["weight_zero_point"] = (lq.zeros.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
        theirs = compressor.compress(state, scheme)
        assert sorted(theirs) == sorted(k.removeprefix(f"{name}.") for k in tensors if k.startswith(f"{name}."))
        for key, value in theirs.items():
            assert torch.equal(value, tensors[f"{name}.{key}"]), (name, key)


def test_lengths_that_are_not_multiples_of_32_are_packed(odd_width_model_dir: Path, tmp_path: Path) -> None:
    """intermediate_size 80: 80 3-bit values fill 7.5 words; the format keeps the 8 words that hold them."""
    ckpt = make_checkpoint(odd_width_model_dir, tmp_path / "ckpt", QuantSpec(3, 16, sym=False), "rtn")
    out = tmp_path / "ct"
    out.mkdir()
    report = export_compressed_tensors(ckpt, out, dtype="float32")
    reference, layers = _reference(ckpt)
    assert len(report.packed) == len(layers) and not report.dense
    tensors = load_file(str(out / "model.safetensors"))
    assert tensors["model.layers.0.mlp.down_proj.weight_packed"].shape == (64, 8)
    assert tensors["model.layers.0.mlp.up_proj.weight_zero_point"].shape == (8, 4)
    weights, ref = _dequantized(out), reference.state_dict()
    for name in layers:
        assert torch.equal(weights[f"{name}.weight"], ref[f"{name}.weight"]), name


@pytest.mark.parametrize(("bits", "sym", "dequantize"), [(4, True, False), (2, True, False), (8, False, True)])
def test_transformers_loads_the_export_on_the_cpu(
    tiny_model_dir: Path, tmp_path: Path, bits: int, sym: bool, dequantize: bool
) -> None:
    """transformers + compressed-tensors decompress the weights on the CPU; in float32 the logits are qatcli's.

    Asymmetric exports need dequantize=True: compressed-tensors 0.20.1 lays out the model it loads into with an
    unpacked zero point [out, G], while pack-quantized files (its own compressor's too) hold it packed."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    ckpt = make_checkpoint(tiny_model_dir, tmp_path / "ckpt", QuantSpec(bits, 32, sym), "rtn")
    out = tmp_path / "ct"
    out.mkdir()
    export_compressed_tensors(ckpt, out, dtype="float32")
    extra = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    theirs = AutoModelForCausalLM.from_pretrained(out, device_map="cpu", **extra)
    ours, layers = _reference(ckpt)
    ids = torch.randint(0, 500, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        their_logits, our_logits = theirs(ids).logits, ours(ids).logits
    their_modules = dict(theirs.named_modules())
    for name in layers:
        assert torch.equal(their_modules[name].weight, dict(ours.named_modules())[name].weight), name
    assert torch.equal(their_logits, our_logits)


def test_act_order_is_refused_in_one_line_and_leaves_nothing(tiny_model_dir: Path, tmp_path: Path) -> None:
    ckpt = make_checkpoint(tiny_model_dir, tmp_path / "ckpt", QuantSpec(4, 32), "gptq", act_order=True)
    out, direct = tmp_path / "ct", tmp_path / "direct"
    direct.mkdir()
    with pytest.raises(QatcliError, match="act-order g_idx; compressed-tensors cannot store one"):
        export_compressed_tensors(ckpt, direct)
    assert not any(direct.iterdir())

    refused = run_cli("export", str(ckpt), "-o", str(out), "--format", "compressed-tensors")
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert "Traceback" not in refused.stderr and "act-order g_idx" in lines[-1], refused.stderr
    assert lines[-1].startswith("qatcli: error:")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "direct"]  # no output, no temporary sibling

    clamp = run_cli("export", str(ckpt), "-o", str(out), "--format", "compressed-tensors", "--v1-clamp-zeros")
    assert clamp.returncode == 2 and "--v1-clamp-zeros applies to format gptq only" in clamp.stderr
    assert "Traceback" not in clamp.stderr and not out.exists()


def test_export_command_writes_warns_and_keeps_outputs(tiny_model_dir: Path, tmp_path: Path) -> None:
    four = make_checkpoint(tiny_model_dir, tmp_path / "w4", QuantSpec(4, 32), "rtn")
    two = make_checkpoint(tiny_model_dir, tmp_path / "w2", QuantSpec(2, 32, sym=False), "rtn")
    out = tmp_path / "ct"
    made = run_cli("export", str(four), "-o", str(out), "--format", "compressed-tensors")
    assert made.returncode == 0, made.stderr
    assert "warning" not in made.stderr
    files = sorted(p.name for p in out.iterdir())
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    before = (out / "model.safetensors").read_bytes()

    again = run_cli("export", str(two), "-o", str(out), "--format", "compressed-tensors")
    assert again.returncode == 2 and "--force" in again.stderr
    assert sorted(p.name for p in out.iterdir()) == files and (out / "model.safetensors").read_bytes() == before

    forced = run_cli("export", str(two), "-o", str(out), "--format", "compressed-tensors", "--force")
    assert forced.returncode == 0, forced.stderr
    warning = " ".join(forced.stderr.split())
    assert "warning: 2-bit compressed-tensors: vLLM's fast kernels (Marlin, Machete) take 4 and 8 bits" in warning
    assert "vLLM refuses asymmetric" in warning
    args = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert args["weights"]["num_bits"] == 2 and args["weights"]["symmetric"] is False

    bad = run_cli("export", str(four), "-o", str(tmp_path / "bad"), "--format", "compressed_tensors")
    assert bad.returncode == 2 and not (tmp_path / "bad").exists()
    assert bad.stderr.strip().splitlines() == [
        "qatcli: error: recipe: export.format must be one of gptq, gptq_v2, compressed-tensors, gguf, "
        "got 'compressed_tensors'"
    ]


@pytest.mark.parametrize("sym", [True, False])
def test_eval_reads_the_export_through_compressed_tensors(
    tiny_model_dir: Path, sotu: Path, tmp_path: Path, sym: bool
) -> None:
    ckpt = make_checkpoint(tiny_model_dir, tmp_path / "ckpt", QuantSpec(4, 32, sym), "rtn")
    out = tmp_path / "ct"
    made = run_cli("export", str(ckpt), "-o", str(out), "--format", "compressed-tensors", "--dtype", "float32")
    assert made.returncode == 0, made.stderr
    data = ["--data", str(sotu / "test.txt"), "--seqlen", "64", "--max-windows", "3"]
    result = run_cli("eval", str(ckpt), str(out), *data, "--json", str(tmp_path / "e.json"))
    assert result.returncode == 0, result.stderr
    ours, theirs = json.loads((tmp_path / "e.json").read_text())
    assert theirs["format"] == "compressed-tensors" and (theirs["bits"], theirs["sym"]) == (4, sym)
    assert theirs["ppl"] == pytest.approx(ours["ppl"], rel=1e-5)  # float32 export: the very same weights
    assert 0 < theirs["weight_bytes"] < ours["weight_bytes"] * 1.5
