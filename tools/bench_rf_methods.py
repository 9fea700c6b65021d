"""Training step time of every rf_cifar distillation method against the plain loop (issue 12).

For each registered student recipe (the registry ``distill rf compare`` uses) and each of its phases, the one
training loop (``training.loop.train``) runs the phase's loss on the preset's UNet; the baseline is the same loop on
the teacher's plain rectified-flow loss (one forward + backward). Reported: ms per optimizer step and the ratio to the
plain loop, which is what a method costs per step of a fixed step budget (adversarial: student step + discriminator
step with R1 through the frozen encoder; consistency: + a frozen teacher ODE step and an EMA target forward;
progressive: + two teacher Euler steps). Random weights and data: speed does not depend on them.

    python tools/bench_rf_methods.py --preset smoke [--device cuda] [--batch-size 64] [--steps 30] [--methods ...]

The best ``--window``-step log window after the first is kept, which filters out other processes on a shared machine.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from distill_common.runtime import environment_info, resolve_device
from distill_rf_cifar.compare import compare_methods
from distill_rf_cifar.config import SCALES, FlowConfig, LoopConfig, RecipeConfig
from distill_rf_cifar.losses import RectifiedFlowLoss
from distill_rf_cifar.models import build_unet, count_parameters
from distill_rf_cifar.recipes import build_recipe
from distill_rf_cifar.training import ImageLabelData, PairData, PairsWithImages, TrainingCallback, train


class _Windows(TrainingCallback):
    def __init__(self) -> None:
        self.rates: list[float] = []

    def on_metrics(self, step, metrics):
        self.rates.append(metrics["steps_per_second"])


def steps_per_second(model: torch.nn.Module, loss, data, cfg: LoopConfig) -> float:
    rec = _Windows()
    with tempfile.TemporaryDirectory() as tmp:
        train(cfg, model, loss, data, Path(tmp), callback=rec, progress=False)
    return max(rec.rates[1:] or rec.rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="smoke", choices=sorted(SCALES), help="UNet size of this preset.")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30, help="Optimizer steps per measurement.")
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--methods", nargs="*", default=None, help="Recipes (default: every registered one).")
    args = parser.parse_args()

    console = Console(width=max(120, Console().width))
    device = resolve_device(args.device)
    torch.manual_seed(0)
    unet_cfg = SCALES[args.preset]().model
    teacher = build_unet(unet_cfg)
    env = environment_info(device)
    console.print(f"{args.preset} UNet, {count_parameters(teacher):,} parameters; {env['device_name']} ({env['device']}, "
                  f"{env['num_threads']} threads, torch {env['torch_version']}), batch {args.batch_size}", highlight=False)
    n = max(4 * args.batch_size, 256)
    images = ImageLabelData(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (n,)))
    pairs = PairData(torch.randn(n, 3, 32, 32), torch.randn(n, 3, 32, 32).clamp(-1, 1), torch.randint(0, 10, (n,)))
    data = {"images": images, "pairs": pairs, "pairs+images": PairsWithImages(pairs, images)}
    cfg = LoopConfig(steps=args.steps, batch_size=args.batch_size, log_every=args.window, checkpoint_every=10**9,
                     device=device.type, precision="fp32", warmup_steps=5, log_checkpoints=False)

    def fresh() -> torch.nn.Module:
        model = build_unet(unet_cfg)
        model.load_state_dict(teacher.state_dict())
        return model

    base = steps_per_second(fresh(), RectifiedFlowLoss(), images, cfg)
    rows = [("plain loop (teacher's RectifiedFlowLoss)", "-", 1000 / base, 1.0)]
    opts = RecipeConfig(progressive_start=8, progressive_end=4)
    for method in args.methods or compare_methods():
        phases = build_recipe(method, opts, FlowConfig(), args.steps, teacher_steps=16)
        seen = set()
        for phase in phases:
            kind = type(phase.make_loss(fresh())).__name__
            if kind in seen:  # progressive rounds share one loss: measure it once
                continue
            seen.add(kind)
            model = fresh()  # the phase's start model; a phase with a student conversion (guided) trains its student
            student = phase.student(model) if phase.student is not None else model
            rate = steps_per_second(student, phase.make_loss(model), data[phase.data], cfg)
            rows.append((f"{method} / {phase.name}", kind, 1000 / rate, base / rate))
            console.print(f"  {method:>12} {phase.name:<14} {1000 / rate:8.1f} ms/step  {base / rate:5.2f}x", highlight=False)
    table = Table(title=f"training step time vs the plain loop (best {args.window}-step window of {args.steps} steps)")
    for col in ("method / phase", "loss", "ms/step", "x plain loop"):
        table.add_column(col, justify="right")
    for name, kind, ms, ratio in rows:
        table.add_row(name, kind, f"{ms:.1f}", f"{ratio:.2f}x")
    console.print(table)


if __name__ == "__main__":
    main()
