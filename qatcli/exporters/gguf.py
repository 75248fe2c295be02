"""GGUF for llama.cpp (and Ollama, LM Studio, llama-cpp-python): one file, each quantized layer in the block type
that holds its grid exactly (qatcli/formats/gguf_blocks.py), metadata and tokenizer from llama.cpp's converter.

`qatcli eval FILE.gguf` runs the file in llama.cpp itself (llama-cpp-python, the ``llamacpp`` extra) on the same
token windows as every other row, so one table holds qatcli's evaluation and the engine's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qatcli.errors import QatcliError
from qatcli.exporters.base import ExportFormat, LoadedExport, register
from qatcli.formats.gguf_blocks import BLOCK_TYPES, block_type_for
from qatcli.version import __version__

if TYPE_CHECKING:
    import torch

    from qatcli.config import ExportConfig
    from qatcli.formats.export import ExportReport

DENSE_TYPES = {"float16": "f16", "float32": "f32", "bfloat16": "bf16"}
GGUF_MAGIC = b"GGUF"
TARGETS = {t.target: t for t in BLOCK_TYPES.values()}
EXACT_GRIDS = ", ".join(
    f"{'sym' if t.sym else 'asym'} {t.bits}-bit g{t.block} ({t.name})" for t in BLOCK_TYPES.values()
)


def block_types(layers: dict[str, Any]) -> dict[str, str]:
    """Each quantized layer's block type; a layer on a grid no type holds exactly is refused in one line."""
    from qatcli.quant.grid import default_g_idx

    types = {}
    for name, lq in layers.items():
        s = lq.spec
        t = block_type_for(s.bits, s.group_size, s.sym)
        if t is None:
            raise QatcliError(
                f"layer {name} is on a {'sym' if s.sym else 'asym'} {s.bits}-bit g{s.group_size} grid, which no "
                f"GGUF block type stores exactly; GGUF takes {EXACT_GRIDS}: quantize with --target "
                f"{'|'.join(TARGETS)}"
            )
        if not bool((lq.g_idx.cpu() == default_g_idx(lq.g_idx.numel(), s.group_size)).all()):
            raise QatcliError(f"layer {name} has an act-order g_idx; GGUF blocks are contiguous: quantize without it")
        types[name] = t.name
    return types


def _write_dense_model(checkpoint: Path, work: Path) -> tuple[dict[str, Any], dict[str, str], Any]:
    """The checkpoint as a dense model directory (its quantized layers at their dequantized values) and each
    quantized layer's codes, scales and zero points (``work/layers.safetensors``)."""
    import torch
    from safetensors.torch import save_file

    from qatcli.formats.checkpoint import load_checkpoint
    from qatcli.quant.grid import dequantize

    model, tokenizer, meta, layers = load_checkpoint(checkpoint, torch.device("cpu"), fake_quant=False)
    types = block_types(layers)
    modules = dict(model.named_modules())
    arrays = {}
    for name, lq in layers.items():
        weight = modules[name].weight
        codes = lq.codes(weight.detach())
        with torch.no_grad():
            weight.copy_(dequantize(codes, lq.scales, lq.zeros, lq.g_idx))
        arrays |= {
            f"{name}.codes": codes,
            f"{name}.scales": lq.scales.half(),
            f"{name}.zeros": lq.zeros.to(torch.uint8),
        }
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    save_file({k: v.contiguous() for k, v in arrays.items()}, str(work / "layers.safetensors"))
    return meta, types, layers


def _run_builder(work: Path, out: Path) -> dict[str, Any]:
    from qatcli.exporters.llama_cpp import llama_cpp_tree
    from qatcli.report.progress import stderr_console

    tree = llama_cpp_tree()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree / "gguf-py"), str(tree), env.get("PYTHONPATH")]))
    args = [work / "model", work / "layers.safetensors", work / "plan.json", out, work / "report.json"]
    with stderr_console.status("writing GGUF with llama.cpp's converter"):
        done = subprocess.run(
            [sys.executable, "-m", "qatcli.exporters.gguf_build", *map(str, args)],
            capture_output=True,
            text=True,
            env=env,
        )
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        raise QatcliError(f"llama.cpp's converter failed: {lines[-1] if lines else done.returncode}")
    return json.loads((work / "report.json").read_text())


def _int_or_none(value: str | None) -> int | None:
    return None if value is None else int(value)


def dense_gguf(model_dir: Path, base_model: str, out: Path, dense: str = "f16") -> dict[str, Any]:
    """A GGUF of a full-precision model directory, every weight in ``dense`` (f32, f16 or bf16), with the
    provenance keys `qatcli eval` reads: the file llama.cpp's own quantizer starts from in the comparisons."""
    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=out.parent) as tmp:
        work = Path(tmp)
        (work / "model").symlink_to(Path(model_dir).resolve())
        from safetensors.torch import save_file

        save_file({}, str(work / "layers.safetensors"))
        plan = {
            "layers": {},
            "dense": dense,
            "embedding": dense,
            "metadata": {"version": __version__, "method": "fp", "base_model": base_model},
        }
        (work / "plan.json").write_text(json.dumps(plan))
        return _run_builder(work, out)


@register
class GGUFFormat(ExportFormat):
    name = "gguf"
    values = ("gguf",)
    writes_file = True
    runs_tasks = False
    summary = "one file for llama.cpp: Q2_0 / Q4_0 / Q4_1 / Q8_0 blocks holding the trained codes exactly"

    def problems(self, e: ExportConfig) -> list[str]:
        problems = []
        if e.v1_clamp_zeros:
            problems.append("--v1-clamp-zeros applies to format gptq only, not gguf")
        if e.output is not None and not str(e.output).endswith(".gguf"):
            problems.append(f"a GGUF export is one file: give -o a name ending in .gguf, got '{e.output}'")
        return problems

    def write(self, checkpoint: Path, output: Path, e: ExportConfig) -> ExportReport:
        from qatcli.formats.export import ExportReport, base_model_name, default_spec

        with tempfile.TemporaryDirectory(prefix=".gguf-", dir=output.parent) as tmp:
            work = Path(tmp)
            meta, types, layers = _write_dense_model(checkpoint, work)
            plan = {
                "layers": types,
                "dense": DENSE_TYPES[e.dtype],
                "embedding": e.gguf_embedding if e.gguf_embedding != "auto" else DENSE_TYPES[e.dtype],
                "metadata": {
                    "version": __version__,
                    "method": meta["method"],
                    "base_model": base_model_name(meta),
                    "bits": meta["quantization"]["bits"],
                    "group_size": meta["quantization"]["group_size"],
                    "sym": meta["quantization"]["sym"],
                },
            }
            (work / "plan.json").write_text(json.dumps(plan))
            built = _run_builder(work, output)
        spec = default_spec(meta, layers)
        report = ExportReport("gguf", spec.group_size, bits=spec.bits, sym=spec.sym)
        report.specs = {name: lq.spec for name, lq in layers.items()}
        report.packed = sorted(layers)
        dense = {n: t for n, t in built["tensors"].items() if t not in BLOCK_TYPES}
        report.dense = sorted(n for n in dense if not n.endswith("norm.weight"))
        report.files = {output.name: output.stat().st_size}
        report.dense_dtype = f"{plan['dense']} (token_embd {plan['embedding']}, norms f32)"
        report.details = {
            "block_types": sorted(set(types.values())),
            "q4_1_offset_error": built["q4_1_offset_error"],
            "tensors": built["tensors"],
        }
        return report

    def detect(self, path: Path) -> bool:
        if not path.is_file():
            return False
        with path.open("rb") as f:
            return f.read(4) == GGUF_MAGIC

    def load(self, path: Path, device: torch.device) -> LoadedExport:
        from qatcli.exporters.llama_cpp_model import LlamaCppModel
        from qatcli.formats.gguf_file import read_gguf
        from qatcli.models.loading import load_tokenizer, resolve_model

        meta, tensors = read_gguf(path)
        base = meta.get("qatcli.base_model")
        if base is None:
            raise QatcliError(
                f"'{path}' was not written by qatcli export (no qatcli.base_model): evaluating it needs the "
                "tokenizer of the model it came from"
            )
        model = LlamaCppModel(path, str(meta.get("general.architecture", "")))
        blocks = {t.ggml_type: t.name for t in BLOCK_TYPES.values()}
        kinds = sorted({blocks[t.ggml_type] for t in tensors.values() if t.ggml_type in blocks})
        # a file another tool requantized (llama-quantize) keeps the keys qatcli wrote but not its file type
        ours = str(meta.get("general.file_type")) == meta.get("qatcli.file_type", str(meta.get("general.file_type")))
        info = {
            "method": meta.get("qatcli.method", "unknown") if ours else "requantized",
            "format": f"gguf {'+'.join(kinds) or 'dense'}",
            "bits": _int_or_none(meta.get("qatcli.bits")) if ours else None,
            "group_size": _int_or_none(meta.get("qatcli.group_size")) if ours else None,
            "sym": None if "qatcli.sym" not in meta or not ours else meta["qatcli.sym"] == "True",
            "weight_bytes": sum(t.nbytes for t in tensors.values() if t.ggml_type in blocks),
            "file_bytes": path.stat().st_size,
            "base_model": base,
        }
        return LoadedExport(model, load_tokenizer(resolve_model(base)), info)

    def serving_notes(self, report: ExportReport) -> list[str]:
        notes = []
        if "Q2_0" in report.details.get("block_types", []):
            notes.append(
                "Q2_0: llama.cpp 0.3.36 (llama-cpp-python) runs it on x86 through its generic C fallback, not a "
                "SIMD kernel; Ollama and LM Studio need a llama.cpp from 2026-06 (#24448) or later to read it"
            )
        error = report.details.get("q4_1_offset_error") or 0.0
        if error > 0:
            notes.append(
                f"Q4_1 stores each block's offset as fp16: it moves a weight by at most {error:.2e} of its block's "
                "scale from the checkpoint's grid"
            )
        return notes
