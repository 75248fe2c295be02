"""The token source of one command: every data spec it reads, tokenized once, with one base model for ``generated:``."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from qatcli.data.generated import generated_tokens
from qatcli.data.mix import MixedTokens, parse_mix
from qatcli.data.sources import Purpose, parse_generated, read_texts, tokenize_texts
from qatcli.errors import QatcliError
from qatcli.models.loading import ModelRef, gemma_family


def window_bos(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The token every window of text starts with: BOS for the Gemma family, which needs it as other models do
    not; None for the rest, whose windows are plain cuts of the text as in GPTQ's protocol (and its papers'
    numbers)."""
    return tokenizer.bos_token_id if gemma_family(model) else None


class TokenSource:
    """Resolves data specs to 1-D token streams for one command and keeps each stream it made.

    ``base`` is the full-precision model that ``generated:`` specs sample from; None where the command has none.
    ``bos`` is the token every window cut from these streams starts with (``window_bos``), or None.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        base: ModelRef | None,
        seed: int,
        device: torch.device,
        bos: int | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.base = base
        self.seed = seed
        self.device = device
        self.bos = bos
        self._streams: dict[tuple[str, Purpose], torch.Tensor] = {}

    def tokens(self, spec: str, purpose: Purpose) -> torch.Tensor:
        key = (spec, purpose)
        if key not in self._streams:
            self._streams[key] = self._load(spec, purpose)
        return self._streams[key]

    def mix(self, value: str | list[str], purpose: Purpose) -> MixedTokens:
        """The token streams of every source of a (possibly weighted) data value, with their shares."""
        parts = parse_mix(value)
        return MixedTokens([self.tokens(p.spec, purpose) for p in parts], parts)

    def _load(self, spec: str, purpose: Purpose) -> torch.Tensor:
        gen = parse_generated(spec)
        if gen is None:
            return tokenize_texts(read_texts(spec, purpose), self.tokenizer)
        if self.base is None:
            raise QatcliError(f"data '{spec}' samples the full-precision base model, and none is known here")
        return generated_tokens(self.base, gen, purpose, self.seed, self.device)
