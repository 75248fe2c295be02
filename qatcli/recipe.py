"""Recipes: the YAML files that drive every subcommand, their schema, and command-line overrides.

A recipe is validated as a whole after the overrides are applied, so a value typed on the command
line gets exactly the same checks and messages as one written in the file.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qatcli.errors import QatcliError
from qatcli.formats.gptq_format import DENSE_DTYPES, FORMATS
from qatcli.quant.grid import CLIP_METHODS, SUPPORTED_BITS

PTQ_METHODS = ("rtn", "gptq")
EXPORT_FORMATS = FORMATS
QAT_LOSSES = ("kd", "ce")
BLOCK_LOSSES = ("mse", "token_mse")
QAT_TRAIN = ("all", "scales")
AUTO_BLOCK_EPOCHS = 2
COMPARE_METHODS = ("rtn", "gptq", "qat")
EXPORT_DTYPES = tuple(DENSE_DTYPES)
SCIENTIFIC = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")
AUTO = "auto"

# Data-free training text: 250 sequences of 512 tokens sampled from the full-precision model. Every fifth is
# held out for evaluation, so training gets 200 x 512 = 102,400 tokens: the 400 windows of 256 tokens that
# the default 100 steps x 4 windows read once, without repeating a window.
DEFAULT_QAT_DATA = "generated:250"


def doc(text: str) -> dict[str, str]:
    """A recipe field's documentation (``field(metadata=doc(...))``); the help of its flag is this text."""
    return {"doc": text}


@dataclass
class QuantConfig:
    method: str = field(default="rtn", metadata=doc("Quantization method: rtn or gptq"))
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
        default="minmax",
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


@dataclass
class CalibConfig:
    """Calibration windows (GPTQ): ``nsamples`` windows of ``seqlen`` tokens at seeded random offsets."""

    data: str | None = field(default=None, metadata=doc("GPTQ calibration data (same forms as evaluation data)"))
    nsamples: int = field(default=128, metadata=doc("GPTQ calibration windows"))
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

    def quantization_fields(self) -> dict[str, Any]:
        """The options as a checkpoint records them, under GPTQModel's names (quantization_config)."""
        return {
            "damp_percent": self.damp,
            "desc_act": self.act_order,
            "static_groups": self.static_groups,
            "true_sequential": self.true_sequential,
            "block_size": self.block_size,
        }


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
    nsamples: int = field(default=128, metadata=doc("Calibration windows, drawn from qat.data"))
    seqlen: int = field(default=256, metadata=doc("Tokens per calibration window"))
    batch_size: int = field(default=4, metadata=doc("Windows per step inside a block"))
    lr: float = field(default=1e-4, metadata=doc("Learning rate of the latent weights in the block stage"))
    scale_lr: float = field(default=1e-4, metadata=doc("Learning rate of the scales in the block stage"))
    loss: str = field(
        default="mse",
        metadata=doc(
            "Distance to the full-precision block's output: mse, or token_mse (each token's squared error over "
            "its own squared norm, so a few massive activations do not decide it)"
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
    variance_reduction: bool = field(default=False, metadata=doc("MARS-style corrected gradients inside AdamW"))
    vr_gamma: float = field(default=0.025, metadata=doc("MARS's gamma, with variance_reduction"))
    init: str = field(
        default="fp",
        metadata=doc("Where training starts: fp (the full-precision weights), rtn, gptq or a qatcli checkpoint"),
    )
    data: str = field(
        default=DEFAULT_QAT_DATA,
        metadata=doc(
            "Training data (same forms as evaluation data); the default, sampled from the full-precision model, "
            "holds the 400 windows of 256 tokens that 100 steps of 4 windows read once"
        ),
    )
    steps: int = field(default=100, metadata=doc("End-to-end optimizer steps (0: the block stage alone)"))
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
    save_every: int = field(default=25, metadata=doc("Save the run's state every N steps"))


@dataclass
class EvalConfig:
    data: str | None = field(
        default=None,
        metadata=doc(
            "Evaluation data: a text file, .jsonl, hf:NAME[:CONFIG][@SPLIT], wikitext2, sotu[:train|valid|test] "
            "or generated:N[:LEN]"
        ),
    )
    seqlen: int = field(default=512, metadata=doc("Tokens per evaluation window"))
    max_windows: int | None = field(default=None, metadata=doc("Evaluate at most this many windows (default: all)"))
    models: list[str] = field(
        default_factory=list, metadata=doc("Models for qatcli eval when none are given on the command line")
    )


@dataclass
class ExportConfig:
    output: str | None = field(
        default=None, metadata=doc("GPTQ-format directory to write (the checkpoint read is the recipe's output)")
    )
    format: str | None = field(
        default=None, metadata=doc("gptq (v1) or gptq_v2; by default gptq for symmetric grids, else gptq_v2")
    )
    dtype: str = field(
        default="float16", metadata=doc("dtype of the tensors that stay dense: float16, bfloat16 or float32")
    )
    max_shard_mib: int = field(default=5120, metadata=doc("Largest safetensors shard, in MiB"))
    v1_clamp_zeros: bool = field(
        default=False, metadata=doc("Write an asymmetric grid as format gptq (v1), zero points clamped to >= 1")
    )


@dataclass
class CompareMethod:
    """One entry of ``compare.methods``: a method and the values it is run with (a list: one cell each).

    A value left out comes from the compare section, then from the recipe's quant and qat sections.
    """

    method: str = field(default="rtn", metadata=doc("rtn, gptq or qat"))
    bits: int | list[int] | None = field(default=None, metadata=doc("Bit widths of this entry"))
    group_size: int | str | list[int | str] | None = field(
        default=None, metadata=doc("Group sizes of this entry (auto, -1 or N)")
    )
    estimator: str | list[str] | None = field(
        default=None, metadata=doc("qat only: estimators, passed to the qat recipe unchanged")
    )
    init: str | list[str] | None = field(default=None, metadata=doc("qat only: fp, rtn, gptq or a qatcli checkpoint"))
    steps: int | None = field(default=None, metadata=doc("qat only: optimizer steps"))


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
    model: str | None = field(default=None, metadata=doc("Model directory, hub id or built-in alias (smollm2-135m)"))
    output: str | None = field(
        default=None, metadata=doc("Output directory: the checkpoint of ptq and qat, the directory of compare")
    )
    seed: int = field(default=0, metadata=doc("Random seed"))
    device: str = field(default="auto", metadata=doc("auto (CUDA if present), cpu, cuda or cuda:N"))
    quant: QuantConfig = field(
        default_factory=QuantConfig, metadata=doc("Which layers are quantized and to which grid")
    )
    calib: CalibConfig = field(default_factory=CalibConfig, metadata=doc("GPTQ calibration windows"))
    gptq: GPTQOptions = field(default_factory=GPTQOptions, metadata=doc("GPTQ algorithm options"))
    qat: QATConfig = field(default_factory=QATConfig, metadata=doc("Quantization-aware training"))
    eval: EvalConfig = field(default_factory=EvalConfig, metadata=doc("Perplexity evaluation"))
    export: ExportConfig = field(default_factory=ExportConfig, metadata=doc("GPTQ-format export"))
    compare: CompareConfig = field(default_factory=CompareConfig, metadata=doc("The matrix of qatcli compare"))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and 0 < abs(value) < 1e-3:  # 2e-4, as recipes write it, not 0.0002
        mantissa, exponent = f"{value:e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return ", ".join(_shown(v) for v in value)
    return str(value)


def field_help(dotted: str) -> str:
    """The help of the flag that sets ``dotted``: the field's doc and its default, if it has one."""
    doc = recipe_field(dotted).metadata["doc"]
    default = default_value(dotted)
    if default is None or default == [] or dataclasses.is_dataclass(default):
        return doc + "."
    return f"{doc} (default: {_shown(default)})."


_NAMES = {int: ("an integer", "integers"), float: ("a number", "numbers"), bool: ("true or false", "booleans")}
_NAMES[str] = ("a string", "strings")


def _type_name(tp: Any, plural: bool = False) -> str:
    if tp in _NAMES:
        return _NAMES[tp][plural]
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        if dataclasses.is_dataclass(item):
            return "a list of mappings"
        return "a list of " + _type_name(item, plural=True)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a, plural) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _matches(value: Any, tp: Any) -> bool:
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if tp is type(None):
        return value is None
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(tp))
    raise TypeError(f"unsupported recipe field type {tp}")


def _dataclass_items(tp: Any) -> type | None:
    """The item class of a ``list[SomeDataclass]`` field, else None."""
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        if dataclasses.is_dataclass(item):
            return item
    return None


def _build(cls: type, data: Any, where: str, problems: list[str]) -> Any:
    """An instance of ``cls`` from ``data``; a key that is unknown or of the wrong type is recorded in
    ``problems`` and left at its default, so that the value checks still run on everything else."""
    if not isinstance(data, dict):
        problems.append(f"recipe: {where or 'the recipe'} must be a mapping, got {type(data).__name__}")
        return cls()
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in known:
            problems.append(f"recipe: unknown key '{dotted}' (known keys here: {', '.join(known)})")
            continue
        tp = hints[key]
        items = _dataclass_items(tp)
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, dotted, problems)
        elif items is not None:
            if isinstance(value, list):
                kwargs[key] = [_build(items, v, f"{dotted}[{i}]", problems) for i, v in enumerate(value)]
            else:
                problems.append(f"recipe: {dotted} must be {_type_name(tp)}, got {value!r}")
        elif not _matches(value, tp):
            problems.append(f"recipe: {dotted} must be {_type_name(tp)}, got {value!r}")
        else:
            kwargs[key] = float(value) if tp is float else value
    return cls(**kwargs)


def _one_of(problems: list[str], key: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        shown = f"'{value}'" if isinstance(value, str) else value
        problems.append(f"recipe: {key} must be one of {', '.join(map(str, allowed))}, got {shown}")


def _positive(problems: list[str], values: dict[str, float | int | None]) -> None:
    for key, value in values.items():
        if value is not None and value <= 0:
            problems.append(f"recipe: {key} must be positive, got {value}")


def valid_group_size(value: int | str) -> bool:
    """auto, -1 (per row) or a positive integer."""
    return value == AUTO or (isinstance(value, int) and (value == -1 or value >= 1))


def _value_problems(recipe: Recipe) -> list[str]:
    problems: list[str] = []
    q = recipe.quant
    _one_of(problems, "quant.method", q.method, PTQ_METHODS)
    _one_of(problems, "quant.clip", q.clip, CLIP_METHODS)
    _one_of(problems, "quant.bits", q.bits, SUPPORTED_BITS)
    if not valid_group_size(q.group_size):
        problems.append(f"recipe: quant.group_size must be -1 (per row), auto or positive, got {q.group_size!r}")
    t, e = recipe.qat, recipe.export
    _positive(
        problems,
        {
            "calib.nsamples": recipe.calib.nsamples,
            "calib.seqlen": recipe.calib.seqlen,
            "gptq.block_size": recipe.gptq.block_size,
            "gptq.batch_size": recipe.gptq.batch_size,
            **{f"qat.{k}": getattr(t, k) for k in ("batch_size", "seqlen", "grad_accum", "save_every")},
            **{f"qat.block.{k}": getattr(t.block, k) for k in ("nsamples", "seqlen", "batch_size", "lr", "scale_lr")},
            **{f"qat.{k}": getattr(t, k) for k in ("lr", "scale_lr", "clip_grad")},
            "export.max_shard_mib": e.max_shard_mib,
            "eval.seqlen": recipe.eval.seqlen,
            "eval.max_windows": recipe.eval.max_windows,
        },
    )
    _one_of(problems, "qat.loss", t.loss, QAT_LOSSES)
    _one_of(problems, "qat.block.loss", t.block.loss, BLOCK_LOSSES)
    _one_of(problems, "qat.train", t.train, QAT_TRAIN)
    if t.steps < 0:
        problems.append(f"recipe: qat.steps must be 0 or more, got {t.steps}")
    if not (t.block.epochs == AUTO or (isinstance(t.block.epochs, int) and t.block.epochs >= 0)):
        problems.append(f"recipe: qat.block.epochs must be auto or 0 or more, got {t.block.epochs!r}")
    if t.steps == 0 and t.block.epochs_for(recipe.quant.bits) == 0:
        problems.append("recipe: qat.steps and qat.block.epochs are both 0: nothing would be trained")
    if not 0 <= t.vr_gamma <= 1:
        problems.append(f"recipe: qat.vr_gamma must be in [0, 1], got {t.vr_gamma}")
    if t.warmup_steps < 0 or not 0 <= t.min_lr_ratio <= 1 or t.weight_decay < 0:
        problems.append("recipe: qat.warmup_steps and qat.weight_decay must be >= 0, qat.min_lr_ratio in [0, 1]")
    if e.format is not None:
        _one_of(problems, "export.format", e.format, EXPORT_FORMATS)
    _one_of(problems, "export.dtype", e.dtype, EXPORT_DTYPES)
    if not 0 <= recipe.gptq.damp < 10:
        problems.append(f"recipe: gptq.damp must be in [0, 10), got {recipe.gptq.damp}")
    return problems + _compare_problems(recipe.compare)


def as_list(value: Any) -> list[Any]:
    """A compare value that may be given as one value or a list of them."""
    return value if isinstance(value, list) else [value]


def _compare_problems(c: CompareConfig) -> list[str]:
    problems: list[str] = []
    supported = ", ".join(map(str, SUPPORTED_BITS))
    for key in ("bits", "group_size"):
        if getattr(c, key) == []:
            problems.append(f"recipe: compare.{key} is an empty list")
    problems += [
        f"recipe: compare.bits must hold {supported}, got {b}" for b in c.bits or [] if b not in SUPPORTED_BITS
    ]
    groups = list(c.group_size or [])
    for i, m in enumerate(c.methods):
        where = f"compare.methods[{i}]"
        _one_of(problems, f"{where}.method", m.method, COMPARE_METHODS)
        for key in ("bits", "group_size", "estimator", "init"):
            if getattr(m, key) == []:
                problems.append(f"recipe: {where}.{key} is an empty list")
        bits = as_list(m.bits) if m.bits is not None else []
        problems += [f"recipe: {where}.bits must hold {supported}, got {b}" for b in bits if b not in SUPPORTED_BITS]
        groups += as_list(m.group_size) if m.group_size is not None else []
        if m.method != "qat":
            for key in ("estimator", "init", "steps"):
                if getattr(m, key) is not None:
                    problems.append(f"recipe: {where}.{key} applies to method qat only, not {m.method}")
        _positive(problems, {f"{where}.steps": m.steps})
    for group in groups:
        if not valid_group_size(group):
            problems.append(f"recipe: group sizes in compare must be -1 (per row), auto or positive, got {group!r}")
    return problems


def together(problems: list[str]) -> str:
    """One message for every problem of a recipe: the only one as it is, several after a count."""
    if len(problems) == 1:
        return problems[0]
    return f"recipe: {len(problems)} problems: " + "; ".join(p.removeprefix("recipe: ") for p in problems)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for p in parents:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise QatcliError(f"recipe: {p} must be a mapping, got {child!r}")
        node = child
    node[leaf] = value


def read_recipe_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise QatcliError(f"recipe file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise QatcliError(f"recipe file '{path}' is not valid YAML{where}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise QatcliError(f"recipe file '{path}' must hold a mapping at the top level")
    return data


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """KEY=VALUE strings from the command line as dotted overrides; values are read as YAML scalars."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise QatcliError(f"--set takes KEY=VALUE (e.g. qat.jacobian.blend=1), got '{item}'")
        if SCIENTIFIC.match(value.strip()):  # YAML 1.1 reads 2e-3 as a string
            out[key.strip()] = float(value)
            continue
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise QatcliError(f"--set {key}: cannot read the value '{value}'") from None
    return out


def load_recipe(path: Path | None, overrides: dict[str, Any]) -> Recipe:
    """Read the recipe file (if any), apply the command-line values that were given, and validate.

    Every problem of the result is reported in one message, before any work.
    """
    data = read_recipe_file(path) if path is not None else {}
    for dotted, value in overrides.items():
        if value is not None:
            _set_dotted(data, dotted, value)
    problems: list[str] = []
    recipe = _build(Recipe, data, "", problems)
    problems += _value_problems(recipe)
    if problems:
        raise QatcliError(together(problems))
    return recipe
