"""Several evaluation domains in one run, the ``code`` alias, and weighted training and calibration mixes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from qatcli.data.mix import MixedBatches, MixPart, data_specs, eval_specs, mixed_calibration_windows, parse_mix, shares
from qatcli.data.sources import check_data_spec, read_texts
from qatcli.data.stdlib_code import CODE_FILES, code_split
from qatcli.errors import QatcliError


def test_a_mix_parses_its_weights_into_shares() -> None:
    parts = parse_mix("sotu:train:0.5,generated:500:1.5")
    assert parts == [MixPart("sotu:train", 0.25), MixPart("generated:500", 0.75)]
    # an integer is a spec's own number (LEN), never a weight; no weights: equal shares
    assert parse_mix("generated:500:256,code") == [MixPart("generated:500:256", 0.5), MixPart("code", 0.5)]
    assert parse_mix(["a.txt", "b.txt"]) == [MixPart("a.txt", 0.5), MixPart("b.txt", 0.5)]
    assert parse_mix("sotu:train") == [MixPart("sotu:train", 1.0)]
    assert data_specs(" a.txt , b.txt ") == ["a.txt", "b.txt"]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("sotu:train:0.0,code:0.5", "must be a finite number above 0"),
        ("sotu:train:-0.5,code:0.5", "must be a finite number above 0"),
        ("sotu:train:nan,code:0.5", "must be a finite number above 0"),
        ("sotu:train:inf,code:0.5", "must be a finite number above 0"),
        ("sotu:train:0.5,generated:500:1", "give every source a weight or none"),
        ("sotu:train:0.5", "needs a second source"),
        ("sotu:train,,code", "empty entry"),
        ("code,code", "names a spec twice"),
        ("code:0.3,code:0.7", "names a source twice"),
    ],
)
def test_a_bad_mix_is_one_message(value: str, message: str) -> None:
    with pytest.raises(QatcliError, match=message):
        parse_mix(value)


def test_evaluation_domains_take_no_weight() -> None:
    assert eval_specs("sotu:test,code:test,generated:100") == ["sotu:test", "code:test", "generated:100"]
    with pytest.raises(QatcliError, match="take no weight"):
        eval_specs("sotu:test:0.5,code:0.5")


def test_shares_split_exactly_by_largest_remainder() -> None:
    parts = [MixPart("a", 0.5), MixPart("b", 0.3), MixPart("c", 0.2)]
    assert shares(parts, 10) == [5, 3, 2]
    assert shares(parts, 7) == [4, 2, 1]  # 3.5, 2.1, 1.4: the largest remainder (a's) gets the spare one
    assert sum(shares(parts, 129)) == 129


def _streams() -> list[torch.Tensor]:
    # each source's tokens in a range of its own, so a window's source is known from its first token
    return [torch.arange(0, 4000), torch.arange(10_000, 11_000), torch.arange(20_000, 22_000)]


def _source_of(window: torch.Tensor) -> int:
    return int(window[0]) // 10_000


def test_mixed_batches_draw_each_source_in_its_weight_and_resume_exactly() -> None:
    parts = [MixPart("a", 0.5), MixPart("b", 0.25), MixPart("c", 0.25)]
    batches = MixedBatches(_streams(), parts, seqlen=8, batch_size=4, seed=3)
    drawn = torch.cat([batches.next_batch() for _ in range(50)])
    counts = [sum(_source_of(w) == i for w in drawn) for i in range(3)]
    assert counts == [100, 50, 50]
    # every prefix stays within one window of its share
    for k in range(1, drawn.shape[0] + 1):
        seen = [sum(_source_of(w) == i for w in drawn[:k]) for i in range(3)]
        assert all(abs(n - p.weight * k) < 1 for n, p in zip(seen, parts, strict=True))
    # source b has 125 windows: 50 draws stay inside its first epoch, so none repeats
    b_windows = [int(w[0]) for w in drawn if _source_of(w) == 1]
    assert len(set(b_windows)) == len(b_windows)

    state = json.loads(json.dumps(batches.state_dict()))
    expected = [batches.next_batch() for _ in range(40)]  # past b's epoch: reshuffled in its seeded order
    resumed = MixedBatches(_streams(), parts, seqlen=8, batch_size=4, seed=3)
    resumed.load_state_dict(state)
    assert all(torch.equal(resumed.next_batch(), e) for e in expected)
    # another seed, another order
    other = MixedBatches(_streams(), parts, seqlen=8, batch_size=4, seed=4)
    assert not torch.equal(torch.cat([other.next_batch() for _ in range(50)]), drawn)


def test_mixed_calibration_takes_each_share() -> None:
    parts = [MixPart("a", 0.75), MixPart("c", 0.25)]
    streams = [_streams()[0], _streams()[2]]
    windows = mixed_calibration_windows(streams, parts, nsamples=16, seqlen=8, seed=0, bos=None)
    assert windows.shape == (16, 8)
    assert sorted(_source_of(w) for w in windows) == [0] * 12 + [2] * 4
    again = mixed_calibration_windows(streams, parts, nsamples=16, seqlen=8, seed=0, bos=None)
    assert torch.equal(windows, again)


def test_code_alias_reads_the_standard_library_in_fixed_disjoint_splits() -> None:
    splits = {s: code_split(s) for s in ("train", "valid", "test")}
    assert [len(splits[s]) for s in ("train", "valid", "test")] == [55, 7, 6]
    assert sum(len(v) for v in splits.values()) == len(CODE_FILES) == len(set(CODE_FILES))
    assert not set(splits["test"]) & set(splits["train"])
    texts = read_texts("code:test", "eval")
    assert len(texts) == 6 and all("def " in t for t in texts)
    assert read_texts("code", "eval") == texts and read_texts("code", "train") == read_texts("code:train", "train")
    with pytest.raises(QatcliError, match="expected code, code:train"):
        check_data_spec("code:dev")


@pytest.fixture(scope="module")
def domains(tmp_path_factory: pytest.TempPathFactory, sotu: Path) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("domains")
    speech, other = folder / "speech.txt", folder / "other.txt"
    speech.write_text((sotu / "test.txt").read_text()[:20_000])
    other.write_text((sotu / "valid.txt").read_text()[:20_000])
    return speech, other


def test_several_domains_give_each_the_number_of_its_own_run(
    tiny_model_dir: Path, domains: tuple[Path, Path], tmp_path: Path
) -> None:
    speech, _ = domains
    common = ("--seqlen", "64", "--max-windows", "5")
    both = tmp_path / "both.json"
    result = run_cli("eval", str(tiny_model_dir), "--data", f"{speech},code:test", *common, "--json", str(both))
    assert result.returncode == 0, result.stderr
    row = json.loads(both.read_text())[0]
    assert list(row["domains"]) == [str(speech), "code:test"]
    assert row["code_python"].count(".") == 2
    for spec in (str(speech), "code:test"):
        single = tmp_path / "single.json"
        alone = run_cli("eval", str(tiny_model_dir), "--data", spec, *common, "--json", str(single), "--force")
        assert alone.returncode == 0, alone.stderr
        one = json.loads(single.read_text())[0]
        assert "domains" not in one
        assert row["domains"][spec]["ppl"] == one["ppl"] and row["domains"][spec]["windows"] == one["windows"] == 5
    each = [d["nll"] for d in row["domains"].values()]
    assert row["ppl"] == pytest.approx(math.exp(sum(each) / 2), rel=1e-12)
    assert "geo mean" in result.stdout and "code:test" in result.stdout


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("{speech}:0.5,{other}:0.0", "must be a finite number above 0"),
        ("{speech},,{other}", "empty entry"),
        ("{speech},{empty}", "holds no text"),
    ],
)
def test_a_bad_training_mix_is_one_line_before_any_work(
    tiny_model_dir: Path, domains: tuple[Path, Path], tmp_path: Path, data: str, message: str
) -> None:
    speech, other = domains
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    spec = data.format(speech=speech, other=other, empty=empty)
    out = tmp_path / "run"
    result = run_cli("qat", str(tiny_model_dir), "--bits", "4", "--data", spec, "--steps", "1", "-o", str(out))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_eval_refuses_a_weighted_domain(tiny_model_dir: Path, domains: tuple[Path, Path]) -> None:
    speech, other = domains
    result = run_cli("eval", str(tiny_model_dir), "--data", f"{speech}:0.5,{other}:0.5")
    assert result.returncode == 2 and "take no weight" in result.stderr


def test_qat_trains_on_a_mix_and_resumes_it(tiny_model_dir: Path, domains: tuple[Path, Path], tmp_path: Path) -> None:
    speech, other = domains
    common = ["--bits", "4", "--steps", "4", "--seqlen", "32", "--batch-size", "2", "--save-every", "2"]
    mix = f"{speech}:0.75,{other}:0.25"
    whole = tmp_path / "whole"
    done = run_cli("qat", str(tiny_model_dir), *common, "--data", mix, "-o", str(whole))
    assert done.returncode == 0, done.stderr
    parts = tmp_path / "parts"
    first = run_cli("qat", str(tiny_model_dir), *common, "--data", mix, "-o", str(parts), "--stop-after", "2")
    assert first.returncode != 0 or not (parts / "qatcli.json").exists()
    second = run_cli("qat", str(tiny_model_dir), *common, "--data", mix, "-o", str(parts), "--resume")
    assert second.returncode == 0, second.stderr
    losses = [
        [json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (whole, parts)
    ]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    # another weight is other data: a resume refuses it
    third = tmp_path / "third"
    run_cli("qat", str(tiny_model_dir), *common, "--data", mix, "-o", str(third), "--stop-after", "2")
    changed = run_cli(
        "qat", str(tiny_model_dir), *common, "--data", f"{speech}:0.5,{other}:0.5", "-o", str(third), "--resume"
    )
    assert changed.returncode == 2 and "qat.data" in changed.stderr
