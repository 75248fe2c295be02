"""What ptq and qat share: the loaded full-precision model with its targets and grids, a registered method run on
it with its calibration windows, the stated grid a checkpoint records, and the evaluation of quantized layers."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from qatcli.config import Recipe
from qatcli.data.tokens import TokenSource
from qatcli.evaluation.perplexity import evaluate_on_data
from qatcli.methods import Job, PTQMethod, Quantized
from qatcli.models.loading import ModelRef, load_model, load_tokenizer
from qatcli.quant.grid import QuantSpec
from qatcli.quant.layer import LayerQuant, fake_quantized
from qatcli.quant.targets import find_targets, plan_quantization, spec_fields, untie_lm_head
from qatcli.report.progress import stderr_console
from qatcli.runtime import keeping_peak_memory


@dataclass
class Base:
    """A loaded full-precision model, the layers to quantize and the grid each gets: ``spec`` is the recipe's
    default (quant.bits, group_size, sym), ``specs`` each layer's own (quant.dynamic rules applied), ``dynamic``
    the rules with their group sizes resolved, ``untied`` the input embeddings' weight that lm_head shared
    before it got its own copy (None: not tied, or lm_head not quantized)."""

    ref: ModelRef
    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    targets: dict[str, nn.Linear]
    spec: QuantSpec
    specs: dict[str, QuantSpec]
    dynamic: dict[str, dict[str, Any]] = field(default_factory=dict)
    untied: str | None = None


@dataclass
class Made:
    """A checkpoint written by ptq or qat: where, what it holds and what it measured."""

    output: Path
    meta: dict[str, Any]
    specs: dict[str, QuantSpec] = field(default_factory=dict)  # each quantized layer's grid

    @property
    def metrics(self) -> dict[str, Any]:
        return self.meta["metrics"]


def base_meta(ref: ModelRef) -> dict[str, str]:
    return {"spec": ref.spec, "kind": ref.kind, "location": ref.location}


def load_base(recipe: Recipe, ref: ModelRef, device: torch.device) -> Base:
    """The model in fp32 on ``device`` with its quantization targets and their grids (each group size must fit
    its layer); with quant.lm_head, lm_head gets its own weight where it shares the input embeddings'."""
    q = recipe.quant
    model = load_model(ref, device)
    tokenizer = load_tokenizer(ref)
    targets = find_targets(model, q.include, q.exclude, q.lm_head)
    plan = plan_quantization(targets, q)
    untied = untie_lm_head(model) if q.lm_head else None
    if q.group_size == "auto":
        stderr_console.print(f"group size auto -> {plan.default.group_size}")
    return Base(ref, model, tokenizer, targets, plan.default, plan.specs, plan.dynamic, untied)


def quantization_meta(recipe: Recipe, base: Base) -> dict[str, Any]:
    """The checkpoint's stated grid: the default spec, the dynamic rules (group sizes resolved) where the
    recipe has any, and whether lm_head is quantized (and untied from the embeddings)."""
    spec = base.spec
    meta: dict[str, Any] = {"bits": spec.bits, "group_size": spec.group_size, "sym": spec.sym}
    # a layer the rules do not describe (QAT from a checkpoint whose group sizes `auto` accepted) gets its own
    # exact rule in front, so that the stated grid is each layer's grid
    exact = {
        f"^{re.escape(name)}$": {"bits": s.bits, "group_size": s.group_size, "sym": s.sym}
        for name, s in base.specs.items()
        if spec_fields(name, meta, base.dynamic) != {"bits": s.bits, "group_size": s.group_size, "sym": s.sym}
    }
    if base.dynamic or exact:
        meta["dynamic"] = {**exact, **base.dynamic}
    if recipe.quant.lm_head:
        meta["lm_head"] = True
        if base.untied is not None:
            meta["untied_lm_head"] = base.untied
    return meta


def _calibration(recipe: Recipe, source: TokenSource) -> torch.Tensor:
    """The recipe's calibration windows, [nsamples, seqlen]."""
    c = recipe.calib
    assert c.data is not None
    return source.mix(c.data, "calib").calibration(c.nsamples, c.seqlen, recipe.seed, source.bos)


def model_device_for(method: PTQMethod, device: torch.device) -> torch.device:
    """Where the model loads for ``method``: the CPU for methods that walk it a decoder block at a time (only the
    block being worked on goes to ``device``, and the model ends on the CPU), else ``device``."""
    return torch.device("cpu") if method.walks else device


def run_method(method: PTQMethod, recipe: Recipe, base: Base, source: TokenSource, device: torch.device) -> Quantized:
    """``method`` on the base model's targets, with the recipe's calibration windows where it needs them."""
    windows = _calibration(recipe, source) if method.needs_calibration else None
    with keeping_peak_memory(device):
        return method.quantize(Job(recipe, base.model, base.targets, base.specs, windows, device))


def calibration_metrics(recipe: Recipe) -> dict[str, Any]:
    c = recipe.calib
    return {"data": c.data, "nsamples": c.nsamples, "seqlen": c.seqlen}


def evaluate_layers(
    base: Base, layers: dict[str, LayerQuant], recipe: Recipe, source: TokenSource, device: torch.device, label: str
) -> dict[str, Any]:
    """Perplexity of the model with ``layers`` applied, as recorded in a checkpoint's metrics."""
    t0 = time.perf_counter()
    with fake_quantized(base.model, layers):
        result = evaluate_on_data(base.model, source, recipe.eval, device, label)
    return {
        "data": recipe.eval.data,
        **result.fields(),
        "seconds": round(time.perf_counter() - t0, 3),
    }
