"""Task accuracy (arc_easy, hellaswag, a local YAML task...) through EleutherAI's lm-evaluation-harness.

The model qatcli has already loaded (full precision, a fake-quantized checkpoint or a packed GPTQ-format
directory) is handed to lm-eval's HFLM as it is, with its tokenizer; lm-eval only builds the prompts, scores
them and aggregates. lm_eval is imported only here and only when tasks are asked for (``qatcli[tasks]``).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from qatcli.config import EvalConfig
from qatcli.errors import QatcliError
from qatcli.models.loading import gemma_family, leading_bos

INSTALL = "pip install 'qatcli[tasks]'"
# lm-eval's own default seed of the few-shot sampler, so that few-shot prompts are the ones its CLI builds.
FEWSHOT_SEED = 1234
# The metric shown in tables where a task reports several (acc_norm, as the Open LLM Leaderboard quotes ARC
# and HellaSwag); any other task shows the first metric lm-eval reports for it.
PREFERRED_METRICS = ("acc_norm", "acc")
# What lm-eval logs, as expected, when it is handed a built model instead of a name to load.
_EXPECTED = ("`pretrained` model kwarg is not of type", "Passed an already-initialized model")


@dataclass(frozen=True)
class TaskPlan:
    """The requested tasks, resolved once: what lm-eval's TaskManager loads, and the names shown."""

    manager: Any  # lm_eval.tasks.TaskManager
    specs: tuple[Any, ...]  # a name, or a task's config (a YAML file's, its local data files resolved)
    names: tuple[str, ...]  # the tasks and groups asked for, as lm-eval names their results (a tag: its tasks)
    version: str


def _lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError as err:
        if err.name == "lm_eval":
            raise QatcliError(f"--tasks needs lm-evaluation-harness, which is not installed: {INSTALL}") from None
        raise QatcliError(f"lm-evaluation-harness cannot be imported ({err}); reinstall it: {INSTALL}") from None
    return lm_eval


def _is_yaml(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml"))


def _local_files(value: Any, base: Path) -> Any:
    """``data_files`` (a path, a list or a split -> path mapping) with each relative path that names files
    beside the YAML made absolute; other paths stay relative to the working directory, as lm-eval reads them."""
    if isinstance(value, dict):
        return {k: _local_files(v, base) for k, v in value.items()}
    if isinstance(value, list):
        return [_local_files(v, base) for v in value]
    if isinstance(value, str) and value and not Path(value).is_absolute() and any(base.glob(value)):
        return str(base / value)
    return value


def _task_config(path: Path) -> dict[str, Any] | None:
    """A task YAML's config as lm-eval reads it (includes merged, !function resolved), its relative
    ``dataset_kwargs.data_files`` resolved against the YAML's directory; None for a group or tag file."""
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        cfg = load_yaml(path, resolve_func=True, recursive=True)
    except Exception as err:  # yaml errors, a missing include, a !function that does not import
        raise QatcliError(f"task file '{path}': {_first_line(err)}") from None
    if not isinstance(cfg.get("task"), str) or "group" in cfg or "class" in cfg:
        return None
    kwargs = cfg.get("dataset_kwargs")
    if isinstance(kwargs, dict) and "data_files" in kwargs:
        cfg["dataset_kwargs"] = {**kwargs, "data_files": _local_files(kwargs["data_files"], path.parent)}
    return cfg


def _manager(dirs: tuple[str, ...], defaults: bool) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(dirs) or None, include_defaults=defaults)


@lru_cache(maxsize=4)
def _plan(tasks: tuple[str, ...], dirs: tuple[str, ...]) -> TaskPlan:
    lm_eval = _lm_eval()
    for d in dirs:
        if not Path(d).is_dir():
            raise QatcliError(f"task directory '{d}' does not exist")
    files = [t for t in tasks if _is_yaml(t)]
    for f in files:
        if not Path(f).is_file():
            raise QatcliError(f"task file '{f}' does not exist")
    # lm-eval's own index of its thousands of task YAMLs takes seconds to build: only when a name needs it.
    local = _manager(dirs, defaults=False)
    names = [t for t in tasks if not _is_yaml(t)]
    local_only = all(t in local.task_index and local.task_index[t].kind.name == "TASK" for t in names)
    manager = local if local_only else _manager(dirs, defaults=True)
    unknown = [t for t in names if t not in manager.task_index]
    if unknown:
        where = " or --task-dir" if dirs else ""
        raise QatcliError(
            f"unknown task{'s' if len(unknown) > 1 else ''} {', '.join(repr(t) for t in unknown)}: not a task, group "
            f"or tag of lm-eval {lm_eval.__version__}{where}, nor a task YAML file"
        )
    specs: list[Any] = []
    shown: list[str] = []
    for t in tasks:
        spec, names = _yaml_spec(Path(t)) if _is_yaml(t) else _named_spec(manager.task_index[t])
        specs.append(spec)
        shown += names
    return TaskPlan(manager, tuple(specs), tuple(dict.fromkeys(shown)), lm_eval.__version__)


def _yaml_spec(path: Path) -> tuple[Any, list[str]]:
    """A task file as a config with its local data files resolved; a group file as its path."""
    cfg = _task_config(path)
    if cfg is not None:
        return cfg, [cfg["task"]]
    from lm_eval.tasks._yaml_loader import load_yaml

    return str(path.resolve()), [str(load_yaml(path, resolve_func=False).get("group"))]


def _named_spec(entry: Any) -> tuple[Any, list[str]]:
    """A registered name; a task from a --task-dir as its config, its local data files resolved."""
    import lm_eval

    if entry.kind.name == "TAG":
        return entry.name, sorted(entry.tags)
    ours = Path(lm_eval.__file__).resolve().parent
    if entry.kind.name == "TASK" and entry.yaml_path and not entry.yaml_path.resolve().is_relative_to(ours):
        cfg = _task_config(entry.yaml_path)
        if cfg is not None:
            return cfg, [entry.name]
    return entry.name, [entry.name]


def check_tasks(cfg: EvalConfig) -> None:
    """Raise a QatcliError if lm-eval is missing or a task is unknown (before any model is loaded)."""
    if cfg.tasks:
        _plan(tuple(cfg.tasks), tuple(cfg.task_dirs))


def add_bos_token(model: nn.Module) -> bool | None:
    """HFLM's add_bos_token for the model: True for the Gemma family, else None (the tokenizer's own default).

    lm-eval up to 0.4.9.1 forced a BOS token for Gemma ("Gemma underperforms without it"); since 0.4.9.2
    (PR #3347) add_bos_token defaults to None, which follows the tokenizer: Llama and Gemma tokenizers add
    BOS, GPT-2-style ones such as SmolLM2's do not. qatcli keeps the Gemma rule, for Gemma tokenizers saved
    without their BOS default (GGUF conversions), and otherwise prompts as ``lm_eval --model hf`` does.
    """
    return True if gemma_family(model) else None


def prepends_bos(tokenizer: PreTrainedTokenizerBase, add_bos: bool | None) -> bool:
    """Whether the task prompts start with the BOS token."""
    if tokenizer.bos_token_id is None:
        return False
    if add_bos is not None:
        return add_bos
    return leading_bos(tokenizer) is not None


class _DropExpected(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_EXPECTED)


def _quiet_logs() -> None:
    """Keep lm-eval's warnings (the root logger qatcli sets up shows INFO) unless LMEVAL_LOG_LEVEL says more."""
    if "LMEVAL_LOG_LEVEL" not in os.environ:
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
    for name in ("lm_eval.models.huggingface", "lm_eval.evaluator"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropExpected) for f in log.filters):
            log.addFilter(_DropExpected())


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):  # lm-eval writes "N/A" where it has no stderr
        return None
    return number if math.isfinite(number) else None


def _summary(entry: dict[str, Any], samples: Any, shots: Any) -> dict[str, Any] | None:
    """One task's (or group's) metrics under lm-eval's names (',none', the default filter, left out)."""
    values = {k.removesuffix(",none"): _number(v) for k, v in entry.items() if "," in k}
    metrics = [k for k in values if "_stderr" not in k]
    if not metrics:
        return None
    main = next((m for m in PREFERRED_METRICS if m in metrics), metrics[0])
    stderr = main.replace(",", "_stderr,", 1) if "," in main else f"{main}_stderr"
    out = {"metric": main, "value": values[main], "stderr": values.get(stderr), **values}
    if isinstance(samples, dict):
        out["samples"] = samples.get("effective")
    if shots is not None:
        out["num_fewshot"] = shots
    return out


# lm-eval scores a batch of requests from its full-vocabulary fp32 logits (and their log-softmax): at most this many
# logits per token position, so a 262k vocabulary (gemma3-270m) scores 2 requests at a time, not 8 (1 GB, not 4 GB
# per copy at 512 tokens), while 49k (smollm2) keeps 8
TASK_LOGITS_PER_POSITION = 2**19


def task_batch_size(asked: int, vocab: int) -> int:
    """Requests per forward pass: ``asked``, fewer where the vocabulary would make the batch's logits too large."""
    return max(1, min(asked, TASK_LOGITS_PER_POSITION // vocab))


def evaluate_tasks(model: nn.Module, tokenizer: PreTrainedTokenizerBase, cfg: EvalConfig) -> dict[str, Any]:
    """The fields a result row gets from ``cfg.tasks`` (none without tasks): ``tasks``, the metrics of each
    task asked for (a group's aggregate, a tag's tasks); ``subtasks``, those of the tasks inside a group;
    ``task_bos``, whether the prompts started with the BOS token; ``lm_eval``, its version."""
    if not cfg.tasks:
        return {}
    plan = _plan(tuple(cfg.tasks), tuple(cfg.task_dirs))
    _quiet_logs()
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM

    bos = add_bos_token(model)
    batch = task_batch_size(cfg.batch_size, model.get_output_embeddings().weight.shape[0])
    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch, add_bos_token=bos)
    try:
        loaded = plan.manager.load(list(plan.specs))
    except Exception as err:  # a dataset that cannot be read (offline hub, a bad data file)
        raise QatcliError(f"cannot load the tasks: {_first_line(err)}") from None
    for task in loaded["tasks"].values():  # as lm_eval.simple_evaluate does with num_fewshot
        if cfg.num_fewshot is not None and task.get_config("num_fewshot") != 0:
            task.set_config(key="num_fewshot", value=cfg.num_fewshot)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=FEWSHOT_SEED)
    results = evaluator.evaluate(lm=lm, task_dict=loaded, limit=cfg.limit, log_samples=False)
    assert results is not None  # single process
    summaries = {}
    for name, entry in results["results"].items():
        summary = _summary(entry, results["n-samples"].get(name), results["n-shot"].get(name))
        if summary is not None:
            summaries[name] = summary
    row: dict[str, Any] = {"tasks": {n: summaries[n] for n in plan.names if n in summaries}}
    if others := {n: v for n, v in summaries.items() if n not in plan.names}:
        row["subtasks"] = others
    row["task_bos"] = prepends_bos(tokenizer, bos)
    row["lm_eval"] = plan.version
    return row


def flat_task_fields(row: dict[str, Any]) -> dict[str, float | None]:
    """The main metric of each task of a row and its stderr as flat fields, for CSV: 'arc_easy.acc_norm'."""
    out: dict[str, float | None] = {}
    for name, result in (row.get("tasks") or {}).items():
        out[f"{name}.{result['metric']}"] = result["value"]
        out[f"{name}.{result['metric']}_stderr"] = result["stderr"]
    return out


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
