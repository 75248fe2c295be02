"""Quantization-aware training from full precision, a fresh PTQ pass or a checkpoint, into a qatcli checkpoint.

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

from qatcli.data.models import load_model, resolve_model
from qatcli.data.sources import TrainBatches
from qatcli.data.tokens import TokenSource
from qatcli.errors import QatcliError
from qatcli.formats.checkpoint import is_checkpoint, load_checkpoint, provenance, read_meta, save_checkpoint
from qatcli.outputs import atomic_dir, write_json_atomic
from qatcli.pipeline.inputs import Problems
from qatcli.pipeline.ptq import Base, Made, base_meta, evaluate_layers, gptq_layers, load_base
from qatcli.qat.estimators import Estimator, make_estimator
from qatcli.qat.fake_quant import convert_qat, prepare_qat
from qatcli.qat.trainer import METRICS_FILE, STATE_FILE, Trainer, TrainSettings
from qatcli.quant.grid import QuantSpec
from qatcli.quant.layer import apply_fake_quant, quantized_bytes
from qatcli.quant.rtn import quantize_rtn
from qatcli.recipe import Recipe
from qatcli.report.progress import stderr_console
from qatcli.runtime import resolve_device, seed_everything

INITS = ("fp", "rtn", "gptq")
BEFORE_FILE = "before.json"


def run_dir(output: Path) -> Path:
    """Where an unfinished run of ``output`` keeps its state."""
    return output.with_name(output.name + ".run")


def can_resume(output: Path) -> bool:
    return (run_dir(output) / STATE_FILE).is_file()


def make_estimator_from(recipe: Recipe) -> Estimator:
    options: dict[str, object] = {}
    if recipe.qat.estimator == "fourier":
        options = {"amplitudes": recipe.qat.amplitudes}
    elif recipe.qat.estimator == "jacobian":
        options = {**dataclasses.asdict(recipe.qat.jacobian), "seed": recipe.seed}
    return make_estimator(recipe.qat.estimator, **options)


def check_init(init: str, what: str) -> None:
    """``what`` names the setting in the message: --init, or a compare cell's init."""
    if init not in INITS and not is_checkpoint(Path(init)):
        raise QatcliError(f"{what} must be fp, rtn, gptq or a qatcli checkpoint, got '{init}'")


def check_qat(recipe: Recipe, force: bool, resume: bool) -> None:
    """Every input problem of a qat run at once."""
    t = recipe.qat
    problems = Problems()
    if recipe.output is None:
        problems.add("no output directory: pass -o DIR or set 'output' in the recipe")
    else:
        out = Path(recipe.output)
        if resume and not can_resume(out):
            problems.add(f"nothing to resume: no {STATE_FILE} in '{run_dir(out)}'")
        if not resume:
            problems.output(out, force, "")
            if run_dir(out).exists() and not force:
                problems.add(
                    f"an unfinished run is in '{run_dir(out)}': pass --resume to continue it or --force to start over"
                )
    with problems.check():
        check_init(t.init, "--init")
        if t.init not in INITS:
            read_meta(Path(t.init))
    if t.init in INITS:
        problems.model(recipe.model, "give MODEL on the command line or set 'model' in the recipe")
    problems.data(t.data, "no training data: pass --data or set qat.data in the recipe")
    if t.init == "gptq":
        problems.data(recipe.calib.data, "--init gptq needs calibration data: pass --calib-data or set calib.data")
    if recipe.eval.data is not None:
        problems.data(recipe.eval.data, "")
    with problems.check():
        make_estimator_from(recipe)
    problems.raise_if_any()


def _initial_model(recipe: Recipe, device: torch.device) -> tuple[Base, dict, TokenSource]:
    """The model with latent weights and grid to start from, and the token source of the run."""
    q, init = recipe.quant, recipe.qat.init
    if init not in INITS:
        model, tokenizer, meta, layers = load_checkpoint(Path(init), device, fake_quant=False)
        got = next(iter(layers.values())).spec
        spec = QuantSpec(q.bits, got.group_size if q.group_size == "auto" else int(q.group_size), q.sym)
        if got != spec:
            raise QatcliError(f"init checkpoint '{init}' has {got}, the recipe asks for {spec}")
        ref = resolve_model(meta["base_model"]["spec"])
        targets = {name: model.get_submodule(name) for name in layers}
        base = Base(ref, model, tokenizer, targets, spec)
        return base, layers, TokenSource(tokenizer, ref, recipe.seed, device)
    base = load_base(recipe, resolve_model(str(recipe.model)), device)
    source = TokenSource(base.tokenizer, base.ref, recipe.seed, device)
    if init == "gptq":
        layers, _ = gptq_layers(recipe, base, source, device)
    else:
        layers = quantize_rtn(base.targets, base.spec, q.clip)
        if init == "rtn":
            apply_fake_quant(base.model, layers)  # latent weights start on their grid points
    return base, layers, source


def _calibration(model: nn.Module, tokens: torch.Tensor, recipe: Recipe, device: torch.device) -> None:
    """Forward passes over training windows (drawn apart from the training order) for estimators that calibrate."""
    batches = TrainBatches(tokens, recipe.qat.seqlen, recipe.qat.batch_size, recipe.seed + 1)
    for _ in range(recipe.qat.jacobian.calib_batches):
        model(batches.next_batch().to(device), use_cache=False)


def train_qat(recipe: Recipe, force: bool, resume: bool, stop_after: int | None) -> Made | None:
    """Run (or continue) the training; the checkpoint when it finished, None when it stopped early."""
    check_qat(recipe, force, resume)
    t = recipe.qat
    out = Path(str(recipe.output))
    workdir = run_dir(out)
    if not resume and workdir.exists():
        shutil.rmtree(workdir)
    device = resolve_device(recipe.device)
    seed_everything(recipe.seed)

    t0 = time.perf_counter()
    base, layers, source = _initial_model(recipe, device)
    model = base.model
    teacher = load_model(base.ref, device) if t.loss == "kd" else None
    assert t.data is not None
    tokens = source.tokens(t.data, "train")
    batches = TrainBatches(tokens, t.seqlen, t.batch_size, recipe.seed)
    workdir.mkdir(parents=True, exist_ok=True)
    before = None
    if recipe.eval.data is not None:
        if (workdir / BEFORE_FILE).is_file():
            before = json.loads((workdir / BEFORE_FILE).read_text())
        else:
            before = evaluate_layers(base, layers, recipe, source, device, "eval (init)")["ppl"]
            write_json_atomic(workdir / BEFORE_FILE, before)
    setup_seconds = time.perf_counter() - t0

    estimator = make_estimator_from(recipe)
    fakes = prepare_qat(model, layers, estimator)
    estimator.setup(fakes, lambda: _calibration(model, tokens, recipe, device))
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
        metrics["eval"] = {"ppl_before": before, **evaluate_layers(base, layers, recipe, source, device, "eval")}
    spec = base.spec
    meta = {
        "method": "qat",
        "base_model": base_meta(base.ref),
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
        save_checkpoint(tmp, model, base.tokenizer, layers, meta)
        shutil.copy(workdir / METRICS_FILE, tmp / METRICS_FILE)
    shutil.rmtree(workdir)
    return Made(out, meta)
