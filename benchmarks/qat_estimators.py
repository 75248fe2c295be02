"""QAT estimators side by side on one model: RTN and GPTQ, then QAT with each estimator and ablation, all
from the same init for the same steps on the same data, evaluated on the same windows.

Runs the real command line (ptq / qat for each cell, one eval call over all of them), prints the table and
appends it, with the command, machine and date, to docs/results.md.

    python benchmarks/qat_estimators.py --model runs/sotu-llama-small --bits 2 --group-size 64 --steps 300

A cell is a preset name (see PRESETS) or NAME=FLAGS with any extra `qatcli qat` flags, for example
`jac-ue5="--estimator jacobian --set qat.jacobian.update_every=5"`. With --reuse a finished cell is kept.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import REPO, TEST_DATA, TRAIN_DATA, machine, publish

PRESETS = {
    "rtn": "ptq --method rtn",
    "gptq": "ptq --method gptq",
    "ste": "qat --estimator ste",
    "fourier": "qat --estimator fourier",
    "jacobian": "qat --estimator jacobian",
    "jacobian-dither": "qat --estimator jacobian --set qat.jacobian.blend=1",
    "jacobian-probe": "qat --estimator jacobian --set qat.jacobian.blend=0",
    "ste+vr": "qat --estimator ste --variance-reduction",
    "fourier+vr": "qat --estimator fourier --variance-reduction",
    "jacobian+vr": "qat --estimator jacobian --variance-reduction",
    "ste-ce": "qat --estimator ste --loss ce",
    "fourier-ce": "qat --estimator fourier --loss ce",
}
DEFAULT_CELLS = ["rtn", "gptq", "ste", "fourier", "jacobian"]


def run(args: list[str]) -> None:
    print("$ qatcli " + shlex.join(args), flush=True)
    subprocess.run([sys.executable, "-m", "qatcli", *args], check=True)


def parse_cell(cell: str) -> tuple[str, list[str]]:
    name, sep, flags = cell.partition("=")
    if sep:
        return name, ["qat", *shlex.split(flags)]
    if cell not in PRESETS:
        raise SystemExit(f"unknown cell '{cell}' (presets: {', '.join(PRESETS)}; or NAME=FLAGS)")
    return cell, shlex.split(PRESETS[cell])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "runs" / "sotu-llama-small"))
    parser.add_argument("--cells", nargs="+", default=DEFAULT_CELLS)
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--init", default="rtn")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--train-seqlen", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--scale-lr", type=float, default=1e-3)
    parser.add_argument("--loss", default="kd")
    parser.add_argument("--train-data", default=TRAIN_DATA)
    parser.add_argument("--calib-data", default=TRAIN_DATA)
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--data", default=TEST_DATA)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--reuse", action="store_true", help="Keep cells whose checkpoint already exists.")
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench-qat")
    parser.add_argument("--results", type=Path, default=REPO / "docs" / "results.md")
    parser.add_argument("--title", default="QAT estimators")
    args = parser.parse_args()

    workdir = args.workdir / f"w{args.bits}-g{args.group_size}"
    workdir.mkdir(parents=True, exist_ok=True)
    quant = ["--bits", str(args.bits), "--group-size", str(args.group_size), "--device", args.device]
    calib = ["--calib-data", args.calib_data, "--nsamples", str(args.nsamples)]
    cells: dict[str, Path] = {}
    commands: dict[str, str] = {}
    for cell in args.cells:
        name, flags = parse_cell(cell)
        out = workdir / name
        cells[name], commands[name] = out, shlex.join(flags)
        if args.reuse and (out / "qatcli.json").is_file():
            print(f"reusing {out}", flush=True)
            continue
        command, rest = flags[0], flags[1:]
        if command == "ptq":
            extra = [*calib, "--seqlen", str(args.seqlen)] if "gptq" in rest else []
            run(["ptq", args.model, *quant, *rest, *extra, "-o", str(out), "--force"])
            continue
        train = [
            "--init", args.init, "--data", args.train_data, "--steps", str(args.steps),
            "--batch-size", str(args.batch_size), "--seqlen", str(args.train_seqlen), "--lr", str(args.lr),
            "--scale-lr", str(args.scale_lr), "--save-every", str(args.steps),
        ]  # fmt: skip
        if "--loss" not in rest:
            train += ["--loss", args.loss]
        if args.init == "gptq":
            train += calib
        run(["qat", args.model, *quant, *train, *rest, "-o", str(out), "--force"])

    rows_path = workdir / "eval.json"
    window_flags = ["--seqlen", str(args.seqlen), "--device", args.device]
    if args.max_windows:
        window_flags += ["--max-windows", str(args.max_windows)]
    targets = [str(p) for p in cells.values()]
    run(["eval", args.model, *targets, "--data", args.data, *window_flags, "--json", str(rows_path), "--force"])
    rows = {Path(r["name"]).name if r["name"] != args.model else "fp": r for r in json.loads(rows_path.read_text())}
    fp = rows["fp"]["ppl"]

    lines = [
        f"### {args.title}: {args.bits}-bit g{args.group_size} ({datetime.now(timezone.utc).strftime('%Y-%m-%d')})",
        "",
        f"Command: `python benchmarks/qat_estimators.py {shlex.join(sys.argv[1:])}`  ",
        f"Machine: {machine()}  ",
        f"Model `{Path(args.model).name}`; QAT: init {args.init}, {args.steps} steps of {args.batch_size} x "
        f"{args.train_seqlen} tokens of `{Path(args.train_data).name}`, lr {args.lr} / scales {args.scale_lr}, "
        f"loss {args.loss} unless the cell says otherwise. Eval: `{Path(args.data).name}`, "
        f"{rows['fp']['windows']} windows x {rows['fp']['seqlen']} tokens. fp ppl {fp:.3f}.",
        "",
        "| cell | command | ppl | vs fp | quantize/train s | s/step |",
        "|---|---|---|---|---|---|",
    ]
    for name, out in cells.items():
        metrics = json.loads((out / "qatcli.json").read_text())["metrics"]
        seconds = metrics.get("train_seconds_this_invocation", metrics.get("quantize_seconds"))
        per_step = metrics.get("mean_step_seconds")
        ppl = rows[name]["ppl"]
        lines.append(
            f"| {name} | `{commands[name]}` "
            f"| {ppl:.3f} | {ppl / fp:.3f}x | {seconds:.1f} | {f'{per_step:.3f}' if per_step else '-'} |"
        )
    publish("\n".join(lines) + "\n", args.results)


if __name__ == "__main__":
    main()
