"""qat.frozen_dtype: the student's frozen parts held in bfloat16 or float16 during the end-to-end steps.

Only the fake-quantized layers train (their latent weights and scales, which stay fp32); the rest of the student
(embeddings, norms, lm_head where it is not quantized, the layers left in full precision) is frozen, and here
stored in the lower dtype, half its fp32 memory. Each module holding such parameters computes in their dtype, as
bf16 autocast computes a matmul: its floating inputs are cast to it and its floating outputs back to fp32, so the
residual stream and the fake-quantized layers compute in fp32 as before. Only modules without submodules are
lowered; a parameter held by a module with submodules stays fp32.

Under FSDP2 a decoder block's unit then holds fp32 latent weights and scales beside bf16 norms: FSDP2 asks one
dtype of the trainable parameters only and gathers a unit of several dtypes as bytes, so the frozen parameters are
sharded in their own dtype. A MixedPrecisionPolicy would be wrong here: it keeps the stored parameters fp32 and
casts every parameter, the latent weights too, for the computation. DDP all-reduces trainable gradients only.

At the end the trained model takes its frozen parameters back, in fp32, from the model training started from
(``restore_frozen``): the checkpoint then stores none of them, as always, and reads them from the base model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from qatcli.errors import QatcliError
from qatcli.qat.fake_quant import FakeQuantLinear


def _cast(value: Any, dtype: torch.dtype) -> Any:
    return value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def _computing_in(dtype: torch.dtype) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """The hooks of a lowered module: its inputs to ``dtype``, its outputs in ``dtype`` back to fp32."""

    def inputs(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        return tuple(_cast(a, dtype) for a in args), {k: _cast(v, dtype) for k, v in kwargs.items()}

    def output(_module: nn.Module, _args: tuple, out: Any) -> Any:
        return out.float() if isinstance(out, torch.Tensor) and out.dtype == dtype else out

    return inputs, output


@torch.no_grad()
def lower_frozen(model: nn.Module, dtype: torch.dtype) -> list[RemovableHandle]:
    """Store the frozen parameters of ``model`` (every parameter of a module without submodules but the
    fake-quantized layers') in ``dtype``, their modules computing in it; the hooks that do so, to remove after
    training."""
    trained = {id(p): p for m in model.modules() if isinstance(m, FakeQuantLinear) for p in m.parameters()}
    for param in trained.values():
        # transformers loads a model on the CPU as views of its memory-mapped weight file, which stays mapped,
        # the frozen parts' fp32 pages with it, while any view lives; the trained ones' pages are copied on
        # their first update anyway
        if param.device.type == "cpu":
            param.data = param.data.clone()
    inputs, output = _computing_in(dtype)
    handles = []
    for name, module in model.named_modules():
        if next(module.children(), None) is not None or isinstance(module, FakeQuantLinear):
            continue
        own = module.named_parameters(recurse=False)
        params = [(key, p) for key, p in own if p.is_floating_point() and id(p) not in trained]
        for key, param in params:
            param.data = param.data.to(dtype)  # a tied parameter's second owner finds it lowered: a no-op
            if not torch.isfinite(param).all():
                raise QatcliError(
                    f"qat.frozen_dtype {str(dtype).removeprefix('torch.')}: {name}.{key} has values outside its "
                    "range; use bfloat16 or float32"
                )
        if params:
            handles.append(module.register_forward_pre_hook(inputs, with_kwargs=True))
            handles.append(module.register_forward_hook(output))
    return handles


@torch.no_grad()
def restore_frozen(model: nn.Module, load_source: Callable[[], nn.Module]) -> None:
    """Give every parameter of ``model`` that is not fp32 (the frozen ones ``lower_frozen`` lowered) the fp32 value
    of the same parameter in the model ``load_source`` returns, which it calls only where there is one."""
    lowered = [(name, p) for name, p in model.named_parameters() if p.dtype != torch.float32]
    if not lowered:
        return
    source = load_source()
    for name, param in lowered:
        param.data = source.get_parameter(name).data.to(param.device)
