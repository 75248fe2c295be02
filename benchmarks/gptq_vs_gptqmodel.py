"""qatcli GPTQ against GPTQModel 7.6.0 on the same model, calibration windows, settings and eval windows.

Both run in this one invocation, one after the other, on the same machine. GPTQModel runs in its own
virtual environment (benchmarks/setup_gptqmodel_env.sh builds it) through benchmarks/gptqmodel_reference.py.
Reported per bit width: both perplexities, both quantization wall times (the quantize call only; model
loading, saving and evaluation excluded) and their ratio. Results are appended to docs/results.md.

    bash benchmarks/setup_gptqmodel_env.sh
    python benchmarks/gptq_vs_gptqmodel.py --bits 4 3 2 --group-size 64
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from safetensors.torch import save_file

from qatcli.data.models import load_tokenizer, resolve_model
from qatcli.data.sources import calibration_windows, eval_windows, read_texts, tokenize_texts

sys.path.insert(0, str(Path(__file__).parent))
from common import REPO, TEST_DATA, TRAIN_DATA, machine, publish


def sh(cmd: list[str], env: dict[str, str] | None = None) -> None:
    print("$ " + shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--bits", nargs="+", type=int, default=[4, 3, 2])
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--damp", type=float, default=0.01)
    parser.add_argument("--calib-data", default=TRAIN_DATA)
    parser.add_argument("--eval-data", default=TEST_DATA)
    parser.add_argument("--max-windows", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--venv", type=Path, default=REPO / ".venv-gptqmodel")
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench-gptqmodel")
    parser.add_argument("--ckpt-dir", type=Path, default=REPO / "runs" / "bench-ptq", help="qatcli checkpoints go here")
    parser.add_argument("--results", type=Path, default=REPO / "docs" / "results.md")
    args = parser.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    ref = resolve_model(args.model)
    tokenizer = load_tokenizer(ref)
    # The very windows `qatcli ptq` draws for these flags (same functions, same seed), saved for GPTQModel.
    calib = calibration_windows(
        tokenize_texts(read_texts(args.calib_data, "calib"), tokenizer), args.nsamples, args.seqlen, args.seed
    )
    evals = eval_windows(tokenize_texts(read_texts(args.eval_data, "eval"), tokenizer), args.seqlen, args.max_windows)
    calib_path, eval_path = args.workdir / "calib.safetensors", args.workdir / "eval.safetensors"
    save_file({"input_ids": calib.contiguous()}, str(calib_path))
    save_file({"input_ids": evals.contiguous()}, str(eval_path))

    env = dict(os.environ, GPTQMODEL_CPU_WORKERS=os.environ.get("GPTQMODEL_CPU_WORKERS", "2"))
    window_flags = ["--seqlen", str(args.seqlen)] + (
        ["--max-windows", str(args.max_windows)] if args.max_windows else []
    )
    rows = []
    for bits in args.bits:
        ours = args.ckpt_dir / f"gptq-w{bits}-g{args.group_size}"
        sh(
            [
                sys.executable,
                "-m",
                "qatcli",
                "ptq",
                args.model,
                "--method",
                "gptq",
                "--bits",
                str(bits),
                "--group-size",
                str(args.group_size),
                "--sym",
                "--calib-data",
                args.calib_data,
                "--nsamples",
                str(args.nsamples),
                "--damp",
                str(args.damp),
                "--no-act-order",
                "--no-static-groups",
                "--true-sequential",
                "--seed",
                str(args.seed),
                "-o",
                str(ours),
                "--force",
                *window_flags[:2],
            ]
        )
        theirs_json = args.workdir / f"gptqmodel-w{bits}.json"
        sh(
            [
                str(args.venv / "bin" / "python"),
                str(REPO / "benchmarks" / "gptqmodel_reference.py"),
                "--model",
                ref.location,
                "--calib",
                str(calib_path),
                "--eval",
                str(eval_path),
                "--bits",
                str(bits),
                "--group-size",
                str(args.group_size),
                "--damp",
                str(args.damp),
                "--no-desc-act",
                "--true-sequential",
                "--out",
                str(args.workdir / f"gptqmodel-w{bits}"),
                "--json",
                str(theirs_json),
            ],
            env=env,
        )
        both_eval = args.workdir / f"w{bits}-eval.json"
        # Both checkpoints through the same loader and windows: qatcli reads GPTQModel's directory packed.
        sh(
            [
                sys.executable,
                "-m",
                "qatcli",
                "eval",
                str(ours),
                str(args.workdir / f"gptqmodel-w{bits}"),
                "--data",
                args.eval_data,
                *window_flags,
                "--json",
                str(both_eval),
                "--force",
            ]
        )
        meta = json.loads((ours / "qatcli.json").read_text())
        ours_row, theirs_row = json.loads(both_eval.read_text())
        theirs = json.loads(theirs_json.read_text())
        assert ours_row["windows"] == theirs["windows"] and ours_row["seqlen"] == theirs["seqlen"]
        rows.append(
            (
                bits,
                ours_row["ppl"],
                theirs_row["ppl"],
                theirs["ppl"],
                meta["metrics"]["quantize_seconds"],
                theirs["quantize_seconds"],
            )
        )

    lines = [
        f"### GPTQ: qatcli against GPTQModel {theirs.get('gptqmodel_version', '')} "
        f"({datetime.now(timezone.utc).strftime('%Y-%m-%d')})",
        "",
        f"Command: `python benchmarks/gptq_vs_gptqmodel.py {shlex.join(sys.argv[1:])}`  ",
        f"Machine: {machine()}  ",
        f"Model {args.model}; {args.nsamples} calibration windows x {args.seqlen} tokens of "
        f"`{Path(args.calib_data).name}` (identical for both); sym, group {args.group_size}, damp {args.damp}, "
        f"no act-order, true-sequential; GPTQModel in float32 with act_group_aware=False. Eval: "
        f"`{Path(args.eval_data).name}`, {ours_row['windows']} windows x {args.seqlen}, both checkpoints "
        "through `qatcli eval` (GPTQModel's directory read packed by qatcli's loader); the cross-check column is "
        "benchmarks/gptqmodel_reference.py's own fp32 dequantization of GPTQModel's tensors. "
        "Wall time = the quantize call alone (calibration forward included; loading and saving excluded).",
        "",
        "| bits | qatcli ppl | GPTQModel ppl | GPTQModel ppl (cross-check) | qatcli s | GPTQModel s "
        "| qatcli / GPTQModel time |",
        "|---|---|---|---|---|---|---|",
    ]
    for bits, p_ours, p_theirs, p_check, t_ours, t_theirs in rows:
        lines.append(
            f"| {bits} | {p_ours:.3f} | {p_theirs:.3f} | {p_check:.3f} | {t_ours:.1f} | {t_theirs:.1f} "
            f"| {t_ours / t_theirs:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    publish(text, args.results)


if __name__ == "__main__":
    main()
