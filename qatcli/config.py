"""The recipe schema: every setting of every subcommand, with its default and its documentation.

This is the one place defaults live. Each field's doc is also the help text of the flag that sets it
(qatcli/cli.py), so flags, recipes and documentation say the same thing. Reading, overriding and checking
a recipe is qatcli/recipe.py's job.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

QAT_LOSSES = ("kd", "ce")
BLOCK_LOSSES = ("mse", "token_mse", "channel_mse")
QAT_TRAIN = ("all", "scales")
QAT_PARALLEL = ("fsdp", "ddp")
TEACHER_DTYPES = ("float32", "bfloat16", "float16")
FROZEN_DTYPES = TEACHER_DTYPES
AUTO_BLOCK_EPOCHS = 2
EXPORT_DTYPES = ("float16", "bfloat16", "float32")
AUTO = "auto"
GGUF_EMBEDDINGS = (AUTO, "f32", "f16", "bf16", "q8_0")
FUSED_MIN_WEIGHTS = 2**24

# Data-free training text: 500 sequences of 512 tokens sampled from the full-precision model. Every fifth is
# held out for evaluation, so training gets 400 x 512 = 204,800 tokens: 800 windows of 256 tokens, more than the
# default 150 steps x 4 windows read, so no window comes twice (fewer sequences, read more than once, did worse:
# docs/results-archive.md, "500 sampled sequences"). Sampled once and cached.
DEFAULT_QAT_DATA = "generated:500"


def doc(text: str) -> dict[str, str]:
    """A recipe field's documentation (``field(metadata=doc(...))``); the help of its flag is this text."""
    return {"doc": text}


@dataclass
class QuantConfig:
    method: str = field(default="rtn", metadata=doc("Quantization method: rtn, gptq or awq"))
    bits: int = field(default=4, metadata=doc("Weight bits: 2, 3, 4 or 8"))
    group_size: int | str = field(
        default=AUTO,
        metadata=doc(
            "Input columns per group, or -1 for one group per row; auto: the largest of 128, 64 and 32 that "
            "divides every quantized layer's in_features, else -1"
        ),
    )
    sym: bool = field(
        default=True, metadata=doc("Symmetric grid (the GPTQ convention, zero point 2^(b-1)); false: asymmetric")
    )
    clip: str = field(
        default="mse",
        metadata=doc(
            "How each group's range is chosen (RTN, GPTQ and QAT's starting grid): minmax, or mse (the shrink of "
            "the min/max range that minimises the group's rounding error)"
        ),
    )
    include: list[str] = field(
        default_factory=list,
        metadata=doc("Regular expression on layer names: quantize only the matching Linear layers (one per flag)"),
    )
    exclude: list[str] = field(
        default_factory=list,
        metadata=doc("Regular expression on layer names: keep matching layers in fp (one per flag)"),
    )
    dynamic: dict[str, dict[str, int | str | bool]] = field(
        default_factory=dict,
        metadata=doc(
            "Per-layer grids: regular expression on layer names (searched, as include/exclude) -> overrides "
            "{bits, group_size, sym}; the first matching rule wins, other layers take bits, group_size and sym"
        ),
    )
    target: str | None = field(
        default=None,
        metadata=doc(
            "The grid of a deployment format, chosen before quantizing so that the export stores the codes exactly: "
            "gguf:q2_0 (sym 2-bit g64), gguf:q4_0 (sym 4-bit g32), gguf:q4_1 (asym 4-bit g32) or gguf:q8_0 (sym "
            "8-bit g32); it sets bits, group_size and sym, and refuses another value given for one of them"
        ),
    )
    lm_head: bool = field(
        default=False,
        metadata=doc(
            "Quantize lm_head too (a copy of its weight where it is tied to the input embeddings, which stay as "
            "they are)"
        ),
    )


@dataclass
class CalibConfig:
    """Calibration windows (GPTQ, AWQ): ``nsamples`` windows of ``seqlen`` tokens at seeded random offsets."""

    data: str | list[str] | None = field(
        default=None,
        metadata=doc(
            "GPTQ and AWQ calibration data (same forms as evaluation data); several sources mix in their weights, "
            "e.g. sotu:train:0.5,generated:500:0.5"
        ),
    )
    nsamples: int = field(default=128, metadata=doc("GPTQ and AWQ calibration windows"))
    seqlen: int = field(default=512, metadata=doc("Tokens per calibration window"))


@dataclass
class GPTQOptions:
    """The options of the GPTQ algorithm: qatcli.quant.gptq and qatcli.quant.gptq_model take this object."""

    damp: float = field(
        default=0.01, metadata=doc("GPTQ dampening: fraction of mean(diag H) added to the Hessian's diagonal")
    )
    block_size: int = field(default=128, metadata=doc("GPTQ lazy-update block, in columns"))
    act_order: bool = field(
        default=False, metadata=doc("GPTQ desc_act: quantize columns by descending Hessian diagonal")
    )
    act_group_aware: bool | str = field(
        default=AUTO,
        metadata=doc(
            "GPTQ group-aware reordering (GPTQModel's act_group_aware): groups by their largest Hessian diagonal, "
            "columns by descending diagonal inside each; g_idx stays trivial, so every kernel reads the export. "
            "auto: on unless act_order (GPTQModel's default)"
        ),
    )
    static_groups: bool = field(
        default=False, metadata=doc("GPTQ group parameters from the original weights, before any update")
    )
    true_sequential: bool = field(
        default=True,
        metadata=doc(
            "GPTQ order within a block: q/k/v, then o, then gate/up, then down, each on the quantized ones before"
        ),
    )
    batch_size: int = field(default=8, metadata=doc("Calibration windows per block forward in GPTQ"))

    @property
    def group_aware(self) -> bool:
        """Whether GAR applies: act_group_aware, where auto means on unless act_order takes the columns' order."""
        return self.act_group_aware is True or (self.act_group_aware == AUTO and not self.act_order)

    def quantization_fields(self) -> dict[str, Any]:
        """The options as a checkpoint records them, under GPTQModel's names (quantization_config)."""
        return {
            "damp_percent": self.damp,
            "desc_act": self.act_order,
            "act_group_aware": self.group_aware,
            "static_groups": self.static_groups,
            "true_sequential": self.true_sequential,
            "block_size": self.block_size,
        }


@dataclass
class AWQOptions:
    """The options of AWQ's scale search: qatcli.quant.awq takes this object."""

    n_grid: int = field(
        default=20, metadata=doc("AWQ scale search: the exponent alpha takes the values 0, 1/n_grid, ..., 1 - 1/n_grid")
    )
    duo_scaling: bool = field(
        default=False,
        metadata=doc(
            "AWQ scales x_mean^alpha / w_mean^(1 - alpha) (AutoAWQ's default) instead of the paper's x_mean^alpha"
        ),
    )
    fp_inputs: bool = field(
        default=False,
        metadata=doc(
            "AWQ searches each block on the full-precision model's activations (as AutoAWQ does) instead of the "
            "outputs of the blocks before it, already scaled and quantized"
        ),
    )
    batch_size: int = field(default=8, metadata=doc("Calibration windows per block forward in AWQ"))

    def quantization_fields(self) -> dict[str, Any]:
        """The options as a checkpoint records them under ``quantization``."""
        return {"n_grid": self.n_grid, "duo_scaling": self.duo_scaling, "fp_inputs": self.fp_inputs}


@dataclass
class JacobianConfig:
    """Knobs of the jacobian estimator (docs/estimators.md)."""

    update_every: int = field(default=10, metadata=doc("Steps between refreshes of B"))
    dither_width: float = field(default=0.5, metadata=doc("delta: the dither half-width is delta * s / 2"))
    probes: int = field(default=2, metadata=doc("Random sign probes per refresh"))
    probe_step: float = field(default=0.5, metadata=doc("Probe size in units of the scale"))
    blend: float = field(default=0.5, metadata=doc("Weight of Dither against Probe (1: Dither only, 0: Probe only)"))
    ema: float = field(default=0.5, metadata=doc("Smoothing of B across refreshes"))
    clip_min: float = field(default=0.05, metadata=doc("Lower clip of B"))
    clip_max: float = field(default=2.0, metadata=doc("Upper clip of B"))
    calib_batches: int = field(default=4, metadata=doc("Training batches whose layer inputs Probe caches"))


@dataclass
class BlockConfig:
    """The block-wise stage of qat (after EfficientQAT's Block-AP), run before the end-to-end steps."""

    epochs: int | str = field(
        default=AUTO,
        metadata=doc(
            "Passes over the calibration windows for each decoder block; 0 turns the stage off; auto: "
            f"{AUTO_BLOCK_EPOCHS} at 2 and 3 bits, 0 at 4 and 8"
        ),
    )
    data: str | list[str] | None = field(
        default=None,
        metadata=doc("The block stage's calibration data, a single source or a weighted mix (default: qat.data)"),
    )
    nsamples: int = field(default=128, metadata=doc("Calibration windows, drawn from block.data"))
    seqlen: int = field(default=256, metadata=doc("Tokens per calibration window"))
    batch_size: int = field(default=4, metadata=doc("Windows per step inside a block"))
    lr: float = field(default=1e-3, metadata=doc("Learning rate of the latent weights in the block stage"))
    scale_lr: float = field(default=1e-4, metadata=doc("Learning rate of the scales in the block stage"))
    loss: str = field(
        default="mse",
        metadata=doc(
            "Distance to the full-precision block's output: mse; token_mse (each token's squared error over "
            "its own squared norm); channel_mse (each channel's squared error over its mean square in the "
            "full-precision output, so a few channels of massive activations do not decide it)"
        ),
    )

    def epochs_for(self, bits: int) -> int:
        if self.epochs == AUTO:
            return AUTO_BLOCK_EPOCHS if bits <= 3 else 0
        return int(self.epochs)


@dataclass
class QATConfig:
    estimator: str = field(default="ste", metadata=doc("Backward of rounding: ste, fourier or jacobian"))
    amplitudes: list[float] = field(
        default_factory=lambda: [0.21], metadata=doc("fourier's amplitudes A_k, one per flag")
    )
    jacobian: JacobianConfig = field(default_factory=JacobianConfig, metadata=doc("Knobs of the jacobian estimator"))
    block: BlockConfig = field(default_factory=BlockConfig, metadata=doc("The block-wise stage before end-to-end"))
    train: str = field(
        default="all",
        metadata=doc(
            "What the end-to-end steps train: all (latent weights and scales) or scales (EfficientQAT's E2E-QP)"
        ),
    )
    fused: bool | str = field(
        default=AUTO,
        metadata=doc(
            "Run fake quantization's elementwise work as compiled kernels (torch.compile: one pass over each weight "
            "instead of about ten); false, or where compiling fails, plain PyTorch; auto: on where the quantized "
            f"layers hold {FUSED_MIN_WEIGHTS:,} weights or more (compiling costs seconds a run, which only a real "
            "model's steps pay back)"
        ),
    )
    variance_reduction: bool = field(default=False, metadata=doc("MARS-style corrected gradients inside AdamW"))
    vr_gamma: float = field(default=0.025, metadata=doc("MARS's gamma, with variance_reduction"))
    init: str = field(
        default="fp",
        metadata=doc("Where training starts: fp (the full-precision weights), rtn, gptq or a qatcli checkpoint"),
    )
    data: str | list[str] = field(
        default=DEFAULT_QAT_DATA,
        metadata=doc(
            "Training data (same forms as evaluation data), or several sources mixed in their weights, e.g. "
            "sotu:train:0.5,generated:500:0.5; the default, sampled from the full-precision model, holds 800 "
            "windows of 256 tokens"
        ),
    )
    steps: int = field(default=150, metadata=doc("End-to-end optimizer steps (0: the block stage alone)"))
    batch_size: int = field(default=4, metadata=doc("Windows per micro-batch"))
    seqlen: int = field(default=256, metadata=doc("Tokens per training window"))
    grad_accum: int = field(default=1, metadata=doc("Micro-batches per optimizer step"))
    lr: float = field(default=2e-4, metadata=doc("Learning rate of the latent weights"))
    scale_lr: float = field(default=1e-6, metadata=doc("Learning rate of the per-group scales"))
    weight_decay: float = field(default=0.0, metadata=doc("AdamW weight decay"))
    warmup_steps: int = field(default=10, metadata=doc("Steps of linear learning-rate warmup"))
    min_lr_ratio: float = field(
        default=0.1, metadata=doc("Learning rate at the end of the cosine decay, as a fraction of lr")
    )
    clip_grad: float = field(default=1.0, metadata=doc("Gradient-norm clipping"))
    loss: str = field(
        default="kd", metadata=doc("kd (distillation from the full-precision model) or ce (next-token cross-entropy)")
    )
    teacher_dtype: str = field(
        default="float32",
        metadata=doc("dtype of the kd teacher's weights: float32, bfloat16 or float16 (half its memory)"),
    )
    teacher_device: str = field(
        default="auto", metadata=doc("Where the kd teacher runs: auto (the training device), cpu, cuda or cuda:N")
    )
    frozen_dtype: str = field(
        default="float32",
        metadata=doc(
            "dtype of the student's frozen parts in the end-to-end steps (embeddings, norms, lm_head unless "
            "quantized, layers left in full precision), each computing in it: float32, bfloat16 or float16 (half "
            "their memory); the latent weights and scales stay float32, the checkpoint reads the frozen parts from "
            "the base model"
        ),
    )
    parallel: str = field(
        default="fsdp",
        metadata=doc(
            "Under torchrun: fsdp (FSDP2, one unit per decoder block: weights, gradients and optimizer states "
            "sharded over the processes) or ddp (a whole copy on each process, gradients all-reduced)"
        ),
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata=doc(
            "Recompute each decoder block's forward in the backward pass of the end-to-end steps instead of "
            "keeping its activations and fake-quantized weights: less memory, one more forward of the blocks a step"
        ),
    )
    save_every: int = field(default=25, metadata=doc("Save the run's state every N steps"))
    skip_nonfinite: int = field(
        default=0,
        metadata=doc(
            "End-to-end batches with a loss or gradient that is not finite that may be skipped (no update) "
            "before the run stops; 0: stop at the first"
        ),
    )
    record_every: int = field(
        default=0,
        metadata=doc(
            "Record the basin measurements (losses at Q(w) and w, inward cosine, codes changed) every N steps "
            "on a fixed probe batch: end-to-end steps into metrics.jsonl, each block's steps into "
            "block_metrics.jsonl (0: never)"
        ),
    )
    record_eps: float = field(
        default=0.05, metadata=doc("The quantized loss counts as back at full precision within this many nats")
    )
    eval_every: int = field(
        default=0,
        metadata=doc("Evaluate on the evaluation data every N end-to-end steps, into metrics.jsonl (0: never)"),
    )

    def fused_for(self, weights: int) -> bool:
        """Whether fake quantization runs compiled kernels for quantized layers holding ``weights`` weights."""
        return weights >= FUSED_MIN_WEIGHTS if self.fused == AUTO else bool(self.fused)


@dataclass
class EvalConfig:
    data: str | list[str] | None = field(
        default=None,
        metadata=doc(
            "Evaluation data: a text file, .jsonl, hf:NAME[:CONFIG][@SPLIT], wikitext2, sotu[:train|valid|test], "
            "code[:train|valid|test] (Python's standard library) or generated:N[:LEN][:top_p=P][:dtype=D]; several "
            "domains comma-separated (or a list): one perplexity each and their geometric mean"
        ),
    )
    seqlen: int = field(default=512, metadata=doc("Tokens per evaluation window"))
    max_windows: int | None = field(default=None, metadata=doc("Evaluate at most this many windows (default: all)"))
    models: list[str] = field(
        default_factory=list, metadata=doc("Models for qatcli eval when none are given on the command line")
    )
    tasks: list[str] = field(
        default_factory=list,
        metadata=doc(
            "lm-evaluation-harness tasks, groups or tags (arc_easy, hellaswag, ...) or task YAML files, "
            "comma-separated or one per flag; needs qatcli[tasks]"
        ),
    )
    task_dirs: list[str] = field(
        default_factory=list,
        metadata=doc("Directories of task YAML files whose tasks eval.tasks may name (one per flag)"),
    )
    num_fewshot: int | None = field(
        default=None, metadata=doc("Examples in each task prompt (default: the task's own, else 0)")
    )
    limit: int | None = field(default=None, metadata=doc("Evaluate at most the first N items of each task"))
    batch_size: int = field(
        default=8,
        metadata=doc(
            "Task requests per forward pass (tasks only); fewer where the vocabulary is large (2 for gemma3-270m's "
            "262k), so that lm-eval's full-vocabulary logits stay small"
        ),
    )


@dataclass
class DiagnoseConfig:
    """qatcli diagnose: the loss (mean token NLL) on the evaluation windows, along each fp -> quantized segment."""

    points: int = field(default=7, metadata=doc("Points on each segment from the fp weights (t = 0) to t_max"))
    t_max: float = field(default=1.5, metadata=doc("End of the segment, in units of the fp -> quantized step"))
    hessian_windows: int = field(
        default=16, metadata=doc("Evaluation windows whose layer inputs give the Hessians of the distance")
    )


@dataclass
class ExportConfig:
    output: str | None = field(
        default=None,
        metadata=doc("Export directory, or GGUF file, to write (the checkpoint read is the recipe's output)"),
    )
    format: str | None = field(
        default=None,
        metadata=doc(
            "gptq (v1), gptq_v2, compressed-tensors (pack-quantized) or gguf (one file for llama.cpp); by default "
            "gptq for symmetric grids, else gptq_v2"
        ),
    )
    dtype: str = field(
        default="float16", metadata=doc("dtype of the tensors that stay dense: float16, bfloat16 or float32")
    )
    max_shard_mib: int = field(default=5120, metadata=doc("Largest safetensors shard, in MiB"))
    v1_clamp_zeros: bool = field(
        default=False, metadata=doc("Write an asymmetric grid as format gptq (v1), zero points clamped to >= 1")
    )
    gguf_embedding: str = field(
        default=AUTO,
        metadata=doc(
            "gguf only: the token embedding's type: f32, f16, bf16 or q8_0 (as llama.cpp's own Q4_0 files store "
            "it); auto: export.dtype"
        ),
    )


@dataclass
class CompareMethod:
    """One entry of ``compare.methods``: a method and the values it is run with (a list: one cell each).

    A value left out comes from the compare section, then from the recipe's quant and qat sections.
    """

    method: str = field(default="rtn", metadata=doc("rtn, gptq, awq or qat"))
    bits: int | list[int] | None = field(default=None, metadata=doc("Bit widths of this entry"))
    group_size: int | str | list[int | str] | None = field(
        default=None, metadata=doc("Group sizes of this entry (auto, -1 or N)")
    )
    estimator: str | list[str] | None = field(
        default=None, metadata=doc("qat only: estimators, passed to the qat recipe unchanged")
    )
    init: str | list[str] | None = field(default=None, metadata=doc("qat only: fp, rtn, gptq or a qatcli checkpoint"))
    steps: int | None = field(default=None, metadata=doc("qat only: optimizer steps"))
    block_epochs: int | str | list[int | str] | None = field(
        default=None, metadata=doc("qat only: block-stage epochs (auto, 0 for none, or N), one cell each")
    )
    dynamic: dict[str, dict[str, int | str | bool]] | None = field(
        default=None,
        metadata=doc("Per-layer grids of this entry's cells, as quant.dynamic (default: quant.dynamic)"),
    )
    dynamic_name: str | None = field(
        default=None, metadata=doc("What the cell names call this entry's dynamic rules (default: mix)")
    )


@dataclass
class CompareConfig:
    """The matrix of `qatcli compare`: every method entry by its bit widths and group sizes."""

    bits: list[int] | None = field(
        default=None, metadata=doc("Bit widths of the entries that give none (default: quant.bits)")
    )
    group_size: list[int | str] | None = field(
        default=None, metadata=doc("Group sizes of the entries that give none (default: quant.group_size)")
    )
    methods: list[CompareMethod] = field(default_factory=list, metadata=doc("The entries of the matrix"))


@dataclass
class Recipe:
    model: str | None = field(
        default=None, metadata=doc("Model directory, hub id or built-in alias (smollm2-135m, gemma3-270m)")
    )
    output: str | None = field(
        default=None, metadata=doc("Output directory: the checkpoint of ptq and qat, the directory of compare")
    )
    seed: int = field(default=0, metadata=doc("Random seed"))
    deterministic: bool = field(
        default=False,
        metadata=doc(
            "torch's deterministic algorithms only (on CUDA slower; on the CPU results still depend on the "
            "thread count, recorded in every output)"
        ),
    )
    device: str = field(default="auto", metadata=doc("auto (CUDA if present), cpu, cuda or cuda:N"))
    quant: QuantConfig = field(
        default_factory=QuantConfig, metadata=doc("Which layers are quantized and to which grid")
    )
    calib: CalibConfig = field(default_factory=CalibConfig, metadata=doc("GPTQ and AWQ calibration windows"))
    gptq: GPTQOptions = field(default_factory=GPTQOptions, metadata=doc("GPTQ algorithm options"))
    awq: AWQOptions = field(default_factory=AWQOptions, metadata=doc("AWQ scale-search options"))
    qat: QATConfig = field(default_factory=QATConfig, metadata=doc("Quantization-aware training"))
    eval: EvalConfig = field(default_factory=EvalConfig, metadata=doc("Perplexity and task evaluation"))
    diagnose: DiagnoseConfig = field(default_factory=DiagnoseConfig, metadata=doc("qatcli diagnose"))
    export: ExportConfig = field(default_factory=ExportConfig, metadata=doc("Export (GPTQ, compressed-tensors)"))
    compare: CompareConfig = field(default_factory=CompareConfig, metadata=doc("The matrix of qatcli compare"))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The documentation of the schema: --help and the recipe checks read it.


def recipe_field(dotted: str) -> dataclasses.Field:
    """The dataclass field of a dotted recipe key such as ``quant.group_size``."""
    cls: Any = Recipe
    *parents, leaf = dotted.split(".")
    for name in [*parents, leaf]:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if name not in fields:
            raise KeyError(f"no recipe key '{dotted}'")
        found = fields[name]
        cls = typing.get_type_hints(cls)[name]
    return found


def default_value(dotted: str) -> Any:
    """The code's default of a dotted recipe key (a fresh one for lists and sections)."""
    f = recipe_field(dotted)
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def shown_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and 0 < abs(value) < 1e-3:  # 2e-4, as recipes write it, not 0.0002
        mantissa, exponent = f"{value:e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return ", ".join(shown_value(v) for v in value)
    return str(value)


def field_help(dotted: str) -> str:
    """The help of the flag that sets ``dotted``: the field's doc and its default, if it has one."""
    doc = recipe_field(dotted).metadata["doc"]
    default = default_value(dotted)
    if default is None or default in ([], {}) or dataclasses.is_dataclass(default):
        return doc + "."
    return f"{doc} (default: {shown_value(default)})."
