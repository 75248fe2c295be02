"""The compressed-tensors "pack-quantized" format (llm-compressor's output, vLLM's compressed-tensors path).

Per quantized Linear ``p`` (out_features = out, in_features = in, G groups, b bits):

    p.weight_packed      int32   [out, ceil(in * b / 32)]   codes packed along the input dimension
    p.weight_scale       float16 [out, G]                    (float32 when the export's dtype is float32)
    p.weight_zero_point  int32   [ceil(out * b / 32), G]    zero points packed along the output dimension
                                                             (asymmetric grids only)
    p.weight_shape       int64   [2]                         (out, in)
    p.bias               the export's dtype                  (when the layer has one)

compressed-tensors works with signed codes c in [-2^(b-1), 2^(b-1) - 1], a signed zero point zc (0 for a
symmetric grid) and W = s * (c - zc); it packs c + 2^(b-1) and zc + 2^(b-1). qatcli's grid is
W = s * (q - z) with q, z in [0, 2^b - 1] (quant/grid.py), so with c = q - 2^(b-1) and zc = z - 2^(b-1) the
stored unsigned values are exactly qatcli's codes q and zero points z, and W is the same number. A symmetric
grid has z = 2^(b-1) everywhere, hence zc = 0, which is what compressed-tensors assumes when a layer has no
zero point. Packing is the dense bit stream of packing.py (32 values in b words; 3-bit values straddle words),
the layout compressed-tensors uses since its pull request 732 (0.20.1 here); a length that is not a multiple
of 32 is zero-padded and only the words holding values are kept.

Act-order checkpoints (a g_idx that is not i // group_size) are refused: compressed-tensors 0.20 removed
activation ordering with a g_idx ("actorder": "group"), so nothing would read the permutation.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from qatcli.errors import QatcliError
from qatcli.formats.packing import pack_any
from qatcli.quant.grid import QuantSpec, default_g_idx
from qatcli.version import __version__

FORMAT = "compressed-tensors"
PACK_FORMAT = "pack-quantized"
LAYER_TENSORS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
DTYPE_BYTES = {"I32": 4, "I64": 8, "F16": 2, "BF16": 2, "F32": 4}
# The compressed-tensors release whose layout and config this module writes (pinned in pyproject.toml).
COMPRESSED_TENSORS_VERSION = "0.20.1"
# Bit widths vLLM's fast mixed-precision kernels (Marlin, Machete) run for compressed-tensors weights; vLLM's
# compressed_tensors_wNa16.py takes symmetric 2-8 bits, the others only through its Humming kernel, and
# zero points (asymmetric grids) for 4 and 8 bits only.
FAST_KERNEL_BITS = (4, 8)
ZERO_POINT_BITS = (4, 8)
# dtypes the scales are stored in, by the export's dtype: fp16 holds qatcli's scales exactly, bf16 does not.
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.float16, "float32": torch.float32}


def check_layer(name: str, spec: QuantSpec, zeros: torch.Tensor, g_idx: torch.Tensor) -> None:
    """Refuse what the format cannot hold: a permuted g_idx, or a symmetric grid whose zero point is off."""
    if not torch.equal(g_idx.to(torch.int32), default_g_idx(g_idx.numel(), spec.group_size)):
        raise QatcliError(
            f"layer {name} has an act-order g_idx; compressed-tensors cannot store one (it dropped actorder "
            "'group'): quantize without act_order (act_group_aware keeps g_idx trivial) or export as gptq"
        )
    if spec.sym and not bool((zeros.to(torch.int64) == 2 ** (spec.bits - 1)).all()):
        raise QatcliError(f"layer {name}: a symmetric grid with a zero point other than {2 ** (spec.bits - 1)}")


def pack_layer(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, spec: QuantSpec, scale_dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """codes [out, in], scales/zeros [out, G] (qatcli layout) -> the layer's tensors, keyed by suffix."""
    out_features, in_features = codes.shape
    tensors = {
        "weight_packed": pack_any(codes.to(torch.int64), spec.bits, dim=1),
        "weight_scale": scales.to(scale_dtype).contiguous(),
        "weight_shape": torch.tensor([out_features, in_features], dtype=torch.int64),
    }
    if not spec.sym:
        tensors["weight_zero_point"] = pack_any(zeros.to(torch.int64), spec.bits, dim=0)
    return tensors


def weights_args(spec: QuantSpec) -> dict[str, Any]:
    """The QuantizationArgs of the weights (compressed-tensors' field names; it forbids any other field)."""
    channel = spec.group_size == -1
    return {
        "num_bits": spec.bits,
        "type": "int",
        "symmetric": spec.sym,
        "group_size": None if channel else spec.group_size,
        "strategy": "channel" if channel else "group",
        "dynamic": False,
    }


def config_groups(specs: dict[str, QuantSpec]) -> dict[str, dict[str, Any]]:
    """One config group per distinct spec. Where every quantized layer has the same spec, the group targets the
    class Linear (the layers left out are in ``ignore``); otherwise each group targets its layers by name
    (compressed-tensors matches a target that is not a class name or "re:" regex to the module name exactly,
    and vLLM maps its fused modules, qkv_proj and gate_up_proj, to their parts' names)."""
    distinct = list(dict.fromkeys(specs.values()))
    groups = {}
    for i, spec in enumerate(distinct):
        targets = ["Linear"] if len(distinct) == 1 else [name for name, s in specs.items() if s == spec]
        groups[f"group_{i}"] = {
            "targets": targets,
            "weights": weights_args(spec),
            "input_activations": None,
            "output_activations": None,
            "format": PACK_FORMAT,
        }
    return groups


def quantization_config(specs: dict[str, QuantSpec], ignore: list[str], provenance: dict[str, Any]) -> dict[str, Any]:
    """quantization_config for config.json: a config group per spec of ``specs`` (quantized layer -> spec);
    every Linear not quantized is in ``ignore``."""
    return {
        "quant_method": "compressed-tensors",
        "format": PACK_FORMAT,
        "quantization_status": "compressed",
        "version": COMPRESSED_TENSORS_VERSION,
        "config_groups": config_groups(specs),
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
        # loaders ignore keys they do not know; this one says where the checkpoint came from
        "qatcli": {"quantizer": f"qatcli:{__version__}", **provenance},
    }


def read_config(directory: Path) -> dict[str, Any] | None:
    """The quantization_config of a compressed-tensors model directory, or None for any other directory."""
    path = Path(directory) / "config.json"
    try:
        qcfg = json.loads(path.read_text()).get("quantization_config") if path.is_file() else None
    except (json.JSONDecodeError, AttributeError):
        return None
    return qcfg if isinstance(qcfg, dict) and qcfg.get("quant_method") == FORMAT else None


def packed_bytes(directory: Path) -> int:
    """Bytes of the quantized layers' tensors (packed weights, scales, zero points, shapes) in the directory."""
    total = 0
    for file in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                if key.rsplit(".", 1)[-1] in LAYER_TENSORS:
                    piece = f.get_slice(key)
                    total += math.prod(piece.get_shape()) * DTYPE_BYTES[piece.get_dtype()]
    return total


def load_model(directory: Path, device: torch.device) -> nn.Module:
    """The model decompressed by compressed-tensors itself (through transformers), in float32 on ``device``."""
    from transformers import AutoModelForCausalLM

    try:
        import compressed_tensors  # noqa: F401
        from transformers import CompressedTensorsConfig
    except ImportError:
        raise QatcliError(
            f"'{directory}' is a compressed-tensors model: reading it needs the compressed-tensors package "
            "(pip install 'qatcli[ct]')"
        ) from None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            directory, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
        )
    except (OSError, ValueError, RuntimeError) as err:
        reason = str(err).splitlines()[0]
        raise QatcliError(f"cannot load the compressed-tensors model '{directory}': {reason}") from err
    return model.float().to(device).eval()
