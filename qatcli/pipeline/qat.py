"""Quantization-aware training from full precision, a fresh PTQ pass or a checkpoint, into a qatcli checkpoint.

While it runs, the run's state lives in ``<output>.run/`` (state.pt, metrics.jsonl); the finished checkpoint
appears at ``<output>`` only when training completes, and the working directory is then removed.

Under torchrun (qatcli/qat/distributed.py) every process loads the model and runs the start identically (RTN or
GPTQ init); the block stage splits each of its batches over the processes; process 0 alone evaluates and writes
files.
The end-to-end steps run sharded; at their end process 0 gathers the whole trained model and writes the same
checkpoint a single process would.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qatcli.config import Recipe
from qatcli.data.mix import MixedTokens
from qatcli.data.tokens import TokenSource, window_bos
from qatcli.errors import Interrupted, QatcliError, TrainingDiverged
from qatcli.evaluation.perplexity import evaluate_on_data
from qatcli.formats.checkpoint import (
    base_model_ref,
    is_checkpoint,
    load_checkpoint,
    provenance,
    read_meta,
    save_checkpoint,
)
from qatcli.methods import METHODS, get_method, init_names
from qatcli.models.loading import load_model, resolve_model
from qatcli.outputs import atomic_dir, write_json_atomic
from qatcli.pipeline.base import (
    Base,
    Made,
    base_meta,
    evaluate_layers,
    load_base,
    model_device_for,
    quantization_meta,
    run_method,
)
from qatcli.pipeline.inputs import Problems
from qatcli.pipeline.resume import check_resumed_run, record_run
from qatcli.qat.block import BlockReport, block_records, saved_blocks, train_blocks
from qatcli.qat.distributed import (
    Distributed,
    distributed_problems,
    join,
    launched_world_size,
    leave,
    main_first,
    unsharded_copy,
)
from qatcli.qat.estimators import make_estimator
from qatcli.qat.fake_quant import convert_qat, prepare_qat, quantized_weights
from qatcli.qat.frozen import lower_frozen, restore_frozen
from qatcli.qat.losses import model_ce_loss
from qatcli.qat.recording import LandscapeRecorder
from qatcli.qat.trainer import InterruptedAtStep, Trainer, has_state
from qatcli.quant.layer import LayerQuant, apply_fake_quant, average_bits, quantized_bytes
from qatcli.quant.targets import plan_quantization, spec_fields
from qatcli.recipe import lowest_bits
from qatcli.report.progress import stderr_console
from qatcli.run_layout import AFTER_BLOCKS_FILE, BEFORE_FILE, BLOCK_METRICS_FILE, METRICS_FILE, run_dir
from qatcli.runtime import keep_freed_memory, peak_memory_mib, resolve_device, seed_everything, start_peak_memory


def can_resume(output: Path) -> bool:
    """Whether ``output`` has an unfinished run saved: end-to-end steps, or blocks of the block stage."""
    return has_state(run_dir(output)) or bool(saved_blocks(run_dir(output)))


def check_init(init: str, what: str) -> None:
    """``what`` names the setting in the message: --init, or a compare cell's init."""
    if init not in init_names() and not is_checkpoint(Path(init)):
        raise QatcliError(f"{what} must be {', '.join(init_names())} or a qatcli checkpoint, got '{init}'")


def check_qat(recipe: Recipe, force: bool, resume: bool) -> None:
    """Every input problem of a qat run at once."""
    t = recipe.qat
    problems = Problems()
    if recipe.output is None:
        problems.add("no output directory: pass -o DIR or set 'output' in the recipe")
    else:
        out = Path(recipe.output)
        if resume and not can_resume(out):
            problems.add(f"nothing to resume: no saved state in '{run_dir(out)}'")
        if not resume:
            problems.output(out, force, "", inputs=(recipe.model, None if t.init in init_names() else t.init))
            if run_dir(out).exists() and not force:
                problems.add(
                    f"an unfinished run is in '{run_dir(out)}': pass --resume to continue it or --force to start over"
                )
    with problems.check():
        check_init(t.init, "--init")
        if t.init not in init_names():
            read_meta(Path(t.init))
    if t.init in init_names():
        problems.model(recipe.model, "give MODEL on the command line or set 'model' in the recipe")
    problems.data(t.data, "no training data: pass --data or set qat.data in the recipe", mix=True)
    if t.init in METHODS and METHODS[t.init].needs_calibration:
        missing = f"--init {t.init} needs calibration data: pass --calib-data or set calib.data"
        problems.data(recipe.calib.data, missing, mix=True)
    if t.block.data is not None:
        problems.data(t.block.data, "", mix=True)
    if recipe.eval.data is not None:
        problems.data(recipe.eval.data, "")
    with problems.check():
        make_estimator(t, recipe.seed)
    if t.teacher_device != "auto":
        with problems.check():
            resolve_device(t.teacher_device)
    world_size = launched_world_size()
    if world_size is not None:
        block_stage = t.block.epochs_for(lowest_bits(recipe.quant)) > 0
        for problem in distributed_problems(t, world_size, block_stage):
            problems.add(problem)
    problems.raise_if_any()


def _initial_model(recipe: Recipe, device: torch.device, load_device: torch.device) -> tuple[Base, dict, TokenSource]:
    """The model with latent weights and grid to start from, and the token source of the run. The model loads on
    ``load_device``: the CPU where only parts of it go to ``device`` at a time (FSDP's shards); GPTQ's walk
    loads it on the CPU and leaves it there."""
    init = recipe.qat.init
    if init not in init_names():
        model, tokenizer, meta, layers = load_checkpoint(Path(init), load_device, fake_quant=False)
        targets = {name: model.get_submodule(name) for name in layers}
        base = _init_checkpoint_base(recipe, Path(init), meta, model, tokenizer, layers, targets)
        return base, layers, TokenSource(tokenizer, base.ref, recipe.seed, device, window_bos(model, tokenizer))
    method = get_method("rtn" if init == "fp" else init)  # fp starts from the full-precision weights on RTN's grid
    base = load_base(recipe, resolve_model(str(recipe.model)), model_device_for(method, load_device))
    source = TokenSource(base.tokenizer, base.ref, recipe.seed, device, window_bos(base.model, base.tokenizer))
    layers = run_method(method, recipe, base, source, device).layers
    if init != "fp" and method.keeps_fp_weights:
        apply_fake_quant(base.model, layers)  # latent weights start on their grid points
    return base, layers, source


def _init_checkpoint_base(
    recipe: Recipe, init: Path, meta: dict, model, tokenizer, layers: dict[str, LayerQuant], targets: dict
) -> Base:
    """The Base of a run that starts from a checkpoint: each layer's grid must be the one the recipe gives it
    (bits and sym always; the group size where the recipe names one, as ``auto`` accepts the checkpoint's)."""
    q = recipe.quant
    stated = meta.get("quantization", {})
    if bool(stated.get("lm_head", False)) != q.lm_head:
        has = "quantizes" if stated.get("lm_head") else "does not quantize"
        want = "true" if stated.get("lm_head") else "false"
        raise QatcliError(f"init checkpoint '{init}' {has} lm_head; set quant.lm_head to {want} to match")
    default_group = stated.get("group_size") if q.group_size == "auto" else q.group_size
    quant = dataclasses.replace(q, group_size=default_group if isinstance(default_group, int) else q.group_size)
    plan = plan_quantization(targets, quant)
    differ = []
    for name, lq in layers.items():
        want = plan.specs[name]
        if spec_fields(name, {"group_size": q.group_size}, q.dynamic)["group_size"] == "auto":
            want = dataclasses.replace(want, group_size=lq.spec.group_size)
        if lq.spec != want:
            differ.append(f"{name} has {lq.spec}, the recipe asks for {want}")
    if differ:
        more = f" (and {len(differ) - 1} more layers)" if len(differ) > 1 else ""
        raise QatcliError(f"init checkpoint '{init}': {differ[0]}{more}")
    specs = {name: lq.spec for name, lq in layers.items()}
    untied = stated.get("untied_lm_head") if q.lm_head else None
    return Base(base_model_ref(init, meta), model, tokenizer, targets, plan.default, specs, plan.dynamic, untied)


def _block_loss(report: BlockReport) -> dict[str, Any]:
    """The block stage's losses as the checkpoint records them (kept_start: blocks left at their start)."""
    return {"start": report.start, "end": report.end, "kept_start": sorted(report.kept_start)}


def _block_stage(
    recipe: Recipe,
    base: Base,
    layers: dict[str, LayerQuant],
    source: TokenSource,
    device: torch.device,
    group: Distributed | None,
) -> tuple[dict[str, LayerQuant], BlockReport | None, int]:
    """The block-wise stage where the recipe asks for it and no end-to-end state has superseded it. Under torchrun
    every process walks its share of each batch of windows and the gradients are averaged (qatcli/qat/block.py);
    process 0 saves the blocks."""
    t = recipe.qat
    lowest = min(spec.bits for spec in base.specs.values())
    epochs = t.block.epochs_for(lowest)  # the lowest bits decide
    if epochs == 0 and lowest == 2 and t.init in ("fp", "rtn") and recipe.quant.clip == "mse" and t.steps > 0:
        stderr_console.print(
            "[yellow]2-bit end-to-end QAT without the block stage, from the MSE grid, collapses (smollm2-135m: "
            "perplexity 5e5 after 30 steps, 1076 from the min/max grid; docs/results.md): keep the block stage "
            "or pass --clip minmax"
        )
    workdir = run_dir(Path(str(recipe.output)))
    if epochs == 0 or has_state(workdir):  # a saved end-to-end state holds the stage's result
        return layers, None, epochs
    data = source.mix(t.block.data if t.block.data is not None else t.data, "train")
    windows = data.calibration(t.block.nsamples, t.block.seqlen, recipe.seed, source.bos)
    fp_weights = None
    if t.init != "fp":  # the model holds RTN, GPTQ or trained weights: the targets need the fp ones
        fp_model = load_model(base.ref, torch.device("cpu"))
        fp_weights = {name: fp_model.get_submodule(name).weight.detach() for name in layers}
        del fp_model
    try:
        save = group is None or group.is_main
        layers, report = train_blocks(
            base.model, layers, windows, t, epochs, recipe.seed, device, workdir, fp_weights, save, group
        )
    except KeyboardInterrupt:
        message = "interrupted in the block stage (finished blocks are kept); continue with --resume"
        raise Interrupted(message) from None
    return layers, report, epochs


def _evaluated_once(
    path: Path,
    base: Base,
    layers: dict[str, LayerQuant],
    recipe: Recipe,
    source: TokenSource,
    device: torch.device,
    label: str,
) -> dict[str, Any]:
    """The evaluation of a stage of the run, made once and kept in the run directory for resumed invocations."""
    if path.is_file():
        saved = json.loads(path.read_text())
        return saved if isinstance(saved, dict) else {"ppl": saved}  # runs started before domains saved a number
    result = evaluate_layers(base, layers, recipe, source, device, label)
    write_json_atomic(path, result)
    return result


def _stage_fields(stage: str, result: dict[str, Any] | None) -> dict[str, Any]:
    """``ppl_<stage>`` (the geometric mean over domains), and ``domains_<stage>`` where there are several."""
    if result is None:
        return {f"ppl_{stage}": None}
    fields = {f"ppl_{stage}": result["ppl"]}
    if "domains" in result:
        fields[f"domains_{stage}"] = {spec: d["ppl"] for spec, d in result["domains"].items()}
    return fields


@contextmanager
def _on_device(model: nn.Module, device: torch.device) -> Iterator[None]:
    """``model`` on ``device`` inside the block and back where it was after: an evaluation of the model that FSDP
    takes from the CPU (a no-op where the model is on the device already)."""
    home = next(model.parameters()).device
    model.to(device)
    try:
        yield
    finally:
        model.to(home)


def _teacher(recipe: Recipe, base: Base, device: torch.device) -> nn.Module:
    """The full-precision model of the kd loss, in qat.teacher_dtype on qat.teacher_device."""
    t = recipe.qat
    where = device if t.teacher_device == "auto" else resolve_device(t.teacher_device)
    return load_model(base.ref, where, getattr(torch, t.teacher_dtype))


def _initial_weights(recipe: Recipe, base: Base) -> nn.Module:
    """The model training started from, fp32 on the CPU, where the frozen parts come back from (qat.frozen_dtype)."""
    init = recipe.qat.init
    if init in init_names():  # the methods QAT starts from change the quantized layers alone
        return load_model(base.ref, torch.device("cpu"))
    return load_checkpoint(Path(init), torch.device("cpu"), fake_quant=False)[0]


def _end_to_end(
    recipe: Recipe,
    base: Base,
    layers: dict[str, LayerQuant],
    source: TokenSource,
    data: MixedTokens,
    device: torch.device,
    stop_after: int | None,
    group: Distributed | None,
) -> tuple[Base, dict[str, LayerQuant], list[dict[str, Any]]] | None:
    """The end-to-end steps (none where qat.steps is 0): the base holding the trained model, its grids and the
    steps' records; None where the invocation stopped before the last step, and on every process but the first
    of a distributed run."""
    t = recipe.qat
    if t.steps == 0:
        return None if group is not None and not group.is_main else (base, layers, [])
    workdir = run_dir(Path(str(recipe.output)))
    teacher = _teacher(recipe, base, device) if t.loss == "kd" else None
    estimator = make_estimator(t, recipe.seed)
    fakes = prepare_qat(base.model, layers, estimator, t.fused_for(quantized_weights(layers)))
    if group is not None:
        group.broadcast(base.model)
    lowered = [] if t.frozen_dtype == "float32" else lower_frozen(base.model, getattr(torch, t.frozen_dtype))
    trainer = Trainer(
        base.model, fakes, estimator, teacher, data, t, recipe.seed, device, workdir, group, bos=source.bos
    )
    if has_state(workdir):
        trainer.load_state()
        if trainer.step > t.steps:
            raise QatcliError(f"--resume: the run is at step {trainer.step}, past --steps {t.steps}")
        stderr_console.print(f"resuming at step {trainer.step} of {t.steps}")
    evaluate = None
    if recipe.eval.data is not None and t.eval_every:

        def evaluate() -> dict[str, Any]:
            with torch.no_grad():
                result = evaluate_on_data(base.model, source, recipe.eval, device, "eval")
            each = {"eval_domains": {spec: p.ppl for spec, p in result.each.items()}} if len(result.each) > 1 else {}
            return {"eval_ppl": result.ppl, **each}

    record_landscape = None
    if t.record_every:
        fp_teacher = teacher is not None and t.teacher_dtype == "float32"
        fp_model = teacher if fp_teacher else load_model(base.ref, torch.device("cpu"))
        fp = {name: fp_model.get_submodule(name).weight.detach() for name in fakes}
        probe = data.batches(t.seqlen, t.batch_size, recipe.seed + 2, source.bos).next_batch().to(device)
        model = base.model
        record_landscape = LandscapeRecorder(model, fakes, fp, lambda: model_ce_loss(model, probe)).record

    try:
        trainer.train(stop_after, evaluate=evaluate, record_landscape=record_landscape)
    except InterruptedAtStep as stop:
        raise Interrupted(f"interrupted after step {stop.step}, saved; continue with --resume") from None
    except KeyboardInterrupt:
        saved = "nothing saved yet" if trainer.saved_step is None else f"step {trainer.saved_step} is saved"
        raise Interrupted(f"interrupted during step {trainer.step + 1}, {saved}; continue with --resume") from None
    if trainer.step < t.steps:
        stderr_console.print(f"stopped after step {trainer.step} of {t.steps}; continue with --resume")
        return None
    for handle in lowered:
        handle.remove()
    if group is None:
        layers = convert_qat(base.model, fakes)
    else:
        state = group.gather(base.model)
        if not group.is_main:
            return None
        model, layers = unsharded_copy(base.model, fakes, state)
        base = dataclasses.replace(base, model=model, targets={name: model.get_submodule(name) for name in layers})
    records = [json.loads(line) for line in (workdir / METRICS_FILE).read_text().splitlines()]
    return base, layers, records


def _check_trained(base: Base, layers: dict[str, LayerQuant], workdir: Path) -> None:
    """Refuse to write a checkpoint whose grid or latent weights training has broken."""
    for name, lq in layers.items():
        scales = lq.scales.float()
        weight = base.model.get_submodule(name).weight
        if not (torch.isfinite(scales).all() and (scales > 0).all() and torch.isfinite(weight).all()):
            raise TrainingDiverged(
                f"training left {name} with scales or weights that are not finite and positive: nothing was "
                f"written; the run's last saved state is in {workdir} (lower the learning rates)"
            )


def _qat_meta(recipe: Recipe, base: Base, layers: dict[str, LayerQuant], epochs: int, device: torch.device) -> dict:
    t = recipe.qat
    return {
        "method": "qat",
        "base_model": base_meta(base.ref),
        "quantization": {
            **quantization_meta(recipe, base),
            "desc_act": any(lq.act_order for lq in layers.values()),
        },
        "qat": {
            "estimator": make_estimator(t, recipe.seed).describe(),
            "block": {**dataclasses.asdict(t.block), "epochs": epochs} if epochs else None,
            "train": t.train,
            "init": t.init,
            "loss": t.loss,
            "steps": t.steps,
            "variance_reduction": {"gamma": t.vr_gamma} if t.variance_reduction else None,
        },
        "recipe": recipe.to_dict(),
        "provenance": provenance("qat", device, recipe.seed),
    }


def train_qat(recipe: Recipe, force: bool, resume: bool, stop_after: int | None) -> Made | None:
    """Run (or continue) the training; the checkpoint when it finished, None when it stopped early (and on every
    process but the first under torchrun)."""
    check_qat(recipe, force, resume)
    group, device = join(recipe.device, recipe.qat)
    try:
        return _train(recipe, force, resume, stop_after, group, device)
    finally:
        leave(group)


def _train(
    recipe: Recipe,
    force: bool,
    resume: bool,
    stop_after: int | None,
    group: Distributed | None,
    device: torch.device,
) -> Made | None:
    t = recipe.qat
    out = Path(str(recipe.output))
    workdir = run_dir(out)
    main = group is None or group.is_main
    seed_everything(recipe.seed, recipe.deterministic)
    start_peak_memory(device)
    keep_freed_memory()

    t0 = time.perf_counter()
    # FSDP takes the student from the CPU, one unit at a time: no process holds it whole on its device
    load_device = torch.device("cpu") if group is not None and t.parallel == "fsdp" else device
    with main_first(group):
        if main and not resume and workdir.exists():
            shutil.rmtree(workdir)
        base, layers, source = _initial_model(recipe, device, load_device)
        data = source.mix(t.data, "train")
        if resume:
            check_resumed_run(workdir, recipe, data)
        elif main:
            workdir.mkdir(parents=True)
            record_run(workdir, recipe, data)
    if group is not None:  # the Linear layers that the fake-quantized ones replace would keep whole weights alive
        base = dataclasses.replace(base, targets={})
    before = None
    if recipe.eval.data is not None and main:
        with _on_device(base.model, device):
            before = _evaluated_once(workdir / BEFORE_FILE, base, layers, recipe, source, device, "eval (init)")
    setup_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    layers, block_report, epochs = _block_stage(recipe, base, layers, source, device, group)
    block_seconds = time.perf_counter() - t0
    after_blocks = None
    if recipe.eval.data is not None and epochs and t.steps and main:
        # the block stage's own result, so one run measures both block-only and block + end-to-end
        with _on_device(base.model, device):
            label = "eval (after blocks)"
            after_blocks = _evaluated_once(workdir / AFTER_BLOCKS_FILE, base, layers, recipe, source, device, label)
    t0 = time.perf_counter()
    base.model.to(load_device)  # the walks (GPTQ, the block stage) leave it on the CPU
    trained = _end_to_end(recipe, base, layers, source, data, device, stop_after, group)
    if trained is None:
        return None
    base, layers, records = trained
    restore_frozen(base.model, lambda: _initial_weights(recipe, base))
    _check_trained(base, layers, workdir)
    metrics: dict[str, Any] = {
        "setup_seconds": round(setup_seconds, 3),
        "block_seconds_this_invocation": round(block_seconds, 3),
        "train_seconds_this_invocation": round(time.perf_counter() - t0, 3),
        "block_epochs": epochs,
        "block_loss": None if block_report is None else _block_loss(block_report),
        "steps": t.steps,
        "final_loss": records[-1]["loss"] if records else None,
        "mean_step_seconds": sum(r["step_seconds"] for r in records) / len(records) if records else None,
        "quantized_layers": len(layers),
        "quantized_bytes": quantized_bytes(layers),
        "avg_bits": average_bits(layers),
        "processes": 1 if group is None else group.world_size,
        **peak_memory_mib(device),
    }
    recorded = [(r["step"], r["landscape"]) for r in records if "landscape" in r]
    if recorded:
        metrics["landscape_first_step_within_eps"] = next(
            (step for step, m in recorded if m["loss_quantized"] - m["loss_fp"] <= t.record_eps), None
        )
    if recipe.eval.data is not None:
        with _on_device(base.model, device):  # process 0's gathered model, or one that FSDP left on the CPU
            evaluated = evaluate_layers(base, layers, recipe, source, device, "eval")
        stages = {**_stage_fields("before", before), **_stage_fields("after_blocks", after_blocks)}
        metrics["eval"] = {**stages, **evaluated}
    meta = {**_qat_meta(recipe, base, layers, epochs, device), "metrics": metrics}
    with atomic_dir(out, force or resume) as tmp:
        save_checkpoint(tmp, base.model, base.tokenizer, layers, meta)
        if records:
            shutil.copy(workdir / METRICS_FILE, tmp / METRICS_FILE)
        if recorded_blocks := block_records(workdir):
            (tmp / BLOCK_METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in recorded_blocks))
    shutil.rmtree(workdir)
    return Made(out, meta, {name: lq.spec for name, lq in layers.items()})
