"""Size on disk of GPTQ-format exports against theory, and the exported model's perplexity against the checkpoint's.

For each checkpoint: export with fp16 dense tensors (the deployable form) and with fp32 dense tensors (the
exact form), measure the files, and evaluate checkpoint and both exports on the same windows. The fp16
row is the full-precision model saved in fp16. Appends the table to docs/results.md.

    python benchmarks/export_smollm2.py runs/bench-ptq/gptq-w4-g64 runs/bench-ptq/gptq-w3-g64 runs/bench-ptq/gptq-w2-g64
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import safe_open

from qatcli.models.loading import load_model, resolve_model

sys.path.insert(0, str(Path(__file__).parent))
from common import REPO, TEST_DATA, machine, publish


def qatcli(*args: str) -> None:
    print("$ qatcli " + shlex.join(args), flush=True)
    subprocess.run([sys.executable, "-m", "qatcli", *args], check=True)


def weight_files_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def split_bytes(directory: Path) -> tuple[int, int]:
    """(bytes of packed-layer tensors, bytes of everything else) in a directory's safetensors files."""
    packed = dense = 0
    for path in directory.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            names = list(f.keys())
            layers = {n.rsplit(".", 1)[0] for n in names if n.endswith(".qweight")}
            for name in names:
                t = f.get_slice(name)
                shape = t.get_shape()
                numel = 1
                for d in shape:
                    numel *= d
                size = numel * {"F16": 2, "BF16": 2, "F32": 4, "I32": 4, "U8": 1, "I64": 8}[t.get_dtype()]
                if name.rsplit(".", 1)[0] in layers:
                    packed += size
                else:
                    dense += size
    return packed, dense


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--data", default=TEST_DATA)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=64)
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench-export")
    parser.add_argument("--results", type=Path, default=REPO / "docs" / "results.md")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)

    base = json.loads((args.checkpoints[0] / "qatcli.json").read_text())["base_model"]["spec"]
    fp16_dir = args.workdir / "fp16"
    if not fp16_dir.is_dir():
        load_model(resolve_model(base), torch.device("cpu")).half().save_pretrained(fp16_dir)
    fp16_linear = json.loads((args.checkpoints[0] / "qatcli.json").read_text())["metrics"]["fp16_bytes"]

    rows, evals = [], []
    for ckpt in args.checkpoints:
        meta = json.loads((ckpt / "qatcli.json").read_text())
        q = meta["quantization"]
        exports = {}
        for dtype in ("float16", "float32"):
            out = args.workdir / f"{ckpt.name}-{dtype}"
            qatcli("export", str(ckpt), "-o", str(out), "--dtype", dtype, "--force")
            exports[dtype] = out
        packed, dense = split_bytes(exports["float16"])
        bits, g = q["bits"], q["group_size"]
        groups_x_out = sum(
            (info["in_features"] // (g if g != -1 else info["in_features"])) * info["out_features"]
            for info in meta["layers"].values()
        )
        in_total = sum(info["in_features"] for info in meta["layers"].values())
        theory = fp16_linear * bits // 16 + groups_x_out * 2 + groups_x_out * bits // 8
        rows.append(
            (
                ckpt.name,
                meta["method"],
                bits,
                g,
                weight_files_bytes(exports["float16"]),
                packed,
                theory,
                in_total * 4,
                dense,
            )
        )
        evals += [str(ckpt), str(exports["float32"]), str(exports["float16"])]

    eval_json = args.workdir / "eval.json"
    qatcli(
        "eval",
        *evals,
        "--data",
        args.data,
        "--seqlen",
        str(args.seqlen),
        "--max-windows",
        str(args.max_windows),
        "--json",
        str(eval_json),
        "--force",
    )
    ppl = {r["name"]: r for r in json.loads(eval_json.read_text())}

    _, fp16_dense = split_bytes(fp16_dir)
    lines = [
        f"### GPTQ-format exports: size and fidelity ({datetime.now(timezone.utc).strftime('%Y-%m-%d')})",
        "",
        f"Command: `python benchmarks/export_smollm2.py {shlex.join(sys.argv[1:])}`  ",
        f"Machine: {machine()}  ",
        "Size: the safetensors files of the export with fp16 dense tensors (embeddings/lm_head tied, norms). "
        "Theory for the quantized layers: bits/16 of their fp16 weights + fp16 scales + b-bit zeros "
        "(g_idx, 4 bytes per input column, listed apart). "
        f"Perplexity: `{Path(args.data).name}`, {args.max_windows} windows x {args.seqlen}; the fp32 export "
        "must equal the checkpoint exactly, the fp16 export differs only by fp16 rounding of the dense tensors.",
        "",
        "| model | bits | group | files (MiB) | packed layers (MiB) | theory (MiB) | g_idx (MiB) | dense (MiB) "
        "| ppl checkpoint | ppl export fp32 | ppl export fp16 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| fp16 model | 16 | - | {weight_files_bytes(fp16_dir) / 2**20:.2f} | {fp16_linear / 2**20:.2f} "
        f"| {fp16_linear / 2**20:.2f} | - | {(fp16_dense - fp16_linear) / 2**20:.2f} | - | - | - |",
    ]
    for i, (name, _method, bits, g, files, packed, theory, g_idx, dense) in enumerate(rows):
        ck, e32, e16 = (ppl[evals[3 * i + k]]["ppl"] for k in range(3))
        lines.append(
            f"| {name} | {bits} | {g} | {files / 2**20:.2f} | {packed / 2**20:.2f} | {theory / 2**20:.2f} "
            f"| {g_idx / 2**20:.2f} | {dense / 2**20:.2f} | {ck:.4f} | {e32:.4f} | {e16:.4f} |"
        )
    text = "\n".join(lines) + "\n"
    publish(text, args.results)


if __name__ == "__main__":
    main()
