"""Data-free text: sequences sampled from the full-precision model itself, as LLM-QAT does.

Each sequence starts from a uniformly drawn (non-special) token, continues greedily for a few tokens
and is then sampled from the model's distribution at temperature 1, whole or (``top_p=P``) cut to its
nucleus: the most likely tokens whose probabilities add up to P. Every fifth sequence is held
out: perplexity on the held-out part measures how closely a quantized model follows the
full-precision model (fidelity), not how well it models natural text.
"""

from __future__ import annotations

from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qatcli.data.models import ModelRef, cache_root, load_model, load_tokenizer
from qatcli.data.sources import GeneratedSpec, Purpose
from qatcli.errors import QatcliError
from qatcli.outputs import atomic_dir
from qatcli.report.progress import progress_bar

HELD_OUT_EVERY = 5
GREEDY_PREFIX = 3
BATCH_SIZE = 64


def _cache_argument(step: Any) -> dict[str, Any]:
    """The key-value cache of a forward output, as the next call takes it: transformers 5.2x renamed
    ``past_key_values`` to ``cache`` (the old name warns on every call, and goes in 5.40)."""
    if "cache" in step:
        return {"cache": step["cache"]}
    return {"past_key_values": step["past_key_values"]}


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """``probs`` [b, V] with every token outside the smallest set whose probabilities reach ``top_p`` zeroed
    (the most likely token is always kept), renormalised."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    keep_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs < top_p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    kept = probs * keep
    return kept / kept.sum(dim=-1, keepdim=True)


@torch.no_grad()
def sample_sequences(
    model: nn.Module,
    allowed_first: torch.Tensor,
    n: int,
    length: int,
    seed: int,
    device: torch.device,
    top_p: float = 1.0,
) -> torch.Tensor:
    """n sequences of ``length`` tokens sampled from ``model``: [n, length] int64 on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    with progress_bar() as progress:
        task = progress.add_task("generating data", total=n * length, unit="tok")
        for start in range(0, n, BATCH_SIZE):
            b = min(BATCH_SIZE, n - start)
            first = allowed_first[torch.randint(0, allowed_first.numel(), (b,), generator=gen)]
            seq = first.unsqueeze(1)
            step = model(seq.to(device), use_cache=True)
            for t in range(1, length):
                logits = step.logits[:, -1].float().cpu()
                if t <= GREEDY_PREFIX:
                    nxt = logits.argmax(dim=-1)
                else:
                    probs = nucleus(torch.softmax(logits, dim=-1), top_p)
                    nxt = torch.multinomial(probs, 1, generator=gen).squeeze(1)
                seq = torch.cat([seq, nxt.unsqueeze(1)], dim=1)
                step = model(nxt.unsqueeze(1).to(device), use_cache=True, **_cache_argument(step))
                progress.advance(task, b)
            progress.advance(task, b)
            out.append(seq)
    return torch.cat(out)


def _cached_sequences(ref: ModelRef, spec: GeneratedSpec, seed: int, device: torch.device) -> torch.Tensor:
    nucleus_part = "" if spec.top_p >= 1.0 else f"-top_p{spec.top_p:g}"
    folder = cache_root() / "generated" / ref.cache_key / f"n{spec.n}-len{spec.length}{nucleus_part}-seed{seed}"
    path = folder / "tokens.safetensors"
    if not path.is_file():
        tokenizer = load_tokenizer(ref)
        model = load_model(ref, device)
        special = set(tokenizer.all_special_ids)
        vocab = model.get_input_embeddings().weight.shape[0]
        allowed = torch.tensor([i for i in range(vocab) if i not in special], dtype=torch.long)
        tokens = sample_sequences(model, allowed, spec.n, spec.length, seed, device, spec.top_p)
        with atomic_dir(folder, force=True) as tmp:
            save_file({"tokens": tokens}, str(tmp / "tokens.safetensors"), metadata={"model": ref.spec})
        del model
    return load_file(str(path))["tokens"]


def generated_tokens(
    ref: ModelRef, spec: GeneratedSpec, purpose: Purpose, seed: int, device: torch.device
) -> torch.Tensor:
    """The token stream of ``generated:N[:LEN]`` for one purpose: held-out sequences for eval, the rest else."""
    sequences = _cached_sequences(ref, spec, seed, device)
    held_out = torch.arange(sequences.shape[0]) % HELD_OUT_EVERY == HELD_OUT_EVERY - 1
    chosen = sequences[held_out] if purpose == "eval" else sequences[~held_out]
    if chosen.shape[0] == 0:
        raise QatcliError(
            f"generated:{spec.n} leaves no sequences for {purpose}; use at least {HELD_OUT_EVERY} sequences"
        )
    return chosen.reshape(-1)
