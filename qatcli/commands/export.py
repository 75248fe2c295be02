"""qatcli export: write the export directory, warn where fast kernels will not apply, print its row."""

from __future__ import annotations

from qatcli.config import Recipe
from qatcli.formats import compressed_tensors as ct
from qatcli.formats.export import FAST_KERNEL_GROUP_SIZES, ExportReport
from qatcli.pipeline.export import export_checkpoint
from qatcli.quant.grid import QuantSpec
from qatcli.report.progress import stderr_console
from qatcli.report.table import human_bytes, print_table


def run_export(recipe: Recipe, checkpoint_arg: str | None, force: bool) -> None:
    output, report = export_checkpoint(recipe, checkpoint_arg, force)
    if report.dense:
        stderr_console.print(
            f"[yellow]warning: {len(report.dense)} layers stay dense (in/out not multiples of 32): "
            + ", ".join(report.dense)
        )
    if report.unfused:
        stderr_console.print(
            "[yellow]warning: vLLM runs q/k/v and gate/up as one module each, which needs one grid; these differ: "
            + ", ".join(report.unfused)
        )
    slow = [g for g in report.group_sizes if g not in FAST_KERNEL_GROUP_SIZES]
    if report.fmt != ct.FORMAT:
        _warn_transformers(report)
        low = sorted({report.specs[n].bits for n in report.packed} - set(ct.FAST_KERNEL_BITS))
        if low:
            stderr_console.print(
                f"[yellow]warning: {'/'.join(map(str, low))}-bit GPTQ format: vLLM's GPTQ path keeps only Marlin (4 "
                "and 8 bits) and refuses these widths (vLLM #38288); GPTQModel and transformers on the CPU run them, "
                "and vLLM through --format compressed-tensors with its humming kernels (docs/export.md)"
            )
    if report.fmt == ct.FORMAT:
        _warn_compressed_tensors(report)
    elif slow:
        stderr_console.print(
            f"[yellow]warning: group size {', '.join(map(str, slow))}: the fast GPU kernels (Marlin, ExLlamaV2, "
            f"vLLM's gptq_marlin) take {', '.join(map(str, FAST_KERNEL_GROUP_SIZES))}; loaders fall back to slower ones"
        )
    if report.clamped_zero_points:
        stderr_console.print(f"[yellow]warning: {report.clamped_zero_points} zero points clamped to 1 for format v1")
    print_table(
        f"qatcli export -> {output}",
        ["checkpoint", "format", "dtype", "packed layers", "dense layers", "files", "size on disk"],
        [
            [
                str(checkpoint_arg or recipe.output),
                report.fmt,
                recipe.export.dtype,
                len(report.packed),
                len(report.dense),
                len(report.files),
                human_bytes(sum(report.files.values())),
            ]
        ],
    )


def _warn_transformers(report: ExportReport) -> None:
    """What transformers' own GPTQ path (optimum) does not read: `dynamic` grids and a quantized lm_head."""
    mixed = len({report.specs[n] for n in report.packed}) > 1
    if mixed or report.lm_head:
        what = " and ".join(w for w, on in (("per-layer grids", mixed), ("a quantized lm_head", report.lm_head)) if on)
        stderr_console.print(
            f"[yellow]warning: this export has {what}, which GPTQModel (GPTQModel.load) and vLLM read; transformers' "
            "from_pretrained (through optimum) reads neither: it refuses layers whose grid differs from the top-level "
            "one (size mismatch) and starts a quantized lm_head from random weights"
        )


def _warn_compressed_tensors(report: ExportReport) -> None:
    """Where vLLM's compressed-tensors path (its wNa16 scheme) has no fast kernel, or no kernel, for the export."""
    fast = " and ".join(map(str, ct.FAST_KERNEL_BITS))
    specs = set(report.specs.values()) or {QuantSpec(report.bits, report.group_size, report.sym)}
    slow_bits = sorted({s.bits for s in specs if s.bits not in ct.FAST_KERNEL_BITS})
    if slow_bits:
        widths = "/".join(map(str, slow_bits))
        asym = any(not s.sym and s.bits not in ct.ZERO_POINT_BITS for s in specs)
        refused = "; vLLM refuses asymmetric (zero-point) weights of this width" if asym else ""
        stderr_console.print(
            f"[yellow]warning: {widths}-bit compressed-tensors: vLLM's fast kernels (Marlin, Machete) take "
            f"{fast} bits; it runs {widths}-bit pack-quantized layers only through its Humming kernel "
            f"(the humming package, CUDA){refused}"
        )
    elif slow := sorted({s.group_size for s in specs if s.group_size not in FAST_KERNEL_GROUP_SIZES}):
        stderr_console.print(
            f"[yellow]warning: group size {', '.join(map(str, slow))}: vLLM's Marlin kernels take "
            f"{', '.join(map(str, FAST_KERNEL_GROUP_SIZES))}; other sizes fall back to slower kernels"
        )
