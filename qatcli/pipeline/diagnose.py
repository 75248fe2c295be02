"""qatcli diagnose: where quantized models sit in the full-precision model's loss landscape.

Every quantized model (a qatcli checkpoint or a GPTQ-format directory) is compared with the full-precision
model it was made from, on the same evaluation windows: the loss along the segment from the fp weights to
its quantized weights, the loss gap, each layer's Hessian-weighted distance and the inward component of the
gradient at the quantized point (qatcli/diagnose/geometry.py). A QAT checkpoint's latent point is
evaluated too. Only the quantized layers' weights change between points; the rest is the fp model's.
"""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qatcli.config import Recipe
from qatcli.data.mix import eval_specs
from qatcli.data.sources import eval_windows
from qatcli.data.tokens import TokenSource, window_bos
from qatcli.diagnose.geometry import Point, hessian_distance, inward_component, segment_profile
from qatcli.errors import QatcliError
from qatcli.evaluation.perplexity import perplexity
from qatcli.formats.checkpoint import is_checkpoint, load_checkpoint, read_meta
from qatcli.formats.packed_model import PackedLinear, load_gptq_model, read_gptq_config
from qatcli.models.loading import load_model, load_tokenizer, resolve_model
from qatcli.pipeline.inputs import Problems
from qatcli.qat.block import block_records
from qatcli.qat.losses import model_ce_loss
from qatcli.quant.gptq import HessianAccumulator
from qatcli.quant.targets import untie_lm_head
from qatcli.report.progress import progress_bar
from qatcli.run_layout import BLOCK_METRICS_FILE, METRICS_FILE
from qatcli.runtime import resolve_device, seed_everything


@dataclass
class QuantizedPoint:
    name: str
    kind: str  # the method recorded (rtn, gptq, qat) and the format read
    weights: Point  # the quantized weights
    latent: Point | None  # a QAT checkpoint's latent weights


def check_diagnose(recipe: Recipe, fp: str | None, quantized: list[str]) -> None:
    problems = Problems()
    problems.model(fp, "give the full-precision MODEL first")
    if not quantized:
        problems.add("nothing to diagnose: give one or more qatcli checkpoints or GPTQ directories after MODEL")
    for spec in quantized:
        if not is_checkpoint(Path(spec)) and read_gptq_config(Path(spec)) is None:
            problems.add(f"'{spec}' is neither a qatcli checkpoint nor a GPTQ-format directory")
    problems.data(recipe.eval.data, "no data: pass --data or set eval.data in the recipe")
    if recipe.eval.data is not None:
        with problems.check():
            if len(eval_specs(recipe.eval.data)) > 1:
                problems.add("diagnose measures the landscape on one domain: give --data a single spec")
    problems.raise_if_any()


def load_quantized_point(spec: str, layer_names: list[str]) -> QuantizedPoint:
    """The quantized (and, for QAT, latent) weights of ``layer_names`` in a checkpoint or GPTQ directory."""
    path = Path(spec)
    folded = f"'{spec}' changed parameters other than the quantized weights (AWQ folds its scales into the norms): "
    folded += "the segment from the fp weights is defined for the quantized layers' weights only"
    if is_checkpoint(path):
        if read_meta(path).get("changed"):
            raise QatcliError(folded)
        model, _, meta, layers = load_checkpoint(path, torch.device("cpu"), fake_quant=False)
        missing = sorted(set(layer_names) - set(layers))
        if missing:
            raise QatcliError(f"'{spec}' does not quantize {missing[0]} (and {len(missing) - 1} more)")
        latent = {name: model.get_submodule(name).weight.detach().clone() for name in layer_names}
        weights = {name: layers[name].fake_quant(latent[name]) for name in layer_names}
        kind = f"{meta['method']} (qatcli)"
        point = QuantizedPoint(path.name, kind, weights, latent if meta["method"] == "qat" else None)
    else:
        if (read_gptq_config(path) or {}).get("meta", {}).get("qatcli_method") == "awq":
            raise QatcliError(folded)
        model, _, qcfg = load_gptq_model(path, torch.device("cpu"))
        weights = {}
        for name in layer_names:
            module = model.get_submodule(name)
            if not isinstance(module, PackedLinear):
                raise QatcliError(f"'{spec}' does not quantize {name}")
            weights[name] = module.dequantized_weight()
        kind = f"{qcfg.get('meta', {}).get('qatcli_method', 'gptq')} (GPTQ format)"
        point = QuantizedPoint(path.name, kind, weights, None)
    del model
    gc.collect()
    return point


class Landscape:
    """The fp model with its quantized layers' weights settable: the loss (mean token NLL) at any point."""

    def __init__(self, model: nn.Module, names: list[str], windows: torch.Tensor, device: torch.device) -> None:
        self.model, self.names, self.windows, self.device = model, names, windows, device
        self.modules = {name: model.get_submodule(name) for name in names}
        self.fp: Point = {name: m.weight.detach().cpu().clone() for name, m in self.modules.items()}

    def _set(self, point: Point) -> None:
        with torch.no_grad():
            for name, module in self.modules.items():
                module.weight.copy_(point[name])

    def loss(self, point: Point) -> float:
        self._set(point)
        return perplexity(self.model, self.windows, self.device, "loss").nll

    def loss_and_grad(self, point: Point) -> tuple[float, Point]:
        """The mean token NLL over the windows (the mean of model_ce_loss per batch of 4) and its gradient."""
        self._set(point)
        weights = [m.weight for m in self.modules.values()]
        for w in weights:
            w.requires_grad_(True)
        batches = self.windows.split(4)
        total = 0.0
        for batch in batches:
            batch = batch.to(self.device)
            loss = model_ce_loss(self.model, batch) * batch.shape[0] / len(self.windows)
            loss.backward()
            total += float(loss)
        grads = {name: m.weight.grad.detach().cpu().clone() for name, m in self.modules.items()}
        for w in weights:
            w.grad = None
            w.requires_grad_(False)
        return total, grads

    def restore(self) -> None:
        self._set(self.fp)

    @torch.no_grad()
    def hessians(self, windows: torch.Tensor) -> dict[str, torch.Tensor]:
        """H = 2/N sum x x^T of each layer's inputs at the fp weights, as GPTQ collects it."""
        self.restore()
        acc = {name: HessianAccumulator(m.in_features, self.device) for name, m in self.modules.items()}
        hooks = [
            m.register_forward_hook(lambda _m, args, _out, name=name: acc[name].add(args[0]))
            for name, m in self.modules.items()
        ]
        try:
            for batch in windows.split(4):
                self.model(batch.to(self.device), use_cache=False)
        finally:
            for hook in hooks:
                hook.remove()
        return {name: a.H.cpu() for name, a in acc.items()}


def diagnose(recipe: Recipe, fp_spec: str | None, quantized: list[str]) -> dict[str, Any]:
    """The measurements of every quantized model against ``fp_spec``, as one JSON-ready dict."""
    check_diagnose(recipe, fp_spec, quantized)
    assert fp_spec is not None and isinstance(recipe.eval.data, str)
    device = resolve_device(recipe.device)
    seed_everything(recipe.seed, recipe.deterministic)
    ref = resolve_model(fp_spec)
    model = load_model(ref, device)
    for p in model.parameters():
        p.requires_grad_(False)
    tokenizer = load_tokenizer(ref)
    source = TokenSource(tokenizer, ref, recipe.seed, device, window_bos(model, tokenizer))
    windows = eval_windows(
        source.tokens(recipe.eval.data, "eval"), recipe.eval.seqlen, recipe.eval.max_windows, source.bos
    )
    cfg = recipe.diagnose
    ts = [cfg.t_max * i / (cfg.points - 1) for i in range(cfg.points)]

    names = _quantized_names(Path(quantized[0]))
    if any(model.get_submodule(name) is model.get_output_embeddings() for name in names):
        untie_lm_head(model)  # a quantized lm_head (quant.lm_head) moves alone, not the embeddings tied to it
    landscape = Landscape(model, names, windows, device)
    hessians = landscape.hessians(windows[: cfg.hessian_windows])
    fp_loss = landscape.loss(landscape.fp)
    results = []
    with progress_bar() as progress:
        task = progress.add_task("diagnose", total=len(quantized), unit="model")
        for spec in quantized:
            point = load_quantized_point(spec, names)
            profile = segment_profile(landscape.loss, landscape.fp, point.weights, ts)
            q_loss = landscape.loss(point.weights)
            inward = inward_component(landscape.loss_and_grad, landscape.fp, point.weights)
            distances = hessian_distance(landscape.fp, point.weights, hessians)
            results.append(
                {
                    "name": spec,
                    "kind": point.kind,
                    "loss_fp": fp_loss,
                    "loss_quantized": q_loss,
                    "loss_gap": q_loss - fp_loss,
                    "profile": [{"t": t, "loss": loss} for t, loss in zip(ts, profile, strict=True)],
                    "t_lowest": ts[min(range(len(ts)), key=profile.__getitem__)],
                    "loss_latent": None if point.latent is None else landscape.loss(point.latent),
                    "hessian_distance": sum(distances.values()),
                    "hessian_distance_by_layer": distances,
                    "inward_cosine": inward.cosine,
                    "inward_projected": inward.projected,
                    "grad_norm": inward.grad_norm,
                    "distance": inward.distance,
                }
            )
            del point
            gc.collect()
            progress.advance(task)
    landscape.restore()
    return {
        "model": fp_spec,
        "data": recipe.eval.data,
        "windows": int(windows.shape[0]),
        "seqlen": int(windows.shape[1]),
        "hessian_windows": min(cfg.hessian_windows, int(windows.shape[0])),
        "results": results,
    }


def _quantized_names(spec: Path) -> list[str]:
    """The quantized layers of the first model; every other model must quantize the same ones."""
    if is_checkpoint(spec):
        return sorted(read_meta(spec)["layers"])
    model, _, _ = load_gptq_model(spec, torch.device("cpu"))
    return sorted(name for name, m in model.named_modules() if isinstance(m, PackedLinear))


@dataclass
class Recorded:
    """The basin measurements recorded during a QAT run: end-to-end steps, and each block's steps."""

    steps: list[dict[str, Any]]
    blocks: list[dict[str, Any]]


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def recorded_landscape(run: Path) -> Recorded | None:
    """The landscape records of a QAT checkpoint or of a run directory still in progress, if it has any."""
    steps = [r for r in _jsonl(run / METRICS_FILE) if "landscape" in r]
    blocks = _jsonl(run / BLOCK_METRICS_FILE) or block_records(run)
    return Recorded(steps, blocks) if steps or blocks else None
