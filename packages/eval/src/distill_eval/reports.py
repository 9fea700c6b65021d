"""Benchmark reports: CSV, JSON and a Markdown table per benchmark, and the rich table printed to the terminal."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:.1f}"
    return str(v)


def columns_of(rows: Sequence[Mapping[str, Any]], preferred: Sequence[str] = ()) -> list[str]:
    cols = [c for c in preferred if any(c in r for r in rows)]
    for r in rows:
        cols += [k for k in r if k not in cols]
    return cols


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    head = "| " + " | ".join(columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body]) + "\n"


def write_report(rows: Sequence[Mapping[str, Any]], out_dir: str | Path, name: str = "report", *,
                 columns: Sequence[str] = (), meta: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """Write ``name.csv``, ``name.json`` (rows + meta such as the protocol) and ``name.md``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cols = columns_of(rows, columns)
    paths = {"csv": out / f"{name}.csv", "json": out / f"{name}.json", "md": out / f"{name}.md"}
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({c: r.get(c) for c in cols})
    paths["json"].write_text(json.dumps({"meta": dict(meta or {}), "rows": list(rows)}, indent=2, default=str))
    md = f"# {name}\n\n"
    if meta:
        md += "\n".join(f"- **{k}**: {v}" for k, v in meta.items()) + "\n\n"
    paths["md"].write_text(md + markdown_table(rows, cols))
    return paths


def print_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], title: str | None = None,
                console: Console | None = None) -> Table:
    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="right" if rows and isinstance(rows[0].get(c), (int, float)) else "left")
    for r in rows:
        table.add_row(*(_fmt(r.get(c)) for c in columns))
    (console or Console()).print(table)
    return table
