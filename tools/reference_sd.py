"""Train and ship the reference text-to-image model (a CIFAR-sized Stable Diffusion) and its evaluation classifier.

    python tools/reference_sd.py train-vae        --run-dir ~/distill-work/reference_sd/vae  --steps 2400
    python tools/reference_sd.py train-unet       --run-dir ~/distill-work/reference_sd/unet --vae ~/distill-work/reference_sd/vae/export/vae --steps 6000
    python tools/reference_sd.py train-classifier --run-dir ~/distill-work/classifier --steps 4000
    python tools/reference_sd.py ship --vae ... --unet ...           # assemble the diffusers folder as package data

Every command resumes its run folder's newest checkpoint (keep run folders outside the work tree), logs to MLflow
(experiment ``reference_sd``) and writes ``summary.json`` and ``export/`` when done. ``--init reference`` warm-starts
a component from the shipped weights.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0])
console = Console()
ROOT = Path(__file__).resolve().parents[1]


def _threads(threads: int) -> None:
    import torch

    if threads > 0:
        torch.set_num_threads(threads)


def _bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=console)


def _run(task, cfg, run_dir: Path, run_name: str, params: dict) -> dict:
    from distill_common.checkpoint import write_json
    from distill_common.reference_sd.training import train_component
    from distill_common.tracking import start_run

    run_dir.mkdir(parents=True, exist_ok=True)
    id_file = run_dir / "mlflow_run_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else None
    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    with start_run("reference_sd", run_name, config={**params, "command": command}, run_id=run_id,
                   fallback_dir=run_dir) as run:
        if run_id is None and run.run_id:
            id_file.write_text(run.run_id)
        with _bar() as bar:
            tid = bar.add_task(run_name, total=cfg.steps, info="")

            def progress(done, total, last):
                info = " ".join(f"{k} {v:.4g}" for k, v in last.items() if k in ("loss", "l1", "lpips", "mse", "acc"))
                bar.update(tid, completed=done, info=info)

            summary = train_component(task, cfg, run_dir, log=lambda m, s: run.log_metrics(m, step=s),
                                      progress=progress)
        write_json(run_dir / "summary.json", {**summary, "command": command, "mlflow_run_id": run.run_id})
    console.print(f"{run_name}: {summary['steps']} steps, {summary['wall_time_s'] / 60:.1f} min, "
                  f"export in {run_dir / 'export'}")
    return summary


def _cifar_uint8(data_root: str | None, split: str = "train"):
    from distill_common.data.cifar10 import open_cifar10

    ds = open_cifar10(data_root, split, preload=True)
    return ds.uint8_images(), _labels(ds)


def _labels(ds):
    import torch

    if hasattr(ds, "labels"):
        labels = ds.labels
        return torch.as_tensor(list(labels() if callable(labels) else labels))
    return torch.as_tensor([ds[i][1] for i in range(len(ds))])


@app.command("train-vae")
def train_vae(run_dir: Path = typer.Option(...), steps: int = 2400, batch_size: int = 64,
              learning_rate: float = 1e-3, lpips_weight: float = 0.5, kl_weight: float = 1e-6,
              ema_decay: float = 0.999, precision: str = "bf16", threads: int = 2,
              data_root: str = typer.Option(None), checkpoint_every: int = 200) -> None:
    """Train the AutoencoderKL on CIFAR-10 train (L1 + LPIPS(alex) + KL)."""
    _threads(threads)
    from distill_common.models.tiny_sd import build_tiny_vae
    from distill_common.reference_sd.spec import REFERENCE_SD_SPEC
    from distill_common.reference_sd.tasks import VAETask
    from distill_common.reference_sd.training import ComponentTrainConfig
    from distill_eval.lpips_metric import LPIPSMetric

    cfg = ComponentTrainConfig(steps=steps, batch_size=batch_size, learning_rate=learning_rate, warmup_steps=100,
                               ema_decay=ema_decay, precision=precision, checkpoint_every=checkpoint_every)
    cfg.validate()
    images, _ = _cifar_uint8(data_root)
    vae = build_tiny_vae(REFERENCE_SD_SPEC)
    task = VAETask(vae, images, perceptual=LPIPSMetric("alex") if lpips_weight > 0 else None,
                   perceptual_weight=lpips_weight, kl_weight=kl_weight)
    params = {"component": "vae", "parameters": sum(p.numel() for p in vae.parameters()), "lpips_weight": lpips_weight,
              "kl_weight": kl_weight, **{f"train_{k}": v for k, v in cfg.__dict__.items()}}
    _run(task, cfg, run_dir, "reference-sd-vae", params)


@app.command("train-unet")
def train_unet(run_dir: Path = typer.Option(...), vae: Path = typer.Option(..., help="the trained VAE folder"),
               steps: int = 6000, batch_size: int = 64, learning_rate: float = 6e-4, ema_decay: float = 0.999,
               caption_dropout: float = 0.1, min_snr_gamma: float = 5.0, precision: str = "bf16",
               threads: int = 2, data_root: str = typer.Option(None), checkpoint_every: int = 250,
               freeze_text_encoder: bool = False) -> None:
    """Train the UNet2DConditionModel (and the CLIP text encoder) on the VAE's latents of CIFAR-10 with captions."""
    _threads(threads)
    import torch
    from diffusers import AutoencoderKL

    from distill_common.models.tiny_sd import build_tiny_text_encoder, build_tiny_unet
    from distill_common.models.tokenizer import clip_tokenizer
    from distill_common.reference_sd.captions import class_captions
    from distill_common.reference_sd.spec import REFERENCE_SD_SPEC
    from distill_common.reference_sd.tasks import UNetTask, encode_moments
    from distill_common.reference_sd.training import ComponentTrainConfig

    cfg = ComponentTrainConfig(steps=steps, batch_size=batch_size, learning_rate=learning_rate, warmup_steps=200,
                               ema_decay=ema_decay, precision=precision, checkpoint_every=checkpoint_every)
    cfg.validate()
    autoencoder = AutoencoderKL.from_pretrained(vae).eval()
    images, labels = _cifar_uint8(data_root)
    moments_file = run_dir / "latent_moments.pt"
    if moments_file.is_file():
        moments = torch.load(moments_file, weights_only=True)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        with _bar() as bar:
            tid = bar.add_task("encoding latents", total=2 * len(images), info="")
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                moments = encode_moments(autoencoder, images, progress=lambda d, t: bar.update(tid, completed=d))
        tmp = moments_file.with_suffix(".tmp")
        torch.save(moments, tmp)
        os.replace(tmp, moments_file)
    labels2 = torch.cat([labels, labels])
    tokenizer = clip_tokenizer()
    table = class_captions("train")
    flat = [c for row in table for c in row]
    ids = tokenizer(flat, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.view(len(table), len(table[0]), -1)
    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                      return_tensors="pt").input_ids[0]
    unet, text_encoder = build_tiny_unet(REFERENCE_SD_SPEC), build_tiny_text_encoder(REFERENCE_SD_SPEC)
    task = UNetTask(unet, text_encoder, moments, labels2, ids, empty,
                    scaling_factor=autoencoder.config.scaling_factor, caption_dropout=caption_dropout,
                    min_snr_gamma=min_snr_gamma, train_text_encoder=not freeze_text_encoder)
    params = {"component": "unet", "unet_parameters": sum(p.numel() for p in unet.parameters()),
              "text_encoder_parameters": sum(p.numel() for p in text_encoder.parameters()),
              "caption_dropout": caption_dropout, "min_snr_gamma": min_snr_gamma,
              "train_text_encoder": not freeze_text_encoder, "vae": str(vae),
              **{f"train_{k}": v for k, v in cfg.__dict__.items()}}
    _run(task, cfg, run_dir, "reference-sd-unet", params)


if __name__ == "__main__":
    app()
