"""Reference GPTQ run with GPTQModel 7.6.0, for side-by-side comparison with qatcli's GPTQ.

Run it with the interpreter of the separate environment that benchmarks/setup_gptqmodel_env.sh builds:

    bash benchmarks/setup_gptqmodel_env.sh                      # once; .venv-gptqmodel/
    .venv-gptqmodel/bin/python benchmarks/gptqmodel_reference.py \\
        --model /work/cache/models/smollm2-135m --calib calib.safetensors --eval eval.safetensors \\
        --bits 4 --group-size 64 --out runs/gptqmodel-w4g64 --json runs/gptqmodel-w4g64.json

Inputs are token windows, not text, so that both tools see exactly the same tokens:
--calib and --eval are safetensors files holding one int64 tensor `input_ids` of shape [n, seqlen].

What it does:
1. Loads the model with GPTQModel in float32 (GPTQModel quantizes a bf16 copy on the CPU unless the model is
   loaded with dtype=torch.float32).
2. Quantizes with sym=True, damp_percent=--damp (GPTQModel's default is 0.05), act_group_aware=--act-group-aware
   (off unless given; GPTQModel's own default turns it on when desc_act is False),
   desc_act / static_groups / true_sequential as given, fallback=None (no silent per-module RTN fallback),
   offload_to_disk=False (no algorithmic effect, fewer moving parts), mse=0 (plain min/max grid, the default).
   Each calibration window is one sample with an all-ones attention mask, batch size 1.
   Only the quantize() call is timed.
3. Saves the GPTQ checkpoint to --out.
4. Perplexity, eval_route "dequant_fp32": the packed qweight/qzeros/scales/g_idx of the saved checkpoint are
   unpacked and dequantized (W = fp16 scale * (q - z), computed in float32) into the original float32 model,
   whose other tensors (embeddings, norms, lm_head) stay the original float32 ones. This is exact and
   independent of GPTQModel's CPU kernels, which either do not run in float32 (GPTQ_TORCH and the aten
   int4pack kernel: fp16/bf16 only) or requantize the weights (GPTQ_TORCH_INT8). Per window: mean next-token
   cross-entropy (logits[:, :-1] against ids[:, 1:]); window means averaged with equal weights; ppl = exp(mean).
   --kernel-backend NAME additionally loads the checkpoint back through GPTQModel (e.g. gptq_torch, in
   --kernel-dtype bfloat16) and reports that perplexity as "kernel_ppl", as a cross-check of the saved artifact.

GPTQModel.load requires a tokenizer in the model directory (it is not used here: the windows are token ids);
for a model directory without one, pass --tokenizer DIR. GPTQModel writes per-module logs to ./logs; this script
runs it from a scratch directory and moves them to OUT/gptqmodel_logs. GPTQMODEL_CPU_WORKERS defaults to 2.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# GPTQModel sizes its CPU worker pool at import time; on a 2-core machine the default misbehaves.
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from safetensors import safe_open
from safetensors.torch import load_file


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local float32 HF Llama model directory")
    p.add_argument("--calib", required=True, help="safetensors file with input_ids int64 [n, seqlen]")
    p.add_argument("--eval", required=True, dest="eval_file", help="safetensors file with input_ids int64 [k, seqlen]")
    p.add_argument("--bits", type=int, required=True, choices=[2, 3, 4, 8])
    p.add_argument("--group-size", type=int, required=True)
    p.add_argument("--damp", type=float, default=0.01, help="damp_percent (GPTQModel's own default is 0.05)")
    p.add_argument("--desc-act", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument(
        "--act-group-aware",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="GPTQModel's group-aware reordering (on in GPTQModel's own defaults, off in the reference settings)",
    )
    p.add_argument("--static-groups", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--batch-size", type=int, default=1, help="calibration forward batch size (no effect on H)")
    p.add_argument("--out", required=True, help="directory GPTQModel saves the quantized checkpoint to")
    p.add_argument("--json", required=True, dest="json_file", help="where to write the result JSON")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer directory, for a --model directory without one (GPTQModel.load requires a tokenizer; "
        "it is not applied to the calibration windows, which are token ids already)",
    )
    p.add_argument(
        "--kernel-backend",
        default=None,
        help="also evaluate through GPTQModel's loader with this BACKEND value (e.g. gptq_torch)",
    )
    p.add_argument("--kernel-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    return p.parse_args(argv)


def load_windows(path: str) -> torch.Tensor:
    ids = load_file(path)["input_ids"]
    if ids.dtype != torch.int64 or ids.dim() != 2:
        raise SystemExit(f"{path}: input_ids must be int64 [n, seqlen], got {ids.dtype} {tuple(ids.shape)}")
    return ids


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


def model_dir_with_tokenizer(model: str, tokenizer: str | None, scratch: str) -> str:
    """GPTQModel.load insists on loading a tokenizer from the model directory. When the model directory has none,
    hand it a scratch directory of symlinks: the model's files plus the tokenizer files of --tokenizer."""
    model_dir = Path(model)
    has_tok = (model_dir / "tokenizer.json").exists() or (model_dir / "tokenizer.model").exists()
    if tokenizer is None:
        if not has_tok:
            raise SystemExit(f"{model_dir} has no tokenizer, which GPTQModel.load requires: pass --tokenizer DIR")
        return str(model_dir)
    merged = Path(scratch) / "model"
    merged.mkdir()
    for f in model_dir.iterdir():
        if f.name not in TOKENIZER_FILES:
            (merged / f.name).symlink_to(f.resolve())
    for name in TOKENIZER_FILES:
        if (Path(tokenizer) / name).exists():
            (merged / name).symlink_to((Path(tokenizer) / name).resolve())
    return str(merged)


# ---------------------------------------------------------------------------------------------- unpacking
def _unpack_stream(words: torch.Tensor, bits: int) -> torch.Tensor:
    """words: int32 [..., bits] holding 32 values of `bits` bits as one little-endian bit stream
    (the GPTQ layout for 2/4/8 bits and GPTQModel's non-planar 3-bit layout). Returns int64 [..., 32]."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    maxq = (1 << bits) - 1
    out = []
    for k in range(32):
        start = bits * k
        word, off = divmod(start, 32)
        v = w[..., word] >> off
        if off + bits > 32:
            v = v | (w[..., word + 1] << (32 - off))
        out.append(v & maxq)
    return torch.stack(out, dim=-1)


def unpack_qweight(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """qweight int32 [in*bits/32, out] -> codes int64 [in, out]."""
    rows, out = qweight.shape
    words = qweight.reshape(rows // bits, bits, out).permute(0, 2, 1)  # [in/32, out, bits]
    codes = _unpack_stream(words, bits)  # [in/32, out, 32]
    return codes.permute(0, 2, 1).reshape(rows // bits * 32, out)


def unpack_qzeros(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """qzeros int32 [G, out*bits/32] -> int64 [G, out]."""
    groups, cols = qzeros.shape
    words = qzeros.reshape(groups, cols // bits, bits)
    return _unpack_stream(words, bits).reshape(groups, cols // bits * 32)


def read_quant_config(out_dir: Path) -> dict:
    cfg = json.loads((out_dir / "config.json").read_text()).get("quantization_config") or {}
    qc_path = out_dir / "quantize_config.json"
    if qc_path.exists():
        cfg = {**json.loads(qc_path.read_text()), **cfg}
    return cfg


def dequantize_checkpoint(out_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Dense float32 weights [out, in] for every packed Linear of a GPTQ checkpoint directory."""
    qcfg = read_quant_config(out_dir)
    bits = int(qcfg["bits"])
    fmt = qcfg.get("checkpoint_format") or qcfg.get("format") or "gptq"
    if fmt not in ("gptq", "gptq_v2"):
        raise SystemExit(f"unsupported checkpoint format {fmt!r}")
    if qcfg.get("pack_dtype", "int32") not in ("int32", "torch.int32"):
        raise SystemExit(f"unsupported pack_dtype {qcfg.get('pack_dtype')!r}")
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(glob.glob(str(out_dir / "*.safetensors"))):
        with safe_open(f, "pt") as fh:
            for k in fh.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                tensors[k] = fh.get_tensor(k)
    dense = {}
    for key in [k for k in tensors if k.endswith(".qweight")]:
        p = key[: -len(".qweight")]
        q = unpack_qweight(tensors[key], bits)
        z = unpack_qzeros(tensors[p + ".qzeros"], bits)
        if fmt == "gptq":  # v1 stores z - 1
            z = z + 1
        s = tensors[p + ".scales"].to(torch.float32)
        g = tensors[p + ".g_idx"].to(torch.int64)
        w = s[g] * (q - z[g]).to(torch.float32)  # [in, out]
        dense[p + ".weight"] = w.t().contiguous()
        if p + ".bias" in tensors:
            dense[p + ".bias"] = tensors[p + ".bias"].to(torch.float32)
    others = {
        k: v for k, v in tensors.items() if not any(k.endswith(s) for s in (".qweight", ".qzeros", ".scales", ".g_idx"))
    }
    return dense, {"bits": bits, "format": fmt, "others": others, "qcfg": qcfg}


# ---------------------------------------------------------------------------------------------- eval
@torch.inference_mode()
def perplexity(model, windows: torch.Tensor) -> tuple[float, list[float]]:
    model.eval()
    nlls = []
    for row in windows:
        ids = row.unsqueeze(0)
        logits = model(input_ids=ids).logits.to(torch.float32)
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="mean")
        nlls.append(float(nll))
    return math.exp(sum(nlls) / len(nlls)), nlls


def main(argv=None) -> int:
    args = parse_args(argv)
    for name in ("model", "calib", "eval_file", "out", "json_file", "tokenizer"):
        if getattr(args, name) is not None:
            setattr(args, name, str(Path(getattr(args, name)).resolve()))
    calib = load_windows(args.calib)
    evalw = load_windows(args.eval_file)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    # GPTQModel's processors write per-module logs to ./logs (a hard-coded relative path,
    # gptqmodel/looper/loop_processor.py _PROJECT_LOG_DIR): run from a scratch directory, keep them in --out.
    scratch = tempfile.mkdtemp(prefix="gptqmodel-ref-")
    cwd = os.getcwd()
    os.chdir(scratch)
    try:
        args.gptq_model_dir = model_dir_with_tokenizer(args.model, args.tokenizer, scratch)
        return _run(args, calib, evalw, out_dir)
    finally:
        os.chdir(cwd)
        if os.path.isdir(os.path.join(scratch, "logs")):
            shutil.rmtree(out_dir / "gptqmodel_logs", ignore_errors=True)
            shutil.move(os.path.join(scratch, "logs"), out_dir / "gptqmodel_logs")
        shutil.rmtree(scratch, ignore_errors=True)


def _run(args: argparse.Namespace, calib: torch.Tensor, evalw: torch.Tensor, out_dir: Path) -> int:

    import gptqmodel
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig

    qcfg = QuantizeConfig(
        bits=args.bits,
        group_size=args.group_size,
        sym=True,
        desc_act=args.desc_act,
        act_group_aware=args.act_group_aware,
        static_groups=args.static_groups,
        true_sequential=args.true_sequential,
        damp_percent=args.damp,
        fallback=None,
        offload_to_disk=False,
        device="cpu",
    )
    print(f"[ref] QuantizeConfig: {qcfg}", flush=True)

    # Passing device= too is refused when QuantizeConfig.device is set.
    model = GPTQModel.load(args.gptq_model_dir, qcfg, dtype=torch.float32)
    wdtype = next(model.model.parameters()).dtype
    if wdtype != torch.float32:
        raise SystemExit(f"GPTQModel loaded the model in {wdtype}, expected float32")

    calibration = [
        {"input_ids": row.unsqueeze(0).clone(), "attention_mask": torch.ones_like(row).unsqueeze(0)} for row in calib
    ]
    t0 = time.perf_counter()
    model.quantize(calibration, batch_size=args.batch_size, calibration_sort=None)
    quantize_seconds = time.perf_counter() - t0
    print(f"[ref] quantize: {quantize_seconds:.1f} s", flush=True)

    model.save(str(out_dir))
    del model

    # Dense float32 model with GPTQModel's dequantized weights.
    import transformers
    from transformers import AutoModelForCausalLM

    dense, info = dequantize_checkpoint(out_dir)
    fp_model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, device_map="cpu")
    state = fp_model.state_dict()
    missing = [k for k in dense if k not in state]
    if missing:
        raise SystemExit(f"dequantized tensors without a place in the model: {missing[:5]}")
    max_other_diff = 0.0
    for k, v in info["others"].items():
        if k in state and state[k].shape == v.shape:
            max_other_diff = max(max_other_diff, float((state[k] - v.to(torch.float32)).abs().max()))
    with torch.no_grad():
        for k, v in dense.items():
            state[k].copy_(v)
    n_quant = sum(1 for k in dense if k.endswith(".weight"))
    t1 = time.perf_counter()
    ppl, nlls = perplexity(fp_model, evalw)
    eval_seconds = time.perf_counter() - t1
    print(f"[ref] ppl (dequant fp32) = {ppl:.4f} over {len(nlls)} windows x {evalw.shape[1]}", flush=True)
    del fp_model

    result = {
        "quantize_seconds": round(quantize_seconds, 3),
        "ppl": ppl,
        "windows": int(evalw.shape[0]),
        "seqlen": int(evalw.shape[1]),
        "calib_windows": int(calib.shape[0]),
        "calib_seqlen": int(calib.shape[1]),
        "bits": args.bits,
        "group_size": args.group_size,
        "damp": args.damp,
        "desc_act": args.desc_act,
        "static_groups": args.static_groups,
        "true_sequential": args.true_sequential,
        "act_group_aware": args.act_group_aware,
        "sym": True,
        "gptqmodel_version": gptqmodel.__version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "eval_route": "dequant_fp32: packed qweight/qzeros/scales/g_idx of the saved checkpoint unpacked to dense "
        "float32 Linear weights (fp16 scales as stored) in the original float32 model",
        "eval_dtype": "float32",
        "eval_seconds": round(eval_seconds, 3),
        "window_nll": nlls,
        "quantized_linears": n_quant,
        "checkpoint_format": info["format"],
        "checkpoint_other_tensors_max_abs_diff_vs_fp32": max_other_diff,
        "out": str(out_dir),
        "torch_threads": torch.get_num_threads(),
        "gptqmodel_cpu_workers": os.environ.get("GPTQMODEL_CPU_WORKERS"),
    }

    if args.kernel_backend:
        kdtype = getattr(torch, args.kernel_dtype)
        qm = GPTQModel.load(str(out_dir), device="cpu", backend=BACKEND(args.kernel_backend), dtype=kdtype)
        kernels = sorted({type(m).__name__ for m in qm.model.modules() if hasattr(m, "qweight")})
        t2 = time.perf_counter()
        kppl, _ = perplexity(qm.model, evalw)
        result.update(
            {
                "kernel_ppl": kppl,
                "kernel_backend": args.kernel_backend,
                "kernel_dtype": args.kernel_dtype,
                "kernel_modules": kernels,
                "kernel_eval_seconds": round(time.perf_counter() - t2, 3),
            }
        )
        print(f"[ref] ppl (GPTQModel {args.kernel_backend}, {args.kernel_dtype}, {kernels}) = {kppl:.4f}", flush=True)

    Path(args.json_file).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_file).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "window_nll"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
