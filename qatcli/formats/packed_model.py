"""Run any GPTQ-format directory (qatcli's export or one written by GPTQModel) with packed weights.

Each quantized Linear becomes a PackedLinear that keeps qweight/qzeros/scales/g_idx as they are stored and
dequantizes them with vectorised torch on every forward (the CPU reference path).

Per-layer grids follow GPTQModel's `dynamic` (gptqmodel/quantization/config.py, 7.6.0): each key is a regular
expression matched against the module name from its start (re.match), with "-:" (the module is not
quantized) or "+:" (or no prefix: its values override bits and group_size) in front; the "-:" rules are tried
first, then the others in order, and the first match wins. lm_head is packed where its tensors are.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from qatcli.errors import QatcliError
from qatcli.formats.gptq_format import FORMATS, SAFETENSORS_INDEX, TENSOR_SUFFIXES, PackedLayer, unpack_layer
from qatcli.quant.grid import SUPPORTED_BITS, dequantize


class PackedLinear(nn.Module):
    """A Linear layer computing with GPTQ-packed weights."""

    def __init__(
        self, in_features: int, out_features: int, bits: int, fmt: str, packed: PackedLayer, bias: torch.Tensor | None
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.bits, self.fmt = in_features, out_features, bits, fmt
        for key in TENSOR_SUFFIXES:
            self.register_buffer(key, getattr(packed, key))
        self.register_buffer("bias", bias)

    def dequantized_weight(self) -> torch.Tensor:
        """[out, in] float32 weights s * (q - z), by the same grid.dequantize as every other path."""
        packed = PackedLayer(self.qweight, self.qzeros, self.scales, self.g_idx)
        codes, zeros, scales = unpack_layer(packed, self.bits, self.fmt)
        return dequantize(codes, scales, zeros, self.g_idx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight().to(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, fmt={self.fmt}"


def packed_layer_bytes(layer: PackedLinear) -> int:
    """Bytes of the packed tensors (qweight, qzeros, scales, g_idx) of one layer."""
    return sum(t.numel() * t.element_size() for t in (layer.qweight, layer.qzeros, layer.scales, layer.g_idx))


def read_gptq_config(directory: Path) -> dict[str, Any] | None:
    """The GPTQ quantization config of a model directory, or None if it is not a GPTQ-format model."""
    for name, key in (("config.json", "quantization_config"), ("quantize_config.json", None)):
        path = Path(directory) / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise QatcliError(f"'{path}' is not valid JSON") from err
        qcfg = data.get(key) if key else data
        if isinstance(qcfg, dict) and (qcfg.get("quant_method") or qcfg.get("method")) == "gptq":
            return qcfg
    return None


@dataclass
class GPTQGrid:
    """A GPTQ config's grid: the top-level bits and group size, and its `dynamic` rules in the order they are
    tried: (negative, compiled pattern, overrides)."""

    bits: int
    group_size: int
    rules: list[tuple[bool, re.Pattern, dict[str, Any]]]

    def layer(self, name: str) -> tuple[int, int] | None:
        """Bits and group size of module ``name``; None where a "-:" rule leaves it unquantized."""
        for negative, pattern, overrides in self.rules:
            if pattern.match(name):
                if negative:
                    return None
                return overrides.get("bits", self.bits), overrides.get("group_size", self.group_size)
        return self.bits, self.group_size


def _bits_problem(bits: Any) -> bool:
    return isinstance(bits, bool) or bits not in SUPPORTED_BITS


def _group_problem(group_size: Any) -> bool:
    return isinstance(group_size, bool) or not isinstance(group_size, int) or not (group_size == -1 or group_size > 0)


def _checked_config(directory: Path, qcfg: dict[str, Any]) -> tuple[GPTQGrid, str]:
    """The grid and format of a GPTQ config, each value checked in type and range."""
    bits = qcfg.get("bits")
    fmt = qcfg.get("checkpoint_format", qcfg.get("format", "gptq"))
    group_size = qcfg.get("group_size", -1)
    if _bits_problem(bits):
        raise QatcliError(f"'{directory}': GPTQ bits {bits!r} not supported (2, 3, 4 or 8)")
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise QatcliError(f"'{directory}': checkpoint format {fmt!r} not supported ({', '.join(FORMATS)})")
    if group_size is None:
        group_size = -1
    if _group_problem(group_size):
        raise QatcliError(f"'{directory}': group_size {group_size!r} is not -1 or a positive integer")
    dynamic = qcfg.get("dynamic") or {}
    if not isinstance(dynamic, dict) or not all(isinstance(k, str) and isinstance(v, dict) for k, v in dynamic.items()):
        raise QatcliError(f"'{directory}': 'dynamic' must map module patterns to overrides, got {dynamic!r}")
    rules = []
    for key in sorted(dynamic, key=lambda k: not k.startswith("-:")):  # GPTQModel tries the "-:" rules first
        overrides = dynamic[key]
        where = f"'{directory}': dynamic rule '{key}'"
        try:
            pattern = re.compile(key[2:] if key.startswith(("-:", "+:")) else key)
        except re.error as err:
            raise QatcliError(f"{where} is not a regular expression this loader reads ({err})") from err
        if "bits" in overrides and _bits_problem(overrides["bits"]):
            raise QatcliError(f"{where}: bits {overrides['bits']!r} not supported (2, 3, 4 or 8)")
        if "group_size" in overrides and _group_problem(overrides["group_size"]):
            raise QatcliError(f"{where}: group_size {overrides['group_size']!r} is not -1 or a positive integer")
        if overrides.get("pack_dtype", "int32") != "int32":
            raise QatcliError(f"{where}: pack_dtype {overrides['pack_dtype']!r} not supported (int32)")
        rules.append((key.startswith("-:"), pattern, overrides))
    return GPTQGrid(bits, group_size, rules), fmt


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    index = directory / SAFETENSORS_INDEX
    try:
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = ["model.safetensors"]
        tensors: dict[str, torch.Tensor] = {}
        for name in files:
            tensors.update(load_file(str(directory / name)))
    except (FileNotFoundError, SafetensorError, KeyError, json.JSONDecodeError) as err:
        raise QatcliError(f"'{directory}': cannot read the model weights ({err})") from err
    return tensors


def _expect(directory: Path, name: str, tensor: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    if tensor.dtype != dtype or tuple(tensor.shape) != shape:
        raise QatcliError(f"'{directory}': {name} is {tensor.dtype} {tuple(tensor.shape)}, expected {dtype} {shape}")


def load_gptq_model(directory: Path, device: torch.device) -> tuple[nn.Module, PreTrainedTokenizerBase, dict]:
    """Build the model from its config, put a PackedLinear wherever the weights are packed, load the rest."""
    directory = Path(directory)
    qcfg = read_gptq_config(directory)
    if qcfg is None:
        raise QatcliError(f"'{directory}' is not a GPTQ-format model (no quantization_config with quant_method gptq)")
    grid, fmt = _checked_config(directory, qcfg)
    try:
        config = AutoConfig.from_pretrained(directory)
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as err:
        raise QatcliError(f"'{directory}': cannot read its config or tokenizer ({err})") from err
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = _read_tensors(directory)

    modules = dict(model.named_modules())
    for qname in [k for k in tensors if k.endswith(".qweight")]:
        name = qname.removesuffix(".qweight")
        linear = modules.get(name)
        if not isinstance(linear, nn.Linear):
            raise QatcliError(f"'{directory}': packed tensors for '{name}', which is not a Linear layer of the model")
        out_f, in_f = linear.out_features, linear.in_features
        layer_grid = grid.layer(name)
        if layer_grid is None:
            raise QatcliError(f"'{directory}': packed tensors for '{name}', which a '-:' dynamic rule leaves dense")
        bits, group_size = layer_grid
        if group_size != -1 and in_f % group_size:
            raise QatcliError(f"'{directory}': group_size {group_size} does not divide {name}'s {in_f} inputs")
        groups = in_f // group_size if group_size != -1 else 1
        try:
            packed = PackedLayer(*(tensors.pop(f"{name}.{k}") for k in TENSOR_SUFFIXES))
        except KeyError as err:
            raise QatcliError(f"'{directory}': '{name}' lacks {err.args[0]}") from err
        _expect(directory, f"{name}.qweight", packed.qweight, torch.int32, (in_f * bits // 32, out_f))
        _expect(directory, f"{name}.qzeros", packed.qzeros, torch.int32, (groups, out_f * bits // 32))
        _expect(directory, f"{name}.scales", packed.scales, torch.float16, (groups, out_f))
        _expect(directory, f"{name}.g_idx", packed.g_idx, torch.int32, (in_f,))
        if int(packed.g_idx.min()) < 0 or int(packed.g_idx.max()) >= groups:
            raise QatcliError(f"'{directory}': {name}.g_idx points outside its {groups} groups")
        bias = tensors.pop(f"{name}.bias", None)
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name], child, PackedLinear(in_f, out_f, bits, fmt, packed, bias))

    # a quantized lm_head is its own layer (qatcli writes such an export untied); only a dense one can be tied
    tied = getattr(config, "tie_word_embeddings", False) and isinstance(model.get_output_embeddings(), nn.Linear)
    state = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    packed_buffers = {
        f"{n}.{k}" for n, m in model.named_modules() if isinstance(m, PackedLinear) for k in (*TENSOR_SUFFIXES, "bias")
    }
    missing = [m for m in missing if m not in packed_buffers and not (tied and m == "lm_head.weight")]
    if missing or unexpected:
        raise QatcliError(
            f"'{directory}': weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    if tied:
        model.tie_weights()
    return model.to(device).eval(), tokenizer, qcfg
