"""qatcli eval --tasks: lm-evaluation-harness on the local task tests/data/tasks/tiny_facts.yaml, its accuracies
checked against each item's choices scored here, directly, with the same model."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from test_cli import assert_one_line_error, parsed
from transformers import AutoModelForCausalLM, AutoTokenizer

from qatcli.formats.checkpoint import load_checkpoint
from qatcli.formats.packed_model import load_gptq_model

TASKS = Path(__file__).resolve().parent / "data" / "tasks"
TASK = TASKS / "tiny_facts.yaml"
ITEMS = [json.loads(line) for line in (TASKS / "tiny_facts.jsonl").read_text().splitlines()]
SHOT = json.loads((TASKS / "tiny_facts_train.jsonl").read_text())
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No hub, and a datasets cache of the tests' own (the commands run in child processes that inherit it)."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf-datasets"))


def prompt(item: dict) -> str:
    return f"Question: {item['question']}\nAnswer:"


@torch.no_grad()
def expected(model: torch.nn.Module, tokenizer, items: list[dict], shots: int = 0) -> dict[str, float]:
    """acc and acc_norm as the harness defines them, computed here: each choice's summed log-likelihood after
    the prompt (the choice follows a space; acc_norm divides by its length in characters), argmax against the
    answer. A one-shot prompt starts with the only training item and its answer, then a blank line."""
    prefix = f"{prompt(SHOT)} {SHOT['choices'][SHOT['answer']]}\n\n" if shots else ""
    hits = {"acc": 0.0, "acc_norm": 0.0}
    for item in items:
        context = tokenizer(prefix + prompt(item))["input_ids"]
        scores = []
        for choice in item["choices"]:
            ids = tokenizer(prefix + prompt(item) + " " + choice)["input_ids"]
            logprobs = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
            scores.append(sum(logprobs[i - 1, ids[i]].item() for i in range(len(context), len(ids))))
        best = max(range(len(scores)), key=scores.__getitem__)
        best_norm = max(range(len(scores)), key=lambda i: scores[i] / len(item["choices"][i]))
        hits["acc"] += best == item["answer"]
        hits["acc_norm"] += best_norm == item["answer"]
    return {k: v / len(items) for k, v in hits.items()}


def stderr_of(p: float, n: int) -> float:
    """The harness's standard error of a mean of 0/1 scores (sample standard deviation over sqrt(n))."""
    return math.sqrt(p * (1 - p) * n / (n - 1) / n)


def eval_rows(tmp_path: Path, *args: str) -> tuple[list[dict], str]:
    out = tmp_path / "rows.json"
    result = run_cli("eval", *args, "--device", "cpu", "--json", str(out), "--force")
    assert result.returncode == 0, result.stderr
    return json.loads(out.read_text()), result.stdout


def fp_model(model_dir: Path) -> tuple[torch.nn.Module, object]:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(
        model_dir
    )


def test_task_flags_set_the_eval_section(monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["--tasks", "arc_easy, hellaswag", "--tasks", "my.yaml", "--task-dir", "d", "--num-fewshot", "5"]
    r = parsed(monkeypatch, "eval", "m", *args, "--limit", "7", "--eval-batch-size", "2")
    assert r.eval.tasks == ["arc_easy", "hellaswag", "my.yaml"] and r.eval.task_dirs == ["d"]
    assert (r.eval.num_fewshot, r.eval.limit, r.eval.batch_size) == (5, 7, 2)
    assert parsed(monkeypatch, "eval", "m").eval.tasks == []


def test_accuracy_of_an_fp_model_is_the_one_computed_directly(tiny_model_dir: Path, tmp_path: Path) -> None:
    rows, stdout = eval_rows(tmp_path, str(tiny_model_dir), "--tasks", str(TASK))
    (row,) = rows
    result = row["tasks"]["tiny_facts"]
    want = expected(*fp_model(tiny_model_dir), ITEMS)
    assert (result["acc"], result["acc_norm"]) == (want["acc"], want["acc_norm"])
    assert 0 <= result["acc"] <= 1 and result["samples"] == len(ITEMS) and result["num_fewshot"] == 0
    assert result["acc_stderr"] == pytest.approx(stderr_of(want["acc"], len(ITEMS)))
    assert (result["metric"], result["value"]) == ("acc_norm", want["acc_norm"])
    assert result["stderr"] == result["acc_norm_stderr"] == pytest.approx(stderr_of(want["acc_norm"], len(ITEMS)))
    assert row["task_bos"] is False  # the tiny tokenizer adds no BOS, and the harness follows it
    assert "ppl" not in row and row["method"] == "fp"
    assert "tiny_facts acc_norm" in stdout and f"{want['acc_norm']:.3f} ± {result['stderr']:.3f}" in stdout


def test_one_shot_by_task_dir_name_with_perplexity(tiny_model_dir: Path, sotu: Path, tmp_path: Path) -> None:
    args = ["--tasks", "tiny_facts", "--task-dir", str(TASKS), "--num-fewshot", "1"]
    rows, stdout = eval_rows(tmp_path, str(tiny_model_dir), *args, "--data", str(sotu / "test.txt"), "--seqlen", "64")
    (row,) = rows
    result = row["tasks"]["tiny_facts"]
    want = expected(*fp_model(tiny_model_dir), ITEMS, shots=1)
    assert (result["acc"], result["acc_norm"], result["num_fewshot"]) == (want["acc"], want["acc_norm"], 1)
    assert row["ppl"] > 1 and row["seqlen"] == 64  # both measured
    assert "ppl" in stdout and "1-shot" in stdout


def test_checkpoint_and_its_export_score_the_same(tiny_model_dir: Path, tmp_path: Path) -> None:
    ckpt, export = tmp_path / "rtn", tmp_path / "gptq"
    made = run_cli("ptq", str(tiny_model_dir), "--bits", "2", "--group-size", "32", "-o", str(ckpt))
    assert made.returncode == 0, made.stderr
    exported = run_cli("export", str(ckpt), "-o", str(export), "--dtype", "float32")  # the very same weights
    assert exported.returncode == 0, exported.stderr
    rows, _ = eval_rows(tmp_path, str(ckpt), str(export), "--tasks", str(TASK))
    by_format = {r["format"]: r["tasks"]["tiny_facts"] for r in rows}
    quantized, tokenizer, _, _ = load_checkpoint(ckpt, CPU)
    want = expected(quantized.eval(), tokenizer, ITEMS)
    packed, packed_tokenizer, _ = load_gptq_model(export, CPU)
    assert want == expected(packed.eval(), packed_tokenizer, ITEMS)
    for fmt in ("qatcli", "gptq"):
        assert (by_format[fmt]["acc"], by_format[fmt]["acc_norm"]) == (want["acc"], want["acc_norm"]), fmt
    # the quantized weights were scored, not the full-precision model they came from
    assert want != expected(*fp_model(tiny_model_dir), ITEMS)


def test_limit_keeps_the_first_items(tiny_model_dir: Path, tmp_path: Path) -> None:
    rows, stdout = eval_rows(tmp_path, str(tiny_model_dir), "--tasks", str(TASK), "--limit", "5")
    result = rows[0]["tasks"]["tiny_facts"]
    want = expected(*fp_model(tiny_model_dir), ITEMS[:5])
    assert (result["samples"], result["acc"], result["acc_norm"]) == (5, want["acc"], want["acc_norm"])
    assert "at most 5 items" in stdout


def test_unknown_task_and_missing_harness_are_one_line_errors(
    tiny_model_dir: Path, sotu: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = str(tiny_model_dir)
    assert_one_line_error(run_cli("eval", model, "--tasks", "no_such_task"), "unknown task 'no_such_task'")
    assert_one_line_error(run_cli("eval", model, "--tasks", str(tmp_path / "none.yaml")), "does not exist")
    assert_one_line_error(run_cli("eval", model, "--tasks", str(TASK), "--limit", "0"), "eval.limit must be positive")
    stub = tmp_path / "stub" / "lm_eval"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'lm_eval'\", name='lm_eval')\n")
    monkeypatch.setenv("PYTHONPATH", str(stub.parent))
    missing = run_cli("eval", model, "--tasks", str(TASK))
    assert_one_line_error(missing, "pip install 'qatcli[tasks]'")
    # perplexity alone never needs the harness
    ppl = run_cli("eval", model, "--data", str(sotu / "test.txt"), "--seqlen", "64", "--max-windows", "1")
    assert ppl.returncode == 0, ppl.stderr


def test_compare_reports_the_tasks_of_every_cell(tiny_model_dir: Path, sotu: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"""
model: {tiny_model_dir}
output: {out}
device: cpu
quant: {{bits: 2, group_size: 32}}
eval: {{data: {sotu / "test.txt"}, seqlen: 64, max_windows: 2, tasks: [{TASK}]}}
export: {{dtype: float32}}
compare:
  methods:
    - method: rtn
"""
    )
    first = run_cli("compare", str(recipe))
    assert first.returncode == 0, first.stderr
    rows = {r["cell"]: r for r in json.loads((out / "compare.json").read_text())["rows"]}
    packed, tokenizer, _ = load_gptq_model(out / "cells" / "rtn-w2-g32" / "gptq", CPU)
    wants = {"fp": expected(*fp_model(tiny_model_dir), ITEMS), "rtn-w2-g32": expected(packed.eval(), tokenizer, ITEMS)}
    for cell, want in wants.items():
        result = rows[cell]["tasks"]["tiny_facts"]
        assert (result["acc"], result["acc_norm"], result["samples"]) == (want["acc"], want["acc_norm"], 16), cell
    with (out / "compare.csv").open() as f:
        table = {r["cell"]: r for r in csv.DictReader(f)}
    assert float(table["rtn-w2-g32"]["tiny_facts.acc_norm"]) == wants["rtn-w2-g32"]["acc_norm"]
    assert "tiny_facts.acc_norm_stderr" in table["fp"]
    assert "tiny_facts acc_norm" in first.stdout

    # other task settings: every row is evaluated again, no checkpoint is made again
    checkpoint = out / "cells" / "rtn-w2-g32" / "checkpoint" / "qatcli.json"
    stamp = checkpoint.stat().st_mtime_ns
    second = run_cli("compare", str(recipe), "--set", "eval.limit=4")
    assert second.returncode == 0, second.stderr
    rows = {r["cell"]: r for r in json.loads((out / "compare.json").read_text())["rows"]}
    assert {c: r["status"] for c, r in rows.items()} == {"fp": "new", "rtn-w2-g32": "re-evaluated"}
    assert checkpoint.stat().st_mtime_ns == stamp
    assert all(r["tasks"]["tiny_facts"]["samples"] == 4 for r in rows.values())


def test_a_large_vocabulary_scores_fewer_requests_at_once(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lm_eval.models.huggingface import HFLM

    from qatcli.config import EvalConfig
    from qatcli.evaluation import tasks

    assert [tasks.task_batch_size(8, v) for v in (49152, 262144, 2**20)] == [8, 2, 1]
    model, tokenizer = fp_model(tiny_model_dir)
    vocab = model.get_output_embeddings().weight.shape[0]
    monkeypatch.setattr(tasks, "TASK_LOGITS_PER_POSITION", vocab)  # as if the vocabulary were huge
    batches = []
    model_call = HFLM._model_call

    def counted(self: HFLM, inps: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        batches.append(inps.shape[0])
        return model_call(self, inps, *args, **kwargs)

    monkeypatch.setattr(HFLM, "_model_call", counted)
    row = tasks.evaluate_tasks(model, tokenizer, EvalConfig(tasks=[str(TASK)]))
    assert batches and set(batches) == {1}
    assert row["tasks"]["tiny_facts"]["acc"] == expected(model, tokenizer, ITEMS)["acc"]
