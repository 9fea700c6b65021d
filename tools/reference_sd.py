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


def _run(task, cfg, run_dir: Path, run_name: str, params: dict, extra: dict | None = None) -> dict:
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
        write_json(run_dir / "summary.json", {**summary, "command": command, "mlflow_run_id": run.run_id, **(extra or {})})
    console.print(f"{run_name}: {summary['steps']} steps, {summary['wall_time_s'] / 60:.1f} min, "
                  f"export in {run_dir / 'export'}")
    return summary


def _cifar_uint8(data_root: str | None, split: str = "train", limit: int = 0):
    from distill_common.data.cifar10 import open_cifar10

    ds = open_cifar10(data_root, split, limit=limit or None, preload=True)
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
              data_root: str = typer.Option(None), checkpoint_every: int = 200,
              init: Path = typer.Option(None, help="start from this trained VAE folder (diffusers layout) instead of "
                                                   "random weights"),
              decoder_only: bool = typer.Option(False, help="fine-tune only the decoder (needs --init): the encoder, "
                                                            "its latents and scaling factor stay, so a UNet trained "
                                                            "on them stays valid")) -> None:
    """Train the AutoencoderKL on CIFAR-10 train (L1 + LPIPS(alex) + KL), or fine-tune a trained one's decoder."""
    if decoder_only and init is None:
        raise typer.BadParameter("--decoder-only fine-tunes a trained VAE; pass its folder with --init")
    if init is not None and not (init / "config.json").is_file():
        raise typer.BadParameter(f"--init {init}: no config.json there; pass a diffusers VAE folder "
                                 "(for example <run>/export/vae)")
    _threads(threads)
    import torch
    from diffusers import AutoencoderKL

    from distill_common.models.tiny_sd import build_tiny_vae
    from distill_common.reference_sd.spec import REFERENCE_SD_SPEC
    from distill_common.reference_sd.tasks import VAETask
    from distill_common.reference_sd.training import ComponentTrainConfig
    from distill_eval.lpips_metric import LPIPSMetric

    cfg = ComponentTrainConfig(steps=steps, batch_size=batch_size, learning_rate=learning_rate, warmup_steps=100,
                               ema_decay=ema_decay, precision=precision, checkpoint_every=checkpoint_every)
    cfg.validate()
    images, _ = _cifar_uint8(data_root)
    vae = (AutoencoderKL.from_pretrained(init, torch_dtype=torch.float32) if init is not None
           else build_tiny_vae(REFERENCE_SD_SPEC))
    task = VAETask(vae, images, perceptual=LPIPSMetric("alex") if lpips_weight > 0 else None,
                   perceptual_weight=lpips_weight, kl_weight=kl_weight, decoder_only=decoder_only)
    params = {"component": "vae", "parameters": sum(p.numel() for p in vae.parameters()), "lpips_weight": lpips_weight,
              "kl_weight": kl_weight, "init": str(init or "random"), "decoder_only": decoder_only,
              **{f"train_{k}": v for k, v in cfg.__dict__.items()}}
    # the run that trained --init (its summary sits two folders up, in <run>/summary.json), for the model card
    parent = _summary(init.parent.parent) if init is not None else {}
    _run(task, cfg, run_dir, "reference-sd-vae-decoder" if decoder_only else "reference-sd-vae", params,
         extra={"initialized_from": parent} if parent else None)


@app.command("train-unet")
def train_unet(run_dir: Path = typer.Option(...), vae: Path = typer.Option(..., help="the trained VAE folder"),
               steps: int = 6000, batch_size: int = 64, learning_rate: float = 6e-4, ema_decay: float = 0.999,
               caption_dropout: float = 0.1, min_snr_gamma: float = 5.0, precision: str = "bf16",
               threads: int = 2, data_root: str = typer.Option(None), checkpoint_every: int = 250,
               freeze_text_encoder: bool = False, limit: int = typer.Option(0, help="first N training images (0 = all)")) -> None:
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
    images, labels = _cifar_uint8(data_root, limit=limit)
    moments_file = run_dir / "latent_moments.pt"  # (N, 8, 16, 16): one encoding per VAE; delete it after changing --vae
    if moments_file.is_file():
        moments = torch.load(moments_file, weights_only=True)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        with _bar() as bar:
            tid = bar.add_task("encoding latents", total=len(images), info="")
            moments = encode_moments(autoencoder, images, bf16=precision == "bf16",
                                     progress=lambda d, t: bar.update(tid, completed=d))
        tmp = moments_file.with_suffix(".tmp")
        torch.save(moments, tmp)
        os.replace(tmp, moments_file)
    tokenizer = clip_tokenizer()
    table = class_captions("train")
    flat = [c for row in table for c in row]
    ids = tokenizer(flat, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.view(len(table), len(table[0]), -1)
    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                      return_tensors="pt").input_ids[0]
    unet, text_encoder = build_tiny_unet(REFERENCE_SD_SPEC), build_tiny_text_encoder(REFERENCE_SD_SPEC)
    task = UNetTask(unet, text_encoder, moments, labels, ids, empty,
                    scaling_factor=autoencoder.config.scaling_factor, caption_dropout=caption_dropout,
                    min_snr_gamma=min_snr_gamma, train_text_encoder=not freeze_text_encoder)
    params = {"component": "unet", "unet_parameters": sum(p.numel() for p in unet.parameters()),
              "text_encoder_parameters": sum(p.numel() for p in text_encoder.parameters()),
              "caption_dropout": caption_dropout, "min_snr_gamma": min_snr_gamma,
              "train_text_encoder": not freeze_text_encoder, "vae": str(vae),
              **{f"train_{k}": v for k, v in cfg.__dict__.items()}}
    _run(task, cfg, run_dir, "reference-sd-unet", params)


@app.command("train-classifier")
def train_classifier(run_dir: Path = typer.Option(...), steps: int = 3000, batch_size: int = 256,
                     learning_rate: float = 4e-3, weight_decay: float = 5e-2, width: int = 16,
                     precision: str = "bf16", threads: int = 2, data_root: str = typer.Option(None),
                     checkpoint_every: int = 250) -> None:
    """Train the CIFAR-10 classifier behind the class-accuracy metric (ResNet-9 style), then score the test split."""
    _threads(threads)
    from distill_common.checkpoint import write_json
    from distill_common.reference_sd.training import ComponentTrainConfig
    from distill_eval.classifier import CifarClassifier, ClassifierTask, class_accuracy, load_classifier

    cfg = ComponentTrainConfig(steps=steps, batch_size=batch_size, learning_rate=learning_rate,
                               weight_decay=weight_decay, warmup_steps=150, ema_decay=0.0, precision=precision,
                               checkpoint_every=checkpoint_every, min_lr_ratio=0.0)
    cfg.validate()
    images, labels = _cifar_uint8(data_root)
    model = CifarClassifier(width)
    task = ClassifierTask(model, images, labels)
    params = {"component": "classifier", "parameters": sum(p.numel() for p in model.parameters()), "width": width,
              **{f"train_{k}": v for k, v in cfg.__dict__.items()}}
    _run(task, cfg, run_dir, "reference-classifier", params)
    test_images, test_labels = _cifar_uint8(data_root, "test")
    acc = class_accuracy(test_images, test_labels, load_classifier(run_dir / "export" / "classifier"))
    write_json(run_dir / "test_accuracy.json", {**acc.as_dict(), "split": "test", "n": acc.n})
    console.print(f"CIFAR-10 test accuracy: {acc.cell()} on {acc.n} images")


def _git_commit() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        return "unknown"


def _summary(run: Path) -> dict:
    import json

    return json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}


@app.command("ship")
def ship(vae_run: Path = typer.Option(..., help="the VAE run folder (its export/vae is shipped)"),
         unet_run: Path = typer.Option(..., help="the UNet run folder (its export/unet and export/text_encoder)"),
         classifier_run: Path = typer.Option(None, help="the classifier run folder (export/classifier)")) -> None:
    """Assemble the diffusers folder (fp16, safetensors) as package data, with SHA256SUMS and training.json."""
    import json
    import platform
    import shutil

    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from distill_common.checkpoint import atomic_dir, write_json
    from distill_common.models.tiny_sd import sd15_scheduler
    from distill_common.models.tokenizer import clip_tokenizer
    from distill_common.reference_sd import REFERENCE_SD_DIR, REFERENCE_SD_ROOT, write_sha256sums

    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(vae_run / "export" / "vae"),
        text_encoder=CLIPTextModel.from_pretrained(unet_run / "export" / "text_encoder"),
        tokenizer=clip_tokenizer(),
        unet=UNet2DConditionModel.from_pretrained(unet_run / "export" / "unet"),
        scheduler=sd15_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).to(torch.float16)
    with atomic_dir(REFERENCE_SD_DIR) as tmp:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
    parts = {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in ("unet", "vae", "text_encoder")}
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    training = {
        "commit": _git_commit(), "hardware": f"{cpu}, {os.cpu_count()} cores, no GPU ({platform.machine()})",
        "precision": "bf16 autocast, fp32 master weights; shipped in fp16", "parameters": parts,
        "data": "CIFAR-10 train, 50,000 images (WebDataset shards, JPEG q~75 re-encodings), captions from 12 templates",
        "vae": _summary(vae_run), "unet": _summary(unet_run),
    }
    if classifier_run is not None:
        from distill_eval.classifier import CLASSIFIER_DIR

        with atomic_dir(CLASSIFIER_DIR) as tmp:
            for f in (classifier_run / "export" / "classifier").iterdir():
                shutil.copy2(f, tmp / f.name)
            summary = _summary(classifier_run)
            accuracy = json.loads((classifier_run / "test_accuracy.json").read_text())
            write_json(tmp / "training.json", {**summary, "commit": _git_commit(), "test_accuracy": accuracy})
            write_sha256sums(tmp, tmp / "SHA256SUMS")
    write_json(REFERENCE_SD_ROOT / "training.json", training)
    sums = write_sha256sums(REFERENCE_SD_DIR)
    size = sum((REFERENCE_SD_ROOT / n).stat().st_size for n in sums)
    console.print(f"shipped {REFERENCE_SD_DIR} ({size / 1e6:.1f} MB, {len(sums)} files); parameters {parts}")


def _extractor_and_reference(reference_n: int, data_root: str | None):
    from distill_eval.inception import InceptionFeatureExtractor
    from distill_eval.reference_stats import reference_stats

    extractor = InceptionFeatureExtractor(precision="bf16")
    return extractor, reference_stats("cifar10-train", extractor, n=reference_n, resolution=32, data_root=data_root)


@app.command("eval-vae")
def eval_vae(vae: Path = typer.Option(None, help="VAE folder (default: the shipped one)"), num_images: int = 10000,
             reference_n: int = 10000, threads: int = 2, data_root: str = typer.Option(None),
             out: Path = typer.Option(Path("~/distill-work/reference_sd/card/vae.json").expanduser())) -> None:
    """Reconstruction FID: the first N training images through the VAE (posterior mean), against training statistics."""
    _threads(threads)
    import json

    import torch
    from diffusers import AutoencoderKL

    from distill_common.checkpoint import write_json
    from distill_common.reference_sd import reference_sd_folder
    from distill_eval.fid import score_images

    folder = vae or reference_sd_folder() / "vae"
    model = AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32).eval()
    images, _ = _cifar_uint8(data_root, limit=num_images)
    extractor, reference = _extractor_and_reference(reference_n, data_root)
    recon = []
    with torch.no_grad(), _bar() as bar:
        tid = bar.add_task("reconstructing", total=len(images), info="")
        for i in range(0, len(images), 250):
            x = images[i:i + 250].float() / 127.5 - 1
            with torch.autocast("cpu", dtype=torch.bfloat16):
                rec = model.decode(model.encode(x).latent_dist.mean).sample.float()
            recon.append(((rec.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))
            bar.update(tid, advance=len(x))
    recon = torch.cat(recon)
    mse = float(((recon.float() - images.float()) / 127.5).pow(2).mean())
    res = score_images(recon, extractor, reference, batch_size=100)
    row = {"what": "VAE reconstruction", "vae": str(folder), "num_images": len(recon), "reference_n": reference.reference_n,
           "fid": res.fid, "fid_low": res.fid_interval.low, "fid_high": res.fid_interval.high,
           "kid_mean": res.kid_mean, "mse_unit_range": mse, "psnr_db": 10 * __import__("math").log10(4 / mse),
           "feature_precision": "bf16", "protocol": str(res.protocol)}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, row)
    console.print(json.dumps(row, indent=1))


def _load_pipeline(model: str):
    import torch

    from distill_common.models.sd_loading import load_sd_pipeline

    pipe = load_sd_pipeline(model, dtype=torch.float32) if model else None
    pipe.set_progress_bar_config(disable=True)
    return pipe


@app.command("eval-teacher")
def eval_teacher(configs: str = typer.Option("pndm:30:1,pndm:30:2,pndm:30:3,pndm:30:5,pndm:30:7.5",
                                             help="comma-separated scheduler:steps:guidance; scheduler one of "
                                                  "ddpm, pndm, ddim, euler, euler_a, dpm"),
                 model: str = "reference", num_images: int = 500, reference_n: int = 10000, batch_size: int = 100,
                 templates: str = "held_out", threads: int = 2, data_root: str = typer.Option(None),
                 classifier: str = typer.Option("reference", help="class-accuracy classifier: 'reference' or a folder"),
                 out_dir: Path = typer.Option(Path("~/distill-work/reference_sd/card").expanduser())) -> None:
    """FID (with 95% interval) and class accuracy of the text-to-image model on held-out caption templates;
    one JSON per configuration (reused when its key matches: the weights' digest, N, seeds, sampler, steps, w and the
    sampler's full config)."""
    _threads(threads)
    import torch

    from distill_common.checkpoint import save_weights, write_json
    from distill_common.reference_sd.captions import evaluation_prompts
    from distill_eval.classifier import class_accuracy, load_classifier
    from distill_eval.fid import score_images
    from distill_sd_prune.sampling.pipeline import SAMPLERS, make_scheduler
    for spec in configs.split(","):
        parts = spec.split(":")
        try:
            ok = len(parts) == 3 and parts[0] in SAMPLERS and int(parts[1]) >= 1 and float(parts[2]) >= 0
        except ValueError:
            ok = False
        if not ok:
            raise SystemExit(f"eval-teacher: bad configuration {spec!r}: write scheduler:steps:guidance with the scheduler "
                             f"one of {', '.join(SAMPLERS)}, steps >= 1 and guidance >= 0 (e.g. pndm:30:4)")
    judge = load_classifier(classifier)
    pipe = _load_pipeline(model)
    base_config = dict(pipe.scheduler.config)
    weights = _model_digest(pipe)
    part_digests = {"unet_weights": _weights_digest(pipe.unet), "vae_weights": _weights_digest(pipe.vae)}
    prompts, labels = evaluation_prompts(num_images, templates)
    extractor, reference = _extractor_and_reference(reference_n, data_root)
    out_dir.mkdir(parents=True, exist_ok=True)
    for spec in configs.split(","):
        name, steps, guidance = spec.split(":")
        steps, guidance = int(steps), float(guidance)
        pipe.scheduler = make_scheduler(name, base_config)
        key, sampler_config = _teacher_key(name, steps, guidance, num_images, templates, weights, pipe.scheduler)
        path = out_dir / f"teacher-{key}.json"
        if path.is_file():
            console.print(f"{spec}: reusing {path.name}")
            continue
        images, seconds = [], 0.0
        partial = out_dir / f"teacher-{key}.partial.safetensors"  # a killed run resumes from its last batch
        if partial.is_file():
            from safetensors import safe_open

            try:
                with safe_open(str(partial), "pt") as f:
                    images, seconds = [f.get_tensor("images")], float(f.metadata()["seconds"])
            except Exception as exc:  # truncated by a full disk, or not this tool's file
                raise SystemExit(f"{spec}: cannot read the saved images in {partial} ({type(exc).__name__}: {exc}); "
                                 "delete that file to generate this configuration from the start") from None
            console.print(f"{spec}: resuming after {len(images[0])} images from {partial.name}")
        done = sum(len(x) for x in images)
        with _bar() as bar:
            tid = bar.add_task(f"{spec}", total=num_images, completed=done, info="")
            for i in range(done, num_images, batch_size):
                chunk = prompts[i:i + batch_size]
                gens = [torch.Generator().manual_seed(i + k) for k in range(len(chunk))]
                import time

                t0 = time.perf_counter()
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                    out = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                               output_type="pt").images
                seconds += time.perf_counter() - t0
                if not torch.isfinite(out).all():
                    raise SystemExit(f"{spec}: non-finite pixels; nothing written")
                images.append((out.float().clamp(0, 1) * 255).round().to(torch.uint8))
                if i + batch_size < num_images:
                    save_weights({"images": torch.cat(images)}, partial, {"seconds": repr(seconds)})
                bar.update(tid, advance=len(chunk))
        images = torch.cat(images)
        res = score_images(images, extractor, reference, batch_size=100)
        acc = class_accuracy(images, labels, judge)
        row = {"scheduler": name, "steps": steps, "guidance": guidance, "num_images": num_images,
               "templates": templates, "weights": weights, "fid": res.fid, "fid_low": res.fid_interval.low,
               "fid_high": res.fid_interval.high, "kid_mean": res.kid_mean, "class_accuracy": acc.accuracy,
               "class_accuracy_low": acc.low, "class_accuracy_high": acc.high,
               "ms_per_image": 1000 * seconds / num_images, "batch_size": batch_size, "precision": "bf16 autocast",
               "feature_precision": "bf16", "reference_n": reference.reference_n, "protocol": str(res.protocol),
               "unet_images_seen": _shipped_images_seen() if model == "reference" else None,
               "sampler_config": sampler_config,
               **part_digests}
        write_json(path, row)
        save_weights({"images": images[:100]}, out_dir / f"teacher-{key}-first100.safetensors")  # for looking at
        partial.unlink(missing_ok=True)
        console.print(f"{spec}: FID {res.fid:.2f} [{res.fid_interval.low:.2f}, {res.fid_interval.high:.2f}]  "
                      f"class accuracy {acc.cell()}  {row['ms_per_image']:.1f} ms/image")


def _teacher_key(name: str, steps: int, guidance: float, num_images: int, templates: str, weights: str,
                 scheduler) -> tuple[str, dict]:
    """The file key of one teacher evaluation and the sampler config it stands for: sampler, steps, w, N, caption
    templates, the weights' digest and a 16-hex digest of the scheduler's full config (a config change, such as
    DDIM's ``clip_sample``, under the same sampler name is a new evaluation)."""
    from distill_sd_prune.data.latent_cache import cache_fingerprint

    config = {k: v for k, v in scheduler.config.items() if not k.startswith("_")}
    return f"{name}-{steps}-w{guidance:g}-n{num_images}-{templates}-{weights}-s{cache_fingerprint(config)}", config


SAMPLER_NAMES = {"ddpm": "DDPM", "pndm": "PNDM", "ddim": "DDIM", "euler": "Euler", "dpm": "DPM-Solver++ (2M)",
                 "euler_a": "Euler ancestral"}


def _shipped_images_seen() -> int | None:
    import json

    from distill_common.reference_sd import REFERENCE_SD_ROOT

    path = REFERENCE_SD_ROOT / "training.json"
    return json.loads(path.read_text())["unet"].get("images_seen") if path.is_file() else None


def _weights_digest(*modules) -> str:
    """The 12-hex key of the modules' weights (order-free over their tensors), used in teacher evaluation file
    names: one UNet gives the key of its UNet alone, the UNet, text encoder and VAE together the key of a model."""
    import hashlib

    return hashlib.sha256(b"".join(sorted(hashlib.sha256(p.detach().float().numpy().tobytes()).digest()
                                          for m in modules for p in m.parameters()))).hexdigest()[:12]


def _training_line(label: str, t: dict, end: str) -> str:
    """One card line for a training run's summary.json: command, steps, images seen, wall clock, MLflow run."""
    return (f"- {label}: `{t.get('command', '?')}` - {t.get('steps', 0):,} steps of batch "
            f"{t.get('config', {}).get('batch_size', '?')} ({t.get('images_seen', 0):,} images seen), "
            f"{t.get('wall_time_s', 0) / 60:.0f} min wall clock; MLflow run `{t.get('mlflow_run_id', '?')}`{end}")


def _model_digest(pipe) -> str:
    """The key of a whole text-to-image model (UNet, text encoder, VAE): a new decoder is a new model."""
    return _weights_digest(pipe.unet, pipe.text_encoder, pipe.vae)


def _fid_cell(row: dict) -> str:
    return f"{row['fid']:.2f} [{row['fid_low']:.2f}, {row['fid_high']:.2f}]"


def _acc_cell(row: dict) -> str:
    return (f"{100 * row['class_accuracy']:.1f}% [{100 * row['class_accuracy_low']:.1f}, "
            f"{100 * row['class_accuracy_high']:.1f}]")


@app.command("card")
def card(card_dir: Path = typer.Option(Path("~/distill-work/reference_sd/card").expanduser()),
         classifier_run: Path = typer.Option(None)) -> None:
    """Write MODEL_CARD.md for the shipped model (and the classifier's) from training.json, SHA256SUMS and the
    evaluation JSONs in ``card_dir``."""
    import json

    from distill_common.checkpoint import atomic_write_bytes
    from distill_common.reference_sd import REFERENCE_SD_ROOT, read_sha256sums

    training = json.loads((REFERENCE_SD_ROOT / "training.json").read_text())
    sums = read_sha256sums()
    vae_row = json.loads((card_dir / "vae.json").read_text()) if (card_dir / "vae.json").is_file() else None
    pipe = _load_pipeline("reference")
    current = _model_digest(pipe)
    all_rows = [json.loads(p.read_text()) for p in card_dir.glob("teacher-*.json")]
    rows = sorted((r for r in all_rows if r.get("weights") == current), key=lambda r: (-r["num_images"], r["fid"]))
    earlier = [r for r in all_rows if r.get("weights") != current and r.get("unet_images_seen")]
    params = training["parameters"]
    lines = [
        "# Reference text-to-image model (a CIFAR-sized Stable Diffusion)",
        "",
        "A latent text-to-image model of exactly Stable Diffusion 1.5's family, trained by this project on two CPU",
        "cores so that every SD recipe (Flash-LoRA, LCM-LoRA, pruned students) can be measured on a trained teacher.",
        "It is a diffusers folder: `StableDiffusionPipeline.from_pretrained(\"<this folder>/pipeline\")` loads it",
        "outside the project (safety checker off); every `distill` command that takes a base model or teacher",
        "accepts `reference` for it (its files are checked against `SHA256SUMS` on load).",
        "",
        "| component | class | parameters | notes |",
        "|---|---|---:|---|",
        f"| VAE | `AutoencoderKL` | {params['vae']:,} | 32x32 RGB -> 16x16x4 latents (2 levels, factor 2); scaling factor "
        f"set to 1/std of the latents |",
        f"| UNet | `UNet2DConditionModel` | {params['unet']:,} | SD 1.5 block types (3 cross-attention down blocks + 1 plain, "
        "cross-attention mid block), widths (64, 96, 128, 128), 1 layer per block |",
        f"| text encoder | `CLIPTextModel` | {params['text_encoder']:,} | 2 layers, width 64, CLIP's 49,408-token "
        "vocabulary and 77 positions; **trained jointly with the UNet** from random init (no CLIP weights exist "
        "offline; SD freezes its pretrained CLIP) |",
        "| tokenizer | `CLIPTokenizer` | - | the real CLIP BPE vocabulary shipped in `open-clip-torch` |",
        "| scheduler | `PNDMScheduler` | - | SD 1.5's config: epsilon prediction, scaled-linear betas 0.00085-0.012, "
        "1,000 steps, `clip_sample: false` (for a swap to DDIM) |",
        "",
        "Stored in fp16 (safetensors only); trained in fp32 with bf16 autocast.",
        "",
        "## Training",
        "",
        f"- Commit: `{training['commit']}`; hardware: {training['hardware']}.",
        f"- Data: {training['data']} (\"a photo of a cat\", ...); 5 held-out templates are kept for evaluation "
        "(`distill_common.reference_sd.captions`).",
    ]
    for name in ("vae", "unet"):
        t = training[name]
        if t.get("initialized_from"):
            lines.append(_training_line(f"{name.upper()} (first stage)", t["initialized_from"], "; then fine-tuned:"))
        lines.append(_training_line(name.upper(), t, "."))
    lines += ["", "UNet objective: epsilon MSE with Min-SNR-5 weighting (Hang et al. 2023), 10% caption dropout for "
              "classifier-free guidance, AdamW with warm-up and cosine decay, EMA 0.999 of the weights (exported).",
              "VAE objective: L1 + 0.5 LPIPS(AlexNet) + 1e-6 KL, EMA 0.999" + (
                  "; then the decoder alone was fine-tuned (`--decoder-only`: encoder, latents and scaling factor "
                  "frozen, so the UNet's latent space is unchanged; L1 + LPIPS at the weight in its command, EMA "
                  "0.999), as Stability fine-tuned SD 1.x's decoder (ft-EMA / ft-MSE)."
                  if training["vae"].get("initialized_from") else "."), "", "## Results", ""]
    if vae_row:
        lines += [f"- **VAE reconstruction FID**: {_fid_cell(vae_row)} ({vae_row['num_images']:,} reconstructions of "
                  f"training images against the statistics of {vae_row['reference_n']:,} training images; PSNR "
                  f"{vae_row['psnr_db']:.1f} dB; Inception features in bf16). Goal <= 10: "
                  f"**{'met' if vae_row['fid_high'] <= 10 else 'not met'}**.", ""]
    if rows:
        lines += ["Generated from held-out caption templates (seed i for image i, classes balanced), scored against "
                  "the statistics of 10,000 CIFAR-10 training images (JPEG re-encodings: not comparable with "
                  "published CIFAR-10 FIDs); class accuracy by the shipped classifier, 95% Wilson interval; "
                  "ms per image at the given batch, bf16 autocast, 2 CPU cores.", "",
                  "| sampler | steps | guidance | images | FID [95% interval] | class accuracy | ms / image |",
                  "|---|---:|---:|---:|---|---|---:|"]
        for r in rows:
            lines.append(f"| {SAMPLER_NAMES.get(r['scheduler'], r['scheduler'])} | {r['steps']} | {r['guidance']:g} | {r['num_images']:,} | {_fid_cell(r)} | "
                         f"{_acc_cell(r)} | {r['ms_per_image']:.1f} |")
        lines += ["", "The folder ships SD 1.5's default sampler (PNDM). To sample with another at 30 steps, swap the "
                  "scheduler: `pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)`.", ""]
    seen = training["unet"].get("images_seen", 0)
    if earlier and rows:
        lines += ["Quality against images seen (same protocol, seeds and sampler (PNDM); the best guidance of each; "
                  "VAE weights key: the decoder the images were decoded with):", "",
                  "| UNet images seen | VAE | best FID [95% interval] | best class accuracy |", "|---:|---|---|---|"]
        by_seen: dict[tuple[int, str], list[dict]] = {}
        protocol_n = min(x["num_images"] for x in rows)
        for r in earlier + rows:
            if r["num_images"] == protocol_n and r["scheduler"] == "pndm":
                by_seen.setdefault((r.get("unet_images_seen") or seen, r.get("vae_weights", "?")), []).append(r)
        for n_seen, vae_key in sorted(by_seen):
            group = by_seen[n_seen, vae_key]
            lines.append(f"| {n_seen:,} | `{vae_key}` | {_fid_cell(min(group, key=lambda r: r['fid']))} | "
                         f"{_acc_cell(max(group, key=lambda r: r['class_accuracy']))} |")
        lines.append("")
    best_acc = max(rows, key=lambda r: r["class_accuracy"]) if rows else None
    big = [r for r in rows if r["num_images"] >= 10000 and r["reference_n"] >= 10000]
    fid_goal = (f"{'met' if min(r['fid_high'] for r in big) <= 40 else 'not met'} ({_fid_cell(min(big, key=lambda r: r['fid']))})"
                if big else "not measured at that size: the rows above are smaller samples, where FID carries a "
                "large small-sample bias")
    acc_goal = (f"{_acc_cell(best_acc)} at guidance {best_acc['guidance']:g}: "
                f"{'met' if best_acc['class_accuracy'] >= 0.8 else 'not met'}" if best_acc else "not measured")
    lines += [f"Goals: VAE reconstruction FID <= 10 (above); teacher FID <= 40 at its best setting on 10,000 generated "
              f"vs 10,000 training images: {fid_goal}; class accuracy >= 80%: {acc_goal}. The UNet has seen "
              f"{seen:,} images; `train-unet` resumes its run folder to train it longer.", ""]
    lines += ["## Files and sha256", "", "| file | sha256 |", "|---|---|"]
    lines += [f"| `{n}` | `{d}` |" for n, d in sums.items()]
    lines += ["", "Rebuild: `python tools/reference_sd.py --help` (train-vae, train-unet, ship, eval-vae, eval-teacher, "
              "card)."]
    atomic_write_bytes(REFERENCE_SD_ROOT / "MODEL_CARD.md", ("\n".join(lines) + "\n").encode())
    console.print(f"wrote {REFERENCE_SD_ROOT / 'MODEL_CARD.md'}")
    _classifier_card()


def _classifier_card() -> None:
    import json

    from distill_common.checkpoint import atomic_write_bytes
    from distill_common.data.cifar10 import CIFAR10_CLASSES
    from distill_common.reference_sd import read_sha256sums
    from distill_eval.classifier import CLASSIFIER_DIR

    t = json.loads((CLASSIFIER_DIR / "training.json").read_text())
    acc = t["test_accuracy"]
    cfg = t["config"]
    config = json.loads((CLASSIFIER_DIR / "config.json").read_text())
    from distill_eval.classifier import CifarClassifier

    params = sum(p.numel() for p in CifarClassifier(config["width"]).parameters())
    lines = [
        "# Reference CIFAR-10 classifier (the class-accuracy metric)",
        "",
        "Labels generated images for **class accuracy**: the share of images assigned to the class named in their",
        "caption (text-to-image) or to their class label (rf_cifar). It stands in for CLIPScore's text-image",
        "alignment where no CLIP weights exist. Load it with `distill_eval.classifier.load_classifier()`",
        "(sha256-checked against `SHA256SUMS`); `class_accuracy(images, labels)` gives the share and its 95% Wilson "
        "interval.",
        "",
        f"- Architecture: ResNet-9 (Page 2018) at base width {config['width']} (channels {config['width']}-"
        f"{8 * config['width']}), {params:,} parameters, fp32 safetensors.",
        f"- Training: `{t['command']}` at commit `{t['commit']}`; {t['steps']:,} AdamW steps of batch "
        f"{cfg['batch_size']} ({t['images_seen']:,} images, {t['images_seen'] / 50000:.1f} epochs), peak lr "
        f"{cfg['learning_rate']:g} with warm-up and cosine decay to 0, weight decay {cfg['weight_decay']:g}, label "
        f"smoothing 0.1, random 4 px crops and flips, bf16 autocast; {t['wall_time_s'] / 60:.1f} min on 2 CPU cores; "
        f"MLflow run `{t['mlflow_run_id']}`.",
        "- Data: CIFAR-10 train, 50,000 images (the shared WebDataset shards: JPEG q~75 re-encodings).",
        "",
        f"**CIFAR-10 test accuracy: {100 * acc['accuracy']:.2f}% [{100 * acc['low']:.2f}, {100 * acc['high']:.2f}]** "
        f"on all {acc['n']:,} test images (goal >= 85%: met).",
        "",
        "| class | " + " | ".join(CIFAR10_CLASSES) + " |",
        "|---|" + "---:|" * len(CIFAR10_CLASSES),
        "| accuracy | " + " | ".join(f"{100 * a:.1f}%" for a in acc["per_class"]) + " |",
        "",
        "A generated image counts as adherent only when this classifier agrees; its own error rate (14%, highest on",
        "cats and dogs) bounds what a perfect generator can score, so compare class accuracies between models, not",
        "with 100%.",
        "",
        "| file | sha256 |",
        "|---|---|",
    ]
    lines += [f"| `{n}` | `{d}` |" for n, d in read_sha256sums(CLASSIFIER_DIR / "SHA256SUMS").items()]
    atomic_write_bytes(CLASSIFIER_DIR / "MODEL_CARD.md", ("\n".join(lines) + "\n").encode())


@app.command("grid")
def grid(model: str = "reference", steps: int = 30, guidance: float = 3.0, seeds: int = 8, threads: int = 2,
         data_root: str = typer.Option(None), out: Path = typer.Option(ROOT / "docs" / "reference_sd_samples.png")) -> None:
    """Pictures: one row per class (a held-out caption), ``seeds`` columns at equal seeds, and a row of VAE
    reconstructions under their originals (``out`` with ``_vae`` before the suffix)."""
    _threads(threads)
    import torch

    from distill_common.data.cifar10 import CIFAR10_CLASSES
    from distill_common.reference_sd.captions import class_captions
    from distill_eval.grids import comparison_grid

    pipe = _load_pipeline(model)
    prompts = [row[0] for row in class_captions("held_out")]
    columns = []
    for k in range(seeds):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            images = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, output_type="pt",
                          generator=[torch.Generator().manual_seed(1000 * k + i) for i in range(len(prompts))]).images
        columns.append((f"seed {k}", images.float().clamp(0, 1)))
    comparison_grid(columns, prompts, out, cell_size=64,
                    title=f"reference text-to-image model: PNDM {steps} steps, guidance {guidance:g}, held-out captions")
    images, labels = _cifar_uint8(data_root, "test", limit=10)
    with torch.no_grad():
        rec = pipe.vae.decode(pipe.vae.encode(images.float() / 127.5 - 1).latent_dist.mean).sample
    comparison_grid([("CIFAR-10 test image", images.float() / 255), ("VAE reconstruction", (rec.clamp(-1, 1) + 1) / 2)],
                    [CIFAR10_CLASSES[int(y)] for y in labels], out.with_name(out.stem + "_vae" + out.suffix), cell_size=64)
    console.print(f"wrote {out} and its _vae companion")


@app.command("ship-lora")
def ship_lora(run: Path = typer.Option(..., help="the flash train run folder (its generator/ is shipped)"),
              name: str = typer.Option(..., help="shipped name: the generator becomes sd-reference-NAME"),
              eval_dir: Path = typer.Option(..., help="the flash eval folder whose flash_eval.json scored it"),
              label: str = typer.Option(..., help="this LoRA's model label in that evaluation")) -> None:
    """Ship a few-step LoRA student of the reference model as package data of lora_flash (generator.json, the
    LoRA safetensors, SHA256SUMS, MODEL_CARD.md with its training options and its scores)."""
    import json
    import re
    import shutil

    import yaml

    from distill_common.checkpoint import atomic_dir, file_sha256
    from distill_common.reference_sd import SHA256_FILE, write_sha256sums
    from distill_lora_flash.generator import SHIPPED_LORA_SUMS, SHIPPED_LORAS

    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", name):
        raise typer.BadParameter(f"--name {name!r}: use lowercase letters, digits and '-'")
    generator_dir = run / "generator"
    if not (generator_dir / "generator.json").is_file():
        raise typer.BadParameter(f"{generator_dir} holds no generator.json: finish the training run first")
    manifest = json.loads((generator_dir / "generator.json").read_text())
    lora_sha = file_sha256(generator_dir / manifest["lora"])
    keys = [json.loads(k.read_text()) for k in (eval_dir / "images").glob(f"{label}_s*/cache_key.json")]
    if not keys or any(lora_sha not in json.dumps(k) for k in keys):
        raise typer.BadParameter(f"the images of {label!r} in {eval_dir} were not made by {generator_dir}'s LoRA "
                                 f"(sha256 {lora_sha[:12]}); evaluate this run's LoRA under that label first")
    report = json.loads((eval_dir / "flash_eval.json").read_text())
    if report.get("meta", {}).get("base_model") != manifest.get("base_model"):
        raise typer.BadParameter(f"{eval_dir} scored base model {report.get('meta', {}).get('base_model')!r}, "
                                 f"not this LoRA's {manifest.get('base_model')!r}")
    rows = [r for r in report["rows"] if r["model"] in (label, "baseline", "base")]
    if not any(r["model"] == label for r in rows):
        raise typer.BadParameter(f"{eval_dir}/flash_eval.json has no rows for {label!r}; labels: "
                                 f"{', '.join(sorted({r['model'] for r in report['rows']}))}")
    guidances = {float(r.get("guidance") or 0.0) for r in rows if r["model"] == label}
    if len(guidances) > 1:
        raise typer.BadParameter(f"{eval_dir} scored {label!r} at several guidance scales ({sorted(guidances)}); "
                                 "ship from an evaluation at one --guidance-scale")
    guidance = guidances.pop()
    cfg = yaml.safe_load((run / "train_config.yaml").read_text())
    mlflow_id = (run / "mlflow_run_id").read_text().strip() if (run / "mlflow_run_id").is_file() else "?"
    images = cfg["max_steps"] * cfg["batch_size"] * cfg["gradient_accumulation_steps"]
    method = {"lcm": "LCM-LoRA consistency distillation (Luo et al. 2023): skipping-step DDIM solver "
                     f"(k = {cfg['lcm_skip']}), teacher CFG w in [{cfg['lcm_guidance_min']:g}, "
                     f"{cfg['lcm_guidance_max']:g}], c_skip/c_out boundary condition, pseudo-Huber loss "
                     f"(c = {cfg['lcm_huber_c']:g}), the LoRA student as its own no-grad target",
              "noise_matching": "Flash-style CFG noise matching: per-timestep MSE to the teacher at CFG "
                                f"{cfg['teacher_guidance']:g}, Min-SNR-{cfg['snr_gamma']:g}, timesteps on the "
                                "LCM grid of 2/4/8 steps"}[cfg["method"]]
    if cfg.get("lcm_noise_matching_weight"):
        method += (f", plus {cfg['lcm_noise_matching_weight']:g} x the noise-matching term of the teacher at CFG "
                   f"{cfg['teacher_guidance']:g} (Min-SNR-{cfg['snr_gamma']:g})")
    data = ("CIFAR-10 training images with captions from the training templates" if cfg.get("data_source") == "cifar10"
            else f"training data {cfg.get('data_shards') or cfg.get('data_dir') or cfg.get('dataset_name') or 'COCO 2017'}")
    dest = SHIPPED_LORAS / name
    with atomic_dir(dest) as tmp:
        for f in generator_dir.iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
        # a student of the reference model's weights as shipped now: it refuses to load on other base weights
        manifest.update(role="student", base_model_sha256sums=file_sha256(SHA256_FILE), guidance=guidance)
        (tmp / "generator.json").write_text(json.dumps(manifest, indent=2) + "\n")
        sums = write_sha256sums(tmp, tmp / SHIPPED_LORA_SUMS)

        def cell(r: dict, key: str, pct: bool = False) -> str:
            if r.get(key) is None:
                return "-"
            lo = r.get(f"{key}_low", r.get(f"{key}_ci95_low"))
            hi = r.get(f"{key}_high", r.get(f"{key}_ci95_high"))
            f = (lambda v: f"{100 * v:.1f}%") if pct else (lambda v: f"{v:.2f}")
            return f(r[key]) + (f" [{f(lo)}, {f(hi)}]" if lo is not None and hi is not None else "")

        meta = report.get("meta", {})
        lines = [f"# sd-reference-{name}: a few-step LoRA student of the reference text-to-image model", "",
                 f"A LoRA (rank {cfg['lora_rank']}, alpha {cfg['lora_alpha']:g}, on {', '.join(cfg['lora_targets'])}) "
                 "for the shipped reference model (`distill_common/reference_sd`), sampled with `LCMScheduler` "
                 f"(trailing spacing) at guidance {guidance:g}"
                 + (" (classifier-free guidance at sampling: two UNet passes per step, timed below)" if guidance > 1 else "")
                 + ". Load it by name: `distill eval benchmark --generators "
                 f"sd-reference-{name}`, or as a file: `pipe.load_lora_weights(\"<this folder>\")` on "
                 "`StableDiffusionPipeline.from_pretrained(\"<reference_sd>/pipeline\")`. Its files are checked "
                 "against `SHA256SUMS` on load.", "",
                 "## Training", "",
                 f"- Method: {method}.",
                 f"- `distill flash train --base-model reference --method {cfg['method']}`, {cfg['max_steps']:,} "
                 f"optimiser steps of {cfg['batch_size']} x {cfg['gradient_accumulation_steps']} images "
                 f"({images:,} images), learning rate {cfg['learning_rate']:g} ({cfg['lr_scheduler']}), seed "
                 f"{cfg['seed']}, {data}; MLflow run "
                 f"`{mlflow_id}`; commit `{_git_commit()}`.", "",
                 "## Scores", "",
                 f"`distill flash eval`: {meta.get('images', '?')} images per row ({Path(str(meta.get('prompts', '?'))).name} "
                 f"held-out prompts, seeds {meta.get('seeds', '?')}), FID against CIFAR-10 training images with "
                 "its 95% bootstrap interval, class accuracy by the shipped classifier with its 95% Wilson interval, "
                 f"ms per image on 2 CPU cores ({meta.get('timing', '')}).", "",
                 "| model | steps | FID [95%] | class accuracy [95%] | ms / image | speed-up |",
                 "|---|---:|---|---|---:|---:|"]
        for r in rows:
            lines.append(f"| {r['model']} | {r['steps']} | {cell(r, 'fid')} | {cell(r, 'class_accuracy', True)} | "
                         f"{r['ms_per_image']:.1f} | {r.get('speedup_vs_teacher') or 1:.1f}x |")
        lines += ["", "`baseline` is the reference model with its own PNDM sampler and CFG; `base` (when present) is "
                  "the reference model without the LoRA at the same LCM steps.", "",
                  "## Files and sha256", "", "| file | sha256 |", "|---|---|"]
        lines += [f"| `{n}` | `{d}` |" for n, d in sums.items()]
        (tmp / "MODEL_CARD.md").write_text("\n".join(lines) + "\n")
    console.print(f"shipped {dest} as sd-reference-{name} ({len(sums)} files)")


if __name__ == "__main__":
    app()
