"""GPTQ for one Linear layer (Frantar et al., ICLR 2023), after the reference code of IST-DASLab/gptq.

Columns are quantized left to right, by descending Hessian diagonal (act-order, which needs a g_idx), or
group by group (group-aware reordering, GAR: groups by their largest diagonal, columns by descending diagonal
inside each, so g_idx stays trivial); each column's
rounding error, scaled by the inverse-Hessian Cholesky factor, is pushed onto the columns not yet
quantized. Updates are applied lazily in blocks of ``block_size`` columns.

One deliberate difference from the reference: when a group starts in the middle of a block, the reference
computes its scale from columns that have not yet received the errors of that block's earlier columns;
here every group's parameters come from fully error-corrected columns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from qatcli.errors import QatcliError
from qatcli.quant.grid import QuantSpec, default_g_idx, fake_quantize_dense, group_qparams, row_qparams

if TYPE_CHECKING:
    # The options are declared once, with their defaults and docs, in the recipe schema; the algorithm
    # only reads them, so it does not import the recipe module at run time.
    from qatcli.config import GPTQOptions

MAX_DAMP = 10.0


class HessianAccumulator:
    """H = (2 / N) * sum over calibration tokens of x x^T, kept as a running mean."""

    def __init__(self, columns: int, device: torch.device) -> None:
        self.H = torch.zeros(columns, columns, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        n = x.shape[0]
        self.H *= self.tokens / (self.tokens + n)
        self.tokens += n
        x = math.sqrt(2 / self.tokens) * x
        self.H += x.T @ x


@dataclass
class GPTQResult:
    weight: torch.Tensor  # dequantized, [out, in], float32: s * (q - z) exactly
    scales: torch.Tensor  # [out, G] fp16 values in float32
    zeros: torch.Tensor  # [out, G]
    g_idx: torch.Tensor  # [in] int32
    damp: float  # the dampening that made H positive definite (the requested one unless raised)
    loss: float  # GPTQ's objective: sum over columns of (w - q)^2 / [H^-1]_jj / 2


def inverse_cholesky(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, raising damp tenfold until it exists.

    Computed in float64 and returned in H's dtype. In float32 the factor of an ill-conditioned Hessian (smollm2's)
    carries errors that depend on how LAPACK splits the work between threads, enough to flip codes between thread
    counts, which the walk through the blocks amplifies (docs/results-archive.md, "GPTQ no longer depends on the
    thread count").
    """
    dtype = H.dtype
    H = H.double()
    mean_diag = torch.mean(torch.diag(H))
    eye = torch.eye(H.shape[0], device=H.device, dtype=H.dtype)
    while True:
        L, info = torch.linalg.cholesky_ex(H + damp * mean_diag * eye)
        if info == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0 and bool(torch.isfinite(U).all()):
                return U.to(dtype), damp
        if damp >= MAX_DAMP:
            raise QatcliError(f"the Hessian is not positive definite even with damp {damp}: check the calibration data")
        damp = min(damp * 10, MAX_DAMP) if damp > 0 else 0.01


def group_aware_order(diag: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GAR's column order, and the order in which it visits the groups (both as indices of the original)."""
    by_group = diag.reshape(-1, group_size)
    group_order = torch.argsort(by_group.max(dim=1).values, descending=True)
    inside = torch.argsort(by_group, dim=1, descending=True)
    offsets = torch.arange(by_group.shape[0], device=diag.device).unsqueeze(1) * group_size
    return (inside + offsets)[group_order].reshape(-1), group_order


@torch.no_grad()
def gptq_quantize(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, options: GPTQOptions, clip: str) -> GPTQResult:
    """GPTQ of one layer's weights ``W`` ([out, in]) given its input Hessian ``H`` ([in, in]), on H's device."""
    W = W.detach().to(H.device, torch.float32, copy=True)  # a layer outside the blocks (lm_head) waits on the CPU
    H = H.clone()
    columns = W.shape[1]
    g = spec.effective_group_size(columns)
    maxq = spec.maxq

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    static = group_qparams(W, spec, clip) if options.static_groups and spec.group_size != -1 else None
    perm = group_order = None
    if options.act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
    elif options.group_aware:
        perm, group_order = group_aware_order(torch.diag(H), g)
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]

    U, damp = inverse_cholesky(H, options.damp)
    del H
    Q = torch.zeros_like(W)
    scales, zeros = [], []
    loss = 0.0
    s = z = None
    for i1 in range(0, columns, options.block_size):
        i2 = min(i1 + options.block_size, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(count):
            col = i1 + i
            if static is not None:
                group = int(perm[col] if perm is not None else col) // g
                s, z = static[0][:, group : group + 1], static[1][:, group : group + 1]
            elif col % g == 0:
                current = W1[:, i : i + g]
                if i + g > count:  # the group runs past this block: bring its later columns up to date
                    end = min(col + g, columns)
                    tail = W[:, i2:end] - Err1[:, :i] @ U[i1 : i1 + i, i2:end]
                    current = torch.cat([W1[:, i:], tail], dim=1)
                s, z = row_qparams(current, spec, clip)
                scales.append(s)
                zeros.append(z)
            w = W1[:, i]
            d = U1[i, i]
            q = fake_quantize_dense(w.unsqueeze(1), s, z, maxq).squeeze(1)
            Q1[:, i] = q
            err = (w - q) / d
            loss += float(((w - q) ** 2).sum() / d**2) / 2
            W1[:, i:] -= err.unsqueeze(1) @ U1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    if static is not None:
        scale_t, zero_t = static
        g_idx = default_g_idx(columns, spec.group_size, W.device)
    else:
        scale_t, zero_t = torch.cat(scales, dim=1), torch.cat(zeros, dim=1)
        g_idx = default_g_idx(columns, spec.group_size, W.device)
        if group_order is not None:  # the k-th group processed is the original group group_order[k]
            scale_t = torch.empty_like(scale_t).index_copy_(1, group_order, scale_t)
            zero_t = torch.empty_like(zero_t).index_copy_(1, group_order, zero_t)
        elif perm is not None:
            # the k-th column processed (original column perm[k]) belongs to group k // g
            g_idx = torch.empty_like(g_idx).scatter_(0, perm, g_idx)
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return GPTQResult(Q, scale_t, zero_t, g_idx.int(), damp, loss)
