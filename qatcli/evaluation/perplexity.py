"""Perplexity by the GPTQ protocol: mean token NLL over non-overlapping windows, ppl = exp(mean)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from qatcli.config import EvalConfig
from qatcli.data.sources import eval_windows
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


def evaluate_on_data(
    model: nn.Module, source: TokenSource, cfg: EvalConfig, device: torch.device, label: str
) -> Perplexity:
    """Perplexity of ``model`` on the windows of ``cfg.data``, read through the command's token source."""
    assert cfg.data is not None
    windows = eval_windows(source.tokens(cfg.data, "eval"), cfg.seqlen, cfg.max_windows, source.bos)
    return perplexity(model, windows, device, label)
