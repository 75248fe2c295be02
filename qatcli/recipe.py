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
from qatcli.quant.grid import SUPPORTED_BITS

PTQ_METHODS = ("rtn", "gptq")
EXPORT_FORMATS = FORMATS
QAT_LOSSES = ("kd", "ce")
COMPARE_METHODS = ("rtn", "gptq", "qat")
EXPORT_DTYPES = tuple(DENSE_DTYPES)
SCIENTIFIC = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


@dataclass
class QuantConfig:
    method: str = "rtn"
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    # Regular expressions on qualified layer names, applied to the Linear layers inside the decoder blocks.
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)


@dataclass
class CalibConfig:
    """Calibration windows (GPTQ): ``nsamples`` windows of ``seqlen`` tokens at seeded random offsets."""

    data: str | None = None
    nsamples: int = 128
    seqlen: int = 512


@dataclass
class GPTQOptions:
    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal
    block_size: int = 128  # columns per lazy batch update
    act_order: bool = False  # desc_act: columns by descending diag(H)
    static_groups: bool = False  # group parameters from the original weights, before any update
    true_sequential: bool = True  # q/k/v, then o, then gate/up, then down within a block
    batch_size: int = 8  # calibration windows per block forward


@dataclass
class JacobianConfig:
    """Knobs of the jacobian estimator (see qatcli/estimators/jacobian.py and docs/estimators.md)."""

    update_every: int = 10  # steps between refreshes of B
    dither_width: float = 0.5  # delta: dither half-width is delta * s / 2
    probes: int = 2  # random sign probes per refresh
    probe_step: float = 0.5  # probe size in units of the scale
    blend: float = 0.5  # weight of Dither against Probe (1 = Dither only, 0 = Probe only)
    ema: float = 0.5  # smoothing of B across refreshes
    clip_min: float = 0.05
    clip_max: float = 2.0
    calib_batches: int = 4  # training batches whose layer inputs Probe caches


@dataclass
class QATConfig:
    estimator: str = "ste"  # ste | fourier | jacobian
    amplitudes: list[float] = field(default_factory=lambda: [0.21])  # fourier's A_k
    jacobian: JacobianConfig = field(default_factory=JacobianConfig)
    variance_reduction: bool = False  # MARS-style corrected gradient inside AdamW
    vr_gamma: float = 0.025  # MARS's gamma
    init: str = "fp"  # fp | rtn | gptq | path of a qatcli checkpoint
    data: str | None = None  # training text (same forms as eval data)
    steps: int = 100
    batch_size: int = 4
    seqlen: int = 256
    grad_accum: int = 1
    lr: float = 5e-5  # latent weights
    scale_lr: float = 1e-4  # per-group scales
    weight_decay: float = 0.0
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    clip_grad: float = 1.0
    loss: str = "kd"  # kd (distillation from the full-precision model) | ce (next-token cross-entropy)
    save_every: int = 50


@dataclass
class EvalConfig:
    data: str | None = None
    seqlen: int = 512
    max_windows: int | None = None
    models: list[str] = field(default_factory=list)


@dataclass
class ExportConfig:
    output: str | None = None  # the GPTQ-format directory; the checkpoint read is the recipe's `output`
    format: str | None = None  # gptq | gptq_v2; default gptq for symmetric grids, gptq_v2 otherwise
    dtype: str = "float16"  # dtype of the tensors that stay dense (embeddings, norms, lm_head)
    max_shard_mib: int = 5120
    v1_clamp_zeros: bool = False


@dataclass
class CompareMethod:
    """One entry of ``compare.methods``: a method and the values it is run with (a list: one cell each).

    A value left out comes from the compare section, then from the recipe's quant and qat sections.
    """

    method: str = "rtn"  # rtn | gptq | qat
    bits: int | list[int] | None = None
    group_size: int | list[int] | None = None
    estimator: str | list[str] | None = None  # qat only; passed to the qat recipe unchanged
    init: str | list[str] | None = None  # qat only: fp | rtn | gptq | a qatcli checkpoint
    steps: int | None = None  # qat only


@dataclass
class CompareConfig:
    """The matrix of `qatcli compare`: every method entry by its bit widths and group sizes."""

    bits: list[int] | None = None  # default for entries without bits (else quant.bits)
    group_size: list[int] | None = None  # default for entries without group_size (else quant.group_size)
    methods: list[CompareMethod] = field(default_factory=list)


@dataclass
class Recipe:
    model: str | None = None
    output: str | None = None
    seed: int = 0
    device: str = "auto"
    quant: QuantConfig = field(default_factory=QuantConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    gptq: GPTQOptions = field(default_factory=GPTQOptions)
    qat: QATConfig = field(default_factory=QATConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _type_name(tp: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    if tp in names:
        return names[tp]
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        if dataclasses.is_dataclass(item):
            return "a list of mappings"
        return "a list of " + _type_name(item).split(" ", 1)[1] + "s"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) if a is not type(None) else "null" for a in typing.get_args(tp))
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


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise QatcliError(f"recipe: {where or 'the recipe'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in known:
            raise QatcliError(f"recipe: unknown key '{dotted}' (known keys here: {', '.join(known)})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, dotted)
        elif _dataclass_items(tp) is not None:
            if not isinstance(value, list):
                raise QatcliError(f"recipe: {dotted} must be {_type_name(tp)}, got {value!r}")
            kwargs[key] = [_build(_dataclass_items(tp), v, f"{dotted}[{i}]") for i, v in enumerate(value)]
        elif not _matches(value, tp):
            raise QatcliError(f"recipe: {dotted} must be {_type_name(tp)}, got {value!r}")
        else:
            kwargs[key] = float(value) if tp is float else value
    return cls(**kwargs)


def _check_values(recipe: Recipe) -> None:
    q = recipe.quant
    if q.method not in PTQ_METHODS:
        raise QatcliError(f"recipe: quant.method must be one of {', '.join(PTQ_METHODS)}, got '{q.method}'")
    if q.bits not in SUPPORTED_BITS:
        raise QatcliError(f"recipe: quant.bits must be one of {', '.join(map(str, SUPPORTED_BITS))}, got {q.bits}")
    if q.group_size != -1 and q.group_size < 1:
        raise QatcliError(f"recipe: quant.group_size must be -1 (per row) or positive, got {q.group_size}")
    positive = {
        "calib.nsamples": recipe.calib.nsamples,
        "calib.seqlen": recipe.calib.seqlen,
        "gptq.block_size": recipe.gptq.block_size,
        "gptq.batch_size": recipe.gptq.batch_size,
    }
    for key, value in positive.items():
        if value < 1:
            raise QatcliError(f"recipe: {key} must be positive, got {value}")
    t = recipe.qat
    if t.loss not in QAT_LOSSES:
        raise QatcliError(f"recipe: qat.loss must be one of {', '.join(QAT_LOSSES)}, got '{t.loss}'")
    for key in ("steps", "batch_size", "seqlen", "grad_accum", "save_every"):
        if getattr(t, key) < 1:
            raise QatcliError(f"recipe: qat.{key} must be positive, got {getattr(t, key)}")
    for key in ("lr", "scale_lr", "clip_grad"):
        if getattr(t, key) <= 0:
            raise QatcliError(f"recipe: qat.{key} must be positive, got {getattr(t, key)}")
    if not 0 <= t.vr_gamma <= 1:
        raise QatcliError(f"recipe: qat.vr_gamma must be in [0, 1], got {t.vr_gamma}")
    if t.warmup_steps < 0 or not 0 <= t.min_lr_ratio <= 1 or t.weight_decay < 0:
        raise QatcliError("recipe: qat.warmup_steps and qat.weight_decay must be >= 0, qat.min_lr_ratio in [0, 1]")
    e = recipe.export
    if e.format is not None and e.format not in EXPORT_FORMATS:
        raise QatcliError(f"recipe: export.format must be one of {', '.join(EXPORT_FORMATS)}, got '{e.format}'")
    if e.dtype not in EXPORT_DTYPES:
        raise QatcliError(f"recipe: export.dtype must be one of {', '.join(EXPORT_DTYPES)}, got '{e.dtype}'")
    if e.max_shard_mib < 1:
        raise QatcliError(f"recipe: export.max_shard_mib must be positive, got {e.max_shard_mib}")
    if not 0 <= recipe.gptq.damp < 10:
        raise QatcliError(f"recipe: gptq.damp must be in [0, 10), got {recipe.gptq.damp}")
    if recipe.eval.seqlen < 1:
        raise QatcliError(f"recipe: eval.seqlen must be positive, got {recipe.eval.seqlen}")
    if recipe.eval.max_windows is not None and recipe.eval.max_windows < 1:
        raise QatcliError(f"recipe: eval.max_windows must be positive, got {recipe.eval.max_windows}")
    _check_compare(recipe.compare)


def as_list(value: Any) -> list[Any]:
    """A compare value that may be given as one value or a list of them."""
    return value if isinstance(value, list) else [value]


def _check_compare(c: CompareConfig) -> None:
    for bits in c.bits or []:
        if bits not in SUPPORTED_BITS:
            raise QatcliError(f"recipe: compare.bits must hold {', '.join(map(str, SUPPORTED_BITS))}, got {bits}")
    for i, m in enumerate(c.methods):
        where = f"compare.methods[{i}]"
        if m.method not in COMPARE_METHODS:
            raise QatcliError(f"recipe: {where}.method must be one of {', '.join(COMPARE_METHODS)}, got '{m.method}'")
        for bits in as_list(m.bits) if m.bits is not None else []:
            if bits not in SUPPORTED_BITS:
                raise QatcliError(f"recipe: {where}.bits must hold {', '.join(map(str, SUPPORTED_BITS))}, got {bits}")
        groups = (as_list(m.group_size) if m.group_size is not None else []) + (c.group_size or [])
        for group in groups:
            if group != -1 and group < 1:
                raise QatcliError(f"recipe: group sizes in compare must be -1 (per row) or positive, got {group}")
        for key in ("bits", "group_size", "estimator", "init"):
            if getattr(m, key) == []:
                raise QatcliError(f"recipe: {where}.{key} is an empty list")
        if m.method != "qat":
            for key in ("estimator", "init", "steps"):
                if getattr(m, key) is not None:
                    raise QatcliError(f"recipe: {where}.{key} applies to method qat only, not {m.method}")
        if m.steps is not None and m.steps < 1:
            raise QatcliError(f"recipe: {where}.steps must be positive, got {m.steps}")
    for key in ("bits", "group_size"):
        if getattr(c, key) == []:
            raise QatcliError(f"recipe: compare.{key} is an empty list")


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
    """Read the recipe file (if any), apply the command-line values that were given, and validate."""
    data = read_recipe_file(path) if path is not None else {}
    for dotted, value in overrides.items():
        if value is not None:
            _set_dotted(data, dotted, value)
    recipe = _build(Recipe, data, "")
    _check_values(recipe)
    return recipe
