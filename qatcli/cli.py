"""The command line: options become recipe overrides; each subcommand's work lives in qatcli.commands.

An option that sets a recipe value is named after its key and takes its help from the field's doc in
qatcli.config, so flags, recipes and their documentation say the same thing.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.models import ParameterInfo

from qatcli.config import Recipe, field_help
from qatcli.errors import INTERRUPTED, QatcliError
from qatcli.flags import COMMAND_KEYS
from qatcli.version import __version__

app = typer.Typer(
    help="Quantize Hugging Face causal LMs to 2-8 bits and measure what each method costs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        print(f"qatcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Quantize Hugging Face causal LMs to 2-8 bits and measure what each method costs."""


def opt(*decls: str, **kwargs: Any) -> Any:
    """An option that sets a recipe value: which one is its parameter's entry in qatcli/flags.py, and its help is
    that field's doc (qatcli.config), filled in by ``keyed``."""
    return typer.Option(*decls, **kwargs)


def keyed(command: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Give each ``opt`` of ``command``'s function the help of the recipe key flags.COMMAND_KEYS maps it to; an
    ``opt`` with no key there, or a key with no such option, is a programming error caught at import."""
    keys = COMMAND_KEYS[command]

    def fill(fn: Callable[..., None]) -> Callable[..., None]:
        hints = typing.get_type_hints(fn, include_extras=True)
        seen = set()
        for name, hint in hints.items():
            for info in getattr(hint, "__metadata__", ()):
                if not isinstance(info, ParameterInfo):
                    continue
                if name in keys:
                    info.help = field_help(keys[name])
                    seen.add(name)
                elif info.help is None:
                    raise AssertionError(f"qatcli {command}: option '{name}' has no recipe key in flags.py")
        if seen != set(keys):
            raise AssertionError(f"qatcli {command}: flags.py keys without an option: {sorted(set(keys) - seen)}")
        fn.__annotations__ = hints  # the evaluated annotations, help filled in, are what typer reads
        return fn

    return fill


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
ModelArg = Annotated[str | None, typer.Argument()]
OutputOpt = Annotated[str | None, opt("--output", "-o")]
DeviceOpt = Annotated[str | None, opt()]
SeedOpt = Annotated[int | None, opt()]
BitsOpt = Annotated[int | None, opt()]
# Any: typer refuses a union such as int | str; the parser gives an int or the text (auto).
GroupSizeOpt = Annotated[Any, opt(parser=_int_or_text, metavar="auto|-1|N")]
SymOpt = Annotated[bool | None, opt("--sym/--asym")]
LmHeadOpt = Annotated[bool | None, opt("--lm-head/--no-lm-head")]
TargetOpt = Annotated[str | None, opt(metavar="gguf:q2_0|gguf:q4_0|gguf:q4_1|gguf:q8_0")]
ClipOpt = Annotated[str | None, opt()]
CalibDataOpt = Annotated[str | None, opt()]
NsamplesOpt = Annotated[int | None, opt()]
CalibSeqlenOpt = Annotated[int | None, opt("--calib-seqlen")]
EvalDataOpt = Annotated[str | None, opt("--eval-data")]
EvalSeqlenOpt = Annotated[int | None, opt("--eval-seqlen")]
MaxWindowsOpt = Annotated[int | None, opt()]


def _load(command: str, recipe: Path | None, params: dict[str, Any], assignments: list[str] | None) -> Recipe:
    """The recipe file with the options given to ``command`` (``params``, its arguments by name) and then
    the --set assignments applied; an option not given (None, or an empty repeatable one) changes nothing."""
    from qatcli.recipe import load_recipe, parse_assignments

    overrides = {key: params[name] if params[name] != [] else None for name, key in COMMAND_KEYS[command].items()}
    return load_recipe(recipe, {**overrides, **parse_assignments(assignments or [])})


@app.command()
@keyed("ptq")
def ptq(
    model: ModelArg = None,
    recipe: RecipeOpt = None,
    method: Annotated[str | None, opt()] = None,
    bits: BitsOpt = None,
    group_size: GroupSizeOpt = None,
    sym: SymOpt = None,
    clip: ClipOpt = None,
    lm_head: LmHeadOpt = None,
    target: TargetOpt = None,
    include: Annotated[list[str] | None, opt()] = None,
    exclude: Annotated[list[str] | None, opt()] = None,
    output: OutputOpt = None,
    calib_data: CalibDataOpt = None,
    nsamples: NsamplesOpt = None,
    seqlen: Annotated[int | None, opt("--seqlen", "--calib-seqlen")] = None,
    damp: Annotated[float | None, opt()] = None,
    block_size: Annotated[int | None, opt()] = None,
    act_order: Annotated[bool | None, opt("--act-order/--no-act-order")] = None,
    act_group_aware: Annotated[bool | None, opt("--act-group-aware/--no-act-group-aware")] = None,
    static_groups: Annotated[bool | None, opt("--static-groups/--no-static-groups")] = None,
    true_sequential: Annotated[bool | None, opt("--true-sequential/--no-true-sequential")] = None,
    n_grid: Annotated[int | None, opt()] = None,
    duo_scaling: Annotated[bool | None, opt("--duo-scaling/--no-duo-scaling")] = None,
    fp_inputs: Annotated[bool | None, opt("--fp-inputs/--no-fp-inputs")] = None,
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
@keyed("qat")
def qat(
    model: ModelArg = None,
    recipe: RecipeOpt = None,
    bits: BitsOpt = None,
    group_size: GroupSizeOpt = None,
    sym: SymOpt = None,
    clip: ClipOpt = None,
    lm_head: LmHeadOpt = None,
    target: TargetOpt = None,
    estimator: Annotated[str | None, opt()] = None,
    # --amplitude, the singular, reads better repeated: --amplitude 0.2 --amplitude 0.05.
    amplitudes: Annotated[list[float] | None, opt("--amplitudes", "--amplitude")] = None,
    init: Annotated[str | None, opt()] = None,
    data: Annotated[str | None, opt()] = None,
    steps: Annotated[int | None, opt()] = None,
    block_epochs: Annotated[Any, opt("--block-epochs", parser=_int_or_text, metavar="auto|N")] = None,
    block_data: Annotated[str | None, opt()] = None,
    train: Annotated[str | None, opt()] = None,
    batch_size: Annotated[int | None, opt()] = None,
    seqlen: Annotated[int | None, opt("--seqlen", "--train-seqlen")] = None,
    grad_accum: Annotated[int | None, opt()] = None,
    lr: Annotated[float | None, opt()] = None,
    scale_lr: Annotated[float | None, opt()] = None,
    loss: Annotated[str | None, opt()] = None,
    teacher_dtype: Annotated[str | None, opt()] = None,
    teacher_device: Annotated[str | None, opt()] = None,
    frozen_dtype: Annotated[str | None, opt()] = None,
    parallel: Annotated[str | None, opt()] = None,
    gradient_checkpointing: Annotated[bool | None, opt("--gradient-checkpointing/--no-gradient-checkpointing")] = None,
    variance_reduction: Annotated[bool | None, opt("--variance-reduction/--no-variance-reduction")] = None,
    fused: Annotated[bool | None, opt("--fused/--no-fused")] = None,
    save_every: Annotated[int | None, opt()] = None,
    eval_every: Annotated[int | None, opt()] = None,
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
@keyed("eval")
def eval_(
    models: Annotated[list[str] | None, typer.Argument(help="Models and/or qatcli checkpoints.")] = None,
    recipe: RecipeOpt = None,
    data: Annotated[str | None, opt("--data", "--eval-data")] = None,
    seqlen: Annotated[int | None, opt("--seqlen", "--eval-seqlen")] = None,
    max_windows: MaxWindowsOpt = None,
    tasks: Annotated[list[str] | None, opt(metavar="TASK[,TASK...]")] = None,
    task_dirs: Annotated[list[str] | None, opt("--task-dir", "--task-dirs", metavar="DIR")] = None,
    num_fewshot: Annotated[int | None, opt()] = None,
    limit: Annotated[int | None, opt()] = None,
    batch_size: Annotated[int | None, opt("--eval-batch-size")] = None,
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
@keyed("diagnose")
def diagnose(
    model: Annotated[str | None, typer.Argument(help="The full-precision model the others were made from.")] = None,
    quantized: Annotated[
        list[str] | None, typer.Argument(help="qatcli checkpoints and/or GPTQ-format directories.")
    ] = None,
    recipe: RecipeOpt = None,
    data: Annotated[str | None, opt("--data", "--eval-data")] = None,
    seqlen: Annotated[int | None, opt("--seqlen", "--eval-seqlen")] = None,
    max_windows: MaxWindowsOpt = None,
    points: Annotated[int | None, opt()] = None,
    t_max: Annotated[float | None, opt()] = None,
    hessian_windows: Annotated[int | None, opt()] = None,
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
@keyed("export")
def export(
    checkpoint: Annotated[str | None, typer.Argument(help="qatcli checkpoint (default: the recipe's output).")] = None,
    recipe: RecipeOpt = None,
    output: Annotated[str | None, opt("--output", "-o")] = None,
    fmt: Annotated[str | None, opt("--format")] = None,
    dtype: Annotated[str | None, opt()] = None,
    max_shard_mib: Annotated[int | None, opt()] = None,
    v1_clamp_zeros: Annotated[bool | None, opt("--v1-clamp-zeros")] = None,
    gguf_embedding: Annotated[str | None, opt()] = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
) -> None:
    """Write a deployable model from a checkpoint: GPTQ format, compressed-tensors, or one GGUF file for llama.cpp."""
    from qatcli.commands.export import run_export

    run_export(_load("export", recipe, locals(), set_), checkpoint, force)


@app.command()
@keyed("compare")
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


def answers_without_libraries(argv: list[str]) -> bool:
    """Whether the command line only asks for help or the version, which need neither torch nor transformers."""
    return not argv or any(arg in ("--help", "--version") for arg in argv)


def main(argv: list[str] | None = None) -> Any:
    """Entry point: user mistakes become one line on stderr and exit status 2, never a traceback."""
    if not answers_without_libraries(sys.argv[1:] if argv is None else argv):
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
