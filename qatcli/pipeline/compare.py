"""qatcli compare: a matrix of methods x bit widths (x group sizes) on one model, in one table.

The output directory holds

  recipe.json                the resolved recipe of the latest run (marks the directory as a compare output)
  fp.json                    the full-precision row
  cells/<name>/cell.json     the cell's checkpoint key and the seconds spent making its checkpoint
  cells/<name>/checkpoint/   its qatcli checkpoint (a QAT cell trains in checkpoint.run/ first)
  cells/<name>/gptq/         its GPTQ-format export, the model that is evaluated
  cells/<name>/result.json   the finished cell: perplexity, sizes, times, and the keys it was made with
  cells/<name>/landscape.json, landscape.png
                             a QAT cell's basin measurements, where the recipe sets qat.record_every
  compare.json, compare.csv, compare.png
  compare_landscape.png      every QAT cell's recorded curves side by side, where any were recorded

A cell whose result.json has the current keys is reused; one whose checkpoint still fits is exported and
evaluated again; anything else is made again. An interrupted QAT cell resumes from its saved state.
"""

from __future__ import annotations

import csv
import dataclasses
import gc
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from qatcli.config import Recipe
from qatcli.data.mix import eval_specs
from qatcli.data.tokens import TokenSource, window_bos
from qatcli.errors import Interrupted, QatcliError
from qatcli.evaluation.perplexity import evaluate_on_data
from qatcli.evaluation.tasks import check_tasks, evaluate_tasks, flat_task_fields
from qatcli.exporters import DEFAULT_FORMAT, format_for
from qatcli.formats.checkpoint import is_checkpoint, read_meta
from qatcli.formats.packed_model import load_gptq_model
from qatcli.methods import METHODS
from qatcli.models.loading import ModelRef, load_model, load_tokenizer, resolve_model
from qatcli.outputs import atomic_file, write_json_atomic
from qatcli.pipeline.diagnose import recorded_landscape
from qatcli.pipeline.export import export_checkpoint
from qatcli.pipeline.inputs import Problems
from qatcli.pipeline.matrix import Cell, cell_recipe, checkpoint_key, eval_key, expand
from qatcli.pipeline.ptq import make_ptq_checkpoint
from qatcli.pipeline.qat import can_resume, check_init, train_qat
from qatcli.qat.estimators import check_estimator
from qatcli.quant.targets import find_targets, layer_specs, resolve_group_size
from qatcli.report.figure import plot_compare
from qatcli.report.landscape_figure import plot_recorded, plot_recorded_runs
from qatcli.report.progress import overall_progress, stderr_console
from qatcli.report.table import fmt
from qatcli.runtime import resolve_device, seed_everything

MARKER = "recipe.json"
OUTPUTS = ("compare.json", "compare.csv", "compare.png")
CSV_COLUMNS = (
    "cell",
    "method",
    "estimator",
    "init",
    "steps",
    "block_epochs",
    "bits",
    "avg_bits",
    "group_size",
    "sym",
    "ppl",
    "ppl_delta",
    "ppl_ratio",
    "nll",
    "windows",
    "seqlen",
    "quantized_bytes",
    "export_bytes",
    "quantize_seconds",
    "status",
)


@dataclass
class Context:
    recipe: Recipe
    output: Path
    ref: ModelRef
    device: torch.device


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _check_inputs(recipe: Recipe, cells: list[Cell]) -> None:
    problems = Problems()
    problems.model(recipe.model, "set 'model' in the recipe")
    if recipe.output is None:
        problems.add("no output directory: pass -o DIR or set 'output' in the recipe")
    if not cells:
        problems.add("the recipe has no compare.methods: list the methods to compare (see recipes/demo.yaml)")
    problems.data(recipe.eval.data, "no evaluation data: set eval.data in the recipe")
    with problems.check():
        check_tasks(recipe.eval)
    if recipe.export.format is not None and format_for(recipe.export.format) is not format_for(DEFAULT_FORMAT):
        problems.add(
            "compare evaluates each cell's GPTQ-format export: leave export.format unset (gptq or gptq_v2), and "
            f"export a chosen cell with qatcli export --format {recipe.export.format}"
        )
    calibrated = sorted({m for c in cells for m in (c.method, c.init) if m in METHODS and METHODS[m].needs_calibration})
    if calibrated:
        names = "/".join(calibrated)
        problems.data(recipe.calib.data, f"{names} cells need calibration data: set calib.data in the recipe", mix=True)
    for c in cells:
        if c.method != "qat":
            continue
        try:
            check_estimator(str(c.estimator))
        except QatcliError as err:
            problems.add(f"cell {c.name}: {err}")
        with problems.check():
            check_init(str(c.init), f"cell {c.name}: init")
    if any(c.method == "qat" for c in cells):
        problems.data(recipe.qat.data, "qat cells need training data: set qat.data in the recipe", mix=True)
    problems.raise_if_any()


def _prepare_output(output: Path, force: bool) -> None:
    """Continue an earlier comparison in ``output``; with ``force`` start over. Never touch other directories."""
    if output.exists() and not output.is_dir():
        raise QatcliError(f"output '{output}' exists and is not a directory")
    ours = (output / MARKER).is_file()
    if output.is_dir() and any(output.iterdir()) and not ours:
        raise QatcliError(f"output '{output}' holds something other than a qatcli compare run; choose another -o")
    if force and ours:
        shutil.rmtree(output)


def _auto_group_size(recipe: Recipe, ref: ModelRef) -> int:
    """What group size ``auto`` means for the model, from its layer shapes alone (built on the meta device)."""
    config = AutoConfig.from_pretrained(ref.location)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    q = recipe.quant
    group = resolve_group_size("auto", find_targets(model, q.include, q.exclude, q.lm_head))
    stderr_console.print(f"group size auto -> {group}")
    return group


def _fp_row(ctx: Context, cells: list[Cell]) -> dict[str, Any]:
    """The full-precision row, evaluated once per evaluation key; the group sizes are checked on the way."""
    r = ctx.recipe
    path = ctx.output / "fp.json"
    key = eval_key(r, with_export=False)
    cached = _read_json(path)
    if cached is not None and cached.get("eval_key") == key:
        return {"avg_bits": 16, **cached["row"], "status": "reused"}
    seed_everything(r.seed, r.deterministic)
    model = load_model(ctx.ref, ctx.device)
    tokenizer = load_tokenizer(ctx.ref)
    targets = find_targets(model, r.quant.include, r.quant.exclude, r.quant.lm_head)
    for cell in cells:  # a group size that does not fit fails here, before any cell runs
        dynamic = r.quant.dynamic if cell.dynamic is None else cell.dynamic
        try:
            layer_specs(
                targets, dataclasses.replace(r.quant, bits=cell.bits, group_size=cell.group_size, dynamic=dynamic)
            )
        except QatcliError as err:
            raise QatcliError(f"cell {cell.name}: {err}") from err
    t0 = time.perf_counter()
    source = TokenSource(tokenizer, ctx.ref, r.seed, ctx.device, window_bos(model, tokenizer))
    result = evaluate_on_data(model, source, r.eval, ctx.device, "eval fp")
    tasks = evaluate_tasks(model, tokenizer, r.eval)
    row = {
        "cell": "fp",
        "method": "fp",
        "series": "fp",
        "bits": 16,
        "avg_bits": 16,
        "group_size": None,
        "sym": None,
        **result.fields(),
        "data": r.eval.data,
        **tasks,
        "quantized_bytes": sum(m.weight.numel() * 2 for m in targets.values()),  # fp16 size of the same layers
        "export_bytes": None,
        "quantize_seconds": None,
        "eval_seconds": round(time.perf_counter() - t0, 3),
    }
    write_json_atomic(path, {"eval_key": key, "row": row})
    del model
    gc.collect()
    return {**row, "status": "new"}


def _block_epochs(meta: dict[str, Any]) -> int | None:
    """The block-stage epochs a QAT checkpoint was trained with (auto resolved; 0 without the stage)."""
    if meta["method"] != "qat":
        return None
    block = meta["qat"].get("block")
    return block["epochs"] if block else 0


def _make_checkpoint(cell: Cell, recipe: Recipe, directory: Path, state: dict[str, Any]) -> str:
    """Run ptq or qat for the cell; QAT time adds up over resumed invocations. Returns new or resumed."""
    checkpoint = Path(str(recipe.output))
    if cell.method != "qat":
        t0 = time.perf_counter()
        make_ptq_checkpoint(recipe, force=True)  # an interrupted PTQ cell simply runs again
        state["seconds"] = time.perf_counter() - t0
        write_json_atomic(directory / "cell.json", state)
        return "new"
    resume = can_resume(checkpoint)
    t0 = time.perf_counter()
    try:
        train_qat(recipe, force=not resume, resume=resume, stop_after=None)
    finally:
        state["seconds"] = state.get("seconds", 0.0) + time.perf_counter() - t0
        write_json_atomic(directory / "cell.json", state)
    return "resumed" if resume else "new"


def _evaluate_export(ctx: Context, cell: Cell, export: Path) -> dict[str, Any]:
    r = ctx.recipe
    seed_everything(r.seed, r.deterministic)
    t0 = time.perf_counter()
    model, tokenizer, _ = load_gptq_model(export, ctx.device)
    source = TokenSource(tokenizer, ctx.ref, r.seed, ctx.device, window_bos(model, tokenizer))
    result = evaluate_on_data(model, source, r.eval, ctx.device, f"eval {cell.name}")
    tasks = evaluate_tasks(model, tokenizer, r.eval)
    del model
    gc.collect()
    return {
        **result.fields(),
        "data": r.eval.data,
        **tasks,
        "eval_seconds": round(time.perf_counter() - t0, 3),
    }


def average_bits(meta: dict[str, Any]) -> float:
    """Bits per quantized weight of a checkpoint: sum of bits x weights over its quantized layers / their weights."""
    layers = meta["layers"].values()
    weights = sum(info["in_features"] * info["out_features"] for info in layers)
    return sum(info["bits"] * info["in_features"] * info["out_features"] for info in layers) / weights


def _run_cell(ctx: Context, cell: Cell) -> dict[str, Any]:
    directory = ctx.output / "cells" / cell.name
    recipe = cell_recipe(ctx.recipe, cell, directory)
    key, ekey = checkpoint_key(recipe, cell), eval_key(ctx.recipe)
    state = _read_json(directory / "cell.json")
    if state is not None and state.get("key") != key:
        stderr_console.print(f"{cell.name}: its settings changed since it was made; making it again")
        shutil.rmtree(directory)
        state = None
    result = _read_json(directory / "result.json")
    if state is not None and result is not None and result.get("eval_key") == ekey:
        reused = result["row"]
        if "avg_bits" not in reused and is_checkpoint(Path(str(recipe.output))):  # a result from before avg_bits
            reused["avg_bits"] = average_bits(read_meta(Path(str(recipe.output))))
        return {**reused, "status": "reused"}

    if state is None:
        state = {"cell": cell.name, "key": key, "seconds": 0.0}
        write_json_atomic(directory / "cell.json", state)
    checkpoint = Path(str(recipe.output))
    if is_checkpoint(checkpoint):  # made earlier: the evaluation settings changed, or a run stopped after it
        status = "re-evaluated" if result is not None else "resumed"
    else:
        status = _make_checkpoint(cell, recipe, directory, state)

    export = Path(str(recipe.export.output))
    t0 = time.perf_counter()
    export_checkpoint(recipe, str(checkpoint), force=True)
    export_seconds = time.perf_counter() - t0
    meta = read_meta(checkpoint)
    row = {
        "cell": cell.name,
        "method": cell.method,
        "series": cell.series,
        "estimator": cell.estimator,
        "init": cell.init,
        "steps": cell.steps,
        "block_epochs": _block_epochs(meta),
        "bits": cell.bits,
        "avg_bits": average_bits(meta),
        "group_size": cell.group_size,
        "sym": recipe.quant.sym,
        **_evaluate_export(ctx, cell, export),
        "quantized_bytes": meta["metrics"]["quantized_bytes"],
        "export_bytes": _dir_bytes(export),
        "quantize_seconds": round(state["seconds"], 3),
        "export_seconds": round(export_seconds, 3),
    }
    if (landscape := _attach_landscape(checkpoint, directory, cell.name)) is not None:
        row["landscape"] = landscape
    write_json_atomic(directory / "result.json", {"key": key, "eval_key": ekey, "row": row})
    return {**row, "status": status}


def _attach_landscape(checkpoint: Path, directory: Path, name: str) -> dict[str, Any] | None:
    """A QAT cell's recorded curves, copied beside its result with their figure; a summary for its row."""
    recorded = recorded_landscape(checkpoint)
    if recorded is None:
        return None
    write_json_atomic(directory / "landscape.json", {"records": recorded.steps, "block_records": recorded.blocks})
    with atomic_file(directory / "landscape.png") as tmp:
        plot_recorded(recorded.steps, recorded.blocks, f"{name}: QAT in the fp loss landscape", tmp)
    last = recorded.steps[-1]["landscape"] if recorded.steps else None
    return {
        "file": str(Path("cells") / name / "landscape.json"),
        "first_step_within_eps": read_meta(checkpoint)["metrics"].get("landscape_first_step_within_eps"),
        "last": last,
    }


def _with_change(row: dict[str, Any], fp: dict[str, Any]) -> dict[str, Any]:
    return {**row, "ppl_delta": row["ppl"] - fp["ppl"], "ppl_ratio": row["ppl"] / fp["ppl"]}


def _flat_domains(row: dict[str, Any]) -> dict[str, float]:
    """A row's perplexity on each domain as CSV fields (none for a single domain, whose ppl is the row's)."""
    return {f"ppl {spec}": d["ppl"] for spec, d in row.get("domains", {}).items()}


def _write_outputs(ctx: Context, recipe_path: Path, fp: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    out = ctx.output
    everything = [_with_change(fp, fp), *(_with_change(r, fp) for r in rows)]
    summary = {
        "recipe": str(recipe_path),
        "model": ctx.recipe.model,
        "data": ctx.recipe.eval.data,
        "windows": fp["windows"],
        "seqlen": fp["seqlen"],
        "size": "quantized_bytes: the packed quantized layers of the GPTQ export (fp16 for fp); "
        "export_bytes: every file of the export",
        "quantize_seconds": "wall time of making the checkpoint (ptq or qat, loading included)",
        "rows": everything,
    }
    write_json_atomic(out / "compare.json", summary)
    with atomic_file(out / "compare.csv") as tmp, tmp.open("w", newline="") as f:
        # each domain's perplexity, each task's main metric and its stderr
        columns = [*CSV_COLUMNS, *_flat_domains(fp), *flat_task_fields(fp)]
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({**r, **flat_task_fields(r), **_flat_domains(r)} for r in everything)
    specs = eval_specs(ctx.recipe.eval.data or [])
    title = f"{Path(str(ctx.recipe.model)).name} on {', '.join(Path(s).name for s in specs)}"
    with atomic_file(out / "compare.png") as tmp:
        plot_compare(fp, rows, title, tmp)
    curves = {
        r["cell"]: json.loads((out / r["landscape"]["file"]).read_text())["records"]
        for r in rows
        if "landscape" in r and (out / r["landscape"]["file"]).is_file()
    }
    if any(curves.values()):
        with atomic_file(out / "compare_landscape.png") as tmp:
            plot_recorded_runs({name: steps for name, steps in curves.items() if steps}, title, tmp)


@dataclass
class Comparison:
    fp: dict[str, Any]
    rows: list[dict[str, Any]]
    output: Path
    seconds: float


def compare_matrix(recipe: Recipe, recipe_path: Path, force: bool) -> Comparison:
    """Every cell of the recipe's matrix (reusing finished ones) and the fp row; writes compare.json/csv/png."""
    cells = expand(recipe)
    _check_inputs(recipe, cells)
    output = Path(str(recipe.output))
    _prepare_output(output, force)
    device = resolve_device(recipe.device)
    ref = resolve_model(str(recipe.model))
    if any(c.group_size == "auto" for c in cells):
        cells = expand(recipe, _auto_group_size(recipe, ref))
    ctx = Context(recipe, output, ref, device)
    write_json_atomic(output / MARKER, {"recipe": str(recipe_path), **recipe.to_dict()})

    t_start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    current = "fp"
    try:
        with overall_progress() as progress:
            task = progress.add_task("compare", total=len(cells) + 1, unit="cell")
            fp = _fp_row(ctx, cells)
            progress.advance(task)
            for cell in cells:
                current = cell.name
                progress.update(task, description=f"compare: {cell.name}")
                try:
                    row = _run_cell(ctx, cell)
                except QatcliError as err:
                    if isinstance(err, Interrupted):  # qat saved its state and said so
                        raise KeyboardInterrupt from err
                    raise QatcliError(f"cell {cell.name}: {err}") from err
                rows.append(row)
                took = "reused" if row["status"] == "reused" else f"{row['status']}, {row['quantize_seconds']:.1f} s"
                stderr_console.print(f"{cell.name}: ppl {fmt(row['ppl'])} ({took})")
                progress.advance(task)
            progress.update(task, description="compare")
    except KeyboardInterrupt:
        stderr_console.print(
            f"interrupted in {current}; the finished cells are kept in {output}: run the same command again to "
            "continue (an interrupted qat cell resumes from its last saved step)"
        )
        raise
    _write_outputs(ctx, recipe_path, fp, rows)
    return Comparison(fp, rows, output, time.perf_counter() - t_start)
