"""The quantization grid against the formulas of DESIGN.md section 2."""

from __future__ import annotations

import pytest
import torch

from qatcli.quant.grid import (
    QuantSpec,
    clip_error,
    default_g_idx,
    dequantize,
    fake_quantize,
    group_qparams,
    packed_bytes,
    quantize,
    row_qparams,
    to_fp16_grid,
)

BITS = (2, 3, 4, 8)


def weights(out: int = 16, inp: int = 128, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=gen) * 0.02
    w[0, 5] = 0.3  # an outlier
    w[1] = w[1].abs() + 0.01  # an all-positive row: the asymmetric range must still contain 0
    return w


def grid(w: torch.Tensor, spec: QuantSpec):
    scales, zeros = group_qparams(w, spec)
    g_idx = default_g_idx(w.shape[1], spec.group_size)
    return scales, zeros, g_idx


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [-1, 16, 32, 64, 128])
def test_codes_in_range_and_error_at_most_half_step(bits: int, sym: bool, group_size: int) -> None:
    spec = QuantSpec(bits, group_size, sym)
    w = weights()
    scales, zeros, g_idx = grid(w, spec)
    assert scales.shape == zeros.shape == (16, 1 if group_size == -1 else 128 // group_size)
    codes = quantize(w, scales, zeros, g_idx, spec.maxq)
    assert codes.dtype == torch.uint8
    assert int(codes.min()) >= 0 and int(codes.max()) <= spec.maxq
    s = scales[:, g_idx.long()]
    z = zeros[:, g_idx.long()]
    position = w / s + z
    inside = (position >= -0.5) & (position <= spec.maxq + 0.5)
    # Only the extremes can fall outside (the symmetric grid has one level fewer above 0 than below).
    assert inside.float().mean() > 0.9
    err = (dequantize(codes, scales, zeros, g_idx) - w).abs()
    assert bool((err[inside] <= s[inside] / 2 * (1 + 1e-5)).all())


@pytest.mark.parametrize("bits", BITS)
def test_symmetric_matches_formula(bits: int) -> None:
    spec = QuantSpec(bits, 32, sym=True)
    w = weights()
    scales, zeros, _ = grid(w, spec)
    groups = w.reshape(16, -1, 32)
    expected = (2 * groups.abs().amax(dim=2) / spec.maxq).half().float()
    torch.testing.assert_close(scales, expected, rtol=0, atol=0)
    assert bool((zeros == 2 ** (bits - 1)).all())


@pytest.mark.parametrize("bits", BITS)
def test_asymmetric_matches_formula(bits: int) -> None:
    spec = QuantSpec(bits, 32, sym=False)
    w = weights()
    scales, zeros, _ = grid(w, spec)
    groups = w.reshape(16, -1, 32)
    lo = groups.amin(dim=2).clamp_max(0)
    hi = groups.amax(dim=2).clamp_min(0)
    expected_s = ((hi - lo) / spec.maxq).half().float()
    torch.testing.assert_close(scales, expected_s, rtol=0, atol=0)
    torch.testing.assert_close(zeros, torch.round(-lo / expected_s).clamp(0, spec.maxq), rtol=0, atol=0)


def test_two_bit_symmetric_levels() -> None:
    spec = QuantSpec(2, -1, sym=True)
    w = torch.tensor([[-1.0, -0.5, 0.0, 0.5, 0.74]])
    scales, zeros = row_qparams(w, spec)
    assert float(scales) == pytest.approx(2 / 3, rel=1e-3) and float(zeros) == 2
    deq = fake_quantize(w, scales, zeros, default_g_idx(5, -1), spec.maxq)
    levels = torch.tensor([-2.0, -1.0, 0.0, 1.0]) * scales.item()
    assert all(torch.isclose(levels, v).any() for v in deq.flatten())


@pytest.mark.parametrize("sym", [True, False])
def test_scales_are_fp16_values(sym: bool) -> None:
    scales, _ = group_qparams(weights(seed=3), QuantSpec(4, 64, sym))
    assert scales.dtype == torch.float32
    assert torch.equal(scales.half().float(), scales)
    assert bool((scales > 0).all())


def test_zero_group_quantizes_to_zero() -> None:
    w = torch.zeros(2, 32)
    for sym in (True, False):
        spec = QuantSpec(3, 16, sym)
        scales, zeros, g_idx = grid(w, spec)
        assert torch.equal(fake_quantize(w, scales, zeros, g_idx, spec.maxq), w)


def test_permuted_g_idx_uses_each_columns_group() -> None:
    spec = QuantSpec(4, 32, sym=False)
    w = weights()
    scales, zeros, _ = grid(w, spec)
    g_idx = default_g_idx(128, 32)[torch.randperm(128, generator=torch.Generator().manual_seed(1))]
    codes = quantize(w, scales, zeros, g_idx, spec.maxq)
    for col in (0, 17, 100):
        g = int(g_idx[col])
        expected = torch.clamp(torch.round(w[:, col] / scales[:, g]) + zeros[:, g], 0, 15)
        assert torch.equal(codes[:, col].float(), expected)


def test_group_size_must_divide() -> None:
    with pytest.raises(ValueError, match="does not divide"):
        group_qparams(weights(inp=96), QuantSpec(4, 64))


@pytest.mark.parametrize("bad", [1, 5, 16])
def test_unsupported_bits_refused(bad: int) -> None:
    with pytest.raises(ValueError):
        QuantSpec(bad)


def test_packed_bytes_counts_gptq_tensors() -> None:
    # 4-bit, 64 x 128 layer, g32: qweight 4096 B, qzeros 4*64/2 = 128 B, scales 4*64*2 = 512 B, g_idx 512 B
    assert packed_bytes(64, 128, QuantSpec(4, 32)) == 4096 + 128 + 512 + 512


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym", [True, False])
def test_mse_clipping_is_never_worse_than_minmax_on_its_objective(bits: int, sym: bool) -> None:
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(48, 64, generator=gen) * torch.rand(48, 1, generator=gen)
    w[0, 3] = 9.0  # an outlier the search should clip
    spec = QuantSpec(bits, 32, sym)
    rows = w.reshape(-1, 32)
    base = clip_error(rows, *row_qparams(rows, spec), spec)
    searched = clip_error(rows, *row_qparams(rows, spec, "mse"), spec)
    assert bool((searched <= base).all())
    if bits < 8:  # at 8 bits the min/max grid can already be the best one
        assert float(searched.sum()) < float(base.sum())
    scales, zeros = group_qparams(w, spec, "mse")
    codes = quantize(w, scales, zeros, default_g_idx(64, 32), spec.maxq)
    assert int(codes.max()) <= spec.maxq and torch.equal(scales, to_fp16_grid(scales))


def test_unknown_clip_method_is_refused() -> None:
    with pytest.raises(ValueError, match="clip must be one of"):
        row_qparams(torch.ones(2, 4), QuantSpec(4, 4), "percentile")
