"""llama.cpp's block formats for weights (ggml-common.h) that hold a qatcli grid exactly, code for code.

Each block covers ``block`` consecutive weights of one row and stores an fp16 scale ``d`` (Q4_1 also an fp16
offset ``m``) and packed codes:

| type | ggml id | block | stored value of code c | qatcli grid (levels s * (q - z)) |
|---|---|---|---|---|
| Q2_0 | 42 | 64 | (c - 1) * d, c in 0..3 | symmetric 2-bit g64: d = -s, c = 3 - q |
| Q4_0 | 2 | 32 | (c - 8) * d, c in 0..15 | symmetric 4-bit g32: d = s, c = q |
| Q4_1 | 3 | 32 | c * d + m, c in 0..15 | asymmetric 4-bit g32: d = s, c = q, m = fp16(-s * z) |
| Q8_0 | 8 | 32 | c * d, c int8 | symmetric 8-bit g32: d = s, c = q - 128 |

Q2_0's levels {-1, 0, 1, 2} * d are qatcli's {-2, -1, 0, 1} * s mirrored, hence the negative d. Q4_1's offset is
the one value that is not exact: fp16(-s * z) can differ from -s * z by half an fp16 ulp, which
:func:`offset_error` measures. Everything here is plain numpy on little-endian bytes; the reader
(:func:`decode`) is what the tests check llama.cpp's own dequantization against.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BlockType:
    name: str
    ggml_type: int  # GGMLQuantizationType
    file_type: int  # LlamaFileType of a file whose weights are mostly this type
    block: int  # weights per block (the qatcli group size)
    bits: int
    sym: bool

    @property
    def bytes_per_block(self) -> int:
        return 2 * (1 if self.sym else 2) + self.block * self.bits // 8

    @property
    def target(self) -> str:
        return f"gguf:{self.name.lower()}"


BLOCK_TYPES = {
    t.name: t
    for t in (
        BlockType("Q2_0", 42, 41, 64, 2, True),
        BlockType("Q4_0", 2, 2, 32, 4, True),
        BlockType("Q4_1", 3, 3, 32, 4, False),
        BlockType("Q8_0", 8, 7, 32, 8, True),
    )
}


def block_type_for(bits: int, group_size: int, sym: bool) -> BlockType | None:
    """The block type that stores this grid exactly, if one does."""
    return next(
        (t for t in BLOCK_TYPES.values() if (t.bits, t.block, t.sym) == (bits, group_size, sym)),
        None,
    )


def _fp16_bytes(values: np.ndarray) -> np.ndarray:
    """[rows, blocks] float16 values as [rows, blocks, 2] little-endian bytes."""
    return values.astype("<f2").view(np.uint8).reshape(*values.shape, 2)


def _nibbles(codes: np.ndarray) -> np.ndarray:
    """[rows, blocks, 32] codes in 0..15 as 16 bytes a block: byte j holds code j (low) and code j + 16 (high)."""
    return (codes[..., :16] | (codes[..., 16:] << 4)).astype(np.uint8)


def encode(t: BlockType, codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray) -> np.ndarray:
    """A [rows, in] weight on a qatcli grid (codes uint8, per-block fp16 ``scales`` and integer ``zeros``, both
    [rows, in / block]) as [rows, bytes per row] of blocks of type ``t``."""
    rows, cols = codes.shape
    if cols % t.block:
        raise ValueError(f"{t.name} needs rows that are multiples of {t.block} weights, got {cols}")
    blocks = cols // t.block
    q = codes.astype(np.int16).reshape(rows, blocks, t.block)
    s = scales.astype(np.float16).reshape(rows, blocks)
    if t.sym and not (zeros == 2 ** (t.bits - 1)).all():
        raise ValueError(f"{t.name} stores a symmetric grid (zero point {2 ** (t.bits - 1)})")
    if t.name == "Q2_0":
        c = (3 - q).astype(np.uint8)
        packed = (c[..., 0::4] | (c[..., 1::4] << 2) | (c[..., 2::4] << 4) | (c[..., 3::4] << 6)).astype(np.uint8)
        head = _fp16_bytes(-s)
    elif t.name == "Q4_0":
        packed, head = _nibbles(q.astype(np.uint8)), _fp16_bytes(s)
    elif t.name == "Q4_1":
        m = offsets(s, zeros.reshape(rows, blocks))
        packed, head = _nibbles(q.astype(np.uint8)), np.concatenate([_fp16_bytes(s), _fp16_bytes(m)], axis=-1)
    else:  # Q8_0
        packed, head = (q - 128).astype(np.int8).view(np.uint8), _fp16_bytes(s)
    return np.concatenate([head, packed], axis=-1).reshape(rows, blocks * t.bytes_per_block)


def offsets(scales: np.ndarray, zeros: np.ndarray) -> np.ndarray:
    """Q4_1's per-block offsets m = -s * z, rounded to fp16 as the block stores them."""
    return (-scales.astype(np.float32) * zeros.astype(np.float32)).astype(np.float16)


def offset_error(scales: np.ndarray, zeros: np.ndarray) -> float:
    """The largest change Q4_1's fp16 offset makes to a weight, in units of its block's scale."""
    s = scales.astype(np.float32)
    exact = -s * zeros.astype(np.float32)
    return float((np.abs(offsets(scales, zeros).astype(np.float32) - exact) / np.maximum(s, 1e-30)).max(initial=0))


def decode(t: BlockType, data: np.ndarray, cols: int) -> np.ndarray:
    """[rows, bytes per row] blocks of type ``t`` as float32 weights [rows, cols], by ggml's formulas."""
    rows = data.shape[0]
    blocks = cols // t.block
    raw = data.reshape(rows, blocks, t.bytes_per_block)
    d = raw[..., :2].copy().view("<f2")[..., 0].astype(np.float32)[..., None]
    if t.name == "Q2_0":
        qs = raw[..., 2:]
        c = np.stack([(qs >> shift) & 3 for shift in (0, 2, 4, 6)], axis=-1).reshape(rows, blocks, t.block)
        values = (c.astype(np.float32) - 1) * d
    elif t.name in ("Q4_0", "Q4_1"):
        start = 2 if t.sym else 4
        qs = raw[..., start:]
        c = np.concatenate([qs & 15, qs >> 4], axis=-1).astype(np.float32)
        if t.sym:
            values = (c - 8) * d
        else:
            m = raw[..., 2:4].copy().view("<f2")[..., 0].astype(np.float32)[..., None]
            values = c * d + m
    else:
        values = raw[..., 2:].copy().view(np.int8).astype(np.float32) * d
    return values.reshape(rows, cols)
