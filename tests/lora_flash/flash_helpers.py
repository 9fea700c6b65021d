"""Helpers of the lora_flash tests: run ``distill flash ARGS`` in-process and list the files a command wrote."""

from __future__ import annotations

from pathlib import Path

from distill_common.cli import run_app
from distill_lora_flash.cli import app


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run ``distill flash ARGS`` in-process as the console script would; returns (exit code, stdout, stderr)."""
    code = 0
    try:
        run_app(app, args)
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
