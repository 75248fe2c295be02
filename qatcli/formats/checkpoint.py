"""The qatcli checkpoint directory: what differs from the base model, plus the grid of every quantized layer.

Version 2 (docs/checkpoint-format.md): qatcli.json names the base model with the sha256 of its weight files;
latent.safetensors holds the fp32 latent weight of each quantized layer whose latent weight is not the base's
(RTN's are), and any other parameter of the decoder blocks that differs from the base's (the norms AWQ folds
its scales into); quant.safetensors the grid (scales, zeros, g_idx); config.json and the tokenizer files
complete it. Every other parameter is read from the base model. Version 1 (the whole model in
model.safetensors) is read.

The quantized weight of a layer is always grid.fake_quantize(latent, scales, zeros, g_idx): eval,
QAT and export derive the integer codes with that one function.
"""

from __future__ import annotations

import hashlib
import json
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from qatcli.errors import QatcliError
from qatcli.models.loading import ModelRef, resolve_model
from qatcli.notices import carry_notices
from qatcli.quant.grid import QuantSpec
from qatcli.quant.layer import LayerQuant, apply_fake_quant
from qatcli.quant.targets import decoder_blocks, output_head, rule_for, spec_fields, untie_lm_head
from qatcli.version import __version__

FORMAT = "qatcli-checkpoint"
FORMAT_VERSION = 2
# Version 3 is version 2 with a `changed` list: written only where other parameters changed (AWQ), so that an
# older qatcli refuses such a checkpoint instead of loading it without those parameters.
CHANGED_FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
META_FILE = "qatcli.json"
QUANT_FILE = "quant.safetensors"
LATENT_FILE = "latent.safetensors"
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")  # the first that matches a base model's files is hashed

# sha256 of files already hashed in this process, keyed by (resolved path, size, mtime): compare and a
# command that saves then reloads hash each base model once.
_DIGESTS: dict[tuple[str, int, int], str] = {}


def provenance(command: str, device: torch.device, seed: int) -> dict[str, Any]:
    return {
        "command": command,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "seed": seed,
        "host": platform.node(),
        "qatcli": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
    }


def _file_sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        with path.open("rb") as f:
            _DIGESTS[key] = hashlib.file_digest(f, "sha256").hexdigest()
    return _DIGESTS[key]


def base_weight_files(ref: ModelRef) -> list[Path]:
    """The files holding the weights of a base model: its *.safetensors, else its *.bin files."""
    for pattern in WEIGHT_PATTERNS:
        if ref.kind == "hub":
            from huggingface_hub import snapshot_download  # a transformers dependency, needed only here

            try:
                root = Path(snapshot_download(ref.location, allow_patterns=[pattern]))
            except (OSError, ValueError) as err:
                raise QatcliError(f"cannot fetch the weights of '{ref.spec}': {str(err).splitlines()[0]}") from err
        else:
            root = Path(ref.location)
        files = sorted(root.glob(pattern))
        if files:
            return files
    raise QatcliError(f"base model '{ref.spec}' has no weight files ({', '.join(WEIGHT_PATTERNS)}) in {ref.location}")


def base_weights_sha256(ref: ModelRef) -> dict[str, str]:
    """The sha256 of each weight file of a base model, by file name."""
    return {path.name: _file_sha256(path) for path in base_weight_files(ref)}


def _base_tensor_files(ref: ModelRef) -> dict[str, Path]:
    """Tensor name -> safetensors file of a base model; empty for .bin weights."""
    found: dict[str, Path] = {}
    for path in base_weight_files(ref):
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt") as f:
                    found.update(dict.fromkeys(f.keys(), path))
            except SafetensorError as err:
                raise QatcliError(f"cannot read the base model's weights '{path}': {err}") from err
    return found


def _equals_base(files: dict[str, Path], key: str, weight: torch.Tensor) -> bool:
    if key not in files:
        return False
    # One mapping per tensor: the pages it touched leave this process's resident memory when it closes.
    with safe_open(str(files[key]), framework="pt") as f:
        original = f.get_tensor(key).to(torch.float32).contiguous()
        # Bit patterns compared in numpy: torch.equal is some 40 times slower on CPU.
        return original.shape == weight.shape and np.array_equal(
            original.numpy().view(np.uint32), weight.numpy().view(np.uint32)
        )


def _changed_block_parameters(
    model: nn.Module, layers: dict[str, LayerQuant], files: dict[str, Path]
) -> dict[str, torch.Tensor]:
    """The parameters of the decoder blocks, other than the quantized layers' weights, that differ from the
    base model's (AWQ divides the norms by its scales), as fp32 tensors by name."""
    prefix, blocks = decoder_blocks(model)
    quantized = {f"{name}.weight" for name in layers}
    changed = {}
    for name, param in blocks.named_parameters(prefix=prefix):
        if name in quantized:
            continue
        tensor = param.detach().to("cpu", torch.float32).contiguous()
        if not _equals_base(files, name, tensor):
            changed[name] = tensor
    return changed


def save_checkpoint(
    directory: Path,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    layers: dict[str, LayerQuant],
    meta: dict[str, Any],
) -> None:
    """Write a checkpoint of ``model``, quantized by ``layers``, into ``directory`` (made atomic by the caller).

    ``meta["base_model"]`` ({"spec", "kind", "location"}) names the model that ``model`` was loaded from: only
    the quantized layers are stored, everything else is read from that model when the checkpoint is loaded.
    """
    base = dict(meta["base_model"])
    if base["kind"] == "local":
        base["location"] = str(Path(base["location"]).resolve())  # a checkpoint is loaded from any directory
    ref = ModelRef(base["spec"], base["location"], base["kind"])
    base["sha256"] = base_weights_sha256(ref)

    modules = dict(model.named_modules())
    files = _base_tensor_files(ref)
    # lm_head untied from the input embeddings (quant.lm_head): the base stores its weight under theirs
    untied = meta.get("quantization", {}).get("untied_lm_head")
    aliases = {f"{output_head(model)[0]}.weight": untied} if untied else {}
    latent = {}
    for name in layers:
        weight = modules[name].weight.detach().to("cpu", torch.float32).contiguous()
        key = f"{name}.weight"
        source = aliases[key] if key in aliases and key not in files else key
        if not _equals_base(files, source, weight):
            latent[key] = weight
    changed = _changed_block_parameters(model, layers, files)
    save_file({**latent, **changed}, str(directory / LATENT_FILE), metadata={"format": FORMAT})
    tensors = {}
    for name, lq in layers.items():
        tensors[f"{name}.scales"] = lq.scales.contiguous()
        tensors[f"{name}.zeros"] = lq.zeros.contiguous()
        tensors[f"{name}.g_idx"] = lq.g_idx.contiguous()
    save_file(tensors, str(directory / QUANT_FILE), metadata={"format": FORMAT})

    model.config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    if ref.kind != "hub":  # the base model's licence notices and terms travel with what is made from it
        q = meta.get("quantization", {})
        what = f"{meta.get('method')} quantization to {q.get('bits')} bits (group size {q.get('group_size')})"
        carry_notices(Path(ref.location), directory, f"{what}, written as a qatcli checkpoint")
    layer_meta = {
        name: {
            "bits": lq.spec.bits,
            "group_size": lq.spec.group_size,
            "sym": lq.spec.sym,
            "act_order": lq.act_order,
            "in_features": modules[name].in_features,
            "out_features": modules[name].out_features,
            "latent": "stored" if f"{name}.weight" in latent else "base",
        }
        for name, lq in layers.items()
    }
    version = CHANGED_FORMAT_VERSION if changed else FORMAT_VERSION
    full = {"format": FORMAT, "format_version": version, **meta, "base_model": base, "layers": layer_meta}
    if changed:
        full["changed"] = sorted(changed)
    (directory / META_FILE).write_text(json.dumps(full, indent=2) + "\n")


def is_checkpoint(path: Path) -> bool:
    return (Path(path) / META_FILE).is_file()


def read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((Path(path) / META_FILE).read_text())
    except json.JSONDecodeError as err:
        raise QatcliError(f"checkpoint '{path}': {META_FILE} is not valid JSON") from err
    if meta.get("format") != FORMAT:
        raise QatcliError(f"checkpoint '{path}': {META_FILE} does not describe a {FORMAT}")
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise QatcliError(
            f"checkpoint '{path}' has format version {meta.get('format_version')}; "
            f"this qatcli reads versions {', '.join(map(str, READABLE_VERSIONS))}"
        )
    return meta


def base_model_ref(path: Path, meta: dict[str, Any]) -> ModelRef:
    """The base model of a checkpoint, found from here: a local directory where it was, an alias or hub id anew."""
    base = meta["base_model"]
    try:
        if base["kind"] == "alias":
            return resolve_model(base["spec"])
        if base["kind"] == "local" and not Path(base["location"]).is_dir():
            raise QatcliError(f"no directory {base['location']}")
        return ModelRef(base["spec"], base["location"], base["kind"])
    except QatcliError as err:
        raise QatcliError(f"checkpoint '{path}': its base model '{base['spec']}' is missing: {err}") from err


def _check_base(path: Path, meta: dict[str, Any], ref: ModelRef) -> None:
    recorded = meta["base_model"].get("sha256")
    if not recorded:
        raise QatcliError(f"checkpoint '{path}': {META_FILE} records no sha256 of its base model's weights")
    try:
        found = base_weights_sha256(ref)
    except QatcliError as err:
        raise QatcliError(f"checkpoint '{path}': its base model '{ref.spec}' is missing: {err}") from err
    if found != recorded:
        differ = sorted(
            set(found) ^ set(recorded) | {f for f in found.keys() & recorded.keys() if found[f] != recorded[f]}
        )
        raise QatcliError(
            f"checkpoint '{path}': its base model '{ref.spec}' ({ref.location}) changed since the checkpoint was "
            f"made ({', '.join(differ)} not as recorded); restore that model or quantize again"
        )


def _read_layers(path: Path, meta: dict[str, Any], modules: dict[str, nn.Module]) -> dict[str, LayerQuant]:
    try:
        tensors = load_file(str(Path(path) / QUANT_FILE))
    except (FileNotFoundError, SafetensorError) as err:
        raise QatcliError(f"checkpoint '{path}': cannot read {QUANT_FILE} ({err})") from err
    layers = {}
    for name, info in meta["layers"].items():
        where = f"checkpoint '{path}', layer {name}"
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            raise QatcliError(f"{where}: the model has no Linear layer of that name")
        try:
            spec = QuantSpec(info["bits"], info["group_size"], info["sym"])
            scales, zeros, g_idx = (tensors[f"{name}.{k}"] for k in ("scales", "zeros", "g_idx"))
        except (KeyError, ValueError) as err:
            raise QatcliError(f"{where}: incomplete or invalid quantization data ({err})") from err
        # the stated grid: the checkpoint's default spec, overridden by the first dynamic rule matching the layer
        top = meta.get("quantization", {})
        dynamic = top.get("dynamic") or {}
        stated = spec_fields(name, top, dynamic)
        if any(info[k] != v for k, v in stated.items()):
            rule = rule_for(name, dynamic)
            said = f"dynamic rule '{rule}'" if rule is not None else "quantization"
            raise QatcliError(f"{where}: its grid {spec} disagrees with the checkpoint's {said} {stated}")
        out_f, in_f = module.weight.shape
        if (info["in_features"], info["out_features"]) != (in_f, out_f):
            raise QatcliError(
                f"{where}: metadata says {info['out_features']}x{info['in_features']}, weights are {out_f}x{in_f}"
            )
        groups = spec.num_groups(in_f)
        expected = {
            "scales": (torch.float16, (out_f, groups)),
            "zeros": (torch.uint8, (out_f, groups)),
            "g_idx": (torch.int32, (in_f,)),
        }
        for key, tensor in (("scales", scales), ("zeros", zeros), ("g_idx", g_idx)):
            dtype, shape = expected[key]
            if tensor.dtype != dtype or tuple(tensor.shape) != shape:
                raise QatcliError(f"{where}: {key} is {tensor.dtype} {tuple(tensor.shape)}, expected {dtype} {shape}")
        if int(zeros.max()) > spec.maxq or int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
            raise QatcliError(f"{where}: zero points or g_idx outside their range")
        if not bool((scales > 0).all()):
            raise QatcliError(f"{where}: scales must be positive")
        layers[name] = LayerQuant(spec, scales, zeros, g_idx, bool(info.get("act_order", False)))
    return layers


@torch.no_grad()
def _overlay_latent(path: Path, meta: dict[str, Any], modules: dict[str, nn.Module]) -> None:
    """Copy the stored latent weights, and the other changed parameters, into the base model one at a time."""
    stored = [name for name, info in meta["layers"].items() if info.get("latent") != "base"]
    targets = {f"{name}.weight": modules[name].weight for name in stored}
    for key in meta.get("changed", []):
        module_name, _, attr = key.rpartition(".")
        param = getattr(modules.get(module_name), attr, None)
        if not isinstance(param, torch.Tensor):
            raise QatcliError(f"checkpoint '{path}': the model has no parameter {key} (listed as changed)")
        targets[key] = param
    try:
        with safe_open(str(Path(path) / LATENT_FILE), framework="pt") as f:
            missing = sorted(set(targets) - set(f.keys()))
            if missing:
                raise QatcliError(f"checkpoint '{path}': {LATENT_FILE} lacks {len(missing)} tensors, e.g. {missing[0]}")
            for key, param in targets.items():
                tensor = f.get_tensor(key)
                if tensor.dtype != torch.float32 or tensor.shape != param.shape:
                    raise QatcliError(
                        f"checkpoint '{path}', {key}: stored tensor is {tensor.dtype} {tuple(tensor.shape)}, "
                        f"expected torch.float32 {tuple(param.shape)}"
                    )
                param.copy_(tensor)
    except (FileNotFoundError, SafetensorError) as err:
        raise QatcliError(f"checkpoint '{path}': cannot read {LATENT_FILE} ({err})") from err


def _load_model(path: Path, meta: dict[str, Any]) -> nn.Module:
    """The float32 model on the CPU: version 2 from its base model, version 1 from the checkpoint itself."""
    source, config = str(path), None
    if meta["format_version"] != 1:
        ref = base_model_ref(path, meta)
        _check_base(path, meta, ref)
        source = ref.location
    untied = meta.get("quantization", {}).get("untied_lm_head")
    try:
        if meta["format_version"] != 1:
            config = AutoConfig.from_pretrained(path)  # the architecture the checkpoint was made with
            if untied:  # lm_head starts as the base's, tied to the embeddings, and gets its own copy below
                config.tie_word_embeddings = True
        model = AutoModelForCausalLM.from_pretrained(source, config=config, dtype=torch.float32)
    except (OSError, ValueError, SafetensorError) as err:
        raise QatcliError(f"checkpoint '{path}': cannot load its model ({str(err).splitlines()[0]})") from err
    if untied and untie_lm_head(model) is None:
        raise QatcliError(
            f"checkpoint '{path}': its lm_head is recorded as untied from {untied}, which it does not share"
        )
    model.config.name_or_path = str(path)  # the model is the checkpoint's, as an export's config.json records
    return model


def load_checkpoint(
    path: Path, device: torch.device, fake_quant: bool = True
) -> tuple[nn.Module, PreTrainedTokenizerBase, dict[str, Any], dict[str, LayerQuant]]:
    """Load a checkpoint; with ``fake_quant`` the Linear weights are replaced by their quantized values."""
    meta = read_meta(path)
    model = _load_model(path, meta)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise QatcliError(f"checkpoint '{path}': cannot load its tokenizer ({str(err).splitlines()[0]})") from err
    modules = dict(model.named_modules())
    layers = _read_layers(path, meta, modules)
    if meta["format_version"] != 1:
        _overlay_latent(path, meta, modules)
    if fake_quant:
        apply_fake_quant(model, layers)
    return model.to(device).eval(), tokenizer, meta, layers
