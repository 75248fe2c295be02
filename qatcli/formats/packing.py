"""Bit packing of integer codes into int32 words, as the GPTQ format and compressed-tensors' pack-quantized
format store them.

Every bit width uses one rule: 32 consecutive values form a little-endian bit stream of 32*b bits, value j
at bits [b*j, b*j + b), cut into b words of 32 bits. For 2, 4 and 8 bits this is the familiar
``word = sum_j v[j] << (b*j)``; for 3 bits it gives the layout GPTQ uses, where values 10 and 21 straddle
word boundaries. Packing runs along a chosen dimension (input rows for qweight, output columns for qzeros).
compressed-tensors packs the same stream (since its pull request 732) and takes any length: :func:`pack_any`.
"""

from __future__ import annotations

import torch

_WORD = 32
_MASK32 = (1 << 32) - 1


def _bit_positions(bits: int) -> list[tuple[int, int, int]]:
    """For each of the 32 values of a chunk: (value index, word index, bit offset in that word)."""
    return [(j, (bits * j) // _WORD, (bits * j) % _WORD) for j in range(_WORD)]


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Reinterpret unsigned 32-bit values held in int64 as int32 (two's complement)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack integer ``values`` in [0, 2^bits) along ``dim`` (whose size must be a multiple of 32)."""
    values = values.movedim(dim, 0).to(torch.int64)
    n = values.shape[0]
    if n % _WORD:
        raise ValueError(f"cannot pack {n} values along dim {dim}: not a multiple of 32")
    chunks = values.reshape(n // _WORD, _WORD, *values.shape[1:])
    words = torch.zeros(n // _WORD, bits, *values.shape[1:], dtype=torch.int64, device=values.device)
    for j, word, offset in _bit_positions(bits):
        v = chunks[:, j]
        words[:, word] |= (v << offset) & _MASK32
        if offset + bits > _WORD:  # the value's high bits continue in the next word
            words[:, word + 1] |= v >> (_WORD - offset)
    return _to_int32(words.reshape(n // _WORD * bits, *values.shape[1:])).movedim(0, dim).contiguous()


def pack_any(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """:func:`pack` for any length along ``dim``: zeros pad it to a multiple of 32, and only the
    ceil(n * b / 32) words that hold a value are kept (words beyond them would hold padding alone)."""
    n = values.shape[dim]
    padded = -n % _WORD
    if padded:
        pad_shape = list(values.shape)
        pad_shape[dim] = padded
        values = torch.cat([values, values.new_zeros(pad_shape)], dim=dim)
    return pack(values, bits, dim).narrow(dim, 0, -(-n * bits // _WORD)).contiguous()


def unpack(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of :func:`pack`: int32 words along ``dim`` -> int64 values in [0, 2^bits)."""
    words = words.movedim(dim, 0).to(torch.int64) & _MASK32
    n = words.shape[0]
    if n % bits:
        raise ValueError(f"{n} words along dim {dim} is not a whole number of {bits}-bit chunks")
    chunks = words.reshape(n // bits, bits, *words.shape[1:])
    mask = (1 << bits) - 1
    values = torch.empty(n // bits, _WORD, *words.shape[1:], dtype=torch.int64, device=words.device)
    for j, word, offset in _bit_positions(bits):
        v = chunks[:, word] >> offset
        if offset + bits > _WORD:
            v = v | (chunks[:, word + 1] << (_WORD - offset))
        values[:, j] = v & mask
    return values.reshape(n // bits * _WORD, *words.shape[1:]).movedim(0, dim)
