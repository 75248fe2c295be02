"""Recipes: reading the YAML files that drive every subcommand, command-line overrides, and the checks.

A recipe is validated as a whole after the overrides are applied, so a value typed on the command
line gets exactly the same checks and messages as one written in the file. The schema and its defaults
are in qatcli/config.py.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from qatcli.config import (
    AUTO,
    BLOCK_LOSSES,
    EXPORT_DTYPES,
    FROZEN_DTYPES,
    GGUF_EMBEDDINGS,
    QAT_LOSSES,
    QAT_PARALLEL,
    QAT_TRAIN,
    TEACHER_DTYPES,
    CompareMethod,
    QuantConfig,
    Recipe,
    default_value,
    shown_value,
)
from qatcli.errors import QatcliError
from qatcli.exporters import format_values
from qatcli.exporters.gguf import TARGETS
from qatcli.methods import method_names
from qatcli.quant.grid import CLIP_METHODS, SUPPORTED_BITS

SCIENTIFIC = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


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
    if origin is dict:
        return "a mapping"
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
    if origin is dict:  # the values are checked where the mapping's meaning is known (dynamic_problems)
        return isinstance(value, dict)
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
    _one_of(problems, "quant.method", q.method, method_names())
    _one_of(problems, "quant.clip", q.clip, CLIP_METHODS)
    _one_of(problems, "quant.bits", q.bits, SUPPORTED_BITS)
    if not valid_group_size(q.group_size):
        problems.append(f"recipe: quant.group_size must be -1 (per row), auto or positive, got {q.group_size!r}")
    problems += dynamic_problems(q.dynamic, "quant.dynamic")
    t, e = recipe.qat, recipe.export
    _positive(
        problems,
        {
            "calib.nsamples": recipe.calib.nsamples,
            "calib.seqlen": recipe.calib.seqlen,
            "gptq.block_size": recipe.gptq.block_size,
            "gptq.batch_size": recipe.gptq.batch_size,
            "awq.n_grid": recipe.awq.n_grid,
            "awq.batch_size": recipe.awq.batch_size,
            **{f"qat.{k}": getattr(t, k) for k in ("batch_size", "seqlen", "grad_accum", "save_every")},
            **{f"qat.block.{k}": getattr(t.block, k) for k in ("nsamples", "seqlen", "batch_size", "lr", "scale_lr")},
            **{f"qat.{k}": getattr(t, k) for k in ("lr", "scale_lr", "clip_grad")},
            "export.max_shard_mib": e.max_shard_mib,
            "eval.seqlen": recipe.eval.seqlen,
            "eval.max_windows": recipe.eval.max_windows,
            "eval.limit": recipe.eval.limit,
            "eval.batch_size": recipe.eval.batch_size,
            **{f"diagnose.{k}": getattr(recipe.diagnose, k) for k in ("t_max", "hessian_windows")},
        },
    )
    _one_of(problems, "qat.loss", t.loss, QAT_LOSSES)
    _one_of(problems, "qat.block.loss", t.block.loss, BLOCK_LOSSES)
    _one_of(problems, "qat.train", t.train, QAT_TRAIN)
    _one_of(problems, "qat.parallel", t.parallel, QAT_PARALLEL)
    _one_of(problems, "qat.teacher_dtype", t.teacher_dtype, TEACHER_DTYPES)
    _one_of(problems, "qat.frozen_dtype", t.frozen_dtype, FROZEN_DTYPES)
    if t.steps < 0:
        problems.append(f"recipe: qat.steps must be 0 or more, got {t.steps}")
    if not valid_block_epochs(t.block.epochs):
        problems.append(f"recipe: qat.block.epochs must be auto or 0 or more, got {t.block.epochs!r}")
    if t.steps == 0 and t.block.epochs_for(lowest_bits(recipe.quant)) == 0:
        problems.append("recipe: qat.steps and qat.block.epochs are both 0: nothing would be trained")
    if not 0 <= t.vr_gamma <= 1:
        problems.append(f"recipe: qat.vr_gamma must be in [0, 1], got {t.vr_gamma}")
    if recipe.eval.num_fewshot is not None and recipe.eval.num_fewshot < 0:
        problems.append(f"recipe: eval.num_fewshot must be 0 or more, got {recipe.eval.num_fewshot}")
    if recipe.diagnose.points < 2:
        problems.append(f"recipe: diagnose.points must be 2 or more, got {recipe.diagnose.points}")
    for key in ("eval_every", "skip_nonfinite", "record_every"):
        if getattr(t, key) < 0:
            problems.append(f"recipe: qat.{key} must be 0 or more, got {getattr(t, key)}")
    if t.warmup_steps < 0 or not 0 <= t.min_lr_ratio <= 1 or t.weight_decay < 0:
        problems.append("recipe: qat.warmup_steps and qat.weight_decay must be >= 0, qat.min_lr_ratio in [0, 1]")
    if e.format is not None:
        _one_of(problems, "export.format", e.format, format_values())
    _one_of(problems, "export.dtype", e.dtype, EXPORT_DTYPES)
    _one_of(problems, "export.gguf_embedding", e.gguf_embedding, GGUF_EMBEDDINGS)
    if t.fused not in (True, False, AUTO):
        problems.append(f"recipe: qat.fused must be auto, true or false, got {t.fused!r}")
    gar = recipe.gptq.act_group_aware
    if gar not in (True, False, AUTO):
        problems.append(f"recipe: gptq.act_group_aware must be auto, true or false, got {gar!r}")
    if recipe.gptq.act_order and recipe.gptq.act_group_aware is True:
        problems.append("recipe: gptq.act_order and gptq.act_group_aware are two column orders: choose one")
    if not 0 <= recipe.gptq.damp < 10:
        problems.append(f"recipe: gptq.damp must be in [0, 10), got {recipe.gptq.damp}")
    return problems + _compare_problems(recipe)


DYNAMIC_KEYS = ("bits", "group_size", "sym")


def dynamic_problems(dynamic: Any, where: str) -> list[str]:
    """What is wrong with a ``dynamic`` mapping: each rule a regular expression on layer names mapped to
    overrides of bits, group_size and sym."""
    if not isinstance(dynamic, dict):
        return [f"recipe: {where} must be a mapping of layer patterns to {{bits, group_size, sym}}, got {dynamic!r}"]
    problems: list[str] = []
    for pattern, overrides in dynamic.items():
        rule = f"{where} rule '{pattern}'"
        if not isinstance(pattern, str):
            problems.append(f"recipe: {rule} must be a string (a regular expression on layer names)")
        else:
            try:
                re.compile(pattern)
            except re.error as err:
                problems.append(f"recipe: {rule} is not a valid regular expression ({err})")
        if not isinstance(overrides, dict):
            problems.append(f"recipe: {rule} must map to {{bits, group_size, sym}}, got {overrides!r}")
            continue
        for key, value in overrides.items():
            if key not in DYNAMIC_KEYS:
                problems.append(f"recipe: {rule}: unknown key '{key}' (known keys: {', '.join(DYNAMIC_KEYS)})")
            elif key == "bits" and (isinstance(value, bool) or value not in SUPPORTED_BITS):
                supported = ", ".join(map(str, SUPPORTED_BITS))
                problems.append(f"recipe: {rule}: bits must be one of {supported}, got {value!r}")
            elif key == "group_size" and (isinstance(value, bool) or not valid_group_size(value)):
                problems.append(f"recipe: {rule}: group_size must be -1 (per row), auto or positive, got {value!r}")
            elif key == "sym" and not isinstance(value, bool):
                problems.append(f"recipe: {rule}: sym must be true or false, got {value!r}")
    return problems


def lowest_bits(quant: Any) -> int:
    """The fewest bits any layer may get: quant.bits or a dynamic rule's (what the block stage's auto goes by)."""
    rules = quant.dynamic if isinstance(quant.dynamic, dict) else {}
    bits = [o["bits"] for o in rules.values() if isinstance(o, dict) and o.get("bits") in SUPPORTED_BITS]
    return min([quant.bits, *bits]) if quant.bits in SUPPORTED_BITS else quant.bits


def valid_block_epochs(value: Any) -> bool:
    return value == AUTO or (isinstance(value, int) and not isinstance(value, bool) and value >= 0)


def as_list(value: Any) -> list[Any]:
    """A compare value that may be given as one value or a list of them."""
    return value if isinstance(value, list) else [value]


def _trains_nothing(recipe: Recipe, m: CompareMethod) -> list[int]:
    """The bit widths at which a qat entry with steps 0 would have no block stage either."""
    if m.method != "qat" or m.steps != 0:
        return []
    c = recipe.compare
    bits = as_list(m.bits) if m.bits is not None else (c.bits or [recipe.quant.bits])
    epochs = as_list(m.block_epochs) if m.block_epochs is not None else [recipe.qat.block.epochs]
    block = recipe.qat.block
    return sorted(
        {
            b
            for b in bits
            for e in epochs
            if valid_block_epochs(e) and dataclasses.replace(block, epochs=e).epochs_for(b) == 0
        }
    )


def _compare_problems(recipe: Recipe) -> list[str]:
    c = recipe.compare
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
        _one_of(problems, f"{where}.method", m.method, (*method_names(), "qat"))
        for key in ("bits", "group_size", "estimator", "init", "block_epochs"):
            if getattr(m, key) == []:
                problems.append(f"recipe: {where}.{key} is an empty list")
        bits = as_list(m.bits) if m.bits is not None else []
        problems += [f"recipe: {where}.bits must hold {supported}, got {b}" for b in bits if b not in SUPPORTED_BITS]
        groups += as_list(m.group_size) if m.group_size is not None else []
        if m.method != "qat":
            for key in ("estimator", "init", "steps", "block_epochs"):
                if getattr(m, key) is not None:
                    problems.append(f"recipe: {where}.{key} applies to method qat only, not {m.method}")
        if m.steps is not None and m.steps < 0:
            problems.append(f"recipe: {where}.steps must be 0 or more, got {m.steps}")
        if idle := _trains_nothing(recipe, m):
            problems.append(
                f"recipe: {where} has steps 0 and no block stage at {', '.join(map(str, idle))} bits: "
                "nothing would be trained"
            )
        if m.dynamic is not None:
            problems += dynamic_problems(m.dynamic, f"{where}.dynamic")
        if m.dynamic_name is not None and (not m.dynamic or not re.fullmatch(r"[\w.-]+", m.dynamic_name)):
            problems.append(
                f"recipe: {where}.dynamic_name must name non-empty dynamic rules in letters, digits, '_', '.' "
                f"or '-', got {m.dynamic_name!r}"
            )
        for epochs in as_list(m.block_epochs) if m.block_epochs is not None else []:
            if not valid_block_epochs(epochs):
                problems.append(f"recipe: {where}.block_epochs must be auto or 0 or more, got {epochs!r}")
    for group in groups:
        if not valid_group_size(group):
            problems.append(f"recipe: group sizes in compare must be -1 (per row), auto or positive, got {group!r}")
    return problems


def together(problems: list[str]) -> str:
    """One message for every problem of a recipe: the only one as it is, several after a count."""
    if len(problems) == 1:
        return problems[0]
    return f"recipe: {len(problems)} problems: " + "; ".join(p.removeprefix("recipe: ") for p in problems)


def _is_mapping_value(dotted: str) -> bool:
    """Whether the recipe key ``dotted`` holds a mapping as its value (quant.dynamic), not a section."""
    try:
        cls: Any = Recipe
        *parents, leaf = dotted.split(".")
        for name in parents:
            cls = typing.get_type_hints(cls)[name]
        tp = typing.get_type_hints(cls)[leaf]
    except (KeyError, TypeError):
        return False
    return typing.get_origin(tp) is dict


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested recipe dict as {dotted key: value}; a mapping value (quant.dynamic) stays one value."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and not _is_mapping_value(f"{prefix}{key}"):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


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


def apply_target(q: QuantConfig) -> list[str]:
    """Set bits, group_size and sym from quant.target; a value given for one of them that differs is a problem
    (a default is not a value given)."""
    if q.target is None:
        return []
    t = TARGETS.get(q.target)
    if t is None:
        return [f"recipe: quant.target must be one of {', '.join(TARGETS)}, got '{q.target}'"]
    wanted = {"bits": t.bits, "group_size": t.block, "sym": t.sym}
    problems = [
        f"recipe: quant.target {q.target} means quant.{key} {shown_value(value)}, got {shown_value(getattr(q, key))}"
        for key, value in wanted.items()
        if getattr(q, key) not in (value, default_value(f"quant.{key}"))
    ]
    for key, value in wanted.items():
        setattr(q, key, value)
    return problems


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
    problems += apply_target(recipe.quant)
    problems += _value_problems(recipe)
    if problems:
        raise QatcliError(together(problems))
    return recipe
