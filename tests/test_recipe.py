from __future__ import annotations

import dataclasses
import re
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest
import yaml
from torch import nn

from qatcli.config import GPTQOptions, Recipe, default_value, field_help, recipe_field
from qatcli.data.sources import parse_generated
from qatcli.errors import QatcliError
from qatcli.quant.targets import resolve_group_size
from qatcli.recipe import load_recipe, parse_assignments

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))

# Values a shipped recipe sets on purpose, as "file pattern:key pattern" -> why. Any other value a recipe
# sets fails the test: if it equals the code default it only restates it (remove it from the recipe), and if
# it differs the code default or the recipe is wrong, or the difference belongs here with its reason.
SET_ON_PURPOSE = {
    "*:model": "the model a recipe is for; there is no default model",
    "*:output": "where a recipe writes; there is no default",
    "*:export.output": "where a recipe's export goes; there is no default",
    "*:*.data": "the text a recipe calibrates, trains and evaluates on is its choice (natural text or a sample)",
    "*:quant.bits": "the bit width a recipe is named after",
    "*:quant.group_size": "the group size docs/results.md measured with, named in the cells (auto picks the same)",
    "gptq-*:quant.method": "the method a recipe is named after",
    "awq-*:quant.method": "the method a recipe is named after",
    "rtn-*:quant.method": "names the recipe's method next to its gptq siblings (it is the default)",
    "qat-*:qat.estimator": "the estimator a recipe is named after (ste is the default, stated like the others)",
    "qat-*:eval.max_windows": "40 windows of 512 tokens, the evaluation protocol of docs/results.md",
    "compare-*:eval.max_windows": "40 windows of 512 tokens, the evaluation protocol of docs/results.md",
    "compare-*:compare.methods": "the matrix the recipe is named after",
    "demo.yaml:calib.nsamples": "16 windows keep the demo near 10 minutes on 2 cores (128 is the usual count)",
    "demo.yaml:qat.warmup_steps": "2 warmup steps for the demo's 20-step cell (the default 10 is sized for 100)",
    "demo.yaml:qat.save_every": "the 20-step cell saves every 5 steps, so an interrupted demo resumes close by",
    "demo.yaml:compare.methods": "the demo's matrix",
    "demo.yaml:qat.block.nsamples": "32 block-stage windows keep the demo's qat cell short (128 is the default)",
    "*-gpu.yaml:device": "a GPU recipe: sized for one, it would take days on a CPU",
    "demo.yaml:quant.clip": "min/max, the grid the demo's published numbers were measured with",
    "compare-gemma3-270m.yaml:qat.block.loss": "channel_mse: Gemma's few massive channels decide a plain mse",
    "qat-w2-1b-gpu.yaml:qat.block.*": "the block stage scaled for a 1B model on a GPU: more and longer windows",
    "qat-w2-1b-gpu.yaml:qat.*": "end-to-end distillation scaled for a 1B model on a GPU: longer windows, more steps",
}


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
        ("gptq:\n  act_order: true\n  act_group_aware: true\n", "two column orders: choose one"),
        ("quant:\n  sym: 1\n", "quant.sym must be true or false"),
        ("qat:\n  fused: sometimes\n", "qat.fused must be auto, true or false, got 'sometimes'"),
        ("quant:\n  group_size: 0\n", "quant.group_size must be -1"),
        ("quant:\n  group_size: big\n", "quant.group_size must be -1 (per row), auto or positive, got 'big'"),
        ("quant:\n  include: conv\n", "quant.include must be a list of strings"),
        ("quant: 3\n", "quant must be a mapping"),
        ("eval:\n  seqlen: -1\n", "eval.seqlen must be positive"),
        ("quant:\n  method: hqq\n", "quant.method must be one of"),
        ("compare:\n  group_size: [64, huge]\n", "group sizes in compare must be -1 (per row), auto or positive"),
        ("- a\n- b\n", "mapping at the top level"),
        ("quant: [\n", "not valid YAML"),
    ],
)
def test_invalid_recipes_are_refused_with_a_clear_message(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(QatcliError, match=re.escape(message)):
        load_recipe(write(tmp_path, text), {})


def test_every_problem_is_reported_in_one_message(tmp_path: Path) -> None:
    path = write(tmp_path, "quant:\n  bits: 5\n  bitz: 3\n  sym: 1\nqat:\n  lr: -1.0\n  loss: mse\n")
    with pytest.raises(QatcliError) as caught:
        load_recipe(path, {"eval.seqlen": 0})
    message = str(caught.value)
    assert message.startswith("recipe: 6 problems: ") and "\n" not in message
    for part in (
        "quant.bits must be one of 2, 3, 4, 8, got 5",
        "unknown key 'quant.bitz'",
        "quant.sym must be true or false",
        "qat.lr must be positive",
        "qat.loss must be one of kd, ce",
        "eval.seqlen must be positive",
    ):
        assert part in message, part


def test_group_size_auto_is_the_default_and_accepted_in_compare(tmp_path: Path) -> None:
    assert load_recipe(None, {}).quant.group_size == "auto"
    path = write(tmp_path, "compare:\n  group_size: [auto, 32]\n  methods:\n    - {method: rtn, group_size: auto}\n")
    recipe = load_recipe(path, {})
    assert recipe.compare.group_size == ["auto", 32] and recipe.compare.methods[0].group_size == "auto"


@pytest.mark.parametrize(("widths", "expected"), [((576, 1536), 64), ((256, 768), 128), ((100,), -1), ((96,), 32)])
def test_auto_group_size_is_the_largest_common_one(widths: tuple[int, ...], expected: int) -> None:
    targets = {f"model.layers.{i}.proj": nn.Linear(w, 8) for i, w in enumerate(widths)}
    assert resolve_group_size("auto", targets) == expected
    assert resolve_group_size(48, targets) == 48  # an explicit size is kept (and checked elsewhere)


def test_missing_recipe_file() -> None:
    with pytest.raises(QatcliError, match="does not exist"):
        load_recipe(Path("no/such/recipe.yaml"), {})


def test_override_is_validated_like_the_file() -> None:
    with pytest.raises(QatcliError, match=r"quant\.bits must be one of"):
        load_recipe(None, {"quant.bits": 6})


def test_measured_defaults() -> None:
    """The code's defaults are the best values measured (docs/results.md); recipes need not repeat them."""
    q = Recipe().qat
    assert (q.init, q.lr, q.scale_lr, q.save_every, q.steps) == ("fp", 2e-4, 1e-6, 25, 150)
    assert (q.block.lr, q.block.scale_lr, q.block.epochs_for(2), q.block.epochs_for(4)) == (1e-3, 1e-4, 2, 0)
    # generated:N holds N sequences of LEN tokens, every fifth held out: the default run (steps x batch_size
    # windows of seqlen tokens) reads the training part at most twice, and the block stage's windows fit in it.
    spec = parse_generated(q.data)
    assert spec is not None
    available = spec.n * 4 // 5 * spec.length
    assert q.steps * q.batch_size * q.seqlen <= 2 * available
    assert q.block.nsamples * q.block.seqlen <= available


def _set_keys(data: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys a recipe file sets; a list of mappings (compare.methods) counts as one value."""
    keys = []
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            keys += _set_keys(value, dotted + ".")
        else:
            keys.append(dotted)
    return keys


def _value(recipe: Recipe, dotted: str) -> Any:
    node: Any = recipe
    for part in dotted.split("."):
        node = getattr(node, part)
    return [dataclasses.asdict(v) for v in node] if dotted == "compare.methods" else node


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_set_only_what_they_mean(path: Path) -> None:
    recipe = load_recipe(path, {})
    assert recipe.model and recipe.output
    for key in _set_keys(yaml.safe_load(path.read_text())):
        reason = next((r for pattern, r in SET_ON_PURPOSE.items() if fnmatch(f"{path.name}:{key}", pattern)), None)
        if reason is None:
            value, default = _value(recipe, key), default_value(key)
            verdict = "restates the code default: remove it" if value == default else f"differs from {default!r}"
            pytest.fail(f"{path.name}: {key} = {value!r} {verdict} (or list it in SET_ON_PURPOSE with a reason)")


def test_field_help_is_the_doc_and_the_default() -> None:
    assert field_help("qat.lr") == "Learning rate of the latent weights (default: 2e-4)."
    assert field_help("qat.scale_lr").endswith("(default: 1e-6).")
    assert field_help("quant.sym").endswith("(default: true).")
    assert field_help("calib.data") == recipe_field("calib.data").metadata["doc"] + "."
    for f in dataclasses.fields(GPTQOptions):
        assert f.metadata["doc"], f.name


def test_every_recipe_field_is_documented() -> None:
    def walk(cls: type, prefix: str) -> list[str]:
        out = []
        for f in dataclasses.fields(cls):
            out.append(prefix + f.name)
            assert f.metadata.get("doc"), prefix + f.name
        return out

    from qatcli.config import CompareMethod

    keys = walk(Recipe, "") + walk(CompareMethod, "compare.methods[].")
    for section in ("quant", "calib", "gptq", "qat", "qat.jacobian", "eval", "export", "compare"):
        keys += walk(type(default_value(section)), section + ".")
    assert "qat.jacobian.blend" in keys


def test_set_assignments_read_yaml_scalars_and_scientific_numbers() -> None:
    got = parse_assignments(["qat.lr=2e-3", "qat.steps=7", "qat.estimator=jacobian", "qat.variance_reduction=true"])
    assert got == {"qat.lr": 0.002, "qat.steps": 7, "qat.estimator": "jacobian", "qat.variance_reduction": True}
    with pytest.raises(QatcliError, match="--set takes KEY=VALUE"):
        parse_assignments(["=3"])
