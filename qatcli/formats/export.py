"""Export a qatcli checkpoint to a deployable GPTQ-format directory."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from qatcli.errors import QatcliError
from qatcli.formats.checkpoint import load_checkpoint
from qatcli.formats.gptq_format import (
    DENSE_DTYPES,
    SAFETENSORS_INDEX,
    TENSOR_SUFFIXES,
    can_pack,
    pack_layer,
    quantization_config,
)
from qatcli.quant.grid import QuantSpec, quantize
from qatcli.report.progress import progress_bar


@dataclass
class ExportReport:
    fmt: str
    group_size: int
    packed: list[str] = field(default_factory=list)
    dense: list[str] = field(default_factory=list)
    clamped_zero_points: int = 0
    files: dict[str, int] = field(default_factory=dict)  # file name -> bytes


# The group sizes of the fast GPU kernels that read the GPTQ format (GPTQModel's Marlin and ExLlamaV2, vLLM's
# gptq_marlin); other sizes load only through slower fallbacks (GPTQModel's torch and triton kernels).
FAST_KERNEL_GROUP_SIZES = (-1, 32, 64, 128)


def _common_spec(layers: dict) -> QuantSpec:
    specs = {lq.spec for lq in layers.values()}
    if len(specs) != 1:
        raise QatcliError(f"the GPTQ format holds one bit width and group size per model; this checkpoint has {specs}")
    return specs.pop()


def choose_format(spec: QuantSpec, requested: str | None, v1_clamp_zeros: bool) -> str:
    if requested is None:
        return "gptq" if spec.sym else "gptq_v2"
    if requested == "gptq" and not spec.sym and not v1_clamp_zeros:
        raise QatcliError(
            "an asymmetric checkpoint in format 'gptq' (v1) needs zero points >= 1: write gptq_v2 (the default) "
            "or pass --v1-clamp-zeros to clamp them (this changes the quantized weights)"
        )
    return requested


def write_shards(tensors: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int) -> dict[str, int]:
    """model.safetensors, or model-0000i-of-0000n.safetensors with an index above ``max_shard_bytes``."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(tensors, str(directory / "model.safetensors"), metadata=meta)
        return {"model.safetensors": (directory / "model.safetensors").stat().st_size}
    files, weight_map = {}, {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name), metadata=meta)
        files[name] = (directory / name).stat().st_size
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    files[SAFETENSORS_INDEX] = (directory / SAFETENSORS_INDEX).stat().st_size
    return files


def export_gptq(
    checkpoint: Path,
    directory: Path,
    fmt: str | None = None,
    dtype: str = "float16",
    max_shard_bytes: int = 5 * 2**30,
    v1_clamp_zeros: bool = False,
) -> ExportReport:
    """Write the GPTQ-format model of ``checkpoint`` into ``directory`` (made atomic by the caller)."""
    model, tokenizer, meta, layers = load_checkpoint(checkpoint, torch.device("cpu"), fake_quant=False)
    spec = _common_spec(layers)
    report = ExportReport(choose_format(spec, fmt, v1_clamp_zeros), spec.group_size)
    target_dtype = DENSE_DTYPES[dtype]
    modules = dict(model.named_modules())

    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()  # tied parameters (embedding and lm_head) are stored once
    for name, tensor in model.state_dict().items():
        module_name = name.rsplit(".", 1)[0]
        if (module_name in layers and name.endswith(".weight")) or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        tensors[name] = tensor.to(target_dtype) if tensor.is_floating_point() else tensor

    with progress_bar() as progress:
        task = progress.add_task("packing", total=len(layers), unit="layer")
        for name, lq in layers.items():
            weight = modules[name].weight.detach()
            zeros = lq.zeros
            if report.fmt == "gptq" and not spec.sym:
                report.clamped_zero_points += int((zeros < 1).sum())
                zeros = zeros.clamp_min(1)
            codes = quantize(weight, lq.scales, zeros, lq.g_idx, spec.maxq)
            out_f, in_f = weight.shape
            if can_pack(in_f, out_f):
                packed = pack_layer(codes, lq.scales, zeros, lq.g_idx, spec.bits, report.fmt)
                for key in TENSOR_SUFFIXES:
                    tensors[f"{name}.{key}"] = getattr(packed, key)
                if f"{name}.bias" in tensors:
                    tensors[f"{name}.bias"] = tensors[f"{name}.bias"].to(torch.float16)
                report.packed.append(name)
            else:
                tensors[f"{name}.weight"] = lq.fake_quant(weight).to(target_dtype)
                report.dense.append(name)
            progress.advance(task)

    report.files = write_shards(tensors, directory, max_shard_bytes)
    qcfg = quantization_config(spec, report.fmt, meta.get("quantization", {}))
    qcfg["meta"]["qatcli_method"] = meta["method"]
    base = meta["base_model"]  # what `generated:` data is sampled from: an alias by name, a directory by its path
    qcfg["meta"]["qatcli_base_model"] = base["spec"] if base["kind"] != "local" else base["location"]
    if report.dense:
        # GPTQModel and vLLM skip modules matched by a "-:" pattern in `dynamic`; optimum (the transformers
        # path) instead converts only the modules named in `modules_in_block_to_quantize`.
        qcfg["dynamic"] = {f"-:^{re.escape(n)}$": {} for n in report.dense}
        qcfg["modules_in_block_to_quantize"] = [report.packed]
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = dtype
    config["quantization_config"] = qcfg
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (directory / "quantize_config.json").write_text(json.dumps(qcfg, indent=2) + "\n")
    if model.generation_config is not None:
        model.generation_config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return report
