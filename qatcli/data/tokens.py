"""The token source of one command: every data spec it reads, tokenized once, with one base model for ``generated:``."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from qatcli.data.generated import generated_tokens
from qatcli.data.models import ModelRef
from qatcli.data.sources import Purpose, parse_generated, read_texts, tokenize_texts
from qatcli.errors import QatcliError


class TokenSource:
    """Resolves data specs to 1-D token streams for one command and keeps each stream it made.

    ``base`` is the full-precision model that ``generated:`` specs sample from; None where the command has none.
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, base: ModelRef | None, seed: int, device: torch.device
    ) -> None:
        self.tokenizer = tokenizer
        self.base = base
        self.seed = seed
        self.device = device
        self._streams: dict[tuple[str, Purpose], torch.Tensor] = {}

    def tokens(self, spec: str, purpose: Purpose) -> torch.Tensor:
        key = (spec, purpose)
        if key not in self._streams:
            self._streams[key] = self._load(spec, purpose)
        return self._streams[key]

    def _load(self, spec: str, purpose: Purpose) -> torch.Tensor:
        gen = parse_generated(spec)
        if gen is None:
            return tokenize_texts(read_texts(spec, purpose), self.tokenizer)
        if self.base is None:
            raise QatcliError(f"data '{spec}' samples the full-precision base model, and none is known here")
        return generated_tokens(self.base, gen, purpose, self.seed, self.device)
