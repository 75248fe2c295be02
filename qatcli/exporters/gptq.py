"""The GPTQ format (v1 ``gptq`` and ``gptq_v2``): what transformers, GPTQModel and vLLM load."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from qatcli.exporters.base import ExportFormat, LoadedExport, register
from qatcli.exporters.notes import fused_group_note

if TYPE_CHECKING:
    import torch

    from qatcli.config import ExportConfig
    from qatcli.formats.export import ExportReport

# vLLM's GPTQ path keeps only Marlin, which takes these widths (vLLM #38288 removed the others).
VLLM_GPTQ_BITS = (4, 8)


@register
class GPTQFormat(ExportFormat):
    name = "gptq"
    values = ("gptq", "gptq_v2")
    summary = "packed int32 codes and fp16 scales, GPTQModel's layout (v1 for symmetric grids, v2 for asymmetric)"

    def write(self, checkpoint: Path, output: Path, e: ExportConfig) -> ExportReport:
        from qatcli.formats.export import export_gptq
        from qatcli.notices import carry_notices

        report = export_gptq(checkpoint, output, e.format, e.dtype, e.max_shard_mib * 2**20, e.v1_clamp_zeros)
        carry_notices(checkpoint, output, f"exported to the {report.fmt} format ({e.dtype} dense tensors)")
        return report

    def detect(self, path: Path) -> bool:
        from qatcli.formats.packed_model import read_gptq_config

        return path.is_dir() and read_gptq_config(path) is not None

    def load(self, path: Path, device: torch.device) -> LoadedExport:
        from qatcli.formats.packed_model import PackedLinear, load_gptq_model, packed_layer_bytes

        model, tokenizer, qcfg = load_gptq_model(path, device)
        packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
        qmeta = qcfg.get("meta", {})
        info = {
            "method": qmeta.get("qatcli_method", "gptq"),
            "format": qcfg.get("checkpoint_format", qcfg.get("format", "gptq")),
            "bits": qcfg["bits"],
            "avg_bits": sum(m.bits * m.in_features * m.out_features for m in packed)
            / sum(m.in_features * m.out_features for m in packed),
            "group_size": qcfg.get("group_size"),
            "sym": qcfg.get("sym"),
            "weight_bytes": sum(packed_layer_bytes(m) for m in packed),
            "base_model": qmeta.get("qatcli_base_model"),
        }
        return LoadedExport(model, tokenizer, info)

    def serving_notes(self, report: ExportReport) -> list[str]:
        from qatcli.formats.export import FAST_KERNEL_GROUP_SIZES

        notes = []
        if report.dense:
            notes.append(
                f"{len(report.dense)} layers stay dense (in/out not multiples of 32): " + ", ".join(report.dense)
            )
        notes += fused_group_note(report)
        mixed = len({report.specs[n] for n in report.packed}) > 1
        if mixed or report.lm_head:
            what = " and ".join(
                w for w, on in (("per-layer grids", mixed), ("a quantized lm_head", report.lm_head)) if on
            )
            notes.append(
                f"this export has {what}, which GPTQModel (GPTQModel.load) and vLLM read; transformers' "
                "from_pretrained (through optimum) reads neither: it refuses layers whose grid differs from the "
                "top-level one (size mismatch) and starts a quantized lm_head from random weights"
            )
        low = sorted({report.specs[n].bits for n in report.packed} - set(VLLM_GPTQ_BITS))
        if low:
            notes.append(
                f"{'/'.join(map(str, low))}-bit GPTQ format: vLLM's GPTQ path keeps only Marlin (4 and 8 bits) and "
                "refuses these widths (vLLM #38288); GPTQModel and transformers on the CPU run them, vLLM through "
                "--format compressed-tensors with its humming kernels, llama.cpp through --format gguf "
                "(docs/export.md)"
            )
        slow = [g for g in report.group_sizes if g not in FAST_KERNEL_GROUP_SIZES]
        if slow:
            notes.append(
                f"group size {', '.join(map(str, slow))}: the fast GPU kernels (Marlin, ExLlamaV2, vLLM's "
                f"gptq_marlin) take {', '.join(map(str, FAST_KERNEL_GROUP_SIZES))}; loaders fall back to slower ones"
            )
        if report.clamped_zero_points:
            notes.append(f"{report.clamped_zero_points} zero points clamped to 1 for format v1")
        return notes
