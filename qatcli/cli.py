"""The command line: options become recipe overrides; each subcommand's work lives in qatcli.commands."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from qatcli.errors import QatcliError
from qatcli.recipe import load_recipe, parse_assignments

INTERRUPTED = 130  # the shell's status for a process stopped by SIGINT

app = typer.Typer(
    help="Quantize Hugging Face causal LMs to 2-8 bits and measure what each method costs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

RecipeOpt = Annotated[Path | None, typer.Option("--recipe", "-r", help="YAML recipe; flags override its values.")]
DeviceOpt = Annotated[str | None, typer.Option(help="auto (CUDA if present), cpu, cuda or cuda:N.")]
SeedOpt = Annotated[int | None, typer.Option(help="Random seed (default 0).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]
DataOpt = Annotated[str | None, typer.Option(help="Text file, .jsonl, hf:NAME[:CONFIG], wikitext2 or generated:N.")]
SeqlenOpt = Annotated[int | None, typer.Option(help="Tokens per evaluation window (default 512).")]
MaxWindowsOpt = Annotated[int | None, typer.Option(help="Evaluate at most this many windows.")]
ModelArg = Annotated[str | None, typer.Argument(help="Model directory, hub id or built-in alias.")]
BitsOpt = Annotated[int | None, typer.Option(help="Weight bits: 2, 3, 4 or 8.")]
GroupSizeOpt = Annotated[int | None, typer.Option(help="Input columns per group; -1 for one per row.")]
SymOpt = Annotated[bool | None, typer.Option("--sym/--asym", help="Symmetric (default) or asymmetric grid.")]
OutputOpt = Annotated[str | None, typer.Option("--output", "-o", help="Checkpoint directory to write.")]


@app.command()
def ptq(
    model: ModelArg = None,
    recipe: RecipeOpt = None,
    method: Annotated[str | None, typer.Option(help="Quantization method: rtn or gptq.")] = None,
    bits: BitsOpt = None,
    group_size: GroupSizeOpt = None,
    sym: SymOpt = None,
    include: Annotated[list[str] | None, typer.Option(help="Regex of layers to quantize (repeatable).")] = None,
    exclude: Annotated[list[str] | None, typer.Option(help="Regex of layers to keep in fp (repeatable).")] = None,
    output: OutputOpt = None,
    calib_data: Annotated[str | None, typer.Option(help="GPTQ calibration data (same forms as --eval-data).")] = None,
    nsamples: Annotated[int | None, typer.Option(help="GPTQ calibration windows (default 128).")] = None,
    seqlen: Annotated[int | None, typer.Option(help="Tokens per calibration and evaluation window (512).")] = None,
    damp: Annotated[float | None, typer.Option(help="GPTQ dampening, fraction of mean diag(H) (0.01).")] = None,
    block_size: Annotated[int | None, typer.Option(help="GPTQ lazy-update block in columns (128).")] = None,
    act_order: Annotated[bool | None, typer.Option("--act-order/--no-act-order", help="GPTQ desc_act.")] = None,
    static_groups: Annotated[
        bool | None, typer.Option("--static-groups/--no-static-groups", help="GPTQ groups from the original W.")
    ] = None,
    true_sequential: Annotated[
        bool | None, typer.Option("--true-sequential/--no-true-sequential", help="GPTQ layer order in a block.")
    ] = None,
    eval_data: Annotated[str | None, typer.Option(help="Also measure perplexity on this data.")] = None,
    max_windows: MaxWindowsOpt = None,
    device: DeviceOpt = None,
    seed: SeedOpt = None,
    force: ForceOpt = False,
) -> None:
    """Post-training quantization (RTN or GPTQ) into a qatcli checkpoint directory."""
    from qatcli.commands.ptq import run_ptq

    cfg = load_recipe(
        recipe,
        {
            "model": model,
            "output": output,
            "device": device,
            "seed": seed,
            "quant.method": method,
            "quant.bits": bits,
            "quant.group_size": group_size,
            "quant.sym": sym,
            "quant.include": include or None,
            "quant.exclude": exclude or None,
            "calib.data": calib_data,
            "calib.nsamples": nsamples,
            "calib.seqlen": seqlen,
            "gptq.damp": damp,
            "gptq.block_size": block_size,
            "gptq.act_order": act_order,
            "gptq.static_groups": static_groups,
            "gptq.true_sequential": true_sequential,
            "eval.data": eval_data,
            "eval.seqlen": seqlen,
            "eval.max_windows": max_windows,
        },
    )
    run_ptq(cfg, force)


@app.command()
def qat(
    model: ModelArg = None,
    recipe: RecipeOpt = None,
    bits: BitsOpt = None,
    group_size: GroupSizeOpt = None,
    sym: SymOpt = None,
    estimator: Annotated[str | None, typer.Option(help="Backward of rounding: ste, fourier or jacobian.")] = None,
    amplitude: Annotated[list[float] | None, typer.Option(help="fourier amplitude A_k (repeatable; 0.21).")] = None,
    init: Annotated[str | None, typer.Option(help="fp (default), rtn, gptq or a qatcli checkpoint.")] = None,
    data: Annotated[str | None, typer.Option(help="Training data (same forms as eval data).")] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps (100).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Windows per micro-batch (4).")] = None,
    seqlen: Annotated[int | None, typer.Option(help="Tokens per training window (256).")] = None,
    grad_accum: Annotated[int | None, typer.Option(help="Micro-batches per step (1).")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate of the latent weights (5e-5).")] = None,
    scale_lr: Annotated[float | None, typer.Option(help="Learning rate of the scales (1e-4).")] = None,
    loss: Annotated[str | None, typer.Option(help="kd (distill from fp, default) or ce.")] = None,
    variance_reduction: Annotated[
        bool | None, typer.Option(help="MARS-style corrected gradients inside AdamW (off).")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Any recipe value as KEY=VALUE, e.g. qat.jacobian.blend=1 (repeatable)."),
    ] = None,
    save_every: Annotated[int | None, typer.Option(help="Save the run's state every N steps (50).")] = None,
    calib_data: Annotated[str | None, typer.Option(help="Calibration data for --init gptq.")] = None,
    nsamples: Annotated[int | None, typer.Option(help="Calibration windows for --init gptq (128).")] = None,
    eval_data: Annotated[str | None, typer.Option(help="Measure perplexity before and after on this data.")] = None,
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

    cfg = load_recipe(
        recipe,
        {
            "model": model,
            "output": output,
            "device": device,
            "seed": seed,
            "quant.bits": bits,
            "quant.group_size": group_size,
            "quant.sym": sym,
            "qat.estimator": estimator,
            "qat.amplitudes": amplitude or None,
            "qat.init": init,
            "qat.data": data,
            "qat.steps": steps,
            "qat.batch_size": batch_size,
            "qat.seqlen": seqlen,
            "qat.grad_accum": grad_accum,
            "qat.lr": lr,
            "qat.scale_lr": scale_lr,
            "qat.loss": loss,
            "qat.variance_reduction": variance_reduction,
            "qat.save_every": save_every,
            "calib.data": calib_data,
            "calib.nsamples": nsamples,
            "eval.data": eval_data,
            "eval.max_windows": max_windows,
            **parse_assignments(set_ or []),
        },
    )
    if stop_after is not None and stop_after < 1:
        raise QatcliError(f"--stop-after must be positive, got {stop_after}")
    run_qat(cfg, force, resume, stop_after)


@app.command("eval")
def eval_(
    models: Annotated[list[str] | None, typer.Argument(help="Models and/or qatcli checkpoints.")] = None,
    recipe: RecipeOpt = None,
    data: DataOpt = None,
    seqlen: SeqlenOpt = None,
    max_windows: MaxWindowsOpt = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the rows as JSON here.")] = None,
    device: DeviceOpt = None,
    seed: SeedOpt = None,
    force: ForceOpt = False,
) -> None:
    """Perplexity of full-precision models and checkpoints on the same windows, in one table."""
    from qatcli.commands.evaluate import run_eval

    cfg = load_recipe(
        recipe,
        {
            "device": device,
            "seed": seed,
            "eval.data": data,
            "eval.seqlen": seqlen,
            "eval.max_windows": max_windows,
        },
    )
    run_eval(cfg, models or [], json_path, force)


@app.command()
def export(
    checkpoint: Annotated[str | None, typer.Argument(help="qatcli checkpoint (default: the recipe's output).")] = None,
    recipe: RecipeOpt = None,
    output: Annotated[str | None, typer.Option("--output", "-o", help="GPTQ-format directory to write.")] = None,
    fmt: Annotated[str | None, typer.Option("--format", help="gptq (v1) or gptq_v2 (default: by symmetry).")] = None,
    dtype: Annotated[
        str | None, typer.Option(help="dtype of dense tensors: float16 (default), bfloat16, float32.")
    ] = None,
    max_shard_size: Annotated[int | None, typer.Option(help="Largest safetensors shard in MiB (5120).")] = None,
    v1_clamp_zeros: Annotated[
        bool | None, typer.Option("--v1-clamp-zeros", help="Asymmetric as v1, zero points clamped to >= 1.")
    ] = None,
    force: ForceOpt = False,
) -> None:
    """Write a deployable GPTQ-format model (packed int32 weights, fp16 scales) from a checkpoint."""
    from qatcli.commands.export import run_export

    cfg = load_recipe(
        recipe,
        {
            "export.output": output,
            "export.format": fmt,
            "export.dtype": dtype,
            "export.max_shard_mib": max_shard_size,
            "export.v1_clamp_zeros": v1_clamp_zeros,
        },
    )
    run_export(cfg, checkpoint, force)


@app.command()
def compare(
    recipe: Annotated[Path, typer.Argument(metavar="RECIPE", help="YAML recipe with a compare section.")],
    output: Annotated[
        str | None, typer.Option("--output", "-o", help="Directory of the comparison (default: the recipe's output).")
    ] = None,
    max_windows: MaxWindowsOpt = None,
    device: DeviceOpt = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Any recipe value as KEY=VALUE, e.g. qat.lr=0.0001 (repeatable)."),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Start over: delete the earlier results in the output directory.")
    ] = False,
) -> None:
    """Run a matrix of methods x bit widths on one model (finished cells are reused) into one table."""
    from qatcli.commands.compare import run_compare

    overrides = {"output": output, "device": device, "eval.max_windows": max_windows}
    cfg = load_recipe(recipe, {**overrides, **parse_assignments(set_ or [])})
    run_compare(cfg, recipe, force)


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
        sys.exit(2)
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
