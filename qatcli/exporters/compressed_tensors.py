"""compressed-tensors' pack-quantized format: what llm-compressor writes and vLLM's wNa16 scheme reads."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from qatcli.exporters.base import ExportFormat, LoadedExport, register
from qatcli.exporters.notes import fused_group_note

if TYPE_CHECKING:
    import torch

    from qatcli.config import ExportConfig
    from qatcli.formats.export import ExportReport


@register
class CompressedTensorsFormat(ExportFormat):
    name = "compressed-tensors"
    values = ("compressed-tensors",)
    summary = "pack-quantized int32 codes, llm-compressor's layout (vLLM's wNa16 kernels)"

    def problems(self, e: ExportConfig) -> list[str]:
        if e.v1_clamp_zeros:
            return ["--v1-clamp-zeros applies to format gptq only, not compressed-tensors"]
        return []

    def write(self, checkpoint: Path, output: Path, e: ExportConfig) -> ExportReport:
        from qatcli.formats.export import export_compressed_tensors
        from qatcli.notices import carry_notices

        report = export_compressed_tensors(checkpoint, output, e.dtype, e.max_shard_mib * 2**20)
        carry_notices(checkpoint, output, f"exported to the {report.fmt} format ({e.dtype} dense tensors)")
        return report

    def detect(self, path: Path) -> bool:
        from qatcli.formats import compressed_tensors as ct

        return path.is_dir() and ct.read_config(path) is not None

    def load(self, path: Path, device: torch.device) -> LoadedExport:
        from transformers import AutoTokenizer

        from qatcli.formats import compressed_tensors as ct

        ctcfg = ct.read_config(path)
        assert ctcfg is not None
        model = ct.load_model(path, device)
        provenance = ctcfg.get("qatcli", {})
        weights = next(iter(ctcfg["config_groups"].values()))["weights"]
        info = {
            "method": provenance.get("method", "unknown"),
            "format": ct.FORMAT,
            "bits": weights["num_bits"],
            "group_size": weights["group_size"] or -1,
            "sym": weights["symmetric"],
            "weight_bytes": ct.packed_bytes(path),
            "base_model": provenance.get("base_model"),
        }
        return LoadedExport(model, AutoTokenizer.from_pretrained(path), info)

    def serving_notes(self, report: ExportReport) -> list[str]:
        from qatcli.formats import compressed_tensors as ct
        from qatcli.formats.export import FAST_KERNEL_GROUP_SIZES
        from qatcli.quant.grid import QuantSpec

        notes = fused_group_note(report)
        fast = " and ".join(map(str, ct.FAST_KERNEL_BITS))
        specs = set(report.specs.values()) or {QuantSpec(report.bits, report.group_size, report.sym)}
        slow_bits = sorted({s.bits for s in specs if s.bits not in ct.FAST_KERNEL_BITS})
        if slow_bits:
            widths = "/".join(map(str, slow_bits))
            asym = any(not s.sym and s.bits not in ct.ZERO_POINT_BITS for s in specs)
            refused = "; vLLM refuses asymmetric (zero-point) weights of this width" if asym else ""
            notes.append(
                f"{widths}-bit compressed-tensors: vLLM's fast kernels (Marlin, Machete) take {fast} bits; it runs "
                f"{widths}-bit pack-quantized layers only through its Humming kernel (the humming package, CUDA)"
                f"{refused}"
            )
        elif slow := sorted({s.group_size for s in specs if s.group_size not in FAST_KERNEL_GROUP_SIZES}):
            notes.append(
                f"group size {', '.join(map(str, slow))}: vLLM's Marlin kernels take "
                f"{', '.join(map(str, FAST_KERNEL_GROUP_SIZES))}; other sizes fall back to slower kernels"
            )
        return notes
