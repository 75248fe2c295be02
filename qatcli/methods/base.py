"""The PTQ method interface and registry: a method is one module and one ``@register``.

A method owns what sets it apart from the others: the recipe section of its options (``gptq``, ``awq``), whether
it needs calibration windows, whether it walks the model a decoder block at a time, whether QAT may start from
its result, and the function that quantizes. The pipeline (qatcli/pipeline/ptq.py), compare's cells, the QAT
initialisation, the recipe check and the Python API read these attributes instead of naming methods.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from qatcli.errors import QatcliError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from qatcli.config import Recipe
    from qatcli.quant.grid import QuantSpec
    from qatcli.quant.layer import LayerQuant


@dataclass(frozen=True)
class Job:
    """What a method quantizes: ``targets`` (layers of ``model``), each to its spec in ``specs``, with the recipe's
    options; ``windows`` are the calibration windows [nsamples, seqlen] where the method needs them. A method may
    change ``model`` (GPTQ's error feedback, AWQ's folded scales)."""

    recipe: Recipe
    model: nn.Module
    targets: dict[str, nn.Linear]
    specs: dict[str, QuantSpec]
    windows: torch.Tensor | None
    device: torch.device


@dataclass
class Quantized:
    """What a method made: each quantized layer's grid, the fields its checkpoint records under ``quantization``
    (its options), and the metrics of the run (losses, peak memory)."""

    layers: dict[str, LayerQuant]
    fields: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


class PTQMethod(ABC):
    name: ClassVar[str]
    options: ClassVar[str | None] = None  # the recipe section holding its options, recorded in its checkpoints
    needs_calibration: ClassVar[bool] = False  # reads calib.data windows
    walks: ClassVar[bool] = False  # loads the model on the CPU and moves one decoder block at a time to the device
    qat_init: ClassVar[bool] = True  # `qat --init NAME` may start from its result
    keeps_fp_weights: ClassVar[bool] = False  # the model's weights stay full precision (QAT snaps them to the grid)
    summary: ClassVar[str] = ""  # one line for --help and docs

    @abstractmethod
    def quantize(self, job: Job) -> Quantized:
        """The grid of every target layer of ``job``."""

    def checkpoint_sections(self) -> tuple[str, ...]:
        """The recipe sections besides quant that a checkpoint of this method depends on (compare's cache key)."""
        return (*(("calib",) if self.needs_calibration else ()), *((self.options,) if self.options else ()))


METHODS: dict[str, PTQMethod] = {}


def register(cls: type[PTQMethod]) -> type[PTQMethod]:
    """Class decorator: make ``cls`` available as quant.method ``cls.name``."""
    if cls.name in METHODS:
        raise ValueError(f"PTQ method '{cls.name}' registered twice")
    METHODS[cls.name] = cls()
    return cls


def method_names() -> tuple[str, ...]:
    return tuple(METHODS)


def get_method(name: str) -> PTQMethod:
    if name not in METHODS:
        raise QatcliError(f"quant.method must be one of {', '.join(METHODS)}, got '{name}'")
    return METHODS[name]


def init_names() -> tuple[str, ...]:
    """Where QAT may start: fp, or the result of a method that allows it."""
    return ("fp", *(name for name, m in METHODS.items() if m.qat_init))
