"""PTQ methods and export formats are registered parts: each one has every piece the pipeline, compare, eval,
export and the recipe check ask of it, and the listings everywhere are the registries' names."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from qatcli.config import Recipe
from qatcli.exporters import FORMATS, ExportFormat, format_for
from qatcli.methods import METHODS, PTQMethod, init_names
from qatcli.pipeline.matrix import Cell, checkpoint_key
from qatcli.recipe import load_recipe

SECTIONS = {f.name for f in dataclasses.fields(Recipe)}


def _overrides(cls: type, base: type, name: str) -> bool:
    return getattr(cls, name) is not getattr(base, name)


@pytest.mark.parametrize("name", list(METHODS))
def test_a_registered_method_has_every_piece(name: str) -> None:
    method = METHODS[name]
    assert method.name == name and method.summary
    assert _overrides(type(method), PTQMethod, "quantize") and not inspect.isabstract(type(method))
    assert method.options is None or method.options in SECTIONS, f"{name}: options section '{method.options}'"
    assert set(method.checkpoint_sections()) <= SECTIONS
    assert (name in init_names()) == method.qat_init
    # the recipe check accepts it, and compare's cell of it keys on its own sections
    recipe = load_recipe(None, {"quant.method": name, "calib.data": "x.txt"})
    key = checkpoint_key(recipe, Cell(name, 4, 32))
    assert set(key) - {"method", "model", "seed", "quant"} == set(method.checkpoint_sections())


@pytest.mark.parametrize("value", list(FORMATS))
def test_a_registered_format_has_every_piece(value: str) -> None:
    fmt = format_for(value)
    assert value in fmt.values and fmt.name and fmt.summary
    for piece in ("write", "detect", "load"):
        assert _overrides(type(fmt), ExportFormat, piece), f"{value} lacks {piece}"
    assert not inspect.isabstract(type(fmt))
    assert load_recipe(None, {"export.format": value}).export.format == value


def test_the_listings_are_the_registries() -> None:
    from qatcli.api import quantize  # noqa: F401  (the API imports; its method list is the registry's)

    with pytest.raises(Exception, match="quant.method must be one of " + ", ".join(METHODS)):
        load_recipe(None, {"quant.method": "nope"})
    with pytest.raises(Exception, match="export.format must be one of " + ", ".join(FORMATS)):
        load_recipe(None, {"export.format": "nope"})
