"""The figures, drawn with matplotlib's Agg canvas (no display, no pyplot state) and returned as PNG bytes."""

from __future__ import annotations

import io
import math

from slimquant.errors import OutputError
from slimquant.plots.names import kinds_in_order, layer_and_kind


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise OutputError("plots need matplotlib: pip install 'slimquant[plots]'") from None
    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def linear_errors_by_layer(errors: dict[str, float]) -> bytes:
    """Relative output error of each Linear against its decoder layer, one line per Linear kind, log scale."""
    figure = _figure(8, 4.5)
    from matplotlib.ticker import MaxNLocator
    axes = figure.add_subplot()
    for kind in kinds_in_order(errors):
        points = sorted((layer_and_kind(n)[0], e) for n, e in errors.items() if layer_and_kind(n)[1] == kind)
        axes.plot([p[0] for p in points], [max(p[1], 1e-12) for p in points], marker="o", markersize=3, label=kind)
    axes.set_yscale("log")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("decoder layer")
    axes.set_ylabel("||y_q - y||² / ||y||²")
    axes.set_title("per-Linear output error by layer")
    axes.legend(fontsize=7, ncols=2)
    return _png(figure)


def sensitivity_by_candidate(names: list[str], candidates: list[str], sensitivity: list[list[float]],
                             chosen: list[int]) -> bytes:
    """Predicted loss of every Linear at every candidate (log scale), the chosen candidate ringed."""
    figure = _figure(max(8, len(names) * 0.06), 4.5)
    axes = figure.add_subplot()
    x = range(len(names))
    for j, label in enumerate(candidates):
        axes.plot(x, [max(s[j], 1e-12) for s in sensitivity], marker=".", linewidth=0.8, label=label)
    axes.scatter(x, [max(s[c], 1e-12) for s, c in zip(sensitivity, chosen, strict=True)], facecolors="none",
                 edgecolors="black", s=30, label="chosen", zorder=3)
    axes.set_yscale("log")
    axes.set_xlabel("Linear (in model order)")
    axes.set_ylabel("predicted loss (KL per token)")
    axes.set_title("sensitivity per candidate")
    axes.legend(fontsize=7)
    return _png(figure)


def bit_map(bits: dict[str, float]) -> bytes:
    """Layer x Linear kind heat map of weight bits (16 = left in float)."""
    kinds = kinds_in_order(bits)
    layers = sorted({layer_and_kind(n)[0] for n in bits})
    grid = [[math.nan] * len(kinds) for _ in layers]
    for name, value in bits.items():
        layer, kind = layer_and_kind(name)
        grid[layers.index(layer)][kinds.index(kind)] = value
    figure = _figure(max(5, len(kinds) * 0.9 + 2), max(3, len(layers) * 0.25 + 1.5))
    axes = figure.add_subplot()
    image = axes.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    axes.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right", fontsize=7)
    axes.set_yticks(range(len(layers)), [str(i) for i in layers], fontsize=7)
    axes.set_ylabel("decoder layer")
    axes.set_title("weight bits per Linear")
    figure.colorbar(image, ax=axes, label="bits")
    if len(layers) * len(kinds) <= 400:
        low, high = image.get_clim()
        for r, row in enumerate(grid):
            for c, value in enumerate(row):
                if not math.isnan(value):
                    light = value > (low + high) / 2  # viridis is light at the top
                    axes.text(c, r, f"{value:g}", ha="center", va="center", fontsize=7,
                              color="black" if light else "white")
    return _png(figure)
