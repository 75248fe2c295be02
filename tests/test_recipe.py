from __future__ import annotations

import re
from pathlib import Path

import pytest

from qatcli.errors import QatcliError
from qatcli.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_flags_override_recipe_values(tmp_path: Path) -> None:
    path = write(tmp_path, "model: m\nquant:\n  bits: 3\n  group_size: 64\n  sym: false\n")
    recipe = load_recipe(path, {"quant.bits": 2, "quant.sym": None, "eval.seqlen": 128})
    assert recipe.model == "m"
    assert (recipe.quant.bits, recipe.quant.group_size, recipe.quant.sym) == (2, 64, False)
    assert recipe.eval.seqlen == 128


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("quant:\n  bitz: 3\n", "unknown key 'quant.bitz'"),
        ("colour: red\n", "unknown key 'colour'"),
        ("quant:\n  bits: four\n", "quant.bits must be an integer"),
        ("quant:\n  bits: 5\n", "quant.bits must be one of 2, 3, 4, 8"),
        ("quant:\n  sym: 1\n", "quant.sym must be true or false"),
        ("quant:\n  group_size: 0\n", "quant.group_size must be -1"),
        ("quant:\n  include: conv\n", "quant.include must be a list of strings"),
        ("quant: 3\n", "quant must be a mapping"),
        ("eval:\n  seqlen: -1\n", "eval.seqlen must be positive"),
        ("quant:\n  method: awq\n", "quant.method must be one of"),
        ("- a\n- b\n", "mapping at the top level"),
        ("quant: [\n", "not valid YAML"),
    ],
)
def test_invalid_recipes_are_refused_with_a_clear_message(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(QatcliError, match=re.escape(message)):
        load_recipe(write(tmp_path, text), {})


def test_missing_recipe_file() -> None:
    with pytest.raises(QatcliError, match="does not exist"):
        load_recipe(Path("no/such/recipe.yaml"), {})


def test_override_is_validated_like_the_file() -> None:
    with pytest.raises(QatcliError, match=r"quant\.bits must be one of"):
        load_recipe(None, {"quant.bits": 6})


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_are_valid(path: Path) -> None:
    recipe = load_recipe(path, {})
    assert recipe.model and recipe.output


def test_set_assignments_read_yaml_scalars_and_scientific_numbers() -> None:
    from qatcli.recipe import parse_assignments

    got = parse_assignments(["qat.lr=2e-3", "qat.steps=7", "qat.estimator=jacobian", "qat.variance_reduction=true"])
    assert got == {"qat.lr": 0.002, "qat.steps": 7, "qat.estimator": "jacobian", "qat.variance_reduction": True}
    with pytest.raises(QatcliError, match="--set takes KEY=VALUE"):
        parse_assignments(["=3"])
