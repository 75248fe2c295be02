"""The quantization grid: the one definition of how weights become integer codes and back.

Every method (RTN, GPTQ, QAT), eval and export call these functions; nothing else rounds weights.

Shapes follow torch's Linear: W is [out, in]. Groups are runs of ``group_size`` input columns
(``-1``: one group per row). Per-group parameters are [out, G]; ``g_idx`` ([in]) maps each input
column to its group, which is how act-order checkpoints permute groups without moving columns.

    q = clamp(round(w / s) + z, 0, maxq)        w_q = s * (q - z)

Scales are rounded to fp16 here, once, because the deployable format stores them as fp16: the
fake-quantized weights of a checkpoint and the dequantized weights of its export are then equal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
# The smallest positive fp16 value: a scale must survive the cast to fp16 without becoming 0.
_MIN_SCALE = 2.0**-24


@dataclass(frozen=True)
class QuantSpec:
    """How one Linear is quantized: bit width, group size (-1 = per row) and symmetry."""

    bits: int
    group_size: int = 128
    sym: bool = True

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.group_size != -1 and self.group_size < 1:
            raise ValueError(f"group_size must be -1 or a positive integer, got {self.group_size}")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def effective_group_size(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def fits(self, in_features: int) -> bool:
        return self.group_size == -1 or in_features % self.group_size == 0

    def num_groups(self, in_features: int) -> int:
        return in_features // self.effective_group_size(in_features)


def to_fp16_grid(scales: torch.Tensor) -> torch.Tensor:
    """Round scales to fp16 (as stored on export) and return them as float32, never 0."""
    return scales.to(torch.float16).float().clamp_min(_MIN_SCALE)


CLIP_METHODS = ("minmax", "mse")
# The MSE search shrinks the range by factors 1, 1 - 1/CLIP_GRID, ... down to 1 - CLIP_MAX_SHRINK and keeps,
# per row, the one with the smallest sum |w - w_q|^CLIP_NORM (the GPTQ reference's `mse` option uses the same
# grid and norm).
CLIP_GRID = 100
CLIP_MAX_SHRINK = 0.8
CLIP_NORM = 2.4


def row_qparams(w: torch.Tensor, spec: QuantSpec, clip: str = "minmax") -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of each row of ``w`` ([rows, n]) taken as one group; both [rows, 1].

    As in the GPTQ reference, the asymmetric range always contains 0, so the zero point is a
    representable code and an all-zero group quantizes to exact zeros. ``clip="mse"`` then shrinks each
    row's range to the factor that minimises its rounding error (never worse than min/max on that error).
    """
    w = w.float()
    wmin = w.amin(dim=1, keepdim=True).clamp_max(0)
    wmax = w.amax(dim=1, keepdim=True).clamp_min(0)
    scales, zeros = _range_qparams(wmin, wmax, spec)
    if clip == "minmax":
        return scales, zeros
    if clip != "mse":
        raise ValueError(f"clip must be one of {CLIP_METHODS}, got {clip!r}")
    best = clip_error(w, scales, zeros, spec)
    for i in range(1, int(CLIP_MAX_SHRINK * CLIP_GRID) + 1):
        factor = 1 - i / CLIP_GRID
        s, z = _range_qparams(wmin * factor, wmax * factor, spec)
        err = clip_error(w, s, z, spec)
        better = err < best
        best = torch.where(better, err, best)
        scales = torch.where(better, s, scales)
        zeros = torch.where(better, z, zeros)
    return scales, zeros


def clip_error(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The clipping search's objective per row: sum |w - w_q|^CLIP_NORM, [rows, 1]."""
    return (fake_quantize_dense(w, scales, zeros, spec.maxq) - w).abs_().pow_(CLIP_NORM).sum(1, keepdim=True)


def _range_qparams(wmin: torch.Tensor, wmax: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    maxq = spec.maxq
    if spec.sym:
        absmax = torch.maximum(wmin.abs(), wmax)
        absmax = torch.where(absmax == 0, torch.ones_like(absmax), absmax)
        scales = to_fp16_grid(2 * absmax / maxq)
        zeros = torch.full_like(scales, (maxq + 1) // 2)
    else:
        empty = (wmax - wmin) == 0
        wmin = torch.where(empty, -torch.ones_like(wmin), wmin)
        wmax = torch.where(empty, torch.ones_like(wmax), wmax)
        scales = to_fp16_grid((wmax - wmin) / maxq)
        zeros = torch.round(-wmin / scales).clamp(0, maxq)
    return scales, zeros


def default_g_idx(in_features: int, group_size: int, device: torch.device | None = None) -> torch.Tensor:
    """Group index of each input column for contiguous groups: g_idx[i] = i // group_size."""
    g = in_features if group_size == -1 else group_size
    return torch.arange(in_features, device=device, dtype=torch.int32) // g


def group_qparams(w: torch.Tensor, spec: QuantSpec, clip: str = "minmax") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group scales and zero points of W ([out, in]) for contiguous groups; both [out, G] float32."""
    out_features, in_features = w.shape
    if not spec.fits(in_features):
        raise ValueError(f"group size {spec.group_size} does not divide in_features {in_features}")
    g = spec.effective_group_size(in_features)
    scales, zeros = row_qparams(w.reshape(out_features * (in_features // g), g), spec, clip)
    return scales.reshape(out_features, -1), zeros.reshape(out_features, -1)


def _per_column(params: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    return params.index_select(1, g_idx.to(device=params.device, dtype=torch.long))


def round_to_grid(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, maxq: int) -> torch.Tensor:
    """The rounding rule itself, q = clamp(round(w / s) + z, 0, maxq), with s and z broadcast to w (float)."""
    # in place on the fresh quotient: every new weight-sized tensor costs time (page faults on the CPU)
    return (w.float() / s).round_().add_(z).clamp_(0, maxq)


def quantize(
    w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor, maxq: int
) -> torch.Tensor:
    """Integer codes of W ([out, in]) on the grid given by per-group ``scales``/``zeros`` ([out, G])."""
    s = _per_column(scales.float(), g_idx)
    z = _per_column(zeros.float(), g_idx)
    return round_to_grid(w, s, z, maxq).to(torch.uint8)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """Weights s * (q - z) in float32 from codes ([out, in]) and per-group parameters ([out, G])."""
    s = _per_column(scales.float(), g_idx)
    z = _per_column(zeros.float(), g_idx)
    return s * (codes.float() - z)


def fake_quantize_dense(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, maxq: int) -> torch.Tensor:
    """s * (q - z) with s and z broadcast to w: the quantized value of each weight (float32)."""
    # in place on round_to_grid's fresh result: each new weight-sized tensor costs page faults on the CPU
    return round_to_grid(w, s, z, maxq).sub_(z).mul_(s)


def fake_quantize(
    w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor, maxq: int
) -> torch.Tensor:
    """dequantize(quantize(w)): the weights a quantized model actually computes with (no gradient rule)."""
    return dequantize(quantize(w, scales, zeros, g_idx, maxq), scales, zeros, g_idx)


def packed_bytes(out_features: int, in_features: int, spec: QuantSpec) -> int:
    """Bytes the layer takes in the GPTQ format: qweight + qzeros + fp16 scales + int32 g_idx."""
    groups = spec.num_groups(in_features)
    qweight = in_features * out_features * spec.bits // 8
    qzeros = groups * out_features * spec.bits // 8
    scales = groups * out_features * 2
    g_idx = in_features * 4
    return qweight + qzeros + scales + g_idx
