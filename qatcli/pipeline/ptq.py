"""Post-training quantization of a full-precision model into a qatcli checkpoint (RTN, GPTQ or AWQ)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from qatcli.config import Recipe
from qatcli.data.tokens import TokenSource, window_bos
from qatcli.formats.checkpoint import provenance, save_checkpoint
from qatcli.methods import get_method
from qatcli.models.loading import ModelRef
from qatcli.outputs import atomic_dir
from qatcli.pipeline.base import (
    Made,
    base_meta,
    calibration_metrics,
    evaluate_layers,
    load_base,
    model_device_for,
    quantization_meta,
    run_method,
)
from qatcli.pipeline.inputs import Problems
from qatcli.quant.layer import average_bits, quantized_bytes
from qatcli.runtime import peak_memory_mib, resolve_device, seed_everything, start_peak_memory


def check_ptq(recipe: Recipe, force: bool) -> ModelRef:
    """Every input problem of a ptq run at once; the base model's reference when there is none."""
    problems = Problems()
    ref = problems.model(recipe.model, "give MODEL on the command line or set 'model' in the recipe")
    missing = "no output directory: pass -o DIR or set 'output' in the recipe"
    problems.output(recipe.output, force, missing, inputs=(recipe.model,))
    method = get_method(recipe.quant.method)
    if method.needs_calibration:
        problems.data(
            recipe.calib.data,
            f"{method.name} needs calibration data: pass --calib-data or set calib.data in the recipe",
            mix=True,
        )
    if recipe.eval.data is not None:
        problems.data(recipe.eval.data, "")
    problems.raise_if_any()
    assert ref is not None
    return ref


def make_ptq_checkpoint(recipe: Recipe, force: bool) -> Made:
    ref = check_ptq(recipe, force)
    out = Path(str(recipe.output))
    device = resolve_device(recipe.device)
    seed_everything(recipe.seed, recipe.deterministic)
    start_peak_memory(device)

    t0 = time.perf_counter()
    q = recipe.quant
    method = get_method(q.method)
    base = load_base(recipe, ref, model_device_for(method, device))
    source = TokenSource(base.tokenizer, ref, recipe.seed, device, window_bos(base.model, base.tokenizer))
    load_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    made = run_method(method, recipe, base, source, device)
    layers = made.layers
    quantization: dict[str, Any] = {**quantization_meta(recipe, base), "clip": q.clip, **made.fields}
    extra = {**({"calibration": calibration_metrics(recipe)} if method.needs_calibration else {}), **made.metrics}
    metrics: dict[str, Any] = {
        "load_seconds": round(load_seconds, 3),
        "quantize_seconds": round(time.perf_counter() - t0, 3),
        "quantized_layers": len(layers),
        "quantized_bytes": quantized_bytes(layers),
        "avg_bits": average_bits(layers),
        "fp16_bytes": sum(m.weight.numel() * 2 for m in base.targets.values()),
        **extra,
        **peak_memory_mib(device),  # the whole command's, from before the load
    }
    if recipe.eval.data is not None:
        base.model.to(device)  # a walk left it on the CPU
        metrics["eval"] = evaluate_layers(base, layers, recipe, source, device, "eval")
    meta = {
        "method": q.method,
        "base_model": base_meta(ref),
        "quantization": quantization,
        "recipe": recipe.to_dict(),
        "provenance": provenance("ptq", device, recipe.seed),
        "metrics": metrics,
    }
    with atomic_dir(out, force) as tmp:
        save_checkpoint(tmp, base.model, base.tokenizer, layers, meta)
    return Made(out, meta, {name: lq.spec for name, lq in layers.items()})
