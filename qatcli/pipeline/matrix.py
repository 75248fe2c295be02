"""The cells of `qatcli compare`: the compare section expanded, each cell's recipe, and what makes it reusable.

A cell is one run of one method at one bit width and group size (and, for QAT, one estimator, init, step count
and, where the entry names them, block-stage epochs). Its recipe is the compare recipe's shared sections with
the cell's values put in. Two keys decide what an earlier run of the cell can still be used for: the
checkpoint key (everything its checkpoint depends on) and the evaluation key (the windows it is evaluated on
and how it is exported).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qatcli.config import Recipe
from qatcli.errors import QatcliError
from qatcli.methods import METHODS
from qatcli.recipe import as_list, flatten, load_recipe


@dataclass(frozen=True)
class Cell:
    method: str  # rtn | gptq | awq | qat
    bits: int
    group_size: int | str  # an int once auto is resolved
    estimator: str | None = None  # qat only, passed to the qat recipe as it is
    init: str | None = None  # qat only
    steps: int | None = None  # qat only
    block_epochs: int | str | None = None  # qat only, where the entry names it (else the recipe's qat.block.epochs)
    # the entry's dynamic rules (None: the recipe's quant.dynamic) and what the cell name calls them
    dynamic: dict[str, dict[str, Any]] | None = field(default=None, hash=False)
    dynamic_name: str | None = None

    @property
    def mix(self) -> str:
        """The name's suffix for the entry's own dynamic rules: -mix, or -<dynamic_name>."""
        return f"-{self.dynamic_name or 'mix'}" if self.dynamic else ""

    @property
    def init_name(self) -> str:
        """fp, rtn or gptq, or the name of an init checkpoint (that of its cell for another cell's checkpoint)."""
        path = Path(str(self.init))
        return path.parent.name if path.name == "checkpoint" and path.parent.name else path.name

    @property
    def name(self) -> str:
        """A directory name: rtn-w3-g64, qat-ste-rtn-w2-g64-s200, qat-ste-fp-w2-g64-s20-b2 (block epochs named)."""
        if self.method != "qat":
            return f"{self.method}-w{self.bits}-g{self.group_size}{self.mix}"
        init = re.sub(r"[^\w.-]", "_", self.init_name)
        blocks = "" if self.block_epochs is None else f"-b{self.block_epochs}"
        return f"qat-{self.estimator}-{init}-w{self.bits}-g{self.group_size}-s{self.steps}{blocks}{self.mix}"

    @property
    def series(self) -> str:
        """The cells that differ only in bits and group size form one series (a line in the figure)."""
        mix = f" {self.mix[1:]}" if self.mix else ""
        if self.method != "qat":
            return self.method + mix
        blocks = "" if self.block_epochs is None else f", block epochs {self.block_epochs}"
        return f"qat {self.estimator} ({self.init_name} init, {self.steps} steps{blocks}){mix}"


def expand(recipe: Recipe, auto_group_size: int | None = None) -> list[Cell]:
    """Every cell of the compare section, in recipe order; two cells with one name are refused.

    Group size ``auto`` becomes ``auto_group_size`` where the caller has resolved it for the model.
    """
    c = recipe.compare
    cells: list[Cell] = []
    for m in c.methods:
        bits = as_list(m.bits) if m.bits is not None else c.bits or [recipe.quant.bits]
        groups = as_list(m.group_size) if m.group_size is not None else c.group_size or [recipe.quant.group_size]
        if m.method == "qat":
            estimators = as_list(m.estimator) if m.estimator is not None else [recipe.qat.estimator]
            inits = as_list(m.init) if m.init is not None else [recipe.qat.init]
            steps = m.steps if m.steps is not None else recipe.qat.steps
            epochs = as_list(m.block_epochs) if m.block_epochs is not None else [None]
            variants = [(e, i, steps, b) for e in estimators for i in inits for b in epochs]
        else:
            variants = [(None, None, None, None)]
        for estimator, init, steps, block_epochs in variants:
            for g in groups:
                for b in bits:
                    group = auto_group_size if g == "auto" and auto_group_size is not None else g
                    cells.append(
                        Cell(m.method, b, group, estimator, init, steps, block_epochs, m.dynamic, m.dynamic_name)
                    )
    names = [cell.name for cell in cells]
    for name in names:
        if names.count(name) > 1:
            raise QatcliError(f"recipe: compare.methods lists the cell '{name}' twice")
    return cells


def cell_recipe(base: Recipe, cell: Cell, directory: Path) -> Recipe:
    """The ptq or qat recipe of ``cell``: checkpoint in ``directory/checkpoint``, export in ``directory/gptq``."""
    shared = base.to_dict()
    del shared["compare"]
    values = flatten(shared)
    values.update(
        {
            "output": str(directory / "checkpoint"),
            "export.output": str(directory / "gptq"),
            "quant.bits": cell.bits,
            "quant.group_size": cell.group_size,
        }
    )
    if cell.dynamic is not None:
        values["quant.dynamic"] = cell.dynamic
    if cell.method in METHODS:
        values["quant.method"] = cell.method
    else:
        values.update({"qat.estimator": cell.estimator, "qat.init": cell.init, "qat.steps": cell.steps})
        if cell.block_epochs is not None:
            values["qat.block.epochs"] = cell.block_epochs
    recipe = load_recipe(None, values)
    # compare evaluates every export itself, on the same windows; the cell's run measures nothing.
    recipe.eval.data = None
    return recipe


def checkpoint_key(recipe: Recipe, cell: Cell) -> dict[str, Any]:
    """The settings a cell's checkpoint depends on (not the device, not evaluation or export)."""
    d = recipe.to_dict()
    quant = dict(d["quant"])
    for name, unset in (("dynamic", {}), ("lm_head", False)):  # keys made before these existed stay as they were
        if quant.get(name) == unset:
            del quant[name]
    key: dict[str, Any] = {"method": cell.method, "model": d["model"], "seed": d["seed"], "quant": quant}
    if cell.method == "qat":
        del quant["method"]
        key["qat"] = d["qat"]
    # the sections of the method the checkpoint comes from: the cell's own, or for qat the method it starts from
    source = cell.method if cell.method in METHODS else cell.init
    if source in METHODS:
        key |= {section: d[section] for section in METHODS[source].checkpoint_sections()}
    return key


def eval_key(recipe: Recipe, with_export: bool = True) -> dict[str, Any]:
    """The settings of the evaluation (and of a cell's export) in the compare recipe: equal keys, same windows."""
    d = recipe.to_dict()
    key = {"model": d["model"], "seed": d["seed"], "eval": {k: d["eval"][k] for k in ("data", "seqlen", "max_windows")}}
    if d["eval"]["tasks"]:  # without tasks the key stays as it was, so earlier results are still reused
        key["eval"] |= {k: d["eval"][k] for k in ("tasks", "task_dirs", "num_fewshot", "limit")}
    if with_export:
        key["export"] = {k: v for k, v in d["export"].items() if k != "output"}
    return key
