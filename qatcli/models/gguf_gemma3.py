"""Converting a Gemma 3 GGUF file (llama.cpp's layout) into a Hugging Face Gemma3ForCausalLM directory.

Every tensor is dequantized to float32 with the gguf package's ``dequantize`` (the function transformers' own
GGUF loader calls; it reads Q4_K, Q6_K, Q5_0, Q8_0 and the other llama.cpp types). What llama.cpp's converter
(convert_hf_to_gguf.py, ``Gemma3Model``) changed is undone, and what its runtime (llama-model.cpp,
``LLM_ARCH_GEMMA3``) assumes without writing it down is written into config.json:

- Norm weights: Gemma's RMSNorm scales by (1 + weight); the converter stores weight + 1 for every tensor whose
  name ends in ``norm.weight`` (the four norms of each block, q_norm, k_norm and the final norm), so 1 is
  subtracted here, as transformers' own GGUF loader does for gemma3.
- No permutation: the converter permutes the rows of q/k only for Llama-family models (``LlamaModel``); Gemma's
  q_proj and k_proj are stored as Hugging Face has them.
- Embeddings: stored raw; Gemma3ForCausalLM multiplies them by sqrt(hidden_size) itself, as llama.cpp does.
  lm_head is tied to them unless the file has an ``output.weight``.
- Attention layout: every sixth layer full attention, the others sliding-window (``attention.sliding_window``
  wide, absent or 0: all full); rotary bases ``rope.freq_base`` for full layers and 10000 for sliding ones
  (``rope.freq_base_swa`` where the file states it); query scale 1/sqrt(head_dim), except for the 62-layer 27B
  whose scale is 1/sqrt(hidden_size / heads); ``final_logit_softcapping`` where the file states it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from qatcli.errors import QatcliError

ARCH = "gemma3"
# llama.cpp's runtime constants for gemma3 (not stored in the file)
SLIDING_WINDOW_PATTERN = 6
SLIDING_ROPE_BASE = 10_000.0
LAYERS_27B = 62

# GGUF block tensor (blk.N.<name>.weight) -> Hugging Face module under model.layers.N
BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_ffw_norm": "post_feedforward_layernorm",
}
TOP_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _value(reader: Any, key: str, default: Any = None) -> Any:
    """One scalar or string metadata value (as transformers' GGUF loader parses it), or ``default``."""
    from gguf import GGUFValueType

    field = reader.fields.get(key)
    if field is None:
        return default
    part = field.parts[field.data[0]]
    if field.types[0] == GGUFValueType.STRING:
        return bytes(part).decode("utf-8")
    return part.tolist()[0]


def _required(reader: Any, key: str) -> Any:
    value = _value(reader, key)
    if value is None:
        raise QatcliError(f"GGUF file has no '{key}': not a complete {ARCH} model")
    return value


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face parameter name of a GGUF tensor name (None for a tensor the model does not use)."""
    stem, _, suffix = gguf_name.rpartition(".")
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in BLOCK_TENSORS:
        return f"model.layers.{parts[1]}.{BLOCK_TENSORS[parts[2]]}.{suffix}"
    if stem in TOP_TENSORS:
        return f"{TOP_TENSORS[stem]}.{suffix}"
    return None


def gemma3_config(reader: Any) -> Any:
    """The Gemma3TextConfig that the file's gemma3.* metadata and llama.cpp's gemma3 constants describe."""
    from transformers import Gemma3TextConfig

    key = lambda name: _required(reader, f"{ARCH}.{name}")  # noqa: E731
    hidden, heads, layers = key("embedding_length"), key("attention.head_count"), key("block_count")
    head_dim = _value(reader, f"{ARCH}.attention.key_length", hidden // heads)
    if _value(reader, f"{ARCH}.attention.value_length", head_dim) != head_dim:
        raise QatcliError("GGUF file: gemma3 with key_length != value_length is not supported")
    window = _value(reader, f"{ARCH}.attention.sliding_window", 0) or 0
    layer_types = [
        "sliding_attention" if window > 0 and (i + 1) % SLIDING_WINDOW_PATTERN else "full_attention"
        for i in range(layers)
    ]
    full_rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(key("rope.freq_base"))}
    scaling = _value(reader, f"{ARCH}.rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise QatcliError(f"GGUF file: rope scaling '{scaling}' is not supported for gemma3")
        full_rope = {**full_rope, "rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
    sliding_base = float(_value(reader, f"{ARCH}.rope.freq_base_swa", SLIDING_ROPE_BASE))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise QatcliError("GGUF file has no vocabulary (tokenizer.ggml.tokens): its tokenizer cannot be rebuilt")
    softcap = _value(reader, f"{ARCH}.final_logit_softcapping")
    config = Gemma3TextConfig(
        vocab_size=len(tokens.data),
        hidden_size=hidden,
        intermediate_size=key("feed_forward_length"),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=_value(reader, f"{ARCH}.attention.head_count_kv", heads),
        head_dim=head_dim,
        max_position_embeddings=key("context_length"),
        # stored as float32 (9.99999997e-07): its shortest spelling, 1e-06, is the value the model was trained with
        rms_norm_eps=float(str(np.float32(key("attention.layer_norm_rms_epsilon")))),
        sliding_window=window if window > 0 else None,
        layer_types=layer_types,
        rope_parameters={
            "full_attention": full_rope,
            "sliding_attention": {"rope_type": "default", "rope_theta": sliding_base},
        },
        query_pre_attn_scalar=hidden // heads if layers == LAYERS_27B else head_dim,
        final_logit_softcapping=float(softcap) if softcap else None,
        attn_logit_softcapping=None,
        hidden_activation="gelu_pytorch_tanh",
        bos_token_id=_value(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_value(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_value(reader, "tokenizer.ggml.padding_token_id"),
        tie_word_embeddings=all(t.name != "output.weight" for t in reader.tensors),
    )
    config.architectures = ["Gemma3ForCausalLM"]
    return config


def gemma3_state_dict(reader: Any) -> dict[str, torch.Tensor]:
    """Every tensor of the file, dequantized to float32, under its Hugging Face name, norms as weight - 1."""
    from gguf import dequantize

    state = {}
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is None:
            raise QatcliError(f"GGUF file: unexpected tensor '{tensor.name}' for {ARCH}")
        try:
            array = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as err:
            raise QatcliError(f"GGUF file: cannot dequantize {tensor.name} ({tensor.tensor_type.name})") from err
        # a copy: float32 tensors come back as read-only views of the memory-mapped file, which torch warns of
        weight = torch.from_numpy(np.array(array, dtype=np.float32, order="C"))
        if tensor.name.endswith("norm.weight"):
            weight = weight - 1.0  # llama.cpp stores Gemma's RMSNorm weight w as w + 1
        state[name] = weight
    return state


def convert_gemma3_gguf(gguf_path: Path, target: Path, name: str) -> None:
    """Write the fp32 Gemma3ForCausalLM of the GGUF file ``gguf_path``, with its tokenizer, into ``target``."""
    from gguf import GGUFReader
    from transformers import AutoTokenizer, Gemma3ForCausalLM

    reader = GGUFReader(gguf_path)
    arch = _value(reader, "general.architecture")
    if arch != ARCH:
        raise QatcliError(f"GGUF file '{gguf_path}' holds a '{arch}' model, not {ARCH}")
    config = gemma3_config(reader)
    state = gemma3_state_dict(reader)
    with torch.random.fork_rng(devices=[]):  # the random initialisation, overwritten, leaves the caller's RNG be
        model = Gemma3ForCausalLM(config).float()
    missing, unexpected = model.load_state_dict(state, strict=False)
    expected_missing = ["lm_head.weight"] if config.tie_word_embeddings else []
    if unexpected or sorted(missing) != expected_missing:
        raise QatcliError(f"GGUF file '{gguf_path}': tensors missing {sorted(missing)}, unexpected {unexpected}")
    model.config.name_or_path = name
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
