"""Data-free text: sequences sampled from the full-precision model itself, as LLM-QAT does.

Each sequence starts from a uniformly drawn (non-special) token (after BOS, where the tokenizer starts
every text with one), continues greedily for a few tokens and is then sampled from the model's
distribution at temperature 1, whole or (``top_p=P``) cut to its nucleus: the most likely tokens whose
probabilities add up to P. Every fifth sequence is held out: perplexity on the held-out part measures
how closely a quantized model follows the full-precision model (fidelity), not how well it models
natural text.

The sampler's weights are bfloat16 by default where the device multiplies bfloat16 natively (CUDA, CPUs
with AVX512-BF16 or AMX): 1.4x (512-token sequences) to 1.8x (128) the tokens a second of float32 on a
2-core EPYC (docs/results.md). The
sample is then one of the bfloat16 model, which differs from the float32 one in the last bits of its logits;
the teacher and every evaluation stay float32. ``dtype=float32`` samples the float32 model.
"""

from __future__ import annotations

import inspect

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedTokenizerBase, StaticCache

from qatcli.data.sources import GeneratedSpec, Purpose
from qatcli.errors import QatcliError
from qatcli.models.loading import ModelRef, cache_root, leading_bos, load_model, load_tokenizer
from qatcli.outputs import atomic_dir
from qatcli.progress import progress_bar

HELD_OUT_EVERY = 5
GREEDY_PREFIX = 3
BATCH_SIZE = 64
SAMPLER_VERSION = 2  # part of the cache key: samples of an older sampler are not reused


def _cache_keyword(model: nn.Module) -> str:
    """transformers 5.2x renamed the forward's ``past_key_values`` to ``cache`` (the old name warns on every
    call, and goes in 5.40)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


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


def draw(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per row of ``probs`` [b, V], by inverting its cumulative distribution at a uniform draw.

    torch.multinomial draws an exponential variate for every entry (a quarter of the sampling time on a
    49k-token vocabulary); one uniform per row does the same job."""
    cdf = probs.cumsum(dim=-1)
    u = torch.rand(probs.shape[0], 1, generator=generator) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_max(probs.shape[-1] - 1)


@torch.no_grad()
def sample_sequences(
    model: nn.Module,
    allowed_first: torch.Tensor,
    n: int,
    length: int,
    seed: int,
    device: torch.device,
    top_p: float = 1.0,
    bos: int | None = None,
) -> torch.Tensor:
    """n sequences of ``length`` tokens sampled from ``model``: [n, length] int64 on the CPU. With ``bos``
    each starts with that token before the drawn first one (models whose tokenizer puts one at the start of
    every text, as Gemma's does, degenerate into repeating a word without it)."""
    gen = torch.Generator().manual_seed(seed)
    keyword = _cache_keyword(model)
    out = []
    with progress_bar() as progress:
        task = progress.add_task("generating data", total=n * length, unit="tok")
        for start in range(0, n, BATCH_SIZE):
            b = min(BATCH_SIZE, n - start)
            first = allowed_first[torch.randint(0, allowed_first.numel(), (b,), generator=gen)]
            seq = first.unsqueeze(1) if bos is None else torch.stack([torch.full_like(first, bos), first], dim=1)
            given = seq.shape[1]
            # A cache allocated once: a growing one copies every layer's keys and values at each token.
            cache = {keyword: StaticCache(config=model.config, max_cache_len=length), "use_cache": True}
            step = model(seq.to(device), cache_position=torch.arange(given, device=device), **cache)
            for t in range(given, length):
                logits = step.logits[:, -1].float().cpu()
                if t - given < GREEDY_PREFIX:
                    nxt = logits.argmax(dim=-1)
                else:
                    nxt = draw(nucleus(torch.softmax(logits, dim=-1), top_p), gen)
                seq = torch.cat([seq, nxt.unsqueeze(1)], dim=1)
                if t + 1 < length:
                    position = torch.tensor([t], device=device)
                    step = model(nxt.unsqueeze(1).to(device), cache_position=position, **cache)
                progress.advance(task, b)
            progress.advance(task, b * given)
            out.append(seq)
    return torch.cat(out)


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices natively (else bfloat16 is emulated, slower than float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def sampling_dtype(requested: str, device: torch.device) -> torch.dtype:
    """The dtype the sampler's weights take for ``dtype=requested`` (auto, float32 or bfloat16) on ``device``."""
    if requested == "auto":
        return torch.bfloat16 if native_bfloat16(device) else torch.float32
    return getattr(torch, requested)


def first_tokens(tokenizer: PreTrainedTokenizerBase, model: nn.Module) -> torch.Tensor:
    """The tokens a sequence may start from: every id of the model's vocabulary that is not a special token."""
    special = set(tokenizer.all_special_ids)
    vocab = model.get_input_embeddings().weight.shape[0]
    return torch.tensor([i for i in range(vocab) if i not in special], dtype=torch.long)


def _cached_sequences(ref: ModelRef, spec: GeneratedSpec, seed: int, device: torch.device) -> torch.Tensor:
    dtype = sampling_dtype(spec.dtype, device)
    dtype_name = str(dtype).removeprefix("torch.")
    nucleus_part = "" if spec.top_p >= 1.0 else f"-top_p{spec.top_p:g}"
    dtype_part = "" if dtype == torch.float32 else f"-{dtype_name}"  # float32 samples keep their older key
    name = f"n{spec.n}-len{spec.length}{nucleus_part}-seed{seed}-sampler{SAMPLER_VERSION}{dtype_part}"
    folder = cache_root() / "generated" / ref.cache_key / name
    path = folder / "tokens.safetensors"
    if not path.is_file():
        tokenizer = load_tokenizer(ref)
        model = load_model(ref, device, dtype)
        first, bos = first_tokens(tokenizer, model), leading_bos(tokenizer)
        tokens = sample_sequences(model, first, spec.n, spec.length, seed, device, spec.top_p, bos=bos)
        with atomic_dir(folder, force=True, shared=True) as tmp:
            metadata = {"model": ref.spec, "dtype": dtype_name}
            save_file({"tokens": tokens}, str(tmp / "tokens.safetensors"), metadata=metadata)
        del model
    return load_file(str(path))["tokens"]


def generated_tokens(
    ref: ModelRef, spec: GeneratedSpec, purpose: Purpose, seed: int, device: torch.device
) -> torch.Tensor:
    """The token stream of ``generated:N[...]`` for one purpose: held-out sequences for eval, the rest else."""
    sequences = _cached_sequences(ref, spec, seed, device)
    held_out = torch.arange(sequences.shape[0]) % HELD_OUT_EVERY == HELD_OUT_EVERY - 1
    chosen = sequences[held_out] if purpose == "eval" else sequences[~held_out]
    if chosen.shape[0] == 0:
        raise QatcliError(
            f"generated:{spec.n} leaves no sequences for {purpose}; use at least {HELD_OUT_EVERY} sequences"
        )
    return chosen.reshape(-1)
