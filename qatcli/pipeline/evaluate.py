"""Perplexity and task accuracy of any mix of full-precision models, qatcli checkpoints and exports of any
registered format (qatcli/exporters)."""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from qatcli.config import Recipe
from qatcli.data.tokens import TokenSource, window_bos
from qatcli.errors import QatcliError
from qatcli.evaluation.perplexity import evaluate_on_data
from qatcli.evaluation.tasks import check_tasks, evaluate_tasks
from qatcli.exporters import detect_format
from qatcli.formats.checkpoint import base_model_ref, is_checkpoint, load_checkpoint
from qatcli.models.loading import ModelRef, load_model, load_tokenizer, resolve_model
from qatcli.pipeline.inputs import Problems
from qatcli.quant.layer import average_bits, quantized_bytes
from qatcli.quant.targets import find_targets
from qatcli.runtime import resolve_device, seed_everything


@dataclass
class Loaded:
    """A model ready to evaluate, the fields of its result row, and the full-precision model it came from."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    info: dict[str, Any]
    base: ModelRef | None


def _base_of(spec: str | None) -> ModelRef | None:
    """The recorded base model of a quantized model, where it can still be found."""
    if spec is None:
        return None
    try:
        return resolve_model(spec)
    except QatcliError:
        return None


def load_for_eval(spec: str, device: torch.device) -> Loaded:
    path = Path(spec)
    if is_checkpoint(path):
        model, tokenizer, meta, layers = load_checkpoint(path, device)
        q = meta["quantization"]
        info = {
            "method": meta["method"],
            "format": "qatcli",
            "bits": q["bits"],
            "avg_bits": average_bits(layers),
            "group_size": q["group_size"],
            "sym": q["sym"],
            "weight_bytes": quantized_bytes(layers),
            "base_model": meta["base_model"]["spec"],
        }
        return Loaded(model, tokenizer, info, base_model_ref(path, meta))
    fmt = detect_format(path)
    if fmt is not None:
        loaded = fmt.load(path, device)
        return Loaded(loaded.model, loaded.tokenizer, loaded.info, _base_of(loaded.info.get("base_model")))
    ref = resolve_model(spec)
    model = load_model(ref, device)
    fp16_bytes = sum(m.weight.numel() * 2 for m in find_targets(model, [], []).values())
    info = {
        "method": "fp",
        "format": "fp",
        "bits": None,
        "group_size": None,
        "sym": None,
        "weight_bytes": fp16_bytes,
        "base_model": ref.spec,
    }
    return Loaded(model, load_tokenizer(ref), info, ref)


def check_eval(recipe: Recipe, models: list[str]) -> None:
    problems = Problems()
    if not models:
        problems.add("no model to evaluate: give MODEL_OR_CHECKPOINT arguments or set eval.models")
    if recipe.eval.data is not None or not recipe.eval.tasks:
        problems.data(recipe.eval.data, "no evaluation data: pass --data or --tasks, or set eval.data or eval.tasks")
    with problems.check():
        check_tasks(recipe.eval)
    for spec in models:
        fmt = None if is_checkpoint(Path(spec)) else detect_format(Path(spec))
        if fmt is None and not is_checkpoint(Path(spec)):
            problems.model(spec, "")
        elif fmt is not None and recipe.eval.tasks and not fmt.runs_tasks:
            problems.add(
                f"'{spec}': --tasks needs a torch model and {fmt.name} runs in its own engine; evaluate the "
                "checkpoint it came from"
            )
    problems.raise_if_any()


def evaluate_models(recipe: Recipe, models: list[str]) -> list[dict[str, Any]]:
    """One result row per model: perplexity on the same windows of ``recipe.eval.data`` and/or the
    lm-evaluation-harness tasks of ``recipe.eval.tasks``."""
    check_eval(recipe, models)
    device = resolve_device(recipe.device)
    rows = []
    for spec in models:
        seed_everything(recipe.seed, recipe.deterministic)
        t0 = time.perf_counter()
        loaded = load_for_eval(spec, device)
        row = {"name": spec, **loaded.info}
        if recipe.eval.data is not None:
            bos = window_bos(loaded.model, loaded.tokenizer)
            source = TokenSource(loaded.tokenizer, loaded.base, recipe.seed, device, bos)
            result = evaluate_on_data(loaded.model, source, recipe.eval, device, Path(spec).name)
            row |= {
                **result.fields(),
                "data": recipe.eval.data,
            }
        row |= evaluate_tasks(loaded.model, loaded.tokenizer, recipe.eval)
        rows.append({**row, "seconds": round(time.perf_counter() - t0, 3)})
        del loaded
        gc.collect()
    return rows
