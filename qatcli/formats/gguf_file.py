"""A reader of GGUF files (version 3): the metadata and each tensor's type, shape and bytes.

Small on purpose: the gguf package on PyPI stops at tensor types it does not know (Q2_0), and this reads any
file whose tensors are of the types qatcli writes. The decoded weights are checked against llama.cpp's own
results in tests/test_gguf.py.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from qatcli.formats.gguf_blocks import BLOCK_TYPES, decode

MAGIC = b"GGUF"
# ggml type id -> (weights per block, bytes per block) of the types qatcli writes or reads
TYPE_SIZES = {0: (1, 4), 1: (1, 2), 30: (1, 2)} | {
    t.ggml_type: (t.block, t.bytes_per_block) for t in BLOCK_TYPES.values()
}
TYPE_NAMES = {0: "F32", 1: "F16", 30: "BF16"} | {t.ggml_type: t.name for t in BLOCK_TYPES.values()}
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order: rows first ([out, in] for a weight)
    ggml_type: int
    offset: int  # from the start of the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return TYPE_NAMES.get(self.ggml_type, str(self.ggml_type))


def _read(f: BinaryIO, fmt: str) -> Any:
    return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def _string(f: BinaryIO) -> str:
    return f.read(_read(f, "<Q")).decode("utf-8")


def _value(f: BinaryIO, vtype: int) -> Any:
    if vtype == _STRING:
        return _string(f)
    if vtype == _ARRAY:
        item, count = _read(f, "<I"), _read(f, "<Q")
        return [_value(f, item) for _ in range(count)]
    return _read(f, _SCALARS[vtype])


def read_gguf(path: Path) -> tuple[dict[str, Any], dict[str, TensorInfo]]:
    """The metadata and the tensor table of a GGUF file."""
    with Path(path).open("rb") as f:
        if f.read(4) != MAGIC:
            raise ValueError(f"{path} is not a GGUF file")
        version, n_tensors, n_kv = _read(f, "<I"), _read(f, "<Q"), _read(f, "<Q")
        if version != 3:
            raise ValueError(f"{path}: GGUF version {version}, this reader knows 3")
        metadata = {}
        for _ in range(n_kv):
            key = _string(f)
            metadata[key] = _value(f, _read(f, "<I"))
        infos = []
        for _ in range(n_tensors):
            name = _string(f)
            dims = [_read(f, "<Q") for _ in range(_read(f, "<I"))]
            infos.append((name, tuple(reversed(dims)), _read(f, "<I"), _read(f, "<Q")))
        alignment = int(metadata.get("general.alignment", 32))
        start = -(-f.tell() // alignment) * alignment
    tensors = {}
    for name, shape, ggml_type, offset in infos:
        block, size = TYPE_SIZES[ggml_type]
        tensors[name] = TensorInfo(name, shape, ggml_type, start + offset, int(np.prod(shape)) // block * size)
    return metadata, tensors


def tensor_values(path: Path, info: TensorInfo) -> np.ndarray:
    """The tensor as float32 values in its numpy shape, decoded by ggml's formulas."""
    raw = np.fromfile(path, dtype=np.uint8, count=info.nbytes, offset=info.offset)
    if info.ggml_type == 0:
        return raw.view("<f4").reshape(info.shape)
    if info.ggml_type == 1:
        return raw.view("<f2").astype(np.float32).reshape(info.shape)
    if info.ggml_type == 30:
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(info.shape)
    t = next((t for t in BLOCK_TYPES.values() if t.ggml_type == info.ggml_type), None)
    if t is None:
        raise ValueError(f"{info.name}: decoding {info.type_name} is not implemented here")
    rows = int(np.prod(info.shape[:-1]))
    return decode(t, raw.reshape(rows, -1), info.shape[-1]).reshape(info.shape)
