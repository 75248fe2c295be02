"""The diagnose figure: the loss along each fp -> quantized segment, one curve per quantized model."""

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
