"""GPTQ bit packing: fixed words for known inputs, the 3-bit layout, and round trips."""

from __future__ import annotations

import pytest
import torch

from qatcli.formats.packing import pack, unpack


def as_unsigned(word: torch.Tensor) -> int:
    return int(word) & 0xFFFFFFFF


def test_four_bit_symmetric_v1_zero_points_are_0x77777777() -> None:
    # 4-bit sym: z = 8, format v1 stores z - 1 = 7 in every nibble of qzeros (packed along output columns).
    zeros = torch.full((2, 64), 7)
    words = pack(zeros, 4, dim=1)
    assert words.shape == (2, 8) and words.dtype == torch.int32
    assert all(as_unsigned(w) == 0x77777777 for w in words.flatten())


@pytest.mark.parametrize(("bits", "expected"), [(2, 0xE4E4E4E4), (4, 0x76543210), (8, 0x03020100)])
def test_ascending_values_pack_least_significant_first(bits: int, expected: int) -> None:
    values = torch.arange(32) % (1 << bits)
    assert as_unsigned(pack(values.unsqueeze(1), bits, dim=0)[0, 0]) == expected


def test_three_bit_layout_matches_the_gptq_description() -> None:
    # v10 = 0b101 straddles w0 (low 2 bits at 30-31) and w1 (bit 2 at bit 0); v21 = 0b011 straddles w1 (low
    # bit at 31) and w2 (bits 1-2 at 0-1); v0 = 1 at bit 0 of w0; v11 = 0b111 at bits 1-3 of w1; v22 = 0b110
    # at bits 2-4 of w2; v31 = 0b100 at bits 29-31 of w2.
    values = torch.zeros(32, dtype=torch.int64)
    values[0], values[10], values[11], values[21], values[22], values[31] = 1, 0b101, 0b111, 0b011, 0b110, 0b100
    w0, w1, w2 = (as_unsigned(w) for w in pack(values.unsqueeze(1), 3, dim=0)[:, 0])
    assert w0 == (1 << 0) | (0b01 << 30)
    assert w1 == (0b1 << 0) | (0b111 << 1) | (0b1 << 31)
    assert w2 == (0b01 << 0) | (0b110 << 2) | (0b100 << 29)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dim", [0, 1])
def test_round_trip(bits: int, dim: int) -> None:
    gen = torch.Generator().manual_seed(bits)
    shape = (64, 96) if dim == 0 else (5, 128)
    values = torch.randint(0, 1 << bits, shape, generator=gen)
    words = pack(values, bits, dim)
    assert words.shape[dim] == shape[dim] * bits // 32
    assert torch.equal(unpack(words, bits, dim), values)


def test_lengths_that_do_not_fill_words_are_refused() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        pack(torch.zeros(48, 4, dtype=torch.int64), 4, dim=0)
