"""Plots: quality vs steps, and quality vs latency with the Pareto front marked."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated when both coordinates are to be minimised (latency, FID)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], float("inf")
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def plot_quality_vs_steps(rows: Sequence[Mapping[str, Any]], metric: str, out_path: str | Path,
                          *, model_key: str = "model", steps_key: str = "steps") -> Path:
    """One line per model: ``metric`` against the number of sampling steps (log x axis)."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in rows:
        if r.get(metric) is not None and r.get(steps_key) is not None:
            series[str(r[model_key])].append((int(r[steps_key]), float(r[metric])))
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sampling steps (NFE)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs steps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_quality_vs_latency(rows: Sequence[Mapping[str, Any]], metric: str, out_path: str | Path,
                            *, latency_key: str = "ms_per_image", model_key: str = "model",
                            steps_key: str = "steps") -> Path:
    """Scatter of ``metric`` against ms per image; the Pareto front (lower is better on both) is drawn."""
    pts = [(float(r[latency_key]), float(r[metric]), f"{r[model_key]}@{r.get(steps_key)}")
           for r in rows if r.get(metric) is not None and r.get(latency_key) is not None]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    if pts:
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], color="tab:blue", zorder=2)
        for x, y, label in pts:
            ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        front = pareto_front([(p[0], p[1]) for p in pts])
        fx = [pts[i][0] for i in front]
        fy = [pts[i][1] for i in front]
        ax.step(fx, fy, where="post", color="tab:red", label="Pareto front", zorder=1)
        ax.scatter(fx, fy, color="tab:red", zorder=3)
        ax.set_xscale("log")
        ax.legend(fontsize=8)
    ax.set_xlabel(f"{latency_key} (log)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs latency")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
