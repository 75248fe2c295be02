"""A GGUF file run by llama.cpp (llama-cpp-python), as a module whose forward gives every position's logits.

qatcli's perplexity (qatcli/evaluation/perplexity.py) calls ``model(ids).logits`` on windows of token ids; here each
window goes through llama.cpp's own evaluation, so the numbers are the engine's, not a re-implementation's.
llama.cpp quantizes activations to 8 bits for its quantized dot products, so its logits differ slightly from
a float32 forward of the same weights.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from qatcli.errors import QatcliError


def _llama_class() -> Any:
    try:
        from llama_cpp import Llama
    except ImportError as err:
        raise QatcliError("running a GGUF file needs llama.cpp's bindings: pip install 'qatcli[llamacpp]'") from err
    return Llama


class LlamaCppModel(nn.Module):
    """llama.cpp's model of ``path`` (a model of ``architecture``, which decides whether windows start with BOS),
    on the CPU with torch's thread count (OMP_NUM_THREADS)."""

    def __init__(self, path: Path, architecture: str, threads: int | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        self.threads = threads or int(os.environ.get("OMP_NUM_THREADS", 0)) or torch.get_num_threads()
        self._llama: Any = None
        self._context = 0
        self._open(64)  # a file llama.cpp refuses is refused now, not at the first window
        self.config = SimpleNamespace(model_type=architecture)

    def _open(self, context: int) -> Any:
        """The llama.cpp context, made anew only where a window is longer than the current one holds."""
        if self._llama is None or context > self._context:
            self._llama = None
            try:
                self._llama = _llama_class()(
                    model_path=str(self.path),
                    n_ctx=context,
                    n_batch=context,
                    n_ubatch=context,
                    logits_all=True,
                    n_threads=self.threads,
                    n_threads_batch=self.threads,
                    verbose=False,
                )
            except ValueError as err:
                raise QatcliError(f"llama.cpp cannot load '{self.path}': {err}") from err
            self._context = context
        return self._llama

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, **_: Any) -> SimpleNamespace:
        seqlen = input_ids.shape[1]
        llama = self._open(seqlen)
        logits = []
        for row in input_ids.tolist():
            llama.reset()
            llama.eval(row)
            logits.append(np.array(llama.scores[:seqlen], dtype=np.float32))
        return SimpleNamespace(logits=torch.from_numpy(np.stack(logits)).to(input_ids.device))
