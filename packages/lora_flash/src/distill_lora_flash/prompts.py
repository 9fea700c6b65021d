"""Prompt lists of ``distill flash``: the packaged ``demo_prompts.txt`` (20 varied prompts, the prompt file of the
seed project's evaluation protocol) and how a ``--prompts-file`` argument is resolved."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

DEMO_PROMPTS_NAME = "demo_prompts.txt"


def demo_prompts_file() -> Path:
    """The packaged ``demo_prompts.txt`` (package data of ``distill_lora_flash``)."""
    return Path(str(resources.files("distill_lora_flash") / DEMO_PROMPTS_NAME))


def resolve_prompts_file(path: str | Path | None) -> Path | None:
    """``path`` itself when it exists; the bare name ``demo_prompts.txt`` with no such file here means the packaged
    list, so the seed's ``--prompts_file demo_prompts.txt`` works from any folder. Other paths are left for the
    prompt loader to report."""
    if path is None or str(path) == "":
        return None
    p = Path(path).expanduser()
    if not p.is_file() and str(path) == DEMO_PROMPTS_NAME:
        return demo_prompts_file()
    return p
