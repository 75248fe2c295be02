"""The command line: options become recipe overrides; each subcommand's work lives in qatcli.commands.

An option that sets a recipe value is named after its key and takes its help from the field's doc in
qatcli.config, so flags, recipes and their documentation say the same thing.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from qatcli.config import Recipe
from qatcli.entry import INTERRUPTED
from qatcli.errors import QatcliError
from qatcli.recipe import field_help, load_recipe, parse_assignments

app = typer.Typer(
    help="Quantize Hugging Face causal LMs to 2-8 bits and measure what each method costs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def flag(key: str, *decls: str, **kwargs: Any) -> Any:
    """An option that sets the recipe value ``key``; its help is that field's doc (qatcli.config)."""
    return typer.Option(*decls, help=field_help(key), **kwargs)


def _int_or_text(text: str) -> int | str:
    """auto, or an integer; any other text goes on to the recipe check, which names what is allowed."""
    text = text.strip()
    return int(text) if re.fullmatch(r"[-+]?\d+", text) else text


RecipeOpt = Annotated[Path | None, typer.Option("--recipe", "-r", help="YAML recipe; flags override its values.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", help="Any recipe value as KEY=VALUE, e.g. qat.jacobian.blend=1 (repeatable; applied after the flags)."
    ),
]
ModelArg = Annotated[str | None, typer.Argument(help=field_help("model"))]
OutputOpt = Annotated[str | None, flag("output", "--output", "-o")]
DeviceOpt = Annotated[str | None, flag("device")]
SeedOpt = Annotated[int | None, flag("seed")]
BitsOpt = Annotated[int | None, flag("quant.bits")]
# Any: typer refuses a union such as int | str; the parser gives an int or the text (auto).
GroupSizeOpt = Annotated[Any, flag("quant.group_size", parser=_int_or_text, metavar="auto|-1|N")]
SymOpt = Annotated[bool | None, flag("quant.sym", "--sym/--asym")]
LmHeadOpt = Annotated[bool | None, flag("quant.lm_head", "--lm-head/--no-lm-head")]
ClipOpt = Annotated[str | None, flag("quant.clip")]
CalibDataOpt = Annotated[str | None, flag("calib.data")]
NsamplesOpt = Annotated[int | None, flag("calib.nsamples")]
CalibSeqlenOpt = Annotated[int | None, flag("calib.seqlen", "--calib-seqlen")]
EvalDataOpt = Annotated[str | None, flag("eval.data", "--eval-data")]
EvalSeqlenOpt = Annotated[int | None, flag("eval.seqlen", "--eval-seqlen")]
MaxWindowsOpt = Annotated[int | None, flag("eval.max_windows")]

# Each command's options by parameter name, with the recipe key each one sets: one key per option, and
# an option name means the same key in every command, except --seqlen, --data and --output, which name
# the obvious one of each command (ptq: calibration, qat: training, eval: evaluation).
SHARED_KEYS = {"device": "device", "seed": "seed"}
QUANT_KEYS = {
    "bits": "quant.bits",
    "group_size": "quant.group_size",
    "sym": "quant.sym",
    "clip": "quant.clip",
    "lm_head": "quant.lm_head",
}
EVAL_KEYS = {"eval_data": "eval.data", "eval_seqlen": "eval.seqlen", "max_windows": "eval.max_windows"}
COMMAND_KEYS: dict[str, dict[str, str]] = {
    "ptq": {
        "model": "model",
        "output": "output",
        "method": "quant.method",
        **QUANT_KEYS,
        "include": "quant.include",
        "exclude": "quant.exclude",
        "calib_data": "calib.data",
        "nsamples": "calib.nsamples",
        "seqlen": "calib.seqlen",
        "damp": "gptq.damp",
        "block_size": "gptq.block_size",
        "act_order": "gptq.act_order",
        "act_group_aware": "gptq.act_group_aware",
        "static_groups": "gptq.static_groups",
        "true_sequential": "gptq.true_sequential",
        "n_grid": "awq.n_grid",
        "duo_scaling": "awq.duo_scaling",
        "fp_inputs": "awq.fp_inputs",
        **EVAL_KEYS,
        **SHARED_KEYS,
    },
    "qat": {
        "model": "model",
        "output": "output",
        **QUANT_KEYS,
        "estimator": "qat.estimator",
        "amplitudes": "qat.amplitudes",
        "init": "qat.init",
        "data": "qat.data",
        "steps": "qat.steps",
        "block_epochs": "qat.block.epochs",
        "train": "qat.train",
        "batch_size": "qat.batch_size",
        "seqlen": "qat.seqlen",
        "grad_accum": "qat.grad_accum",
        "lr": "qat.lr",
        "scale_lr": "qat.scale_lr",
        "loss": "qat.loss",
        "teacher_dtype": "qat.teacher_dtype",
        "teacher_device": "qat.teacher_device",
        "frozen_dtype": "qat.frozen_dtype",
        "parallel": "qat.parallel",
        "gradient_checkpointing": "qat.gradient_checkpointing",
        "variance_reduction": "qat.variance_reduction",
        "fused": "qat.fused",
        "save_every": "qat.save_every",
        "eval_every": "qat.eval_every",
        "calib_data": "calib.data",
        "nsamples": "calib.nsamples",
        "calib_seqlen": "calib.seqlen",
        **EVAL_KEYS,
        **SHARED_KEYS,
    },
    "eval": {
        "data": "eval.data",
        "seqlen": "eval.seqlen",
        "max_windows": "eval.max_windows",
        "tasks": "eval.tasks",
        "task_dirs": "eval.task_dirs",
        "num_fewshot": "eval.num_fewshot",
        "limit": "eval.limit",
        "batch_size": "eval.batch_size",
        **SHARED_KEYS,
    },
    "diagnose": {
        "data": "eval.data",
        "seqlen": "eval.seqlen",
        "max_windows": "eval.max_windows",
        "points": "diagnose.points",
        "t_max": "diagnose.t_max",
        "hessian_windows": "diagnose.hessian_windows",
        **SHARED_KEYS,
    },
    "export": {
        "output": "export.output",
        "fmt": "export.format",
        "dtype": "export.dtype",
        "max_shard_mib": "export.max_shard_mib",
        "v1_clamp_zeros": "export.v1_clamp_zeros",
    },
    "compare": {"output": "output", **EVAL_KEYS, "device": "device"},
}


def _load(command: str, recipe: Path | None, params: dict[str, Any], assignments: list[str] | None) -> Recipe:
    """The recipe file with the options given to ``command`` (``params``, its arguments by name) and then
    the --set assignments applied; an option not given (None, or an empty repeatable one) changes nothing."""
    overrides = {key: params[name] if params[name] != [] else None for name, key in COMMAND_KEYS[command].items()}
    return load_recipe(recipe, {**overrides, **parse_assignments(assignments or [])})


@app.command()
def ptq(
    model: ModelArg = None,
    recipe: RecipeOpt = None,
    method: Annotated[str | None, flag("quant.method")] = None,
    bits: BitsOpt = None,
    group_size: GroupSizeOpt = None,
    sym: SymOpt = None,
    clip: ClipOpt = None,
    lm_head: LmHeadOpt = None,
    include: Annotated[list[str] | None, flag("quant.include")] = None,
    exclude: Annotated[list[str] | None, flag("quant.exclude")] = None,
    output: OutputOpt = None,
    calib_data: CalibDataOpt = None,
    nsamples: NsamplesOpt = None,
    seqlen: Annotated[int | None, flag("calib.seqlen", "--seqlen", "--calib-seqlen")] = None,
    damp: Annotated[float | None, flag("gptq.damp")] = None,
    block_size: Annotated[int | None, flag("gptq.block_size")] = None,
    act_order: Annotated[bool | None, flag("gptq.act_order", "--act-order/--no-act-order")] = None,
    act_group_aware: Annotated[
        bool | None, flag("gptq.act_group_aware", "--act-group-aware/--no-act-group-aware")
    ] = None,
    static_groups: Annotated[bool | None, flag("gptq.static_groups", "--static-groups/--no-static-groups")] = None,
    true_sequential: Annotated[
        bool | None, flag("gptq.true_sequential", "--true-sequential/--no-true-sequential")
    ] = None,
    n_grid: Annotated[int | None, flag("awq.n_grid")] = None,
    duo_scaling: Annotated[bool | None, flag("awq.duo_scaling", "--duo-scaling/--no-duo-scaling")] = None,
    fp_inputs: Annotated[bool | None, flag("awq.fp_inputs", "--fp-inputs/--no-fp-inputs")] = None,
    eval_data: EvalDataOpt = None,
    eval_seqlen: EvalSeqlenOpt = None,
    max_windows: MaxWindowsOpt = None,
    set_: SetOpt = None,
    device: DeviceOpt = None,
    seed: SeedOpt = None,
    force: ForceOpt = False,
) -> None:
    """Post-training quantization (RTN, GPTQ or AWQ) into a qatcli checkpoint directory."""
    from qatcli.commands.ptq import run_ptq

    run_ptq(_load("ptq", recipe, locals(), set_), force)


@app.command()
def qat(
    model: ModelArg = None,
    recipe: RecipeOpt = None,
    bits: BitsOpt = None,
    group_size: GroupSizeOpt = None,
    sym: SymOpt = None,
    clip: ClipOpt = None,
    lm_head: LmHeadOpt = None,
    estimator: Annotated[str | None, flag("qat.estimator")] = None,
    # --amplitude, the singular, reads better repeated: --amplitude 0.2 --amplitude 0.05.
    amplitudes: Annotated[list[float] | None, flag("qat.amplitudes", "--amplitudes", "--amplitude")] = None,
    init: Annotated[str | None, flag("qat.init")] = None,
    data: Annotated[str | None, flag("qat.data")] = None,
    steps: Annotated[int | None, flag("qat.steps")] = None,
    block_epochs: Annotated[
        Any, flag("qat.block.epochs", "--block-epochs", parser=_int_or_text, metavar="auto|N")
    ] = None,
    train: Annotated[str | None, flag("qat.train")] = None,
    batch_size: Annotated[int | None, flag("qat.batch_size")] = None,
    seqlen: Annotated[int | None, flag("qat.seqlen", "--seqlen", "--train-seqlen")] = None,
    grad_accum: Annotated[int | None, flag("qat.grad_accum")] = None,
    lr: Annotated[float | None, flag("qat.lr")] = None,
    scale_lr: Annotated[float | None, flag("qat.scale_lr")] = None,
    loss: Annotated[str | None, flag("qat.loss")] = None,
    teacher_dtype: Annotated[str | None, flag("qat.teacher_dtype")] = None,
    teacher_device: Annotated[str | None, flag("qat.teacher_device")] = None,
    frozen_dtype: Annotated[str | None, flag("qat.frozen_dtype")] = None,
    parallel: Annotated[str | None, flag("qat.parallel")] = None,
    gradient_checkpointing: Annotated[
        bool | None, flag("qat.gradient_checkpointing", "--gradient-checkpointing/--no-gradient-checkpointing")
    ] = None,
    variance_reduction: Annotated[
        bool | None, flag("qat.variance_reduction", "--variance-reduction/--no-variance-reduction")
    ] = None,
    fused: Annotated[bool | None, flag("qat.fused", "--fused/--no-fused")] = None,
    save_every: Annotated[int | None, flag("qat.save_every")] = None,
    eval_every: Annotated[int | None, flag("qat.eval_every")] = None,
    set_: SetOpt = None,
    calib_data: CalibDataOpt = None,
    nsamples: NsamplesOpt = None,
    calib_seqlen: CalibSeqlenOpt = None,
    eval_data: EvalDataOpt = None,
    eval_seqlen: EvalSeqlenOpt = None,
    max_windows: MaxWindowsOpt = None,
    output: OutputOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the unfinished run of this output.")] = False,
    stop_after: Annotated[int | None, typer.Option(help="End this invocation after N steps (resume later).")] = None,
    device: DeviceOpt = None,
    seed: SeedOpt = None,
    force: ForceOpt = False,
) -> None:
    """Quantization-aware training into a qatcli checkpoint directory."""
    from qatcli.commands.qat import run_qat

    cfg = _load("qat", recipe, locals(), set_)
    if stop_after is not None and stop_after < 1:
        raise QatcliError(f"--stop-after must be positive, got {stop_after}")
    run_qat(cfg, force, resume, stop_after)


@app.command("eval")
def eval_(
    models: Annotated[list[str] | None, typer.Argument(help="Models and/or qatcli checkpoints.")] = None,
    recipe: RecipeOpt = None,
    data: Annotated[str | None, flag("eval.data", "--data", "--eval-data")] = None,
    seqlen: Annotated[int | None, flag("eval.seqlen", "--seqlen", "--eval-seqlen")] = None,
    max_windows: MaxWindowsOpt = None,
    tasks: Annotated[list[str] | None, flag("eval.tasks", metavar="TASK[,TASK...]")] = None,
    task_dirs: Annotated[list[str] | None, flag("eval.task_dirs", "--task-dir", "--task-dirs", metavar="DIR")] = None,
    num_fewshot: Annotated[int | None, flag("eval.num_fewshot")] = None,
    limit: Annotated[int | None, flag("eval.limit")] = None,
    batch_size: Annotated[int | None, flag("eval.batch_size", "--eval-batch-size")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the rows as JSON here.")] = None,
    set_: SetOpt = None,
    device: DeviceOpt = None,
    seed: SeedOpt = None,
    force: ForceOpt = False,
) -> None:
    """Perplexity and task accuracy of full-precision models and checkpoints, in one table."""
    from qatcli.commands.evaluate import run_eval

    tasks = [t.strip() for item in tasks or [] for t in item.split(",") if t.strip()]
    run_eval(_load("eval", recipe, locals(), set_), models or [], json_path, force)


@app.command()
def diagnose(
    model: Annotated[str | None, typer.Argument(help="The full-precision model the others were made from.")] = None,
    quantized: Annotated[
        list[str] | None, typer.Argument(help="qatcli checkpoints and/or GPTQ-format directories.")
    ] = None,
    recipe: RecipeOpt = None,
    data: Annotated[str | None, flag("eval.data", "--data", "--eval-data")] = None,
    seqlen: Annotated[int | None, flag("eval.seqlen", "--seqlen", "--eval-seqlen")] = None,
    max_windows: MaxWindowsOpt = None,
    points: Annotated[int | None, flag("diagnose.points")] = None,
    t_max: Annotated[float | None, flag("diagnose.t_max")] = None,
    hessian_windows: Annotated[int | None, flag("diagnose.hessian_windows")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the measurements as JSON here.")] = None,
    png_path: Annotated[Path | None, typer.Option("--png", help="Draw the loss along each segment here.")] = None,
    set_: SetOpt = None,
    device: DeviceOpt = None,
    seed: SeedOpt = None,
    force: ForceOpt = False,
) -> None:
    """The loss between the fp model and each quantized one: segment profile, gap, Hessian distance, inward gradient."""
    from qatcli.commands.diagnose import run_diagnose

    cfg = _load("diagnose", recipe, locals(), set_)
    run_diagnose(cfg, model or cfg.model, quantized or [], json_path, png_path, force)


@app.command()
def export(
    checkpoint: Annotated[str | None, typer.Argument(help="qatcli checkpoint (default: the recipe's output).")] = None,
    recipe: RecipeOpt = None,
    output: Annotated[str | None, flag("export.output", "--output", "-o")] = None,
    fmt: Annotated[str | None, flag("export.format", "--format")] = None,
    dtype: Annotated[str | None, flag("export.dtype")] = None,
    max_shard_mib: Annotated[int | None, flag("export.max_shard_mib")] = None,
    v1_clamp_zeros: Annotated[bool | None, flag("export.v1_clamp_zeros", "--v1-clamp-zeros")] = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
) -> None:
    """Write a deployable GPTQ-format model (packed int32 weights, fp16 scales) from a checkpoint."""
    from qatcli.commands.export import run_export

    run_export(_load("export", recipe, locals(), set_), checkpoint, force)


@app.command()
def compare(
    recipe: Annotated[Path, typer.Argument(metavar="RECIPE", help="YAML recipe with a compare section.")],
    output: OutputOpt = None,
    eval_data: EvalDataOpt = None,
    eval_seqlen: EvalSeqlenOpt = None,
    max_windows: MaxWindowsOpt = None,
    device: DeviceOpt = None,
    set_: SetOpt = None,
    force: Annotated[
        bool, typer.Option("--force", help="Start over: delete the earlier results in the output directory.")
    ] = False,
) -> None:
    """Run a matrix of methods x bit widths on one model (finished cells are reused) into one table."""
    from qatcli.commands.compare import run_compare

    run_compare(_load("compare", recipe, locals(), set_), recipe, force)


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # transformers imports torchao whenever it is installed (gptqmodel pulls it in); its import-time
    # warnings about optional kernels say nothing about qatcli's work.
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> Any:
    """Entry point: user mistakes become one line on stderr and exit status 2, never a traceback."""
    _quiet_libraries()
    command = typer.main.get_command(app)
    try:
        status = command.main(args=argv, prog_name="qatcli", standalone_mode=False)
    except QatcliError as err:
        print(f"qatcli: error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except typer.TyperException as err:
        ctx = getattr(err, "ctx", None)
        if type(err).__name__ == "NoArgsIsHelpError" and ctx is not None:
            print(ctx.get_help())
            sys.exit(0)
        print(f"qatcli: error: {err.format_message()}", file=sys.stderr)
        sys.exit(2)
    except typer.Exit as err:
        sys.exit(err.exit_code)
    except typer.Abort:
        print("qatcli: aborted", file=sys.stderr)
        sys.exit(1)
    # typer turns Ctrl-C outside qat's own handler into a returned 130 (qat and compare say where to resume).
    if status == INTERRUPTED:
        print("qatcli: interrupted", file=sys.stderr)
    return status
