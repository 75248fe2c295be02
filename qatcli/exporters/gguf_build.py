"""Build a GGUF file from a dense model directory and the codes of its quantized layers (run as a program).

qatcli's exporter (qatcli/exporters/gguf.py) runs this in a child process whose import path starts with a
llama.cpp source tree, so that ``gguf`` and ``convert_hf_to_gguf`` are llama.cpp's own (the gguf package on
PyPI predates Q2_0). The steps:

1. llama.cpp's converter writes the dense model (the checkpoint's dequantized weights) as an f32 GGUF: every
   key of the model's metadata and tokenizer, every tensor under its llama.cpp name and layout.
2. Each quantized layer's tensor in that file is located by llama.cpp's own name map and stored again as its
   block type, from the layer's integer codes and fp16 scales: no second rounding. The converter may permute
   rows (Llama's q/k heads); rows are matched to the layer's rows by their exact values, and the encoded blocks
   must decode to exactly the f32 tensor (Q4_1: to its offsets' fp16 rounding, which is reported).
3. The other tensors are written in the dense type asked for (norms stay f32), with every metadata key of step
   1, ``general.file_type`` set from the block types, and qatcli's provenance under ``qatcli.*``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file

from qatcli.formats.gguf_blocks import BLOCK_TYPES, BlockType, decode, encode, offset_error


def _byte_level_pre_tokenizer(model_dir: Path) -> bool:
    """Whether the tokenizer splits text as GPT-2 does (a plain ByteLevel pre-tokenizer with its regex), which is
    llama.cpp's 'gpt-2' pre-tokenizer whatever the vocabulary."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return False
    pre = json.loads(path.read_text()).get("pre_tokenizer") or {}
    return pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False)


def convert_dense(model_dir: Path, out: Path) -> None:
    """llama.cpp's convert_hf_to_gguf on ``model_dir``, all tensors f32. A BPE vocabulary the converter does not
    recognise by its hash gets the 'gpt-2' pre-tokenizer where its pre-tokenizer is GPT-2's (the models made by
    tests and by users who train their own tokenizer); any other stays an error."""
    import convert_hf_to_gguf
    from conversion import base

    original = base.TextModel.get_vocab_base_pre

    def vocab_base_pre(self: Any, tokenizer: Any) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            if _byte_level_pre_tokenizer(Path(self.dir_model)):
                return "gpt-2"
            raise

    base.TextModel.get_vocab_base_pre = vocab_base_pre
    sys.argv = ["convert_hf_to_gguf", str(model_dir), "--outtype", "f32", "--outfile", str(out)]
    convert_hf_to_gguf.main()


def _match_rows(converted: np.ndarray, dequantized: np.ndarray, name: str) -> np.ndarray:
    """The row of ``dequantized`` that each row of ``converted`` is, by exact value."""
    index: dict[bytes, int] = {}
    for i, row in enumerate(dequantized):
        index.setdefault(row.tobytes(), i)
    order = np.array([index.get(row.tobytes(), -1) for row in converted])
    if converted.shape != dequantized.shape or (order < 0).any():
        raise SystemExit(f"{name}: the converter changed this layer beyond a permutation of its rows")
    return order


def _copy_metadata(reader: Any, writer: Any, gguf: Any) -> None:
    skip = {"general.architecture", "general.file_type"}
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in skip:
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub_type)


def _dense(data: np.ndarray, name: str, dense: str, embedding: str, gguf: Any) -> tuple[np.ndarray, Any]:
    """A tensor that is not a quantized layer, in the type asked for (1-D tensors, the norms, stay f32)."""
    kind = embedding if name == "token_embd.weight" else dense
    if data.ndim == 1 or kind == "f32":
        return data.astype(np.float32), None
    if kind == "f16":
        return data.astype(np.float16), None
    qtype = gguf.GGMLQuantizationType[kind.upper()]  # BF16, Q8_0
    return gguf.quants.quantize(data.astype(np.float32), qtype), qtype


def build(model_dir: Path, layers_file: Path, plan: dict[str, Any], out: Path) -> dict[str, Any]:
    import gguf

    if not hasattr(gguf.GGMLQuantizationType, "Q2_0"):
        raise SystemExit(f"the gguf package at {gguf.__file__} predates Q2_0: use llama.cpp's own gguf-py")
    raw = out.with_name(out.name + ".f32")
    convert_dense(model_dir, raw)
    reader = gguf.GGUFReader(raw)
    arch = reader.fields["general.architecture"].contents()
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_enum, int(reader.fields[f"{arch}.block_count"].contents()))
    codes = load_file(str(layers_file))
    quantized: dict[str, tuple[str, BlockType]] = {}
    for layer, type_name in plan["layers"].items():
        gguf_name = names.get_name(f"{layer}.weight", try_suffixes=(".weight",))
        if gguf_name is None:
            raise SystemExit(f"{layer}: llama.cpp's {arch} name map has no tensor for this layer")
        quantized[gguf_name] = (layer, BLOCK_TYPES[type_name])

    writer = gguf.GGUFWriter(out, arch=arch)
    _copy_metadata(reader, writer, gguf)
    types = sorted({t.name for _, t in quantized.values()})
    if not types:  # a full-precision model
        file_type = {"f32": gguf.LlamaFileType.ALL_F32, "bf16": gguf.LlamaFileType.MOSTLY_BF16}.get(
            plan["dense"], gguf.LlamaFileType.MOSTLY_F16
        )
    else:
        file_type = BLOCK_TYPES[types[0]].file_type if len(types) == 1 else gguf.LlamaFileType.GUESSED
    writer.add_file_type(int(file_type))
    for key, value in {**plan["metadata"], "file_type": int(file_type)}.items():
        writer.add_string(f"qatcli.{key}", str(value))

    report: dict[str, Any] = {"tensors": {}, "q4_1_offset_error": 0.0}
    written = set()
    for tensor in reader.tensors:
        data = np.asarray(tensor.data)
        if tensor.name in quantized:
            layer, t = quantized[tensor.name]
            q, s, z = codes[f"{layer}.codes"], codes[f"{layer}.scales"], codes[f"{layer}.zeros"]
            dequantized = s.astype(np.float32).repeat(t.block, axis=1) * (
                q.astype(np.float32) - z.repeat(t.block, axis=1)
            )
            order = _match_rows(data, dequantized, layer)
            blocks = encode(t, q[order], s[order], z[order])
            back = decode(t, blocks, q.shape[1])
            if t.sym and not np.array_equal(back, data):
                raise SystemExit(f"{layer}: the {t.name} blocks do not decode to the checkpoint's weights")
            if not t.sym:
                report["q4_1_offset_error"] = max(report["q4_1_offset_error"], offset_error(s, z))
            writer.add_tensor(tensor.name, blocks, raw_dtype=gguf.GGMLQuantizationType(t.ggml_type))
            report["tensors"][tensor.name] = t.name
            written.add(tensor.name)
        else:
            array, qtype = _dense(data, tensor.name, plan["dense"], plan["embedding"], gguf)
            writer.add_tensor(tensor.name, array, raw_dtype=qtype)
            report["tensors"][tensor.name] = qtype.name if qtype is not None else array.dtype.name
    if missing := sorted(set(quantized) - written):
        raise SystemExit(f"the converted file has no tensor {', '.join(missing)}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    raw.unlink()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("layers", type=Path, help="safetensors: <layer>.codes, .scales, .zeros of each layer")
    parser.add_argument("plan", type=Path, help="JSON: layers -> block type, dense, embedding, metadata")
    parser.add_argument("out", type=Path)
    parser.add_argument("report", type=Path, help="JSON written here: each tensor's type, Q4_1's offset error")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    report = build(args.model_dir, args.layers, json.loads(args.plan.read_text()), args.out)
    args.report.write_text(json.dumps(report))


if __name__ == "__main__":
    main()
