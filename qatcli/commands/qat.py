"""qatcli qat: quantization-aware training from full precision, a fresh PTQ pass or a checkpoint.

While it runs, the run's state lives in ``<output>.run/`` (state.pt, metrics.jsonl); the finished checkpoint
appears at ``<output>`` only when training completes, and the working directory is then removed.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from qatcli.commands.ptq import gptq_from_recipe
from qatcli.data.generated import generated_tokens
from qatcli.data.models import ModelRef, load_model, load_tokenizer, resolve_model
from qatcli.data.perplexity import evaluate_on_data
from qatcli.data.sources import TrainBatches, check_data_spec, load_tokens
from qatcli.errors import QatcliError
from qatcli.formats.checkpoint import is_checkpoint, load_checkpoint, provenance, read_meta, save_checkpoint
from qatcli.outputs import atomic_dir, check_writable, write_json_atomic
from qatcli.qat.estimators import Estimator, make_estimator
from qatcli.qat.fake_quant import convert_qat, prepare_qat
from qatcli.qat.trainer import METRICS_FILE, STATE_FILE, Trainer, TrainSettings
from qatcli.quant.grid import QuantSpec
from qatcli.quant.layer import LayerQuant, apply_fake_quant, fake_quantized, quantized_bytes
from qatcli.quant.rtn import quantize_rtn
from qatcli.quant.targets import check_group_size, find_targets
from qatcli.recipe import Recipe
from qatcli.report.progress import stderr_console
from qatcli.report.table import print_table
from qatcli.runtime import resolve_device, seed_everything

INITS = ("fp", "rtn", "gptq")
BEFORE_FILE = "before.json"


def _estimator(recipe: Recipe) -> Estimator:
    options: dict[str, object] = {}
    if recipe.qat.estimator == "fourier":
        options = {"amplitudes": recipe.qat.amplitudes}
    elif recipe.qat.estimator == "jacobian":
        options = {**dataclasses.asdict(recipe.qat.jacobian), "seed": recipe.seed}
    return make_estimator(recipe.qat.estimator, **options)


def _initial_model(
    recipe: Recipe, spec: QuantSpec, device: torch.device
) -> tuple[nn.Module, PreTrainedTokenizerBase, dict[str, LayerQuant], ModelRef]:
    """The model with latent weights and grid to start from, and the full-precision base model."""
    init = recipe.qat.init
    if init not in INITS:
        model, tokenizer, meta, layers = load_checkpoint(Path(init), device, fake_quant=False)
        got = next(iter(layers.values())).spec
        if got != spec:
            raise QatcliError(f"init checkpoint '{init}' has {got}, the recipe asks for {spec}")
        return model, tokenizer, layers, resolve_model(meta["base_model"]["spec"])
    ref = resolve_model(recipe.model)
    model = load_model(ref, device)
    tokenizer = load_tokenizer(ref)
    targets = find_targets(model, recipe.quant.include, recipe.quant.exclude)
    check_group_size(targets, spec)
    if init == "gptq":
        layers, _ = gptq_from_recipe(recipe, model, tokenizer, targets, spec, ref, device)
    else:
        layers = quantize_rtn(targets, spec)
        if init == "rtn":
            apply_fake_quant(model, layers)  # latent weights start on their grid points
    return model, tokenizer, layers, ref


def _run_calibration(model: nn.Module, tokens: torch.Tensor, recipe: Recipe, device: torch.device) -> None:
    """Forward passes over training windows (drawn apart from the training order) for estimators that calibrate."""
    batches = TrainBatches(tokens, recipe.qat.seqlen, recipe.qat.batch_size, recipe.seed + 1)
    for _ in range(recipe.qat.jacobian.calib_batches):
        model(batches.next_batch().to(device), use_cache=False)


def check_init(init: str, what: str) -> None:
    """``what`` names the setting in the message: --init, or a compare cell's init."""
    if init not in INITS and not is_checkpoint(Path(init)):
        raise QatcliError(f"{what} must be fp, rtn, gptq or a qatcli checkpoint, got '{init}'")


def _check_inputs(recipe: Recipe) -> None:
    t = recipe.qat
    if recipe.output is None:
        raise QatcliError("no output directory: pass -o DIR or set 'output' in the recipe")
    check_init(t.init, "--init")
    if t.init not in INITS:
        read_meta(Path(t.init))
    elif recipe.model is None:
        raise QatcliError("no model: give MODEL on the command line or set 'model' in the recipe")
    if t.data is None:
        raise QatcliError("no training data: pass --data or set qat.data in the recipe")
    check_data_spec(t.data)
    if t.init == "gptq":
        if recipe.calib.data is None:
            raise QatcliError("--init gptq needs calibration data: pass --calib-data or set calib.data")
        check_data_spec(recipe.calib.data)
    if recipe.eval.data is not None:
        check_data_spec(recipe.eval.data)
    _estimator(recipe)


def run_qat(recipe: Recipe, force: bool, resume: bool, stop_after: int | None) -> dict[str, Any] | None:
    _check_inputs(recipe)
    out = Path(recipe.output)
    workdir = out.with_name(out.name + ".run")
    if resume:
        if not (workdir / STATE_FILE).is_file():
            raise QatcliError(f"nothing to resume: no {STATE_FILE} in '{workdir}'")
    else:
        check_writable(out, force)
        if workdir.exists():
            if not force:
                raise QatcliError(
                    f"an unfinished run is in '{workdir}': pass --resume to continue it or --force to start over"
                )
            shutil.rmtree(workdir)
    t = recipe.qat
    device = resolve_device(recipe.device)
    seed_everything(recipe.seed)
    spec = QuantSpec(recipe.quant.bits, recipe.quant.group_size, recipe.quant.sym)

    t0 = time.perf_counter()
    model, tokenizer, layers, base = _initial_model(recipe, spec, device)
    teacher = load_model(base, device) if t.loss == "kd" else None
    tokens = load_tokens(t.data, "train", tokenizer, lambda g, p: generated_tokens(base, g, p, recipe.seed, device))
    batches = TrainBatches(tokens, t.seqlen, t.batch_size, recipe.seed)
    workdir.mkdir(parents=True, exist_ok=True)
    before = None
    if recipe.eval.data is not None:
        if (workdir / BEFORE_FILE).is_file():
            before = json.loads((workdir / BEFORE_FILE).read_text())
        else:
            with fake_quantized(model, layers):
                before = evaluate_on_data(
                    model, tokenizer, lambda: base, recipe.eval, recipe.seed, device, "eval (init)"
                ).ppl
            write_json_atomic(workdir / BEFORE_FILE, before)
    setup_seconds = time.perf_counter() - t0

    estimator = _estimator(recipe)
    fakes = prepare_qat(model, layers, estimator)
    estimator.setup(fakes, lambda: _run_calibration(model, tokens, recipe, device))
    settings = TrainSettings(**{f.name: getattr(t, f.name) for f in dataclasses.fields(TrainSettings)})
    trainer = Trainer(model, fakes, estimator, teacher, batches, settings, device, workdir)
    if resume:
        trainer.load_state()
        stderr_console.print(f"resuming at step {trainer.step} of {t.steps}")
    t0 = time.perf_counter()
    try:
        trainer.train(stop_after)
    except KeyboardInterrupt:
        trainer.save_state()
        raise QatcliError(f"interrupted at step {trainer.step}; continue with --resume") from None
    train_seconds = time.perf_counter() - t0
    if trainer.step < t.steps:
        stderr_console.print(f"stopped after step {trainer.step} of {t.steps}; continue with --resume")
        return None

    layers = convert_qat(model, fakes)
    del teacher
    records = [json.loads(line) for line in (workdir / METRICS_FILE).read_text().splitlines()]
    metrics: dict[str, Any] = {
        "setup_seconds": round(setup_seconds, 3),
        "train_seconds_this_invocation": round(train_seconds, 3),
        "steps": trainer.step,
        "final_loss": records[-1]["loss"],
        "mean_step_seconds": sum(r["step_seconds"] for r in records) / len(records),
        "quantized_layers": len(layers),
        "quantized_bytes": quantized_bytes(layers),
    }
    if recipe.eval.data is not None:
        with fake_quantized(model, layers):
            after = evaluate_on_data(model, tokenizer, lambda: base, recipe.eval, recipe.seed, device, "eval")
        metrics["eval"] = {
            "data": recipe.eval.data,
            "ppl_before": before,
            "ppl": after.ppl,
            "windows": after.windows,
            "seqlen": after.seqlen,
        }
    meta = {
        "method": "qat",
        "base_model": {"spec": base.spec, "kind": base.kind, "location": base.location},
        "quantization": {
            "bits": spec.bits,
            "group_size": spec.group_size,
            "sym": spec.sym,
            "desc_act": any(lq.act_order for lq in layers.values()),
        },
        "qat": {
            "estimator": estimator.describe(),
            "init": t.init,
            "loss": t.loss,
            "steps": t.steps,
            "variance_reduction": {"gamma": t.vr_gamma} if t.variance_reduction else None,
        },
        "recipe": recipe.to_dict(),
        "provenance": provenance("qat", device, recipe.seed),
        "metrics": metrics,
    }
    with atomic_dir(out, force or resume) as tmp:
        save_checkpoint(tmp, model, tokenizer, layers, meta)
        shutil.copy(workdir / METRICS_FILE, tmp / METRICS_FILE)
    shutil.rmtree(workdir)
    ev = metrics.get("eval", {})
    print_table(
        f"qatcli qat -> {out}",
        ["estimator", "init", "loss", "bits", "group", "steps", "final loss", "s/step", "ppl before", "ppl after"],
        [
            [
                t.estimator,
                t.init,
                t.loss,
                spec.bits,
                spec.group_size,
                trainer.step,
                metrics["final_loss"],
                metrics["mean_step_seconds"],
                ev.get("ppl_before"),
                ev.get("ppl"),
            ]
        ],
    )
    return metrics
