"""Fixtures: a tiny random Llama with a BPE tokenizer trained here on the SOTU text carried in tests/data."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from qatcli.config import GPTQOptions
from qatcli.formats.checkpoint import save_checkpoint
from qatcli.quant.gptq_model import quantize_gptq
from qatcli.quant.grid import QuantSpec
from qatcli.quant.rtn import quantize_rtn
from qatcli.quant.targets import find_targets

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Parallel workers share the cores: one thread each, for the tests and for the processes they start
    # (threads beyond the cores make every worker wait on the others' spinning threads).
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# Short CC0 cuts of State of the Union addresses (tests/data/README.md): train.txt, valid.txt, test.txt.
SOTU = Path(__file__).resolve().parent / "data" / "sotu"


def build_tokenizer(text: str, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator([text], trainer)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_llama_config(vocab_size: int = 512) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Each test worker its own $QATCLI_CACHE: tests neither read nor fill the user's cache, and parallel
    workers never write the same cache folder at once."""
    with pytest.MonkeyPatch.context() as patch:
        cache = tmp_path_factory.mktemp("qatcli-cache")
        patch.setenv("QATCLI_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="session")
def sotu() -> Path:
    return SOTU


def briefly_train(model: LlamaForCausalLM, tokens: torch.Tensor, steps: int, seqlen: int = 64) -> None:
    """A few hundred AdamW steps, so that quantization has a visible, not random, effect on the loss."""
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, tokens.numel() - seqlen, (8,), generator=gen)
        batch = torch.stack([tokens[s : s + seqlen] for s in starts.tolist()])
        model(batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, sotu: Path) -> Path:
    """A saved small LlamaForCausalLM (in_features 64 and 128) with a tokenizer, both trained on SOTU text."""
    path = tmp_path_factory.mktemp("tiny-llama")
    text = (sotu / "train.txt").read_text()
    tokenizer = build_tokenizer(text)
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(len(tokenizer)))
    briefly_train(model, torch.tensor(tokenizer(text)["input_ids"]), steps=150)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def odd_width_model_dir(tmp_path_factory: pytest.TempPathFactory, sotu: Path) -> Path:
    """A random Llama whose MLP width (80) is not a multiple of 32, so the GPTQ format cannot pack it."""
    path = tmp_path_factory.mktemp("odd-llama")
    tokenizer = build_tokenizer((sotu / "valid.txt").read_text(), vocab_size=300)
    config = tiny_llama_config(len(tokenizer))
    config.intermediate_size = 80
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def default_sigint() -> None:
    """In a child process: take SIGINT's default action even where the test run itself ignores SIGINT (a job
    started in the background by a non-interactive shell does, and its children would inherit that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_cli(*args: str, cache: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real command line in a fresh interpreter."""
    env = dict(os.environ)
    if cache is not None:
        env["QATCLI_CACHE"] = str(cache)
    return subprocess.run([sys.executable, "-m", "qatcli", *args], capture_output=True, text=True, env=env, timeout=600)


def make_checkpoint(model_dir: Path, out: Path, spec: QuantSpec, method: str, act_order: bool = False) -> Path:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    targets = find_targets(model, [], [])
    if method == "gptq":
        windows = torch.randint(0, len(tokenizer), (8, 32), generator=torch.Generator().manual_seed(0))
        layers, _ = quantize_gptq(
            model, targets, spec, GPTQOptions(act_order=act_order), "minmax", windows, torch.device("cpu")
        )
    else:
        layers = quantize_rtn(targets, spec, "minmax")
    meta = {
        "method": method,
        "base_model": {"spec": str(model_dir), "kind": "local", "location": str(model_dir)},
        "quantization": {"bits": spec.bits, "group_size": spec.group_size, "sym": spec.sym, "desc_act": act_order},
        "recipe": {},
        "provenance": {},
        "metrics": {},
    }
    out.mkdir()
    save_checkpoint(out, model, tokenizer, layers, meta)
    return out


def assert_export_is_exact(checkpoint: Path, exported: Path) -> None:
    """The GPTQ export of ``checkpoint`` (fp32 scales) computes the checkpoint's logits exactly."""
    from qatcli.formats.checkpoint import load_checkpoint
    from qatcli.formats.export import export_gptq
    from qatcli.formats.packed_model import load_gptq_model

    cpu = torch.device("cpu")
    exported.mkdir()
    export_gptq(checkpoint, exported, dtype="float32")
    reference, _, _, _ = load_checkpoint(checkpoint, cpu)
    packed, _, _ = load_gptq_model(exported, cpu)
    ids = torch.randint(0, 500, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(packed(ids).logits, reference(ids).logits)
