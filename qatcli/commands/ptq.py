"""qatcli ptq: post-training quantization of a full-precision model into a qatcli checkpoint."""

from __future__ import annotations

import time
from pathlib import Path

from qatcli.checkpoint import fake_quantized, provenance, quantized_bytes, save_checkpoint
from qatcli.data import check_data_spec
from qatcli.errors import QatcliError
from qatcli.evaluate import evaluate_on_data
from qatcli.grid import QuantSpec
from qatcli.models import load_model, load_tokenizer, resolve_model
from qatcli.outputs import atomic_dir, check_writable
from qatcli.recipe import Recipe
from qatcli.report import human_bytes, print_table
from qatcli.rtn import quantize_rtn
from qatcli.runtime import resolve_device, seed_everything
from qatcli.targets import check_group_size, find_targets


def run_ptq(recipe: Recipe, force: bool) -> dict:
    if recipe.model is None:
        raise QatcliError("no model: give MODEL on the command line or set 'model' in the recipe")
    if recipe.output is None:
        raise QatcliError("no output directory: pass -o DIR or set 'output' in the recipe")
    out = Path(recipe.output)
    check_writable(out, force)
    if recipe.eval.data is not None:
        check_data_spec(recipe.eval.data)
    device = resolve_device(recipe.device)
    seed_everything(recipe.seed)
    q = recipe.quant
    spec = QuantSpec(q.bits, q.group_size, q.sym)

    t0 = time.perf_counter()
    ref = resolve_model(recipe.model)
    model = load_model(ref, device)
    tokenizer = load_tokenizer(ref)
    targets = find_targets(model, q.include, q.exclude)
    check_group_size(targets, spec)
    load_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    layers = quantize_rtn(targets, spec)
    quantize_seconds = time.perf_counter() - t0

    metrics = {
        "load_seconds": round(load_seconds, 3),
        "quantize_seconds": round(quantize_seconds, 3),
        "quantized_layers": len(layers),
        "quantized_bytes": quantized_bytes(layers),
        "fp16_bytes": sum(m.weight.numel() * 2 for m in targets.values()),
    }
    meta = {
        "method": q.method,
        "base_model": {"spec": ref.spec, "kind": ref.kind, "location": ref.location},
        "quantization": {"bits": q.bits, "group_size": q.group_size, "sym": q.sym},
        "recipe": recipe.to_dict(),
        "provenance": provenance("ptq", device, recipe.seed),
        "metrics": metrics,
    }
    if recipe.eval.data is not None:
        t0 = time.perf_counter()
        with fake_quantized(model, layers):
            result = evaluate_on_data(model, tokenizer, lambda: ref, recipe.eval, recipe.seed, device, "eval")
        metrics["eval"] = {
            "data": recipe.eval.data,
            "ppl": result.ppl,
            "windows": result.windows,
            "seqlen": result.seqlen,
            "seconds": round(time.perf_counter() - t0, 3),
        }
    with atomic_dir(out, force) as tmp:
        save_checkpoint(tmp, model, tokenizer, layers, meta)

    ev = metrics.get("eval", {})
    print_table(
        f"qatcli ptq -> {out}",
        ["model", "method", "bits", "group", "sym", "layers", "quantized size", "fp16 size", "quantize s", "ppl"],
        [
            [
                ref.spec,
                q.method,
                q.bits,
                q.group_size,
                q.sym,
                len(layers),
                human_bytes(metrics["quantized_bytes"]),
                human_bytes(metrics["fp16_bytes"]),
                metrics["quantize_seconds"],
                ev.get("ppl"),
            ]
        ],
    )
    return metrics
