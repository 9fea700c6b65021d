"""Benchmark reports: CSV, JSON and a Markdown table per benchmark, and the rich table printed to the terminal.

Intervals are shown where they exist: the Markdown and terminal tables print ``fid`` as ``FID [low, high]``
(its 95% bootstrap interval, from the row's ``fid_ci95_low`` / ``fid_ci95_high``) and ``kid`` as ``mean ± std``
over subsets; CSV and JSON keep the numbers in their own columns. :func:`mark_separability` adds the columns
that say which differences the intervals do not establish:

- ``fid_vs_best``: ``best`` for the lowest FID, ``≈ best`` when a row's interval overlaps the best row's (not
  separable from it), ``worse`` when it lies entirely above;
- ``fid_vs_teacher``: for a student row with a teacher row at the same steps, sampler and guidance (a row's
  ``effective_guidance`` when it has one: the CFG scale a student distilled from guided pairs carries in its
  weights): ``better`` / ``worse`` when the intervals are disjoint, ``≈`` when they overlap;
- ``fid_vs_teacher_nfe``: the same against the teacher row with the same network evaluations per image (a CFG
  step counts 2, so a 4-step student meets the teacher at 2 guided steps).

Overlapping 95% intervals are a conservative reading: a difference whose intervals overlap may still be real,
but the table does not claim it.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

FOLDED = ("fid_ci95_low", "fid_ci95_high", "kid_std")  # shown inside the fid / kid cells of the tables
APPROX = "≈"


def interval_note(resamples: int) -> str:
    """The report's one-line statement of how intervals were computed."""
    if not resamples:
        return "no FID intervals (bootstrap switched off)"
    return (f"FID [low, high]: 95% bootstrap interval (FID ± 1.96 bootstrap SE), {resamples} resamples of the "
            "generated images with the reference statistics fixed; KID: mean ± std over random subsets; "
            f"'{APPROX}' marks differences inside the intervals")


def _interval(row: Mapping[str, Any]) -> tuple[float, float] | None:
    low, high = row.get("fid_ci95_low"), row.get("fid_ci95_high")
    if isinstance(low, (int, float)) and isinstance(high, (int, float)) and math.isfinite(low) and math.isfinite(high):
        return float(low), float(high)
    return None


def mark_separability(rows: list[dict[str, Any]], *, metric: str = "fid", teacher_role: str = "teacher") -> None:
    """Add ``fid_vs_best`` and ``fid_vs_teacher`` (see the module doc) to rows with an interval, in place."""
    scored = [r for r in rows if _interval(r) is not None and isinstance(r.get(metric), (int, float))]
    if not scored:
        return
    best = min(scored, key=lambda r: r[metric])
    b_low, b_high = _interval(best)
    for r in scored:
        low, high = _interval(r)
        r[f"{metric}_vs_best"] = "best" if r is best else (f"{APPROX} best" if low <= b_high else "worse")
    teachers = [r for r in scored if r.get("role") == teacher_role]

    def guidance(row: Mapping[str, Any]) -> Any:
        return row.get("effective_guidance", row.get("guidance"))

    def versus(r: Mapping[str, Any], t: Mapping[str, Any]) -> str:
        (t_low, t_high), (low, high) = _interval(t), _interval(r)
        return "better" if high < t_low else ("worse" if low > t_high else APPROX)

    for r in scored:
        if r.get("role") == teacher_role:
            continue
        same = [t for t in teachers if t.get("steps") == r.get("steps") and t.get("sampler") == r.get("sampler")
                and guidance(t) == guidance(r)]
        if same:
            r[f"{metric}_vs_teacher"] = versus(r, same[0])
        equal_nfe = [t for t in teachers if r.get("nfe") is not None and t.get("nfe") == r.get("nfe")]
        if equal_nfe:
            r[f"{metric}_vs_teacher_nfe"] = versus(r, equal_nfe[0])


def cell(row: Mapping[str, Any], column: str) -> str:
    """A table cell: ``fid`` with its interval, ``kid`` with its std, everything else through ``_fmt``."""
    value = row.get(column)
    if column == "fid" and isinstance(value, (int, float)) and _interval(row) is not None:
        low, high = _interval(row)
        return f"{value:.2f} [{low:.2f}, {high:.2f}]"
    if column in ("kid", "kid_mean") and isinstance(value, (int, float)) and isinstance(row.get("kid_std"), float):
        return f"{value:.4g} ± {row['kid_std']:.2g}"
    return _fmt(value)


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


def shown_columns(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> list[str]:
    """Columns of the human-readable tables: interval/std columns fold into the fid/kid cells."""
    folded = set(FOLDED) if any("fid" in r or "kid" in r for r in rows) else set()
    return [c for c in columns if c not in folded]


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    columns = shown_columns(rows, columns)
    head = "| " + " | ".join(columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(cell(r, c) for c in columns) + " |" for r in rows]
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
    columns = shown_columns(rows, columns)
    for c in columns:
        table.add_column(c, justify="right" if rows and isinstance(rows[0].get(c), (int, float)) else "left")
    for r in rows:
        table.add_row(*(cell(r, c) for c in columns))
    (console or Console()).print(table)
    return table
