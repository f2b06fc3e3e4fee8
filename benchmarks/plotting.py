"""Figures for the benchmarks: matplotlib on the Agg backend (the benchmark machines have no
display), one PNG beside each JSON under benchmarks/results/."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

GIB = 1 << 30
COLORS = plt.get_cmap("tab10").colors


def figure(rows: int, cols: int, width: float, height: float):
    """A figure of rows x cols panels, `width` x `height` inches each; axes as a flat list."""
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    return fig, [ax for row in axes for ax in row]


def stacked_bars(ax, x: list[float], layers: dict[str, list[float]], width: float, hatch: str | None = None, legend: bool = True,
                 first_color: int = 0) -> list:
    """One bar per x, its layers stacked bottom to top in `layers` order, the k-th layer in the
    palette's colour first_color + k (so calls with the same layers match); returns the top of each bar."""
    bottom = [0.0] * len(x)
    for index, (name, values) in enumerate(layers.items()):
        ax.bar(x, values, width, bottom=bottom, color=COLORS[(first_color + index) % len(COLORS)], hatch=hatch, edgecolor="white" if hatch is None else "black",
               linewidth=0.5, label=name if legend else None)
        bottom = [b + v for b, v in zip(bottom, values)]
    return bottom


def save(fig, path: Path, title: str | None = None) -> Path:
    """Write the figure as PNG (the folder made if needed) and free it."""
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
