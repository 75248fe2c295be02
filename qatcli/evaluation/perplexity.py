"""Perplexity by the GPTQ protocol: mean token NLL over non-overlapping windows, ppl = exp(mean)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qatcli.config import EvalConfig
from qatcli.data.mix import eval_specs
from qatcli.data.sources import eval_windows
from qatcli.data.stdlib_code import code_python, parse_code
from qatcli.data.tokens import TokenSource
from qatcli.evaluation.head import token_nll
from qatcli.progress import progress_bar


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll: float
    windows: int
    seqlen: int


@torch.no_grad()
def perplexity(
    model: nn.Module, windows: torch.Tensor, device: torch.device, label: str = "eval", batch_size: int = 4
) -> Perplexity:
    """Each window's mean next-token NLL, averaged over windows (equal weights, as GPTQ's eval does)."""
    total = 0.0
    n, seqlen = windows.shape
    with progress_bar() as progress:
        task = progress.add_task(label, total=n, unit="win")
        for start in range(0, n, batch_size):
            batch = windows[start : start + batch_size].to(device)
            # the logits are made a chunk of tokens at a time: never [batch, seqlen, vocab] floats at once
            total += token_nll(model, batch).mean(dim=1).sum().item()
            progress.advance(task, batch.shape[0])
    mean = total / n
    return Perplexity(ppl=math.exp(mean), nll=mean, windows=n, seqlen=seqlen)


@dataclass(frozen=True)
class Domains:
    """Perplexity on each evaluation domain, and their geometric mean (exp of the domains' mean NLL: each domain
    counts once, whatever its number of windows)."""

    each: dict[str, Perplexity]

    @property
    def nll(self) -> float:
        return sum(p.nll for p in self.each.values()) / len(self.each)

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)

    @property
    def windows(self) -> int:
        return sum(p.windows for p in self.each.values())

    @property
    def seqlen(self) -> int:
        return next(iter(self.each.values())).seqlen

    def fields(self) -> dict[str, Any]:
        """What a result row records: the mean's fields (a single domain's own) and, with several, each domain."""
        row: dict[str, Any] = {"ppl": self.ppl, "nll": self.nll, "windows": self.windows, "seqlen": self.seqlen}
        if len(self.each) > 1:
            row["domains"] = {spec: {"ppl": p.ppl, "nll": p.nll, "windows": p.windows} for spec, p in self.each.items()}
        if any(parse_code(spec, "test") is not None for spec in self.each):
            row["code_python"] = code_python()
        return row


def evaluate_on_data(
    model: nn.Module, source: TokenSource, cfg: EvalConfig, device: torch.device, label: str
) -> Domains:
    """Perplexity of ``model`` on the windows of each domain of ``cfg.data``, read through the command's token
    source."""
    assert cfg.data is not None
    specs = eval_specs(cfg.data)
    each = {}
    for spec in specs:
        windows = eval_windows(source.tokens(spec, "eval"), cfg.seqlen, cfg.max_windows, source.bos)
        each[spec] = perplexity(model, windows, device, label if len(specs) == 1 else f"{label} {spec}")
    return Domains(each)
