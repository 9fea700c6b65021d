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

    def versus(r: Mapping[str, Any], t: Mapping[str, Any]) -> str:
        (t_low, t_high), (low, high) = _interval(t), _interval(r)
        return "better" if high < t_low else ("worse" if low > t_high else APPROX)

    for r in scored:
        if r.get("role") == teacher_role:
            continue
        same, equal_nfe = teacher_matches(r, teachers)
        if same:
            r[f"{metric}_vs_teacher"] = versus(r, same)
        if equal_nfe:
            r[f"{metric}_vs_teacher_nfe"] = versus(r, equal_nfe)


def teacher_matches(row: Mapping[str, Any], teachers: Sequence[Mapping[str, Any]]
                    ) -> tuple[Mapping[str, Any] | None, Mapping[str, Any] | None]:
    """The teacher row a student row is compared with at the same steps, sampler and guidance (a row's
    ``effective_guidance`` when it has one), and the one with the same network evaluations per image."""
    def guidance(r: Mapping[str, Any]) -> Any:
        return r.get("effective_guidance", r.get("guidance"))

    same = [t for t in teachers if t.get("steps") == row.get("steps") and t.get("sampler") == row.get("sampler")
            and guidance(t) == guidance(row)]
    equal_nfe = [t for t in teachers if row.get("nfe") is not None and t.get("nfe") == row.get("nfe")]
    return (same[0] if same else None), (equal_nfe[0] if equal_nfe else None)


MINUS = "\u2212"  # a real minus sign: "−9.1%"


def compact_fid(row: Mapping[str, Any], digits: int = 1) -> str:
    """``FID ±half-width`` of its 95% interval ("101.2 ±3.8"), or the FID alone without an interval."""
    value = row.get("fid")
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "n/a"
    ci = _interval(row)
    return f"{value:.{digits}f}" + (f" ±{(ci[1] - ci[0]) / 2:.{digits}f}" if ci else "")


def verdict(row: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], *, teacher_role: str = "teacher") -> str:
    """One short cell saying what the row's FID establishes.

    A student: its FID change against the teacher at the same steps and guidance ("−9.1% vs teacher@4, disjoint";
    ``overlap`` when the 95% intervals overlap, so the difference is not established); without such a teacher row,
    against the teacher with the same network evaluations ("vs teacher@2 (=NFE)"). A teacher row: ``best``, or
    ``≈ best`` when its interval overlaps the best row's. Empty when nothing is established.
    """
    if row.get("role") == teacher_role or not isinstance(row.get("fid"), (int, float)):
        mark = row.get("fid_vs_best")
        return mark if mark in ("best", f"{APPROX} best") else ""
    teachers = [t for t in rows if t.get("role") == teacher_role and isinstance(t.get("fid"), (int, float))]
    same, equal_nfe = teacher_matches(row, teachers)
    t = same or equal_nfe
    if t is None or not t["fid"]:
        return row.get("fid_vs_best", "") if row.get("fid_vs_best") == "best" else ""
    change = f"{100 * (row['fid'] - t['fid']) / t['fid']:+.1f}%".replace("-", MINUS)
    steps = t.get("steps") if t.get("steps") is not None else t.get("sampler")
    where = f"teacher@{steps}" + ("" if same else " (=NFE)")
    ci, t_ci = _interval(row), _interval(t)
    if ci is None or t_ci is None:
        return f"{change} vs {where}"
    disjoint = ci[1] < t_ci[0] or ci[0] > t_ci[1]
    return f"{change} vs {where}, {'disjoint' if disjoint else 'overlap'}"


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


HEADERS = {"fid": "FID", "kid": "KID ±std", "kid_mean": "KID ±std", "nfe": "NFE", "ms_per_image": "ms/img",
           "speedup_vs_teacher": "speed", "images_per_second": "img/s", "lpips_to_teacher": "LPIPS",
           "teacher_same_steps": "teacher FID", "teacher_steps": "from", "n": "N", "clip_score": "CLIPScore",
           "lpips_mean": "LPIPS", "lpips_std": "±std", "num_images": "N", "generated_n": "N generated",
           "reference_n": "N reference", "kid_subset_size": "KID subset", "train_seconds": "train s"}
VERDICT_SOURCES = ("fid_vs_best", "fid_vs_teacher", "fid_vs_teacher_nfe")


def header(column: str) -> str:
    """The terminal header of a report column: a short human name ("ms/img", "NFE"), else the key with spaces."""
    return HEADERS.get(column, column.replace("_", " "))


def compact_table(title: str | None = None) -> Table:
    """A borderless table with one space between columns: the most that fits in 80 columns."""
    return Table(title=title, box=None, padding=(0, 1, 0, 0), pad_edge=False, header_style="bold underline")


def print_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], title: str | None = None,
                console: Console | None = None) -> Table:
    """The terminal form of a report: readable headers, ``FID ±half-width`` cells, and the three separability
    columns replaced by one ``verdict`` (:func:`verdict`); CSV, JSON and Markdown keep every column."""
    table = compact_table(title)
    columns = shown_columns(rows, columns)
    with_interval = any(_interval(r) is not None for r in rows)
    if any(c in VERDICT_SOURCES for c in columns):
        first = next(i for i, c in enumerate(columns) if c in VERDICT_SOURCES)
        columns = [c for c in columns if c not in VERDICT_SOURCES]
        columns.insert(first, "verdict")
    for c in columns:
        name = "FID ±95%" if c == "fid" and with_interval else header(c)
        table.add_column(name, justify="right" if rows and isinstance(rows[0].get(c), (int, float)) else "left")
    for r in rows:
        table.add_row(*(verdict(r, rows) if c == "verdict" else compact_fid(r) if c == "fid" and with_interval
                        else cell(r, c) for c in columns))
    (console or Console()).print(table)
    return table
