"""The GPTQ checkpoint format as transformers, GPTQModel and vLLM read it: per-layer tensors and configs.

Per quantized Linear ``p`` (in_features = in, out_features = out, G groups, b bits):

    p.qweight  int32   [in * b / 32, out]   codes packed along input rows
    p.qzeros   int32   [G, out * b / 32]    zero points packed along output columns
    p.scales   float16 [G, out]
    p.g_idx    int32   [in]
    p.bias     float16 [out]                (when the layer has one)

and W[o, i] = scales[g_idx[i], o] * (q[i, o] - z[g_idx[i], o]). Format "gptq" (v1) stores z - 1 in
qzeros, "gptq_v2" stores z. A v1 zero point of 0 is not portable (loaders add 1 to whole packed words and
the carry spills into the neighbour), so asymmetric grids are written as v2 unless the caller clamps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from qatcli.formats.packing import pack, unpack
from qatcli.quant.grid import QuantSpec
from qatcli.version import __version__

FORMATS = ("gptq", "gptq_v2")
TENSOR_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
SAFETENSORS_INDEX = "model.safetensors.index.json"
# dtypes the tensors that stay dense (embeddings, norms, lm_head) may be written in
DENSE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class PackedLayer:
    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor


def can_pack(in_features: int, out_features: int) -> bool:
    """The format packs 32 values per chunk along both dimensions."""
    return in_features % 32 == 0 and out_features % 32 == 0


def pack_layer(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor, bits: int, fmt: str
) -> PackedLayer:
    """codes [out, in], scales/zeros [out, G] (qatcli layout) -> the GPTQ tensors."""
    stored_zeros = zeros.to(torch.int64).T
    if fmt == "gptq":
        if int(stored_zeros.min()) < 1:
            raise ValueError("format 'gptq' (v1) cannot store a zero point of 0; use gptq_v2")
        stored_zeros = stored_zeros - 1
    return PackedLayer(
        qweight=pack(codes.T, bits, dim=0),
        qzeros=pack(stored_zeros, bits, dim=1),
        scales=scales.T.to(torch.float16).contiguous(),
        g_idx=g_idx.to(torch.int32).contiguous(),
    )


def unpack_layer(layer: PackedLayer, bits: int, fmt: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The GPTQ tensors -> codes [out, in], zeros [out, G] (int64) and scales [out, G] (float32)."""
    codes = unpack(layer.qweight, bits, dim=0).T
    zeros = unpack(layer.qzeros, bits, dim=1)
    if fmt == "gptq":
        zeros = zeros + 1  # per value, after unpacking: no carry into neighbouring values
    return codes, zeros.T, layer.scales.float().T


def quantization_config(spec: QuantSpec, fmt: str, extra: dict[str, Any]) -> dict[str, Any]:
    """quantization_config for config.json, also written as quantize_config.json.

    GPTQ's own options (static_groups, true_sequential, damp_percent) are written where the checkpoint has
    them, i.e. for GPTQ checkpoints; loaders take their defaults otherwise.
    """
    config = {
        "quant_method": "gptq",
        "method": "gptq",
        "checkpoint_format": fmt,
        "format": fmt,
        "bits": spec.bits,
        "group_size": spec.group_size,
        "sym": spec.sym,
        "desc_act": bool(extra.get("desc_act", False)),
        "lm_head": False,
        "pack_dtype": "int32",
        "meta": {"quantizer": [f"qatcli:{__version__}"]},
    }
    config.update({k: extra[k] for k in ("static_groups", "true_sequential", "damp_percent") if k in extra})
    return config
