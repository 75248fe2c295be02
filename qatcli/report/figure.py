"""The compare figure: perplexity against bits per method, and perplexity against packed size."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

MIB = 2**20
# Above this max/min ratio the perplexity axis is logarithmic (2-bit collapses span decades); below it a
# log axis has no labelled decade and its ticks round to the same few digits, so the axis is linear.
LOG_AXIS_RATIO = 3.0
LABEL_GAP_POINTS = 10.0


def ppl_decimals(values: list[float]) -> int:
    """Decimals that tell apart points about 1% of the plotted range apart (at most 3)."""
    spread = max(values) - min(values)
    if spread <= 0:
        return 2
    return min(3, max(0, -math.floor(math.log10(spread / 100))))


def ppl_label(y: float, decimals: int = 0) -> str:
    """Point and log-tick labels: 50.2, 158, 1000, 1.97e6 (never 1e+06 next to 100000)."""
    if y >= 1e4:
        exponent = math.floor(math.log10(y))
        return f"{y / 10**exponent:.3g}e{exponent}"
    if decimals:
        return f"{y:.{decimals}f}"
    return f"{y:.0f}" if y >= 100 else f"{y:.3g}"


def spread_offsets(heights: list[float], gap: float) -> list[float]:
    """Vertical offsets (display points) that keep labels at ``heights`` at least ``gap`` apart.

    Labels keep their order; a cluster closer than ``gap`` is spread evenly about its own centre.
    """
    order = sorted(range(len(heights)), key=lambda i: heights[i])
    clusters = [[i] for i in order]
    # A merged cluster grows both ways and can reach its neighbours: merge until no two are too close.
    merged = True
    while merged:
        merged = False
        for k in range(len(clusters) - 1):
            a, b = clusters[k], clusters[k + 1]
            top_a = sum(heights[j] for j in a) / len(a) + gap * (len(a) - 1) / 2
            bottom_b = sum(heights[j] for j in b) / len(b) - gap * (len(b) - 1) / 2
            if bottom_b - top_a < gap:
                clusters[k : k + 2] = [a + b]
                merged = True
                break
    offsets = [0.0] * len(heights)
    for cluster in clusters:
        centre = sum(heights[j] for j in cluster) / len(cluster)
        for rank, j in enumerate(cluster):
            offsets[j] = centre + gap * (rank - (len(cluster) - 1) / 2) - heights[j]
    return offsets


def plot_compare(fp: dict[str, Any], rows: list[dict[str, Any]], title: str, path: Path) -> None:
    """Write the compare figure to ``path`` as PNG whatever its name (the caller writes a temporary file)."""
    import matplotlib.pyplot as plt

    fig = compare_figure(fp, rows, title)
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def compare_figure(fp: dict[str, Any], rows: list[dict[str, Any]], title: str) -> Any:
    """Two panels, one line per series (method, estimator, init; and group size where several are compared)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

    several_groups = len({r["group_size"] for r in rows}) > 1
    series: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        label = r["series"] + (f", g{r['group_size']}" if several_groups else "")
        series[label].append(r)
    values = [r["ppl"] for r in rows] + [fp["ppl"]]
    log_axis = max(values) / min(values) > LOG_AXIS_RATIO
    decimals = 0 if log_axis else ppl_decimals(values)

    fig, (by_bits, by_size) = plt.subplots(1, 2, figsize=(12, 5.2), constrained_layout=True)
    markers = "osD^vP*X"
    labels: list[tuple[float, float, str, str]] = []
    for i, (label, points) in enumerate(series.items()):
        style = {"marker": markers[i % len(markers)], "label": label, "linewidth": 1.5, "markersize": 7}
        points = sorted(points, key=lambda r: r["bits"])
        (line,) = by_bits.plot([r["bits"] for r in points], [r["ppl"] for r in points], **style)
        labels += [(r["bits"], r["ppl"], ppl_label(r["ppl"], decimals), line.get_color()) for r in points]
        points = sorted(points, key=lambda r: r["quantized_bytes"])
        by_size.plot([r["quantized_bytes"] / MIB for r in points], [r["ppl"] for r in points], **style)

    fp_label = f"full precision: ppl {fp['ppl']:.2f} (fp16 layers {fp['quantized_bytes'] / MIB:.3g} MiB)"
    for ax in (by_bits, by_size):
        ax.axhline(fp["ppl"], color="0.35", linestyle="--", linewidth=1.2, label=fp_label)
        ax.set_ylabel(
            f"perplexity ({'log' if log_axis else 'linear'} scale; {fp['windows']} windows x {fp['seqlen']} tokens)"
        )
        ax.grid(True, which="major", alpha=0.35)
        if log_axis:
            ax.set_yscale("log")
            low, high = ax.get_ylim()
            plain = FuncFormatter(lambda y, _: ppl_label(y))
            ax.yaxis.set_major_formatter(plain)
            # Within a decade the minor ticks are the only ones: label them too; across decades only 10^k.
            ax.yaxis.set_minor_formatter(plain if high / low < 10 else NullFormatter())
            ax.grid(True, which="minor", alpha=0.12)
    bits = sorted({r["bits"] for r in rows})
    by_bits.xaxis.set_major_locator(FixedLocator(bits))
    by_bits.xaxis.set_minor_locator(NullLocator())
    by_bits.set_xlim(min(bits) - 0.5, max(bits) + 0.5)
    by_bits.set_xlabel("weight bits")
    by_bits.set_title("perplexity against bits")
    by_size.set_xlabel("packed quantized layers in the GPTQ export (MiB)")
    by_size.set_title("perplexity against size")
    handles, legend_labels = by_bits.get_legend_handles_labels()
    fig.legend(handles, legend_labels, loc="outside lower center", ncol=min(3, len(legend_labels)), frameon=False)
    fig.suptitle(title)
    _annotate_spread(fig, by_bits, labels)
    return fig


def _annotate_spread(fig: Any, ax: Any, labels: list[tuple[float, float, str, str]]) -> None:
    """Write each point's perplexity right of it, moving labels at the same x apart so none overlap."""
    fig.draw_without_rendering()  # the layout fixes the axes' final size, which sets the labels' spacing
    points_per_pixel = 72.0 / fig.dpi
    by_x: dict[float, list[tuple[float, float, str, str]]] = defaultdict(list)
    for entry in labels:
        by_x[entry[0]].append(entry)
    for entries in by_x.values():
        heights = [ax.transData.transform((x, y))[1] * points_per_pixel for x, y, _, _ in entries]
        for (x, y, text, color), dy in zip(entries, spread_offsets(heights, LABEL_GAP_POINTS), strict=True):
            ax.annotate(
                text,
                (x, y),
                xytext=(7, dy),
                textcoords="offset points",
                va="center",
                fontsize=8,
                color=color,
                bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none", "alpha": 0.85},
                zorder=5,
            )
