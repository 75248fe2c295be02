"""qatcli eval: perplexity of any mix of full-precision models and qatcli checkpoints, in one table."""

from __future__ import annotations

import functools
import gc
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from qatcli.data.models import ModelRef, load_model, load_tokenizer, resolve_model
from qatcli.data.perplexity import evaluate_on_data
from qatcli.data.sources import check_data_spec
from qatcli.errors import QatcliError
from qatcli.formats.checkpoint import is_checkpoint, load_checkpoint
from qatcli.formats.packed_model import PackedLinear, load_gptq_model, packed_layer_bytes, read_gptq_config
from qatcli.outputs import check_writable, write_json_atomic
from qatcli.quant.layer import quantized_bytes
from qatcli.quant.targets import find_targets
from qatcli.recipe import Recipe
from qatcli.report.table import human_bytes, print_table
from qatcli.runtime import resolve_device, seed_everything


def _load(
    spec: str, device: torch.device
) -> tuple[nn.Module, PreTrainedTokenizerBase, dict[str, Any], ModelRef | None]:
    """The model to evaluate, its row fields, and (for a full-precision model) its own reference."""
    path = Path(spec)
    if is_checkpoint(path):
        model, tokenizer, meta, layers = load_checkpoint(path, device)
        q = meta["quantization"]
        info = {
            "method": meta["method"],
            "format": "qatcli",
            "bits": q["bits"],
            "group_size": q["group_size"],
            "sym": q["sym"],
            "weight_bytes": quantized_bytes(layers),
            "base_model": meta["base_model"]["spec"],
        }
        return model, tokenizer, info, None
    if path.is_dir() and read_gptq_config(path) is not None:
        model, tokenizer, qcfg = load_gptq_model(path, device)
        packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
        info = {
            "method": qcfg.get("meta", {}).get("qatcli_method", "gptq"),
            "format": qcfg.get("checkpoint_format", qcfg.get("format", "gptq")),
            "bits": qcfg["bits"],
            "group_size": qcfg.get("group_size"),
            "sym": qcfg.get("sym"),
            "weight_bytes": sum(packed_layer_bytes(m) for m in packed),
            "base_model": None,
        }
        return model, tokenizer, info, None
    ref = resolve_model(spec)
    model = load_model(ref, device)
    tokenizer = load_tokenizer(ref)
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
    return model, tokenizer, info, ref


def _base_model(ref: ModelRef | None, spec: str, base: str | None) -> ModelRef:
    """The full-precision model whose samples ``generated:`` data are: the model itself, or a checkpoint's base."""
    if ref is not None:
        return ref
    if base is None:
        raise QatcliError(f"'{spec}' names no full-precision base model to generate data from; use a text dataset")
    return resolve_model(base)


def run_eval(recipe: Recipe, models: list[str], json_path: Path | None, force: bool) -> list[dict[str, Any]]:
    models = models or recipe.eval.models or ([recipe.model] if recipe.model else [])
    if not models:
        raise QatcliError("no model to evaluate: give MODEL_OR_CHECKPOINT arguments or set eval.models")
    if recipe.eval.data is None:
        raise QatcliError("no evaluation data: pass --data or set eval.data in the recipe")
    check_data_spec(recipe.eval.data)
    if json_path is not None:
        check_writable(json_path, force)
    for spec in models:
        if not is_checkpoint(Path(spec)) and read_gptq_config(Path(spec)) is None:
            resolve_model(spec)  # fail on a bad argument before spending time on the good ones
    device = resolve_device(recipe.device)

    rows = []
    for spec in models:
        seed_everything(recipe.seed)
        t0 = time.perf_counter()
        model, tokenizer, info, ref = _load(spec, device)
        base = functools.partial(_base_model, ref, spec, info["base_model"])
        result = evaluate_on_data(model, tokenizer, base, recipe.eval, recipe.seed, device, Path(spec).name)
        rows.append(
            {
                "name": spec,
                **info,
                "ppl": result.ppl,
                "nll": result.nll,
                "windows": result.windows,
                "seqlen": result.seqlen,
                "data": recipe.eval.data,
                "seconds": round(time.perf_counter() - t0, 3),
            }
        )
        del model
        gc.collect()

    print_table(
        f"perplexity on {recipe.eval.data}",
        ["name", "method", "format", "bits", "group", "ppl", "windows x seqlen", "linear weights", "time s"],
        [
            [
                r["name"],
                r["method"],
                r["format"],
                r["bits"],
                r["group_size"],
                r["ppl"],
                f"{r['windows']} x {r['seqlen']}",
                human_bytes(r["weight_bytes"]),
                r["seconds"],
            ]
            for r in rows
        ],
    )
    if json_path is not None:
        write_json_atomic(json_path, rows, force)
    return rows
