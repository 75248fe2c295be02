"""The diagnose figures: the loss along each fp -> quantized segment, and the landscape recorded during QAT."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_profiles(diagnosis: dict[str, Any], path: Path) -> None:
    """Write the figure to ``path`` as PNG whatever its name (the caller writes a temporary file)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), constrained_layout=True)
    for i, r in enumerate(diagnosis["results"]):
        ts = [p["t"] for p in r["profile"]]
        losses = [p["loss"] for p in r["profile"]]
        (line,) = ax.plot(ts, losses, marker="osD^vP*X"[i % 8], label=f"{Path(r['name']).name} ({r['kind']})")
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


def plot_recorded(records: list[dict[str, Any]], title: str, path: Path) -> None:
    """The landscape recorded during QAT: losses against step, and the inward cosine and codes changed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, (losses, motion) = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True)
    losses.plot(steps, [r["landscape"]["loss_quantized"] for r in records], marker="o", label="L(Q(w)): quantized")
    losses.plot(steps, [r["landscape"]["loss_latent"] for r in records], marker="s", label="L(w): latent weights")
    fp_loss = records[0]["landscape"]["loss_fp"]
    losses.axhline(fp_loss, color="0.35", linestyle="--", label=f"full precision: {fp_loss:.4f}")
    losses.set_xlabel("step")
    losses.set_ylabel("loss on the probe batch (token CE)")
    losses.legend()
    motion.plot(steps, [r["landscape"]["inward_cosine"] for r in records], marker="o", label="inward cosine")
    changed = [(r["step"], r["landscape"]["codes_changed"]) for r in records if r["landscape"]["codes_changed"]]
    motion.plot([s for s, _ in changed], [c for _, c in changed], marker="s", label="fraction of codes changed")
    motion.axhline(0, color="0.6", linewidth=1)
    motion.set_xlabel("step")
    motion.legend()
    for ax in (losses, motion):
        ax.grid(True, alpha=0.35)
    fig.suptitle(title)
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)
