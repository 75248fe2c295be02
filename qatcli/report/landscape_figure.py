"""The diagnose figures: the loss along each fp -> quantized segment, and the landscape recorded during QAT."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def short_name(name: str, names: list[str]) -> str:
    """The last part of a model's path, or as many last parts as tell it from the others (cells/x/checkpoint)."""
    parts = Path(name).parts
    for k in range(1, len(parts) + 1):
        tail = parts[-k:]
        if sum(Path(n).parts[-k:] == tail for n in names) == 1:
            return str(Path(*tail))
    return name


def plot_profiles(diagnosis: dict[str, Any], path: Path) -> None:
    """Write the figure to ``path`` as PNG whatever its name (the caller writes a temporary file)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), constrained_layout=True)
    for i, r in enumerate(diagnosis["results"]):
        ts = [p["t"] for p in r["profile"]]
        losses = [p["loss"] for p in r["profile"]]
        label = f"{short_name(r['name'], [q['name'] for q in diagnosis['results']])} ({r['kind']})"
        (line,) = ax.plot(ts, losses, marker="osD^vP*X"[i % 8], label=label)
        if r["loss_latent"] is not None:
            ax.plot([0], [r["loss_latent"]], marker="*", markersize=12, color=line.get_color(), linestyle="none")
    fp_loss = diagnosis["results"][0]["loss_fp"]
    ax.axhline(fp_loss, color="0.35", linestyle="--", linewidth=1.2, label=f"full precision: {fp_loss:.4f}")
    ax.axvline(1.0, color="0.6", linestyle=":", linewidth=1)
    ax.set_xlabel("t: weights w_fp + t (w_q - w_fp) of the quantized layers (t = 1: the quantized model)")
    ax.set_ylabel(f"mean token NLL ({diagnosis['windows']} windows x {diagnosis['seqlen']} tokens)")
    ax.set_title(f"{diagnosis['model']} on {diagnosis['data']}: the loss between fp and quantized weights")
    ax.grid(True, alpha=0.35)
    if any(r["loss_latent"] is not None for r in diagnosis["results"]):
        ax.plot([], [], marker="*", markersize=12, color="0.3", linestyle="none", label="QAT latent weights (at t=0)")
    ax.legend(fontsize=8)
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def plot_recorded(steps: list[dict[str, Any]], blocks: list[dict[str, Any]], title: str, path: Path) -> None:
    """The landscape recorded during QAT: a row for the end-to-end steps (losses, inward cosine and codes
    changed against the step) and a row for the block stage (each block's first and last record)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [kind for kind, records in (("steps", steps), ("blocks", blocks)) if records]
    fig, axes = plt.subplots(len(rows), 2, figsize=(12, 4.8 * len(rows)), constrained_layout=True, squeeze=False)
    for (losses, motion), kind in zip(axes, rows, strict=True):
        if kind == "steps":
            _plot_steps(steps, losses, motion)
        else:
            _plot_blocks(blocks, losses, motion)
        for ax in (losses, motion):
            ax.grid(True, alpha=0.35)
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def _plot_steps(records: list[dict[str, Any]], losses: Any, motion: Any) -> None:
    steps = [r["step"] for r in records]
    losses.plot(steps, [r["landscape"]["loss_quantized"] for r in records], marker="o", label="L(Q(w)): quantized")
    losses.plot(steps, [r["landscape"]["loss_latent"] for r in records], marker="s", label="L(w): latent weights")
    fp_loss = records[0]["landscape"]["loss_fp"]
    losses.axhline(fp_loss, color="0.35", linestyle="--", label=f"full precision: {fp_loss:.4f}")
    losses.set_xlabel("end-to-end step")
    losses.set_ylabel("loss on the probe batch (token CE)")
    motion.plot(steps, [r["landscape"]["inward_cosine"] for r in records], marker="o", label="inward cosine")
    changed = [(r["step"], r["landscape"]["codes_changed"]) for r in records if r["landscape"]["codes_changed"]]
    motion.plot([s for s, _ in changed], [c for _, c in changed], marker="s", label="fraction of codes changed")
    motion.axhline(0, color="0.6", linewidth=1)
    motion.set_xlabel("end-to-end step")


def _plot_blocks(records: list[dict[str, Any]], losses: Any, motion: Any) -> None:
    by_block: dict[int, list[dict[str, Any]]] = {}
    for r in records:
        by_block.setdefault(r["block"], []).append(r["landscape"])
    index = sorted(by_block)
    first, last = [by_block[b][0] for b in index], [by_block[b][-1] for b in index]
    losses.semilogy(index, [m["loss_quantized"] for m in first], marker="o", label="L(Q(w)) before training")
    losses.semilogy(index, [m["loss_quantized"] for m in last], marker="s", label="L(Q(w)) after")
    losses.semilogy(index, [m["loss_fp"] for m in first], marker="^", linestyle="--", label="L(fp weights)")
    losses.set_xlabel("block")
    losses.set_ylabel("block output MSE against the fp block (first batch)")
    motion.plot(index, [m["inward_cosine"] for m in first], marker="o", label="inward cosine before")
    motion.plot(index, [m["inward_cosine"] for m in last], marker="s", label="inward cosine after")
    changed = [sum(m["codes_changed"] or 0.0 for m in by_block[b]) for b in index]
    motion.plot(index, changed, marker="^", label="codes changed (sum over records)")
    motion.axhline(0, color="0.6", linewidth=1)
    motion.set_xlabel("block")


def plot_recorded_runs(runs: dict[str, list[dict[str, Any]]], title: str, path: Path) -> None:
    """Several runs' end-to-end records side by side: the quantized loss gap to fp, and the inward cosine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (gaps, cosines) = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True)
    for i, (name, records) in enumerate(runs.items()):
        steps = [r["step"] for r in records]
        marker = "osD^vP*X"[i % 8]
        gaps.plot(
            steps,
            [r["landscape"]["loss_quantized"] - r["landscape"]["loss_fp"] for r in records],
            marker=marker,
            label=name,
        )
        cosines.plot(steps, [r["landscape"]["inward_cosine"] for r in records], marker=marker, label=name)
    gaps.set_ylabel("L(Q(w)) - L(fp) on the probe batch")
    cosines.set_ylabel("inward cosine at Q(w)")
    cosines.axhline(0, color="0.6", linewidth=1)
    for ax in (gaps, cosines):
        ax.set_xlabel("end-to-end step")
        ax.grid(True, alpha=0.35)
        ax.legend(fontsize=8)
    fig.suptitle(f"{title}: QAT in the fp loss landscape")
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)
