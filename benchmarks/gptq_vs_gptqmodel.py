"""qatcli GPTQ (and AWQ) against GPTQModel 7.6.0: named cells x bit widths x calibration seeds (x thread counts).

Every run of a cell quantizes the same model on the same calibration windows (drawn by qatcli's own function for
the seed, saved for GPTQModel) and both tools' checkpoints are evaluated by the same `qatcli eval` on the same
windows. GPTQModel runs in its own virtual environment (benchmarks/setup_gptqmodel_env.sh builds it) through
benchmarks/gptqmodel_reference.py. Each finished run is kept as JSON in --workdir and not rerun, so the matrix can be
built over several invocations; the table is made from every kept run that matches the model, group size and
calibration settings, and is appended to docs/results.md with --publish.

    bash benchmarks/setup_gptqmodel_env.sh
    OMP_NUM_THREADS=2 python benchmarks/gptq_vs_gptqmodel.py --bits 3 --seeds 0 1 2 \\
        --cells gptqmodel-defaults qatcli-defaults --publish

Cells (reference settings = damp 0.01, min/max grid, no reordering, true-sequential, sym):
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from safetensors.torch import save_file

from qatcli.data.sources import calibration_windows, eval_windows, read_texts, tokenize_texts
from qatcli.models.loading import load_tokenizer, resolve_model

sys.path.insert(0, str(Path(__file__).parent))
from common import REPO, TEST_DATA, TRAIN_DATA, machine, publish

REFERENCE = ["--damp", "0.01", "--clip", "minmax", "--no-act-order", "--no-act-group-aware", "--no-static-groups"]
# name -> (tool, flags, what it is)
CELLS: dict[str, tuple[str, list[str], str]] = {
    "gptqmodel-defaults": ("gptqmodel", ["--damp", "0.05", "--act-group-aware"], "GPTQModel's own defaults"),
    "gptqmodel-reference": ("gptqmodel", ["--damp", "0.01", "--no-act-group-aware"], "GPTQModel, reference settings"),
    "qatcli-defaults": ("qatcli", [], "qatcli's recipe defaults"),
    "qatcli-reference": ("qatcli", REFERENCE, "qatcli, reference settings"),
    "qatcli-gar": ("qatcli", [*REFERENCE, "--act-group-aware"], "reference + group-aware order alone"),
    "qatcli-mse": ("qatcli", [*REFERENCE, "--clip", "mse"], "reference + MSE clipping search alone"),
    "qatcli-damp05": ("qatcli", [*REFERENCE, "--damp", "0.05"], "reference + damp 0.05 alone"),
    "qatcli-gar-mse": ("qatcli", [*REFERENCE, "--act-group-aware", "--clip", "mse"], "reference + group-aware + MSE"),
    "qatcli-gar-mse-damp05": (
        "qatcli",
        [*REFERENCE, "--act-group-aware", "--clip", "mse", "--damp", "0.05"],
        "reference + group-aware + MSE + damp 0.05",
    ),
    "qatcli-awq": ("qatcli", ["--method", "awq"], "qatcli AWQ at its defaults (scale search, then the MSE grid)"),
}
__doc__ += "\n".join(f"    {name:20} {what}" for name, (_, _, what) in CELLS.items()) + "\n"


def sh(cmd: list[str], env: dict[str, str] | None = None) -> None:
    print("$ " + shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)


def run_cell(args: argparse.Namespace, cell: str, bits: int, seed: int, threads: int, key: str) -> dict:
    """Quantize and evaluate one run; returns its record."""
    tool, flags, _ = CELLS[cell]
    ref = resolve_model(args.model)
    tokenizer = load_tokenizer(ref)
    calib = calibration_windows(
        tokenize_texts(read_texts(args.calib_data, "calib"), tokenizer), args.nsamples, args.seqlen, seed
    )
    evals = eval_windows(tokenize_texts(read_texts(args.eval_data, "eval"), tokenizer), args.seqlen, args.max_windows)
    calib_path, eval_path = args.workdir / f"calib-s{seed}.safetensors", args.workdir / "eval.safetensors"
    save_file({"input_ids": calib.contiguous()}, str(calib_path))
    save_file({"input_ids": evals.contiguous()}, str(eval_path))
    out = args.workdir / key
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), GPTQMODEL_CPU_WORKERS=str(threads))
    common = ["--bits", str(bits), "--group-size", str(args.group_size)]
    if tool == "qatcli":
        method = [] if "--method" in flags else ["--method", "gptq"]
        sh(
            [
                *[sys.executable, "-m", "qatcli", "ptq", args.model, *method, *common, "--sym"],
                *["--calib-data", args.calib_data, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)],
                *[*flags, "--seed", str(seed), "-o", str(out), "--force"],
            ],
            env=env,
        )
        quantize_seconds = json.loads((out / "qatcli.json").read_text())["metrics"]["quantize_seconds"]
    else:
        tool_json = args.workdir / f"{key}.gptqmodel.json"
        sh(
            [
                *[str(args.venv / "bin" / "python"), str(REPO / "benchmarks" / "gptqmodel_reference.py")],
                *["--model", ref.location, "--calib", str(calib_path), "--eval", str(eval_path), *common, *flags],
                *["--no-desc-act", "--true-sequential", "--out", str(out), "--json", str(tool_json)],
            ],
            env=env,
        )
        quantize_seconds = json.loads(tool_json.read_text())["quantize_seconds"]
    eval_json = args.workdir / f"{key}.eval.json"
    sh(
        [sys.executable, "-m", "qatcli", "eval", str(out), "--data", args.eval_data, "--seqlen", str(args.seqlen)]
        + (["--max-windows", str(args.max_windows)] if args.max_windows else [])
        + ["--json", str(eval_json), "--force"],
        env=env,
    )
    (row,) = json.loads(eval_json.read_text())
    return {
        "cell": cell,
        "bits": bits,
        "seed": seed,
        "threads": threads,
        "ppl": row["ppl"],
        "windows": row["windows"],
        "quantize_seconds": quantize_seconds,
        "setting": setting(args),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    }


def setting(args: argparse.Namespace) -> dict:
    """What makes two runs comparable."""
    return {
        "model": args.model,
        "group_size": args.group_size,
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "calib_data": args.calib_data,
        "eval_data": args.eval_data,
        "max_windows": args.max_windows,
    }


def spread(values: list[float], digits: int) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f}, n={len(values)})"


def table(records: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"### GPTQ: qatcli against GPTQModel, mean (min-max, n) over seeds ({datetime.now(timezone.utc):%Y-%m-%d})",
        "",
        f"Command: `python benchmarks/gptq_vs_gptqmodel.py {shlex.join(sys.argv[1:])}` (runs kept in "
        f"{args.workdir.relative_to(REPO)}; every kept run of this setting is in the table)  ",
        f"Machine: {machine()}  ",
        f"Model {args.model}, sym, group {args.group_size}; calibration {args.nsamples} x {args.seqlen} tokens of "
        f"`{args.calib_data}` drawn per seed, identical for both tools; eval `{args.eval_data}`, "
        f"{records[0]['windows']} windows x {args.seqlen}, both tools' checkpoints through `qatcli eval`. "
        "Time: the quantize call alone. Reference settings: damp 0.01, min/max grid, no reordering, true-sequential.",
        "",
        "| cell | bits | threads | ppl | quantize s |",
        "|---|---|---|---|---|",
    ]
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((list(CELLS).index(r["cell"]), r["bits"], r["threads"]), []).append(r)
    for (cell_index, bits, threads), runs in sorted(groups.items(), key=lambda kv: (-kv[0][1], kv[0][0], kv[0][2])):
        cell = list(CELLS)[cell_index]
        ppl = spread([r["ppl"] for r in runs], 2)
        secs = spread([r["quantize_seconds"] for r in runs], 0)
        lines.append(f"| {cell} ({CELLS[cell][2]}) | {bits} | {threads} | {ppl} | {secs} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--cells", nargs="+", choices=list(CELLS), default=list(CELLS))
    parser.add_argument("--bits", nargs="+", type=int, default=[4, 3, 2])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--threads", nargs="+", type=int, default=[2], help="qatcli cells run once per count")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--calib-data", default=TRAIN_DATA)
    parser.add_argument("--eval-data", default=TEST_DATA)
    parser.add_argument("--max-windows", type=int, default=40)
    parser.add_argument("--venv", type=Path, default=REPO / ".venv-gptqmodel")
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench-gptq")
    parser.add_argument("--results", type=Path, default=REPO / "docs" / "results.md")
    parser.add_argument("--publish", action="store_true", help="append the table to --results")
    args = parser.parse_args()
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)

    for bits in args.bits:
        for seed in args.seeds:
            for cell in args.cells:
                # GPTQModel's thread count is not in question here: it runs with the first count only
                for threads in args.threads if CELLS[cell][0] == "qatcli" else args.threads[:1]:
                    key = f"{Path(args.model).name}-g{args.group_size}-w{bits}-{cell}-s{seed}-t{threads}"
                    record_path = args.workdir / f"{key}.json"
                    if record_path.exists() and json.loads(record_path.read_text())["setting"] == setting(args):
                        continue
                    record = run_cell(args, cell, bits, seed, threads, key)
                    record_path.write_text(json.dumps(record, indent=1))
                    print(json.dumps(record), flush=True)

    records = [json.loads(p.read_text()) for p in sorted(args.workdir.glob("*.json"))]
    records = [r for r in records if "cell" in r and r["setting"] == setting(args) and r["cell"] in CELLS]
    text = table(records, args)
    publish(text, args.results, args.publish)


if __name__ == "__main__":
    main()
