"""The compare figure: perplexity against bits per method, and perplexity against packed size."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

MIB = 2**20


def _ppl_label(y: float, _: object = None) -> str:
    """Tick and point labels: 50.2, 158, 1000, 1.97e6 (never 1e+06 next to 100000)."""
    if y >= 1e4:
        exponent = math.floor(math.log10(y))
        return f"{y / 10**exponent:.3g}e{exponent}"
    return f"{y:.0f}" if y >= 100 else f"{y:.3g}"


def plot_compare(fp: dict[str, Any], rows: list[dict[str, Any]], title: str, path: Path) -> None:
    """Two panels, one line per series (method, estimator, init; and group size where several are compared).

    ``path`` is written as PNG whatever its name (the caller writes to a temporary file and renames it).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

    several_groups = len({r["group_size"] for r in rows}) > 1
    series: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        label = r["series"] + (f", g{r['group_size']}" if several_groups else "")
        series[label].append(r)

    fig, (by_bits, by_size) = plt.subplots(1, 2, figsize=(12, 5.2), constrained_layout=True)
    markers = "osD^vP*X"
    for i, (label, points) in enumerate(series.items()):
        style = {"marker": markers[i % len(markers)], "label": label, "linewidth": 1.5, "markersize": 7}
        points = sorted(points, key=lambda r: r["bits"])
        (line,) = by_bits.plot([r["bits"] for r in points], [r["ppl"] for r in points], **style)
        for r in points:
            by_bits.annotate(
                _ppl_label(r["ppl"]),
                (r["bits"], r["ppl"]),
                xytext=(7, 0),
                textcoords="offset points",
                va="center",
                fontsize=8,
                color=line.get_color(),
            )
        points = sorted(points, key=lambda r: r["quantized_bytes"])
        by_size.plot([r["quantized_bytes"] / MIB for r in points], [r["ppl"] for r in points], **style)

    fp_label = f"full precision: ppl {fp['ppl']:.2f} (fp16 layers {fp['quantized_bytes'] / MIB:.3g} MiB)"
    plain = FuncFormatter(_ppl_label)
    for ax in (by_bits, by_size):
        ax.axhline(fp["ppl"], color="0.35", linestyle="--", linewidth=1.2, label=fp_label)
        ax.set_yscale("log")
        low, high = ax.get_ylim()
        ax.yaxis.set_major_formatter(plain)
        # Within a decade the minor ticks are the only ones: label them too; across decades only 10^k.
        ax.yaxis.set_minor_formatter(plain if high / low < 10 else NullFormatter())
        ax.set_ylabel(f"perplexity (log scale; {fp['windows']} windows x {fp['seqlen']} tokens)")
        ax.grid(True, which="major", alpha=0.35)
        ax.grid(True, which="minor", alpha=0.12)
    bits = sorted({r["bits"] for r in rows})
    by_bits.xaxis.set_major_locator(FixedLocator(bits))
    by_bits.xaxis.set_minor_locator(NullLocator())
    by_bits.set_xlim(min(bits) - 0.5, max(bits) + 0.5)
    by_bits.set_xlabel("weight bits")
    by_bits.set_title("perplexity against bits")
    by_size.set_xlabel("packed quantized layers in the GPTQ export (MiB)")
    by_size.set_title("perplexity against size")
    handles, labels = by_bits.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(3, len(labels)), frameon=False)
    fig.suptitle(title)
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)
