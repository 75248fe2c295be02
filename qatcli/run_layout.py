"""The files of a QAT run, named once: where an unfinished run keeps its state and what it writes.

``qat -o OUT`` works in ``OUT.run/`` and moves the finished checkpoint to ``OUT``:

    OUT.run/
      run.json                 the recipe and the training data's hash (a resume must match them)
      before.json              perplexity before training (with --eval-data)
      blocks/                  the block stage: block-NNN.pt (each finished block) and block-NNN.records.json
      after_blocks.json        perplexity after the block stage
      state.pt                 the end-to-end steps' state (or state.dcp.json + its directory, sharded)
      metrics.jsonl            one record per end-to-end step
    OUT/                       the checkpoint (docs/checkpoint-format.md), with metrics.jsonl and
                               block_metrics.jsonl copied in
"""

from __future__ import annotations

from pathlib import Path

RUN_SUFFIX = ".run"
RUN_RECORD_FILE = "run.json"
BEFORE_FILE = "before.json"
BLOCK_STATE_DIR = "blocks"
AFTER_BLOCKS_FILE = "after_blocks.json"
STATE_FILE = "state.pt"
SHARDED_POINTER_FILE = "state.dcp.json"
SHARDED_EXTRA_FILE = "extra.pt"
METRICS_FILE = "metrics.jsonl"
BLOCK_METRICS_FILE = "block_metrics.jsonl"


def run_dir(output: Path) -> Path:
    """Where an unfinished run of ``output`` keeps its state."""
    return output.with_name(output.name + RUN_SUFFIX)
