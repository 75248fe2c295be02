"""PTQ on smollm2-135m: full precision against each method and bit width, perplexity and wall time of each step.

Runs the real command line (ptq for each cell, then one eval call over all of them on the same windows),
prints the table and appends it, with the command, machine and date, to docs/results.md.

    python benchmarks/ptq_smollm2.py --methods rtn --bits 8 4 3 2 --group-size 64
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOTU = REPO.parent / "shared" / "data" / "sotu"


def run(args: list[str]) -> float:
    print("$ qatcli " + shlex.join(args), flush=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "qatcli", *args], check=True)
    return time.perf_counter() - t0


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU only ({cpu}, {_cores()} cores)"
    return f"{platform.node()}: {dev}, torch {torch.__version__}"


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", nargs="+", default=["rtn"])
    parser.add_argument("--bits", nargs="+", type=int, default=[8, 4, 3, 2])
    parser.add_argument("--group-size", nargs="+", type=int, default=[64])
    parser.add_argument("--data", default=str(SOTU / "test.txt"))
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=None)
    parser.add_argument("--extra", default="", help="More ptq flags, e.g. '--calib-data ... --nsamples 128'.")
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench-ptq")
    parser.add_argument("--results", type=Path, default=REPO / "docs" / "results.md")
    parser.add_argument("--title", default="PTQ on smollm2-135m")
    args = parser.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    window_flags = ["--seqlen", str(args.seqlen)]
    if args.max_windows:
        window_flags += ["--max-windows", str(args.max_windows)]

    cells, ptq_seconds = [], {}
    for method in args.methods:
        for g in args.group_size:
            for bits in args.bits:
                out = args.workdir / f"{method}-w{bits}-g{g}"
                cells.append(str(out))
                flags = ["--method", method, "--bits", str(bits), "--group-size", str(g), "-o", str(out), "--force"]
                ptq_seconds[str(out)] = run(["ptq", args.model, *flags, *shlex.split(args.extra)])

    rows_path = args.workdir / "eval.json"
    run(["eval", args.model, *cells, "--data", args.data, *window_flags, "--json", str(rows_path), "--force"])
    rows = json.loads(rows_path.read_text())

    fp = rows[0]["ppl"]
    lines = [
        f"### {args.title} ({datetime.now(timezone.utc).strftime('%Y-%m-%d')})",
        "",
        f"Command: `python benchmarks/ptq_smollm2.py {shlex.join(sys.argv[1:])}`  ",
        f"Machine: {machine()}  ",
        f"Data: `{Path(args.data).name}`, {rows[0]['windows']} windows x {rows[0]['seqlen']} tokens",
        "",
        "| model | method | bits | group | ppl | vs fp | linear weights (MiB) | ptq wall s | eval wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ptq = ptq_seconds.get(r["name"])
        lines.append(
            f"| {Path(r['name']).name} | {r['method']} | {r['bits'] or 'fp32'} | {r['group_size'] or '-'} "
            f"| {r['ppl']:.3f} | {r['ppl'] / fp:.3f}x | {r['weight_bytes'] / 2**20:.2f} "
            f"| {f'{ptq:.1f}' if ptq else '-'} | {r['seconds']:.1f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    with args.results.open("a") as f:
        f.write("\n" + text)


if __name__ == "__main__":
    main()
