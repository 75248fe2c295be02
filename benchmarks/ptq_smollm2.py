"""PTQ on smollm2-135m: full precision against each method and bit width, perplexity and wall time of each step.

Runs the real command line (ptq for each cell, then one eval call over all of them on the same windows),
prints the table and appends it, with the command, machine and date, to docs/results.md.

    python benchmarks/ptq_smollm2.py --cells rtn:8:64 rtn:4:64 rtn:3:64 rtn:2:64 gptq:3:64 gptq:3:-1 --reuse

A cell is METHOD:BITS:GROUP. With --reuse a cell whose checkpoint already exists (written by an earlier run of
this script or of gptq_vs_gptqmodel.py, with the same flags) is evaluated again but not quantized again.
The ptq time reported is the checkpoint's own: model load plus quantization, as `qatcli ptq` measured it.
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

DEFAULT_CELLS = [f"rtn:{b}:64" for b in (8, 4, 3, 2)] + [
    f"{m}:{b}:{g}" for m, g in (("rtn", -1), ("gptq", 64), ("gptq", -1)) for b in (4, 3, 2)
]


def run(args: list[str]) -> None:
    print("$ qatcli " + shlex.join(args), flush=True)
    subprocess.run([sys.executable, "-m", "qatcli", *args], check=True)


def cell_dir(workdir: Path, method: str, bits: int, group: int) -> Path:
    return workdir / f"{method}-w{bits}-g{group}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--cells", nargs="+", default=DEFAULT_CELLS, help="METHOD:BITS:GROUP, e.g. gptq:3:64")
    parser.add_argument("--reuse", action="store_true", help="Keep cells whose checkpoint already exists.")
    parser.add_argument("--calib-data", default=TRAIN_DATA)
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--data", default=TEST_DATA)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=None)
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench-ptq")
    parser.add_argument("--results", type=Path, default=REPO / "docs" / "results.md")
    parser.add_argument("--title", default="PTQ on smollm2-135m")
    args = parser.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    window_flags = ["--seqlen", str(args.seqlen)]
    if args.max_windows:
        window_flags += ["--max-windows", str(args.max_windows)]

    cells = []
    for cell in args.cells:
        method, bits, group = cell.split(":")
        out = cell_dir(args.workdir, method, int(bits), int(group))
        cells.append(str(out))
        if args.reuse and (out / "qatcli.json").is_file():
            print(f"reusing {out}", flush=True)
            continue
        flags = ["--method", method, "--bits", bits, "--group-size", group, "--sym", "-o", str(out), "--force"]
        if method == "gptq":
            flags += ["--calib-data", args.calib_data, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
        run(["ptq", args.model, *flags])
    ptq_seconds = {}
    for c in cells:
        m = json.loads((Path(c) / "qatcli.json").read_text())["metrics"]
        ptq_seconds[c] = m["load_seconds"] + m["quantize_seconds"]

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
        "| model | method | bits | group | ppl | vs fp | linear weights (MiB) | load + quantize s | eval s |",
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
    publish(text, args.results)


if __name__ == "__main__":
    main()
