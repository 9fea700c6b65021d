"""``distill eval``: the shared benchmark, and FID / LPIPS / CLIPScore for folders of images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import typer
from rich.console import Console

from distill_common.config import config_command, save_config
from distill_common.errors import DataError, unknown_choice
from distill_common.output_dir import claims_output_dir
from distill_eval.benchmark import BenchmarkConfig, run_benchmark
from distill_eval.protocol import DEFAULT_PROTOCOL
from distill_eval.reports import interval_note, print_table

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
    cols = ["model", "steps", "fid", "fid_vs_best", "fid_vs_teacher", "kid", "lpips_to_teacher", "clip_score",
            "ms_per_image", "speedup_vs_teacher"]
    print_table(result.rows, [c for c in cols if any(r.get(c) is not None for r in result.rows)],
                title="benchmark", console=console)
    if result.protocol:
        console.print(f"protocol: {result.protocol}", highlight=False)
        console.print(interval_note(cfg.bootstrap_resamples), highlight=False)
        _protocol_notes(console, generated_n=cfg.num_images, reference_set=cfg.reference,
                        reference_n=cfg.reference_n, feature_precision=cfg.feature_precision)
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
    # regular files only: a FIFO or device named x.png would block the read forever
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())[:limit]
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


def _protocol_notes(console: Console, **protocol) -> None:
    """Say where a measurement's protocol differs from the default one (the demo's), and warn below 2,048 images."""
    from distill_eval.protocol import protocol_differences, small_n_warning

    diffs = protocol_differences(**protocol)
    if diffs:
        console.print(f"note: protocol differs from the default (the demo's): {', '.join(diffs)}; FIDs are comparable "
                      "only under one protocol", highlight=False)
    counts = [n for n in (protocol.get("generated_n"), protocol.get("reference_n")) if isinstance(n, int)]
    warning = small_n_warning(*counts) if counts else None
    if warning:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)


@app.command("fid")
def fid_cmd(
    dir_a: Path = typer.Argument(..., help="Folder of generated images."),
    dir_b: Path = typer.Argument(..., help="Folder of reference images (or another generated set)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Feature-extraction batch size.", min=1),
    feature_precision: str = typer.Option(DEFAULT_PROTOCOL["feature_precision"], "--feature-precision",
                                          help="Inception forward precision: bf16 (the default protocol's; about 2x "
                                               "faster on CPUs with bf16 units) or fp32 (FID drifts ~0.2%); fp32+compile / "
                                               "bf16+compile run it under torch.compile (1.34x)."),
    bootstrap_resamples: int = typer.Option(200, "--bootstrap-resamples",
                                            help="Resamples of DIR_A for the FID's 95% interval (0 = none).", min=0),
    kid_subsets: int = typer.Option(100, "--kid-subsets", help="KID subsets (std over them is reported).", min=1),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap and the KID subsets."),
    strict: bool = typer.Option(False, "--strict", help="Refuse unreadable images (default: skip and count them)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object instead of a table."),
    report: Path | None = typer.Option(None, "--report", help="Where to save the JSON report (default: "
                                       "fid_<A>_vs_<B>.json beside DIR_A)."),
) -> None:
    """FID with a 95% bootstrap interval over DIR_A (DIR_B's statistics fixed), and KID mean ± std over subsets
    of half the smaller set (at most 1,000), between two folders of images (Inception-v3 pool features).

    Saves a JSON report beside DIR_A and warns below 2,048 images, where FID is biased upward.
    """
    import json

    from distill_eval.features import extract_features, feature_statistics
    from distill_eval.fid import capped_kid_subset_size, fid_from_features, kid_from_features
    from distill_eval.inception import FEATURE_PRECISIONS, InceptionFeatureExtractor
    from distill_eval.intervals import FidBootstrap
    from distill_eval.reports import compact_fid, interval_note

    if feature_precision not in FEATURE_PRECISIONS:
        raise unknown_choice("feature precision", feature_precision, FEATURE_PRECISIONS)
    for d in (dir_a, dir_b):  # before Inception loads (seconds): a typo costs nothing
        if not d.is_dir():
            raise DataError(f"image folder {d} does not exist; pass a folder of PNG/JPEG images")
    report = report or dir_a.resolve().parent / f"fid_{dir_a.resolve().name}_vs_{dir_b.resolve().name}.json"
    images_a, images_b = (_folder_images(d, strict=strict, strict_flag="--strict") for d in (dir_a, dir_b))
    extractor = InceptionFeatureExtractor(precision=feature_precision)
    fa = extract_features(images_a, extractor, batch_size)
    fb = extract_features(images_b, extractor, batch_size)
    size = capped_kid_subset_size(fa.shape[0], fb.shape[0])
    kid_mean, kid_std = kid_from_features(fa, fb, kid_subsets, size, seed=seed)
    row = {"fid": fid_from_features(fa, fb), "kid": kid_mean, "kid_std": kid_std, "kid_subset_size": size,
           "n_a": fa.shape[0], "n_b": fb.shape[0], "extractor": extractor.extractor_hash,
           "feature_precision": feature_precision, "dir_a": str(dir_a), "dir_b": str(dir_b)}
    if bootstrap_resamples:
        mu, sigma = feature_statistics(fb)
        interval = FidBootstrap(fa, mu, sigma).interval(resamples=bootstrap_resamples, seed=seed)
        row.update(fid_ci95_low=interval.low, fid_ci95_high=interval.high,
                   bootstrap_seconds=round(interval.seconds, 1))
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps({**row, "intervals": interval_note(bootstrap_resamples)}, indent=2))
    if as_json:  # stdout holds the JSON only; notes go to stderr
        typer.echo(json.dumps(row))
        _protocol_notes(Console(stderr=True), generated_n=row["n_a"], reference_n=row["n_b"],
                        feature_precision=feature_precision)
        return
    console = Console()
    interval = (f"  95% interval [{row['fid_ci95_low']:.2f}, {row['fid_ci95_high']:.2f}]"
                if "fid_ci95_low" in row else "")
    console.print(f"{dir_a} vs {dir_b}\n"
                  f"  FID  {compact_fid(row, 2)}{interval}\n"
                  f"  KID  {kid_mean:.4f} ± {kid_std:.4f} (std over {kid_subsets} subsets of {size})\n"
                  f"  N    {row['n_a']:,} vs {row['n_b']:,} images; Inception {extractor.extractor_hash}, "
                  f"{feature_precision} features\n"
                  f"report: {report}", highlight=False)
    console.print(interval_note(bootstrap_resamples), highlight=False)
    _protocol_notes(console, generated_n=row["n_a"], reference_n=row["n_b"], feature_precision=feature_precision)


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
        d = torch.cat([metric(x.float() / 255, y.float() / 255) for x, y in zip(a.split(32), b.split(32), strict=True)])
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
