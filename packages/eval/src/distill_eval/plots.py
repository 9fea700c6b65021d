"""Plots: quality vs steps, and quality vs latency with the Pareto front marked."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

AXIS_NAMES = {"ms_per_image": "ms per image", "images_per_second": "images per second", "fid": "FID", "kid": "KID",
              "nfe": "NFE", "steps": "steps", "lpips_to_teacher": "LPIPS to the teacher", "clip_score": "CLIPScore"}


def axis_name(key: str) -> str:
    """A human axis label for a report key ("ms_per_image" -> "ms per image")."""
    return AXIS_NAMES.get(key, key.replace("_", " "))


def point_label(model: Any, steps_key: str, value: Any) -> str:
    """"teacher, 4 steps" / "student, NFE 8": what a plotted point is, in words."""
    if value is None:
        return str(model)
    try:
        n = f"{float(value):g}"
    except (TypeError, ValueError):
        return f"{model}, {value}"
    if steps_key == "nfe":
        return f"{model}, NFE {n}"
    return f"{model}, {n} step{'' if n == '1' else 's'}"


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
                          *, model_key: str = "model", steps_key: str = "steps", title: str | None = None) -> Path:
    """One line per model: ``metric`` against ``steps_key`` (steps, or NFE; log x axis), with the 95% interval
    as an error bar where rows carry ``{metric}_ci95_low`` / ``_high``; single-point models are labelled."""
    series: dict[str, list[tuple[float, float, float, float]]] = defaultdict(list)
    for r in rows:
        if r.get(metric) is not None and r.get(steps_key) is not None:
            y = float(r[metric])
            low, high = r.get(f"{metric}_ci95_low"), r.get(f"{metric}_ci95_high")
            low = y if low is None else float(low)
            high = y if high is None else float(high)
            series[str(r[model_key])].append((float(r[steps_key]), y, y - low, high - y))
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, pts in sorted(series.items()):
        pts.sort()
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[[p[2] for p in pts], [p[3] for p in pts]],
                    marker="o", capsize=3, label=name)
        if len(pts) == 1:
            ax.annotate(name.split(" ")[0], (pts[0][0], pts[0][1]), fontsize=7, xytext=(4, -10),
                        textcoords="offset points")
    ax.set_xscale("log", base=2)
    unit = "NFE (network evaluations per image)" if steps_key == "nfe" else "sampling steps"
    ax.set_xlabel(unit)
    ax.set_ylabel(axis_name(metric))
    ax.set_title(title or f"{axis_name(metric)} vs "
                 f"{'NFE' if steps_key == 'nfe' else 'steps'} (bars: 95% interval)")
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
    pts = [(float(r[latency_key]), float(r[metric]), point_label(r[model_key], steps_key, r.get(steps_key)))
           for r in rows if r.get(metric) is not None and r.get(latency_key) is not None]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    if pts:
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], color="tab:blue", zorder=2)
        for i, (x, y, label) in enumerate(pts):  # alternate above / below, so neighbouring labels do not overlap
            ax.annotate(label, (x, y), fontsize=7, xytext=(4, 4 if i % 2 == 0 else -10), textcoords="offset points")
        front = pareto_front([(p[0], p[1]) for p in pts])
        fx = [pts[i][0] for i in front]
        fy = [pts[i][1] for i in front]
        ax.step(fx, fy, where="post", color="tab:red", label="Pareto front", zorder=1)
        ax.scatter(fx, fy, color="tab:red", zorder=3)
        ax.set_xscale("log")
        ax.legend(fontsize=8)
    ax.set_xlabel(f"{axis_name(latency_key)} (log scale)")
    ax.set_ylabel(axis_name(metric))
    ax.set_title(f"{axis_name(metric)} vs {axis_name(latency_key)} (lower left is better)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
