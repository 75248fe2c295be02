"""Export a qatcli checkpoint to a deployable directory: the GPTQ format, or compressed-tensors' pack-quantized."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from qatcli.errors import QatcliError
from qatcli.formats import compressed_tensors as ct
from qatcli.formats.checkpoint import load_checkpoint
from qatcli.formats.gptq_format import (
    DENSE_DTYPES,
    SAFETENSORS_INDEX,
    TENSOR_SUFFIXES,
    can_pack,
    pack_layer,
    quantization_config,
)
from qatcli.progress import progress_bar
from qatcli.quant.grid import QuantSpec, quantize
from qatcli.quant.targets import output_head


@dataclass
class ExportReport:
    fmt: str
    group_size: int  # the default spec's (the config's top level); specs holds each layer's own
    packed: list[str] = field(default_factory=list)
    dense: list[str] = field(default_factory=list)
    clamped_zero_points: int = 0
    files: dict[str, int] = field(default_factory=dict)  # file name -> bytes
    bits: int = 4
    sym: bool = True
    specs: dict[str, QuantSpec] = field(default_factory=dict)
    unfused: list[str] = field(default_factory=list)  # layers vLLM fuses (q/k/v, gate/up) that differ in spec
    lm_head: bool = False  # lm_head is packed
    dense_dtype: str | None = None  # what the unquantized tensors are stored as, where the format decides it
    details: dict[str, Any] = field(default_factory=dict)  # format-specific facts its serving notes read

    @property
    def group_sizes(self) -> list[int]:
        return sorted({spec.group_size for spec in self.specs.values()} or {self.group_size})

    @property
    def bit_widths(self) -> list[int]:
        return sorted({spec.bits for spec in self.specs.values()} or {self.bits})


# The group sizes of the fast GPU kernels that read the GPTQ format (GPTQModel's Marlin and ExLlamaV2, vLLM's
# gptq_marlin); other sizes load only through slower fallbacks (GPTQModel's torch and triton kernels).
FAST_KERNEL_GROUP_SIZES = (-1, 32, 64, 128)


# vLLM runs these Llama layers as one fused module each (its packed_modules_mapping): they must share a spec, and a
# dynamic rule must also name the fused module for vLLM to apply it.
VLLM_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def default_spec(meta: dict, layers: dict) -> QuantSpec:
    """The checkpoint's stated default spec (its quantization's bits, group_size and sym); where it does not
    state one, the spec most of its layers have."""
    q = meta.get("quantization", {})
    try:
        return QuantSpec(q["bits"], q["group_size"], q["sym"])
    except (KeyError, TypeError, ValueError):
        specs = [lq.spec for lq in layers.values()]
        return max(specs, key=specs.count)


def dynamic_rules(default: QuantSpec, specs: dict[str, QuantSpec]) -> dict[str, dict]:
    """GPTQModel's `dynamic` overrides for the layers whose spec is not ``default``: one exact-name rule each
    ("+:^name$", which GPTQModel and vLLM match against the module name from its start), plus, for vLLM, a
    rule naming its fused module where all of a fused group's layers share one spec."""
    rules: dict[str, dict] = {}

    def fields(spec: QuantSpec) -> dict:
        return {"bits": spec.bits, "group_size": spec.group_size, "sym": spec.sym}

    for name, spec in specs.items():
        if spec != default:
            rules[f"+:^{re.escape(name)}$"] = fields(spec)
    for name, spec in specs.items():
        prefix, _, leaf = name.rpartition(".")
        for fused, parts in VLLM_FUSED.items():
            if leaf != parts[0] or spec == default:
                continue
            members = [f"{prefix}.{part}" for part in parts]
            if all(specs.get(m) == spec for m in members):
                rules[f"+:^{re.escape(f'{prefix}.{fused}')}$"] = fields(spec)
    return rules


def unfused_layers(specs: dict[str, QuantSpec]) -> list[str]:
    """Layers of a group vLLM fuses into one module (q/k/v, gate/up) whose specs differ within the group."""
    out = []
    for name in specs:
        prefix, _, leaf = name.rpartition(".")
        for parts in VLLM_FUSED.values():
            members = [f"{prefix}.{part}" for part in parts]
            if leaf == parts[0] and len({specs.get(m) for m in members}) > 1:
                out += [m for m in members if m in specs]
    return out


def choose_format(spec: QuantSpec, requested: str | None, v1_clamp_zeros: bool) -> str:
    """gptq (v1) for symmetric grids, gptq_v2 where ``spec`` (for a mixed checkpoint: any layer) is asymmetric."""
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
    spec = default_spec(meta, layers)
    specs = {name: lq.spec for name, lq in layers.items()}
    all_sym = QuantSpec(spec.bits, spec.group_size, all(s.sym for s in [spec, *specs.values()]))
    report = ExportReport(choose_format(all_sym, fmt, v1_clamp_zeros), spec.group_size, bits=spec.bits, sym=spec.sym)
    report.specs, report.unfused = specs, unfused_layers(specs)
    target_dtype = DENSE_DTYPES[dtype]
    modules = dict(model.named_modules())
    tensors = _dense_tensors(model, layers, target_dtype)

    with progress_bar() as progress:
        task = progress.add_task("packing", total=len(layers), unit="layer")
        for name, lq in layers.items():
            weight = modules[name].weight.detach()
            zeros = lq.zeros
            if report.fmt == "gptq" and not lq.spec.sym:
                report.clamped_zero_points += int((zeros < 1).sum())
                zeros = zeros.clamp_min(1)
            codes = quantize(weight, lq.scales, zeros, lq.g_idx, lq.spec.maxq)
            out_f, in_f = weight.shape
            if can_pack(in_f, out_f):
                packed = pack_layer(codes, lq.scales, zeros, lq.g_idx, lq.spec.bits, report.fmt)
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
    qcfg["meta"]["qatcli_base_model"] = base_model_name(meta)
    try:
        head: str | None = output_head(model)[0]
    except QatcliError:  # no Linear lm_head: nothing to say about it
        head = None
    report.lm_head = qcfg["lm_head"] = head in report.packed  # GPTQModel then builds lm_head quantized too
    # GPTQModel and vLLM skip modules matched by a "-:" pattern in `dynamic` and give those matched by a "+:"
    # pattern its overrides (the first match wins); optimum (the transformers path) reads no `dynamic`: it
    # converts only the modules named in `modules_in_block_to_quantize`, all with the top-level spec.
    dynamic = {f"-:^{re.escape(n)}$": {} for n in report.dense}
    dynamic.update(dynamic_rules(spec, {n: specs[n] for n in report.packed}))
    if dynamic:
        qcfg["dynamic"] = dynamic
    if report.dense:
        qcfg["modules_in_block_to_quantize"] = [[n for n in report.packed if n != head]]
    _write_configs(model, tokenizer, directory, dtype, qcfg)
    (directory / "quantize_config.json").write_text(json.dumps(qcfg, indent=2) + "\n")
    return report


def export_compressed_tensors(
    checkpoint: Path, directory: Path, dtype: str = "float16", max_shard_bytes: int = 5 * 2**30
) -> ExportReport:
    """Write the compressed-tensors pack-quantized model of ``checkpoint`` into ``directory`` (made atomic by
    the caller). Every quantized layer is packed (the format pads any length); every other Linear is listed
    in ``ignore`` and stays dense in ``dtype``, as do embeddings and norms."""
    model, tokenizer, meta, layers = load_checkpoint(checkpoint, torch.device("cpu"), fake_quant=False)
    spec = default_spec(meta, layers)
    for name, lq in layers.items():
        ct.check_layer(name, lq.spec, lq.zeros, lq.g_idx)
    report = ExportReport(ct.FORMAT, spec.group_size, bits=spec.bits, sym=spec.sym)
    report.specs = {name: lq.spec for name, lq in layers.items()}
    report.unfused = unfused_layers(report.specs)
    modules = dict(model.named_modules())
    tensors = _dense_tensors(model, layers, DENSE_DTYPES[dtype])
    with progress_bar() as progress:
        task = progress.add_task("packing", total=len(layers), unit="layer")
        for name, lq in layers.items():
            codes = lq.codes(modules[name].weight.detach())
            packed = ct.pack_layer(codes, lq.scales, lq.zeros, lq.spec, ct.SCALE_DTYPES[dtype])
            tensors.update({f"{name}.{key}": value for key, value in packed.items()})
            report.packed.append(name)
            progress.advance(task)

    report.files = write_shards(tensors, directory, max_shard_bytes)
    ignore = sorted(n for n, m in modules.items() if isinstance(m, torch.nn.Linear) and n not in layers)
    provenance = {"method": meta["method"], "base_model": base_model_name(meta)}
    _write_configs(model, tokenizer, directory, dtype, ct.quantization_config(report.specs, ignore, provenance))
    return report


def base_model_name(meta: dict) -> str:
    """What `generated:` data is sampled from: an alias by name, a directory by its path."""
    base = meta["base_model"]
    return base["spec"] if base["kind"] != "local" else base["location"]


def _dense_tensors(model: torch.nn.Module, layers: dict, target_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of the model except the quantized layers' weights, floats in ``target_dtype``."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()  # tied parameters (embedding and lm_head) are stored once
    for name, tensor in model.state_dict().items():
        module_name = name.rsplit(".", 1)[0]
        if (module_name in layers and name.endswith(".weight")) or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        tensors[name] = tensor.to(target_dtype) if tensor.is_floating_point() else tensor
    return tensors


def _write_configs(model: torch.nn.Module, tokenizer, directory: Path, dtype: str, qcfg: dict) -> None:
    """config.json with ``qcfg`` as its quantization_config, generation_config.json and the tokenizer files."""
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = dtype
    config["quantization_config"] = qcfg
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if model.generation_config is not None:
        model.generation_config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
