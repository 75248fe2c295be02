"""qatcli ptq: post-training quantization of a full-precision model into a qatcli checkpoint."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from qatcli.data.generated import generated_tokens
from qatcli.data.models import ModelRef, load_model, load_tokenizer, resolve_model
from qatcli.data.perplexity import evaluate_on_data
from qatcli.data.sources import calibration_windows, check_data_spec, load_tokens
from qatcli.errors import QatcliError
from qatcli.formats.checkpoint import provenance, save_checkpoint
from qatcli.outputs import atomic_dir, check_writable
from qatcli.quant.gptq import GPTQConfig
from qatcli.quant.gptq_model import GPTQStats, quantize_gptq
from qatcli.quant.grid import QuantSpec
from qatcli.quant.layer import LayerQuant, fake_quantized, quantized_bytes
from qatcli.quant.rtn import quantize_rtn
from qatcli.quant.targets import check_group_size, find_targets
from qatcli.recipe import Recipe
from qatcli.report.table import human_bytes, print_table
from qatcli.runtime import resolve_device, seed_everything


def gptq_from_recipe(
    recipe: Recipe,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    targets: dict[str, nn.Linear],
    spec: QuantSpec,
    ref: ModelRef,
    device: torch.device,
) -> tuple[dict[str, LayerQuant], GPTQStats]:
    """GPTQ with the recipe's calibration windows and options (``ref`` samples ``generated:`` data)."""
    c, o = recipe.calib, recipe.gptq
    tokens = load_tokens(c.data, "calib", tokenizer, lambda g, p: generated_tokens(ref, g, p, recipe.seed, device))
    windows = calibration_windows(tokens, c.nsamples, c.seqlen, recipe.seed)
    cfg = GPTQConfig(damp=o.damp, block_size=o.block_size, act_order=o.act_order, static_groups=o.static_groups)
    return quantize_gptq(model, targets, spec, cfg, windows, device, o.true_sequential, o.batch_size)


def run_ptq(recipe: Recipe, force: bool) -> dict:
    if recipe.model is None:
        raise QatcliError("no model: give MODEL on the command line or set 'model' in the recipe")
    if recipe.output is None:
        raise QatcliError("no output directory: pass -o DIR or set 'output' in the recipe")
    out = Path(recipe.output)
    check_writable(out, force)
    if recipe.eval.data is not None:
        check_data_spec(recipe.eval.data)
    if recipe.quant.method == "gptq":
        if recipe.calib.data is None:
            raise QatcliError("gptq needs calibration data: pass --calib-data or set calib.data in the recipe")
        check_data_spec(recipe.calib.data)
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

    quantization = {"bits": q.bits, "group_size": q.group_size, "sym": q.sym}
    extra_metrics = {}
    t0 = time.perf_counter()
    if q.method == "gptq":
        c, o = recipe.calib, recipe.gptq
        layers, stats = gptq_from_recipe(recipe, model, tokenizer, targets, spec, ref, device)
        quantization.update(
            damp_percent=o.damp,
            desc_act=o.act_order,
            static_groups=o.static_groups,
            true_sequential=o.true_sequential,
            block_size=o.block_size,
        )
        extra_metrics = {
            "calibration": {"data": c.data, "nsamples": c.nsamples, "seqlen": c.seqlen},
            "gptq_loss": sum(stats.loss.values()),
            "damp_raised": stats.damp_raised,
            "peak_rss_mib": round(stats.peak_rss_mib, 1),
            "peak_cuda_mib": None if stats.peak_cuda_mib is None else round(stats.peak_cuda_mib, 1),
        }
    else:
        layers = quantize_rtn(targets, spec)
    quantize_seconds = time.perf_counter() - t0

    metrics = {
        "load_seconds": round(load_seconds, 3),
        "quantize_seconds": round(quantize_seconds, 3),
        "quantized_layers": len(layers),
        "quantized_bytes": quantized_bytes(layers),
        "fp16_bytes": sum(m.weight.numel() * 2 for m in targets.values()),
        **extra_metrics,
    }
    meta = {
        "method": q.method,
        "base_model": {"spec": ref.spec, "kind": ref.kind, "location": ref.location},
        "quantization": quantization,
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
