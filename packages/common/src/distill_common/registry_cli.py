"""``distill registry``: list, compare and promote registered generators."""

from __future__ import annotations

import typer

app = typer.Typer(help="MLflow model-registry helpers: list, compare, promote, serve.", no_args_is_help=True)
