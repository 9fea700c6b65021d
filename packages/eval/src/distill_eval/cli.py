"""``distill eval``: the shared benchmark, and FID / LPIPS / CLIPScore for folders of images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import typer
from rich.console import Console

from distill_common.config import config_command, save_config
from distill_common.errors import DataError
from distill_common.output_dir import claims_output_dir
from distill_eval.benchmark import BenchmarkConfig, run_benchmark
from distill_eval.reports import print_table

app = typer.Typer(help="Unified evaluation: FID/KID, LPIPS, CLIPScore, timing, reports, grids, plots.",
                  no_args_is_help=True)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@config_command(app, "benchmark", BenchmarkConfig)
@claims_output_dir(lambda cfg: cfg.output_dir)
def benchmark(cfg: BenchmarkConfig) -> None:
    """Evaluate generators at several step counts against a reference set and the teacher, at fixed seeds.

    Logs an MLflow evaluation run (metrics, report, grid, plots, protocol tags), stamps the numbers on the
    evaluated registry versions, and resumes a cut-off benchmark without regenerating finished images.
    """
    from distill_common import tracking

    console = Console()
    save_config(cfg, Path(cfg.output_dir) / "benchmark_config.yaml")
    with tracking.start_run(cfg.experiment, Path(cfg.output_dir).name, config=cfg, tags={"kind": "evaluation"},
                            fallback_dir=cfg.output_dir, enabled=cfg.track) as run:
        result = run_benchmark(cfg, tracking_run=run if cfg.track else None, console=console)
    cols = ["model", "steps", "fid", "kid", "lpips_to_teacher", "clip_score", "ms_per_image", "speedup_vs_teacher"]
    print_table(result.rows, [c for c in cols if any(r.get(c) is not None for r in result.rows)],
                title="benchmark", console=console)
    if result.protocol:
        console.print(f"protocol: {result.protocol}", highlight=False)
    console.print(f"report: {result.report_paths['md']}\ngrid: {result.grid_path}", highlight=False)
    for p in result.plot_paths:
        console.print(f"plot: {p}", highlight=False)


def _folder_images(folder: Path, limit: int | None = None, strict: bool = True,
                   strict_flag: str | None = None) -> torch.Tensor:
    """(N, 3, H, W) uint8 from a folder of equally sized images, sorted by name.

    Unreadable files are refused naming the file (``strict``; paired metrics always are, as skipping one would
    shift the pairs), or skipped with one printed line that counts them.
    """
    from distill_common.data.images import (
        IMAGE_ERRORS,
        check_images,
        decode_rgb,
        skipped_note,
        unreadable_image,
    )

    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist; pass a folder of PNG/JPEG images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)[:limit]
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    files, bad = check_images(files, strict, strict_flag)
    arrs = []
    for path in files:
        try:
            arrs.append(np.array(decode_rgb(path)))
        except IMAGE_ERRORS as err:  # passed the header check, fails at full decode (truncated)
            if strict:
                raise unreadable_image(path, err, strict_flag) from None
            bad.append(f"{path}: {type(err).__name__}: {err}")
    if bad:
        Console(stderr=True).print(f"[yellow]warning:[/] {skipped_note(bad, folder)}", highlight=False, soft_wrap=True)
    if not arrs:
        raise DataError(f"none of the {len(bad)} images in {folder} is readable (first: {bad[0]}); check the files")
    shapes = {a.shape for a in arrs}
    if len(shapes) > 1:
        raise DataError(f"images in {folder} have different sizes {sorted(shapes)[:3]}; resize them to one size first")
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


@app.command("fid")
def fid_cmd(
    dir_a: Path = typer.Argument(..., help="Folder of generated images."),
    dir_b: Path = typer.Argument(..., help="Folder of reference images (or another generated set)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Feature-extraction batch size.", min=1),
    strict: bool = typer.Option(False, "--strict", help="Refuse unreadable images (default: skip and count them)."),
) -> None:
    """FID and KID between two folders of images (Inception-v3 pool features)."""
    from distill_eval.fid import extract_features, fid_from_features, kid_from_features
    from distill_eval.inception import InceptionFeatureExtractor

    images_a, images_b = (_folder_images(d, strict=strict, strict_flag="--strict") for d in (dir_a, dir_b))
    extractor = InceptionFeatureExtractor()
    fa = extract_features(images_a, extractor, batch_size)
    fb = extract_features(images_b, extractor, batch_size)
    size = min(1000, fa.shape[0], fb.shape[0])
    kid_mean, kid_std = kid_from_features(fa, fb, 10, size)
    row = {"fid": fid_from_features(fa, fb), "kid": kid_mean, "kid_std": kid_std, "n_a": fa.shape[0],
           "n_b": fb.shape[0], "extractor": extractor.extractor_hash}
    print_table([row], list(row), title=f"{dir_a} vs {dir_b}")


@app.command("lpips")
def lpips_cmd(
    dir_a: Path = typer.Argument(..., help="Folder of images."),
    dir_b: Path = typer.Argument(..., help="Folder of images paired by sorted file name."),
    net: str = typer.Option("alex", "--net", help="Backbone: alex or vgg."),
) -> None:
    """Mean LPIPS between images paired by sorted name (e.g. student vs teacher at the same seeds)."""
    from distill_eval.lpips_metric import LPIPSMetric

    a, b = _folder_images(dir_a), _folder_images(dir_b)
    if a.shape != b.shape:
        raise DataError(f"{dir_a} has {tuple(a.shape)} images and {dir_b} {tuple(b.shape)}; pair equal sets")
    metric = LPIPSMetric(net=net, value_range=(0, 1))
    with torch.inference_mode():
        d = torch.cat([metric(x.float() / 255, y.float() / 255) for x, y in zip(a.split(32), b.split(32))])
    print_table([{"lpips_mean": float(d.mean()), "lpips_std": float(d.std()) if len(d) > 1 else 0.0, "n": len(d),
                  "net": net}], ["lpips_mean", "lpips_std", "n", "net"], title="LPIPS")


@app.command("clip-score")
def clip_score_cmd(
    folder: Path = typer.Argument(..., help="Folder of images, sorted by name."),
    prompts: Path = typer.Argument(..., help="Prompts file: line i describes image i."),
    clip_model: str = typer.Option(..., "--clip-model", help="CLIP model: a hub id or a local folder."),
    batch_size: int = typer.Option(32, "--batch-size"),
) -> None:
    """CLIPScore (Hessel et al. 2021): 100 · max(0, cos(image, text)), averaged."""
    from distill_common.data.prompts import load_prompts_file
    from distill_eval.clip_score import CLIPScorer

    images = _folder_images(folder)
    texts = load_prompts_file(prompts)
    if len(texts) < images.shape[0]:
        raise DataError(f"{prompts} has {len(texts)} prompts for {images.shape[0]} images; give one prompt per image")
    scorer = CLIPScorer.from_pretrained(clip_model, batch_size=batch_size)
    scores = scorer(images, texts[: images.shape[0]])
    print_table([{"clip_score": float(scores.mean()), "n": len(scores), "model": clip_model}],
                ["clip_score", "n", "model"], title="CLIPScore")


def main() -> None:
    from distill_common.cli import run_app

    run_app(app)
