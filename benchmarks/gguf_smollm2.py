"""GGUF on smollm2-135m, judged by llama.cpp: qatcli's exports against llama.cpp's own quantizer.

Rows: the full-precision model (qatcli's float32 evaluation), its f16 GGUF; llama.cpp's quantizer (llama-quantize)
at Q2_0, Q4_0 and Q8_0 from that f16 file, without and with an importance matrix (llama-imatrix on the
calibration text); qatcli RTN, GPTQ and QAT checkpoints made with --target for the same types and exported with
`qatcli export --format gguf`. Perplexity of every GGUF row comes from llama.cpp's logits (`qatcli eval FILE.gguf`)
on the same windows as the float32 rows, on each domain; speed from llama-bench (prompt processing of 512 tokens,
generation of 128, on --threads threads), measured once per block type (the values do not change it).

    bash benchmarks/setup_llama_cpp_tools.sh
    OMP_NUM_THREADS=2 python benchmarks/gguf_smollm2.py

Every step keeps its output under --workdir and is skipped when that output exists, so a stopped run goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import REPO, TEST_DATA, TRAIN_DATA, machine, publish

from qatcli.data.sources import read_texts
from qatcli.exporters.gguf import dense_gguf
from qatcli.formats.gguf_file import read_gguf
from qatcli.models.loading import resolve_model

TYPES = ("q2_0", "q4_0", "q8_0")


def qatcli(*args: str) -> None:
    print("$ qatcli " + shlex.join(args), flush=True)
    subprocess.run([sys.executable, "-m", "qatcli", *args], check=True)


def tool(tools: Path, name: str, *args: str) -> str:
    print(f"$ {name} " + shlex.join(args), flush=True)
    return subprocess.run([str(tools / name), *args], check=True, capture_output=True, text=True).stdout


def checkpoint_steps(args: argparse.Namespace, work: Path) -> list[tuple[str, Path, Path]]:
    """(row name, checkpoint, GGUF file) of each qatcli row, made where missing."""
    rows = []
    cells = [("rtn", t) for t in TYPES] + [("gptq", t) for t in TYPES] + [("qat", t) for t in args.qat_types]
    for method, t in cells:
        ckpt, gguf = work / f"{method}-{t}", work / f"{method}-{t}.gguf"
        target = ["--target", f"gguf:{t}"]
        if not (ckpt / "qatcli.json").is_file():
            if method == "qat":
                qatcli("qat", args.model, *target, "--estimator", "fourier", "--data", args.qat_data,
                       "--steps", str(args.qat_steps), "-o", str(ckpt), "--force")  # fmt: skip
            else:
                calib = ["--calib-data", args.calib_data] if method == "gptq" else []
                qatcli("ptq", args.model, "--method", method, *target, *calib, "-o", str(ckpt), "--force")
        if not gguf.is_file():
            qatcli("export", str(ckpt), "--format", "gguf", "-o", str(gguf), "--force")
        rows.append((f"qatcli {method}", ckpt, gguf))
    return rows


def llama_cpp_steps(args: argparse.Namespace, work: Path, f16: Path) -> list[tuple[str, Path]]:
    """(row name, GGUF file) of llama.cpp's own quantizer, without and with an importance matrix."""
    calib = work / "calib.txt"
    if not calib.is_file():
        calib.write_text("\n\n".join(read_texts(args.calib_data, "calib")))
    imatrix = work / "imatrix.gguf"
    if not imatrix.is_file():
        tool(args.tools, "llama-imatrix", "-m", str(f16), "-f", str(calib), "-o", str(imatrix), "-c", "512",
             "--chunks", "128", "-t", str(args.threads))  # fmt: skip
    rows = []
    for t in TYPES:
        for label, extra in (("", []), ("+imatrix", ["--imatrix", str(imatrix)])):
            out = work / f"llama.cpp-{t}{label}.gguf"
            if not out.is_file():
                tool(args.tools, "llama-quantize", *extra, str(f16), str(out), t.upper(), str(args.threads))
            rows.append((f"llama.cpp {t.upper()}{label}", out))
    return rows


def speed(args: argparse.Namespace, gguf: Path) -> dict[str, float]:
    out = tool(args.tools, "llama-bench", "-m", str(gguf), "-p", "512", "-n", "128", "-t", str(args.threads),
               "-r", str(args.repeats), "-o", "json")  # fmt: skip
    runs = json.loads(out)
    return {("pp512" if r["n_prompt"] else "tg128"): r["avg_ts"] for r in runs}


def evaluate(models: list[str], data: str, windows: int, out: Path) -> dict[str, dict]:
    if not out.is_file():
        qatcli("eval", *models, "--data", data, "--seqlen", "512", "--max-windows", str(windows),
               "--json", str(out), "--force")  # fmt: skip
    return {row["name"]: row for row in json.loads(out.read_text())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench-gguf")
    parser.add_argument("--tools", type=Path, default=REPO / "runs" / "llama.cpp-tools" / "bin")
    parser.add_argument("--calib-data", default=TRAIN_DATA)
    parser.add_argument("--qat-data", default=TRAIN_DATA)
    parser.add_argument("--qat-steps", type=int, default=150)
    parser.add_argument("--qat-types", nargs="*", default=["q2_0"])
    parser.add_argument("--domains", nargs="+", default=[TEST_DATA, "code:test", "generated:100"])
    parser.add_argument("--max-windows", type=int, default=40, help="Windows of the first domain (SOTU test)")
    parser.add_argument("--other-windows", type=int, default=20, help="Windows of the other domains, at most")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", type=Path, default=REPO / "docs" / "results.md")
    parser.add_argument("--publish", action="store_true", help="Append the table to --results.")
    parser.add_argument(
        "--only-make", action="store_true", help="Make the checkpoints and files, then stop (time the rest alone)."
    )
    parser.add_argument("--only-speed", action="store_true", help="Make what is missing, time it, then stop.")
    args = parser.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    f16 = work / "fp-f16.gguf"
    if not f16.is_file():
        dense_gguf(Path(resolve_model(args.model).location), args.model, f16)
    qat_rows = checkpoint_steps(args, work)
    llama_rows = llama_cpp_steps(args, work, f16)
    ggufs = [("f16", f16), *llama_rows, *[(name, g) for name, _, g in qat_rows]]
    if args.only_make:
        return
    # speed depends on the tensor types, not on the values: llama-bench runs the first file of each pair of the
    # file's type and its token embedding's (which smollm2's tied lm_head multiplies by too)
    speeds_file = work / "speed.json"
    speeds = json.loads(speeds_file.read_text()) if speeds_file.is_file() else {}
    for _, g in ggufs:
        meta, tensors = read_gguf(g)
        kind = f"{meta['general.file_type']}-{tensors['token_embd.weight'].type_name}"
        if kind not in speeds:
            speeds[kind] = speed(args, g)
            speeds_file.write_text(json.dumps(speeds, indent=2))
        speeds[g.name] = speeds[kind]

    if args.only_speed:
        return

    domains = {d: d for d in args.domains}
    models = [args.model, *[str(c) for _, c, _ in qat_rows], *[str(g) for _, g in ggufs]]
    results = {
        d: evaluate(
            models,
            data,
            args.max_windows if i == 0 else args.other_windows,
            work / f"eval-{d.replace(':', '_')}.json",
        )
        for i, (d, data) in enumerate(domains.items())
    }

    def ppl(name: str) -> list[float]:
        return [results[d][name]["ppl"] for d in domains]

    fp = ppl(args.model)
    lines = [
        "| row | file | size | "
        + " | ".join(f"{d} ppl" for d in domains)
        + " | mean x fp | pp512 tok/s | tg128 tok/s |",
        "|---|---|---|" + "---|" * len(domains) + "---|---|---|",
    ]

    def add(name: str, spec: str, size: str, values: list[float], sp: dict | None) -> None:
        ratios = [v / f for v, f in zip(values, fp, strict=True)]
        geo = 1.0
        for r in ratios:
            geo *= r ** (1 / len(ratios))
        cells = " | ".join(f"{v:.2f} ({r:.2f}x)" for v, r in zip(values, ratios, strict=True))
        speed_cells = f"{sp['pp512']:.0f} | {sp['tg128']:.1f}" if sp else "- | -"
        lines.append(f"| {name} | {spec} | {size} | {cells} | {geo:.2f}x | {speed_cells} |")

    add("fp (qatcli, float32)", "-", "-", fp, None)
    for name, g in ggufs:
        add(name, g.name, f"{g.stat().st_size / 2**20:.1f} MiB", ppl(str(g)), speeds[g.name])
    lines += ["", "qatcli's own evaluation of the checkpoints exported above (float32, same windows):", ""]
    lines += [
        "| checkpoint | " + " | ".join(domains) + " | llama.cpp / qatcli |",
        "|---|" + "---|" * (len(domains) + 1),
    ]
    for name, c, g in qat_rows:
        ours, engine = ppl(str(c)), ppl(str(g))
        gap = max(abs(e / o - 1) for e, o in zip(engine, ours, strict=True))
        lines.append(f"| {name} {c.name} | " + " | ".join(f"{v:.2f}" for v in ours) + f" | max {gap:.2%} |")
    command = f"OMP_NUM_THREADS={args.threads} python benchmarks/gguf_smollm2.py {shlex.join(sys.argv[1:])}"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout
    header = (
        f"### GGUF in llama.cpp: qatcli's exports against llama.cpp's quantizer ({args.model})\n\n"
        f"`{command}` (commit {commit.strip()}, {machine()}, {args.threads} threads, "
        f"{datetime.now(timezone.utc):%Y-%m-%d}; {time.perf_counter() - started:.0f} s for this invocation). "
        f"Windows of 512 tokens: {args.max_windows} of {args.domains[0]}, at most {args.other_windows} of each other "
        f"domain (`generated:N` holds N/5 held-out sequences); code:test is Python {sys.version.split()[0]}'s "
        "standard library. Each cell: perplexity (its ratio to fp on that domain); mean: the "
        "geometric mean of the ratios.\n\n"
    )
    text = header + "\n".join(lines) + "\n"
    publish(text, args.results, args.publish)


if __name__ == "__main__":
    main()
