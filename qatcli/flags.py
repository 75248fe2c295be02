"""Which recipe key each command-line option sets, by the option's parameter name: the command line (cli.py)
and the Python API (api.py) both read it. A test checks that every option of cli.py is here and every entry
here is an option of its command."""

from __future__ import annotations

# Each command's options by parameter name, with the recipe key each one sets: one key per option, and
# an option name means the same key in every command, except --seqlen, --data and --output, which name
# the obvious one of each command (ptq: calibration, qat: training, eval: evaluation).
SHARED_KEYS = {"device": "device", "seed": "seed"}
QUANT_KEYS = {
    "bits": "quant.bits",
    "group_size": "quant.group_size",
    "sym": "quant.sym",
    "clip": "quant.clip",
    "lm_head": "quant.lm_head",
    "target": "quant.target",
}
EVAL_KEYS = {"eval_data": "eval.data", "eval_seqlen": "eval.seqlen", "max_windows": "eval.max_windows"}
COMMAND_KEYS: dict[str, dict[str, str]] = {
    "ptq": {
        "model": "model",
        "output": "output",
        "method": "quant.method",
        **QUANT_KEYS,
        "include": "quant.include",
        "exclude": "quant.exclude",
        "calib_data": "calib.data",
        "nsamples": "calib.nsamples",
        "seqlen": "calib.seqlen",
        "damp": "gptq.damp",
        "block_size": "gptq.block_size",
        "act_order": "gptq.act_order",
        "act_group_aware": "gptq.act_group_aware",
        "static_groups": "gptq.static_groups",
        "true_sequential": "gptq.true_sequential",
        "n_grid": "awq.n_grid",
        "duo_scaling": "awq.duo_scaling",
        "fp_inputs": "awq.fp_inputs",
        **EVAL_KEYS,
        **SHARED_KEYS,
    },
    "qat": {
        "model": "model",
        "output": "output",
        **QUANT_KEYS,
        "estimator": "qat.estimator",
        "amplitudes": "qat.amplitudes",
        "init": "qat.init",
        "data": "qat.data",
        "steps": "qat.steps",
        "block_epochs": "qat.block.epochs",
        "train": "qat.train",
        "batch_size": "qat.batch_size",
        "seqlen": "qat.seqlen",
        "grad_accum": "qat.grad_accum",
        "lr": "qat.lr",
        "scale_lr": "qat.scale_lr",
        "loss": "qat.loss",
        "teacher_dtype": "qat.teacher_dtype",
        "teacher_device": "qat.teacher_device",
        "frozen_dtype": "qat.frozen_dtype",
        "parallel": "qat.parallel",
        "gradient_checkpointing": "qat.gradient_checkpointing",
        "variance_reduction": "qat.variance_reduction",
        "fused": "qat.fused",
        "save_every": "qat.save_every",
        "eval_every": "qat.eval_every",
        "calib_data": "calib.data",
        "nsamples": "calib.nsamples",
        "calib_seqlen": "calib.seqlen",
        **EVAL_KEYS,
        **SHARED_KEYS,
    },
    "eval": {
        "data": "eval.data",
        "seqlen": "eval.seqlen",
        "max_windows": "eval.max_windows",
        "tasks": "eval.tasks",
        "task_dirs": "eval.task_dirs",
        "num_fewshot": "eval.num_fewshot",
        "limit": "eval.limit",
        "batch_size": "eval.batch_size",
        **SHARED_KEYS,
    },
    "diagnose": {
        "data": "eval.data",
        "seqlen": "eval.seqlen",
        "max_windows": "eval.max_windows",
        "points": "diagnose.points",
        "t_max": "diagnose.t_max",
        "hessian_windows": "diagnose.hessian_windows",
        **SHARED_KEYS,
    },
    "export": {
        "output": "export.output",
        "fmt": "export.format",
        "dtype": "export.dtype",
        "max_shard_mib": "export.max_shard_mib",
        "v1_clamp_zeros": "export.v1_clamp_zeros",
        "gguf_embedding": "export.gguf_embedding",
    },
    "compare": {"output": "output", **EVAL_KEYS, "device": "device"},
}
