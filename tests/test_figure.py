"""The compare figure's labels: enough digits to tell points apart, and no two labels on top of each other."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import pytest

from qatcli.report.figure import compare_figure, plot_compare, ppl_decimals, ppl_label, spread_offsets


def test_decimals_follow_the_spread() -> None:
    assert ppl_decimals([139.76, 143.69]) == 2
    assert ppl_decimals([40.3, 216.0]) == 0
    assert ppl_decimals([10.001, 10.004]) == 3
    assert ppl_label(140.25, 2) == "140.25"
    assert ppl_label(2.48e6) == "2.48e6"
    assert ppl_label(40.347) == "40.3"


def test_labels_far_apart_stay_put() -> None:
    assert spread_offsets([0.0, 50.0, 100.0], gap=10.0) == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("heights", [[0.0, 1.0, 2.0, 3.0], [5.0, 0.0, 30.0, 4.0, 33.0], [0.0, 9.0, 18.0, 27.0]])
def test_close_labels_are_spread_in_order(heights: list[float]) -> None:
    gap = 10.0
    placed = [h + dy for h, dy in zip(heights, spread_offsets(heights, gap), strict=True)]
    order = sorted(range(len(heights)), key=lambda i: heights[i])
    for lower, upper in pairwise(order):
        assert placed[upper] - placed[lower] >= gap - 1e-9
    # Each cluster stays centred on its points: the labels do not drift as a whole.
    assert sum(placed) / len(placed) == pytest.approx(sum(heights) / len(heights))


def _row(series: str, bits: int, ppl: float) -> dict[str, object]:
    return {"series": series, "bits": bits, "ppl": ppl, "group_size": 64, "quantized_bytes": bits * 2**20}


@pytest.mark.parametrize(("ppls", "scale"), [((139.9, 140.3, 140.2), "linear"), ((40.3, 216.0, 2.48e6), "log")])
def test_figure_holds_every_series_point_and_label(
    tmp_path: Path, ppls: tuple[float, float, float], scale: str
) -> None:
    fp = {"ppl": ppls[0] - 0.1, "quantized_bytes": 16 * 2**20, "windows": 4, "seqlen": 64}
    rows = [_row("rtn", bits, ppl) for bits, ppl in zip((4, 3, 2), ppls, strict=True)]
    rows += [_row("gptq", bits, ppl * 0.999) for bits, ppl in zip((4, 3, 2), ppls, strict=True)]
    fig = compare_figure(fp, rows, "title")
    by_bits, by_size = fig.axes
    for ax in (by_bits, by_size):
        assert ax.get_yscale() == scale
        lines = {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}
        fp_label = f"full precision: ppl {fp['ppl']:.2f} (fp16 layers 16 MiB)"
        assert set(lines) == {"rtn", "gptq", fp_label}
        for name, factor in (("rtn", 1.0), ("gptq", 0.999)):
            ys = sorted(lines[name].get_ydata())
            assert ys == pytest.approx(sorted(p * factor for p in ppls))
        assert list(lines[fp_label].get_ydata()) == [pytest.approx(fp["ppl"])] * 2
    assert list(by_bits.get_lines()[0].get_xdata()) == [2, 3, 4]
    assert sorted(by_size.get_lines()[0].get_xdata()) == [2, 3, 4]  # MiB: bits * 1 MiB in _row
    assert len(by_bits.texts) == len(rows)  # every point carries its perplexity
    assert fig._suptitle.get_text() == "title"
    path = tmp_path / "figure.tmp"
    plot_compare(fp, rows, "title", path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
