"""Several data specs in one value: evaluation domains, and weighted mixes for training and calibration.

A data value is one spec, a comma-separated list of specs, or a list of them in a recipe. For training and
calibration each spec may end in a weight, ``:W`` with W written with a decimal point (``sotu:train:0.5``), so
that it cannot be read as a spec's own number (``generated:500:256`` is 500 sequences of 256 tokens): either
every spec of a mix has a weight or none has (equal weights); weights need not add up to 1.

Training windows are drawn from each source in its weight, exactly: the k-th window of the stream comes from
the source furthest below its share of the first k windows (ties: the first listed), and each source is read in
its own seeded order, reshuffled every time it is used up. The counts are part of the state, so a resumed run
continues with exactly the next window.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from qatcli.data.sources import TrainBatches, calibration_windows
from qatcli.errors import QatcliError

_WEIGHT = re.compile(r"^[-+]?(\d+\.\d*|\.\d+)(e[-+]?\d+)?$|^[-+]?(nan|inf|infinity)$", re.IGNORECASE)
WEIGHT_SYNTAX = "SPEC:W with W a number with a decimal point, e.g. sotu:train:0.5,generated:500:0.5"


@dataclass(frozen=True)
class MixPart:
    spec: str
    weight: float  # its share: the weights of a mix add up to 1


def data_specs(value: str | list[str]) -> list[str]:
    """The specs of a data value, in order: a list as it is, a string split at its commas."""
    specs = value if isinstance(value, list) else value.split(",")
    specs = [s.strip() for s in specs]
    if not specs or any(not s for s in specs):
        raise QatcliError(f"data '{shown(value)}' has an empty entry: give specs separated by single commas")
    if len(set(specs)) < len(specs):
        raise QatcliError(f"data '{shown(value)}' names a spec twice")
    return specs


def shown(value: str | list[str]) -> str:
    return value if isinstance(value, str) else ",".join(value)


def _split_weight(spec: str) -> tuple[str, float | None]:
    head, sep, tail = spec.rpartition(":")
    if not sep or not head or not _WEIGHT.match(tail):
        return spec, None
    weight = float(tail)
    if not math.isfinite(weight) or weight <= 0:
        raise QatcliError(f"data '{spec}': the weight {tail} must be a finite number above 0")
    return head, weight


def parse_mix(value: str | list[str]) -> list[MixPart]:
    """The sources of a training or calibration data value with their shares (one source: share 1)."""
    split = [_split_weight(s) for s in data_specs(value)]
    weights = [w for _, w in split]
    if all(w is None for w in weights):
        return [MixPart(spec, 1.0 / len(split)) for spec, _ in split]
    if any(w is None for w in weights):
        raise QatcliError(f"data '{shown(value)}': give every source a weight or none ({WEIGHT_SYNTAX})")
    if len(split) == 1:
        raise QatcliError(f"data '{shown(value)}': a weight needs a second source to mix with")
    total = sum(w for w in weights if w is not None)
    specs = [s for s, _ in split]
    if len(set(specs)) < len(specs):
        raise QatcliError(f"data '{shown(value)}' names a source twice")
    return [MixPart(spec, float(w) / total) for spec, w in split if w is not None]


def eval_specs(value: str | list[str]) -> list[str]:
    """The domains of an evaluation data value; weights have no meaning there."""
    specs = data_specs(value)
    weighted = [s for s in specs if _split_weight(s)[1] is not None]
    if weighted:
        raise QatcliError(f"data '{weighted[0]}': evaluation domains take no weight (weights mix training data)")
    return specs


def shares(parts: list[MixPart], total: int) -> list[int]:
    """``total`` items split over ``parts`` in their weights, by largest remainder (ties: the first listed)."""
    exact = [p.weight * total for p in parts]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(len(parts)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def mixed_calibration_windows(
    streams: list[torch.Tensor], parts: list[MixPart], nsamples: int, seqlen: int, seed: int, bos: int | None
) -> torch.Tensor:
    """``nsamples`` calibration windows, each source giving its share (``calibration_windows`` within it),
    in a seeded order that interleaves the sources."""
    if len(parts) == 1:
        return calibration_windows(streams[0], nsamples, seqlen, seed, bos)
    chunks = [
        calibration_windows(tokens, n, seqlen, seed + i, bos)
        for i, (tokens, n) in enumerate(zip(streams, shares(parts, nsamples), strict=True))
        if n
    ]
    windows = torch.cat(chunks)
    order = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(seed))
    return windows[order]


@dataclass(frozen=True)
class MixedTokens:
    """The token stream of each source of a data value, with the sources' shares."""

    streams: list[torch.Tensor]
    parts: list[MixPart]

    def batches(self, seqlen: int, batch_size: int, seed: int, bos: int | None = None) -> TrainBatches | MixedBatches:
        if len(self.parts) == 1:
            return TrainBatches(self.streams[0], seqlen, batch_size, seed, bos)
        return MixedBatches(self.streams, self.parts, seqlen, batch_size, seed, bos)

    def calibration(self, nsamples: int, seqlen: int, seed: int, bos: int | None = None) -> torch.Tensor:
        return mixed_calibration_windows(self.streams, self.parts, nsamples, seqlen, seed, bos)

    def sha256(self) -> str:
        """A digest of the tokens and shares (one source: of its tokens alone, as runs have always recorded)."""
        digest = hashlib.sha256(self.streams[0].cpu().contiguous().numpy().tobytes())
        if len(self.parts) > 1:
            for tokens in self.streams[1:]:
                digest.update(tokens.cpu().contiguous().numpy().tobytes())
            digest.update(repr([p.weight for p in self.parts]).encode())
        return digest.hexdigest()


class MixedBatches:
    """Endless batches whose windows come from several sources in their weights (see the module's docstring)."""

    def __init__(
        self,
        streams: list[torch.Tensor],
        parts: list[MixPart],
        seqlen: int,
        batch_size: int,
        seed: int,
        bos: int | None = None,
    ) -> None:
        self.sources = [TrainBatches(tokens, seqlen, 1, seed + 7919 * i, bos) for i, tokens in enumerate(streams)]
        self.weights = [p.weight for p in parts]
        self.batch_size = batch_size
        self.drawn = [0] * len(parts)

    def _next_source(self) -> int:
        k = sum(self.drawn) + 1
        deficits = [w * k - n for w, n in zip(self.weights, self.drawn, strict=True)]
        return max(range(len(deficits)), key=lambda i: (deficits[i], -i))

    def next_batch(self) -> torch.Tensor:
        rows = []
        for _ in range(self.batch_size):
            i = self._next_source()
            self.drawn[i] += 1
            rows.append(self.sources[i].next_batch())
        return torch.cat(rows)

    def state_dict(self) -> dict[str, Any]:
        return {"drawn": list(self.drawn), "sources": [s.state_dict() for s in self.sources]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.drawn = list(state["drawn"])
        for source, s in zip(self.sources, state["sources"], strict=True):
            source.load_state_dict(s)
