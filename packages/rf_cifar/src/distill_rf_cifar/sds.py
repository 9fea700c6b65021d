"""``distill rf sds``: score distillation sampling (Poole et al. 2022, "DreamFusion"), the 2D exercise.

Images of one class are optimised from noise with :class:`~distill_rf_cifar.losses.ScoreDistillation` (gradient
w(t) (eps_hat - eps), eps_hat = x_t - t v from the teacher's guided velocity) for each guidance scale of a sweep.
SDS is mode-seeking: every seed is pulled to a high-density image of the class, so its results vary less than the
teacher's own samples. That is measured as the mean pairwise LPIPS across seeds (distill_eval's LPIPS) of the SDS
images against the teacher's ODE samples of the same class, seeds and guidance scale.

Writes ``trajectory_w{w}.png`` (rows = seeds, columns = iterations), ``final.png`` (SDS vs teacher per scale),
``images/w{w}/seed{s}.png`` and ``sds.{md,csv,json}``, and logs them with the metrics to MLflow.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from distill_common import tracking
from distill_common.checkpoint import save_image
from distill_common.errors import ConfigError
from distill_common.output_dir import claims_output_dir
from distill_rf_cifar.config import SDSConfig
from distill_rf_cifar.flow import noise_for_seeds
from distill_rf_cifar.losses import ScoreDistillation

PARAMETRISATIONS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]] = {
    "pixels": (lambda x: x.clamp(-1.0, 1.0), lambda theta: theta),  # (init theta from noise, image from theta)
    "tanh": (lambda x: x, torch.tanh),
}


@dataclass
class SDSResult:
    images: torch.Tensor  # (B, 3, H, W) in [-1, 1], the optimised images
    trajectory: list[tuple[int, torch.Tensor]]  # (iteration, images) snapshots, iteration 0 = the initial image
    grad_rms: list[float]  # per iteration, RMS of w(t) (eps_hat - eps)


def optimise(teacher: nn.Module, labels: torch.Tensor, noise: torch.Tensor, *, guidance: float, iterations: int,
             learning_rate: float, parametrisation: str = "pixels", weighting: str = "uniform", t_min: float = 0.02,
             t_max: float = 0.98, snapshots: int = 8, seed: int = 0) -> SDSResult:
    """SDS from ``noise`` (B, 3, H, W): Adam on theta with a cosine-decayed learning rate; batch = seeds."""
    if parametrisation not in PARAMETRISATIONS:
        from distill_common.errors import unknown_choice

        raise unknown_choice("SDS parametrisation", parametrisation, PARAMETRISATIONS)
    init, image_of = PARAMETRISATIONS[parametrisation]
    sds = ScoreDistillation(teacher, guidance, t_min, t_max, weighting)
    theta = nn.Parameter(init(noise.clone()))
    opt = torch.optim.Adam([theta], lr=learning_rate)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iterations)
    at = {round(i * iterations / (snapshots - 1)) for i in range(snapshots)}
    trajectory, grad_rms = [(0, image_of(theta).detach().clone())], []
    torch.manual_seed(seed)  # t and eps of every iteration
    for it in range(1, iterations + 1):
        out = sds(image_of(theta), labels)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        sched.step()
        if parametrisation == "pixels":
            with torch.no_grad():
                theta.clamp_(-1.0, 1.0)
        grad_rms.append(float(out.per_sample.mean().sqrt()))
        if it in at:
            trajectory.append((it, image_of(theta).detach().clone()))
    return SDSResult(image_of(theta).detach(), trajectory, grad_rms)


def mean_pairwise(metric: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], images: torch.Tensor) -> float:
    """Mean of ``metric`` over all unordered pairs of ``images`` (N >= 2): the diversity of a set."""
    pairs = list(itertools.combinations(range(images.shape[0]), 2))
    if not pairs:
        raise ConfigError("diversity needs at least 2 images; pass --seeds 2 or more")
    a = images[[i for i, _ in pairs]]
    b = images[[j for _, j in pairs]]
    with torch.no_grad():
        return float(metric(a, b).mean())


@claims_output_dir(lambda cfg: cfg.output_dir)
def run(cfg: SDSConfig, *, console: Console | None = None) -> list[dict[str, Any]]:
    """The sweep: SDS images and teacher samples per guidance scale, grids, diversity table, MLflow run."""
    from PIL import Image

    from distill_common.generator import load_generator
    from distill_eval.grids import comparison_grid
    from distill_eval.lpips_metric import LPIPSMetric
    from distill_eval.reports import print_table, write_report

    console = console or Console()
    gen = load_generator(cfg.teacher, device=cfg.device)
    if getattr(gen, "family", None) != "rf_cifar":
        raise ConfigError(f"{cfg.teacher} is a {getattr(gen, 'family', '?')!r} generator; sds needs an rf_cifar teacher")
    num_classes = gen.num_classes
    if not 0 <= cfg.class_label < max(num_classes, 1):
        raise ConfigError(f"--class-label {cfg.class_label} is not a class of this teacher (0..{num_classes - 1})")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(cfg.seeds))
    labels = torch.full((cfg.seeds,), cfg.class_label, dtype=torch.long, device=gen.device)
    noise = noise_for_seeds(seeds).to(gen.device)
    lpips = LPIPSMetric(net=cfg.lpips_net, value_range=(-1.0, 1.0)).to(gen.device)
    steps = cfg.teacher_steps or gen.default_steps
    rows, final_columns = [], []
    with tracking.start_run(cfg.experiment, cfg.run_name, config=cfg, fallback_dir=out, enabled=cfg.track,
                            tags={"stage": "sds", "teacher": str(cfg.teacher), "class_label": cfg.class_label}) as run:
        for w in cfg.guidance_scales:
            tag = f"w{w:g}"
            res = optimise(gen.model, labels, noise, guidance=w, iterations=cfg.iterations,
                           learning_rate=cfg.learning_rate, parametrisation=cfg.parametrisation,
                           weighting=cfg.weighting, t_min=cfg.t_min, t_max=cfg.t_max, snapshots=cfg.snapshots)
            teacher_imgs = gen.generate([cfg.class_label] * cfg.seeds, steps, seeds, guidance=w) * 2 - 1  # [-1, 1]
            sds_div = mean_pairwise(lpips, res.images.float())
            teacher_div = mean_pairwise(lpips, teacher_imgs.to(gen.device))
            rows.append({"guidance": w, "sds_lpips_diversity": sds_div, "teacher_lpips_diversity": teacher_div,
                         "ratio": sds_div / max(teacher_div, 1e-12), "final_grad_rms": res.grad_rms[-1],
                         "teacher_steps": steps, "teacher_nfe": gen.last_nfe})
            for i, g in enumerate(res.grad_rms):
                if i % max(1, cfg.iterations // 50) == 0 or i == len(res.grad_rms) - 1:
                    run.log_metrics({f"{tag}.grad_rms": g}, step=i + 1)
            run.log_metrics({f"{tag}.sds_lpips_diversity": sds_div, f"{tag}.teacher_lpips_diversity": teacher_div})
            unit = [(f"it {it}", (x.float().cpu() + 1) / 2) for it, x in res.trajectory]
            comparison_grid(unit, [f"seed {s}" for s in seeds], out / f"trajectory_{tag}.png",
                            title=f"SDS class {cfg.class_label}, guidance {w:g}, {cfg.parametrisation}, {cfg.weighting}")
            run.log_artifact(out / f"trajectory_{tag}.png", "sds")
            img_dir = out / "images" / tag
            img_dir.mkdir(parents=True, exist_ok=True)
            for s, img in zip(seeds, unit[-1][1], strict=True):
                arr = (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
                save_image(Image.fromarray(arr), img_dir / f"seed{s}.png")
            final_columns += [(f"SDS w={w:g} LPIPS {sds_div:.3f}", unit[-1][1]),
                              (f"teacher w={w:g} LPIPS {teacher_div:.3f}", ((teacher_imgs + 1) / 2).cpu())]
            console.print(f"  guidance {w:>6g}: diversity SDS {sds_div:.4f} vs teacher {teacher_div:.4f} "
                          f"(mean pairwise LPIPS over {cfg.seeds} seeds)", highlight=False)
        comparison_grid(final_columns, [f"seed {s}" for s in seeds], out / "final.png",
                        title=f"class {cfg.class_label}: SDS ({cfg.iterations} its) vs teacher ({steps} Euler steps)")
        report = write_report(rows, out, "sds", meta={"teacher": str(cfg.teacher), "class_label": cfg.class_label,
                                                      "seeds": f"0..{cfg.seeds - 1}", "lpips": cfg.lpips_net,
                                                      "diversity": "mean pairwise LPIPS across seeds"})
        for path in [out / "final.png", *report.values()]:
            run.log_artifact(path, "sds")
    print_table(rows, ["guidance", "sds_lpips_diversity", "teacher_lpips_diversity", "ratio"],
                title=f"SDS mode-seeking, class {cfg.class_label} ({cfg.seeds} seeds)", console=console)
    console.print(f"grids: {out / 'final.png'}, {out}/trajectory_w*.png\ntable: {report['md']}", highlight=False)
    return rows
