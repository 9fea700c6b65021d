"""Comparison grids: rows are prompts or classes, columns the teacher and each student, all at the same seeds."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) float in [0, 1] → (N, H, W, 3) uint8."""
    arr = images.detach().float().clamp(0, 1).cpu().permute(0, 2, 3, 1).numpy()
    return (arr * 255).round().astype(np.uint8)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # older Pillow
        return ImageFont.load_default()


def image_grid(images: torch.Tensor, ncols: int | None = None, pad: int = 2) -> Image.Image:
    """Plain grid of (N, 3, H, W) images in [0, 1], row-major."""
    arr = _to_uint8(images)
    n, h, w, _ = arr.shape
    ncols = ncols or int(np.ceil(np.sqrt(n)))
    nrows = int(np.ceil(n / ncols))
    canvas = Image.new("RGB", (ncols * (w + pad) + pad, nrows * (h + pad) + pad), "white")
    for i in range(n):
        r, c = divmod(i, ncols)
        canvas.paste(Image.fromarray(arr[i]), (pad + c * (w + pad), pad + r * (h + pad)))
    return canvas


def comparison_grid(
    columns: Sequence[tuple[str, torch.Tensor]],
    row_labels: Sequence[str],
    out_path: str | Path | None = None,
    *,
    cell_size: int | None = None,
    title: str | None = None,
) -> Image.Image:
    """Labelled grid. ``columns`` is a list of (label, images (R, 3, H, W)) with one image per row label.

    Column labels say what produced the column (e.g. "teacher 32 steps · 41 ms/img").
    """
    if not columns:
        raise ValueError("comparison_grid needs at least one column")
    rows = len(row_labels)
    for label, imgs in columns:
        assert imgs.shape[0] == rows, f"column {label!r} has {imgs.shape[0]} images, expected {rows} (one per row)"
    h, w = columns[0][1].shape[-2:]
    cell = cell_size or max(96, min(256, max(h, w)))
    font_size = max(10, cell // 10)
    font = _font(font_size)
    label_w = max(100, cell)
    wrapped = ["\n".join(textwrap.wrap(label, width=max(8, cell // 7))) for label, _ in columns]  # never cut short
    label_h = max(28, max(text.count("\n") + 1 for text in wrapped) * (font_size + 3) + 4)
    head_h = label_h + (24 if title else 0)
    pad = 4
    width = label_w + len(columns) * (cell + pad) + pad
    height = head_h + rows * (cell + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, 4), title, fill="black", font=font)
    top = head_h - label_h
    for j, (_label, imgs) in enumerate(columns):
        x = label_w + j * (cell + pad)
        draw.multiline_text((x, top + 2), wrapped[j], fill="black", font=font)
        arr = _to_uint8(imgs)
        for i in range(rows):
            tile = Image.fromarray(arr[i]).resize((cell, cell), Image.Resampling.NEAREST if h <= 64 else Image.Resampling.BICUBIC)
            canvas.paste(tile, (x, head_h + i * (cell + pad)))
    for i, label in enumerate(row_labels):
        y = head_h + i * (cell + pad) + 4
        draw.multiline_text((pad, y), "\n".join(textwrap.wrap(str(label), width=max(10, label_w // 7))[:6]),
                            fill="black", font=font)
    if out_path is not None:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        from distill_common.checkpoint import save_image

        save_image(canvas, out_path)
    return canvas
