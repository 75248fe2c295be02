"""The qatcli checkpoint directory: latent weights plus the grid of every quantized layer.

Layout (documented in docs/checkpoint-format.md):
  config.json, generation_config.json, model.safetensors[.index.json], tokenizer files
      a plain Hugging Face model holding the *latent* weights (fp32). For RTN they are the original
      weights; for GPTQ the dequantized ones; for QAT the trained latent weights.
  quant.safetensors
      per quantized layer ``NAME``: NAME.scales (fp16 [out, G]), NAME.zeros (uint8 [out, G]) and
      NAME.g_idx (int32 [in]).
  qatcli.json
      format name and version, method, base model, per-layer spec, resolved recipe, provenance, metrics.

The quantized weight of a layer is always grid.fake_quantize(latent, scales, zeros, g_idx): eval,
QAT and export derive the integer codes with that one function.
"""

from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from qatcli import __version__
from qatcli.errors import QatcliError
from qatcli.quant.grid import QuantSpec
from qatcli.quant.layer import LayerQuant, apply_fake_quant

FORMAT = "qatcli-checkpoint"
FORMAT_VERSION = 1
META_FILE = "qatcli.json"
QUANT_FILE = "quant.safetensors"


def provenance(command: str, device: torch.device, seed: int) -> dict[str, Any]:
    return {
        "command": command,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "seed": seed,
        "host": platform.node(),
        "qatcli": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def save_checkpoint(
    directory: Path,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    layers: dict[str, LayerQuant],
    meta: dict[str, Any],
) -> None:
    """Write a complete checkpoint into ``directory`` (the caller makes the directory atomic)."""
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    tensors = {}
    for name, lq in layers.items():
        tensors[f"{name}.scales"] = lq.scales.contiguous()
        tensors[f"{name}.zeros"] = lq.zeros.contiguous()
        tensors[f"{name}.g_idx"] = lq.g_idx.contiguous()
    save_file(tensors, str(directory / QUANT_FILE), metadata={"format": FORMAT})
    modules = dict(model.named_modules())
    layer_meta = {
        name: {
            "bits": lq.spec.bits,
            "group_size": lq.spec.group_size,
            "sym": lq.spec.sym,
            "act_order": lq.act_order,
            "in_features": modules[name].in_features,
            "out_features": modules[name].out_features,
        }
        for name, lq in layers.items()
    }
    full = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta, "layers": layer_meta}
    (directory / META_FILE).write_text(json.dumps(full, indent=2) + "\n")


def is_checkpoint(path: Path) -> bool:
    return (Path(path) / META_FILE).is_file()


def read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((Path(path) / META_FILE).read_text())
    except json.JSONDecodeError as err:
        raise QatcliError(f"checkpoint '{path}': {META_FILE} is not valid JSON") from err
    if meta.get("format") != FORMAT:
        raise QatcliError(f"checkpoint '{path}': {META_FILE} does not describe a {FORMAT}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise QatcliError(
            f"checkpoint '{path}' has format version {meta.get('format_version')}; "
            f"this qatcli reads version {FORMAT_VERSION}"
        )
    return meta


def _read_layers(path: Path, meta: dict[str, Any], modules: dict[str, nn.Module]) -> dict[str, LayerQuant]:
    try:
        tensors = load_file(str(Path(path) / QUANT_FILE))
    except (FileNotFoundError, SafetensorError) as err:
        raise QatcliError(f"checkpoint '{path}': cannot read {QUANT_FILE} ({err})") from err
    layers = {}
    for name, info in meta["layers"].items():
        where = f"checkpoint '{path}', layer {name}"
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            raise QatcliError(f"{where}: the model has no Linear layer of that name")
        try:
            spec = QuantSpec(info["bits"], info["group_size"], info["sym"])
            scales, zeros, g_idx = (tensors[f"{name}.{k}"] for k in ("scales", "zeros", "g_idx"))
        except (KeyError, ValueError) as err:
            raise QatcliError(f"{where}: incomplete or invalid quantization data ({err})") from err
        out_f, in_f = module.weight.shape
        if (info["in_features"], info["out_features"]) != (in_f, out_f):
            raise QatcliError(
                f"{where}: metadata says {info['out_features']}x{info['in_features']}, weights are {out_f}x{in_f}"
            )
        groups = spec.num_groups(in_f)
        expected = {
            "scales": (torch.float16, (out_f, groups)),
            "zeros": (torch.uint8, (out_f, groups)),
            "g_idx": (torch.int32, (in_f,)),
        }
        for key, tensor in (("scales", scales), ("zeros", zeros), ("g_idx", g_idx)):
            dtype, shape = expected[key]
            if tensor.dtype != dtype or tuple(tensor.shape) != shape:
                raise QatcliError(f"{where}: {key} is {tensor.dtype} {tuple(tensor.shape)}, expected {dtype} {shape}")
        if int(zeros.max()) > spec.maxq or int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
            raise QatcliError(f"{where}: zero points or g_idx outside their range")
        if not bool((scales > 0).all()):
            raise QatcliError(f"{where}: scales must be positive")
        layers[name] = LayerQuant(spec, scales, zeros, g_idx, bool(info.get("act_order", False)))
    return layers


def load_checkpoint(
    path: Path, device: torch.device, fake_quant: bool = True
) -> tuple[nn.Module, PreTrainedTokenizerBase, dict[str, Any], dict[str, LayerQuant]]:
    """Load a checkpoint; with ``fake_quant`` the Linear weights are replaced by their quantized values."""
    meta = read_meta(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise QatcliError(f"checkpoint '{path}': cannot load its model ({str(err).splitlines()[0]})") from err
    layers = _read_layers(path, meta, dict(model.named_modules()))
    if fake_quant:
        apply_fake_quant(model, layers)
    return model.to(device).eval(), tokenizer, meta, layers
