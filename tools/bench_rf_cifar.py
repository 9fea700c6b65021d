"""Benchmark of the rf_cifar package on this machine (CPU or CUDA):

1. sampling: teacher (Euler, N steps) vs students (k steps) images/s with the same UNet and batch, timed by
   distill_eval.timing (warm-up, device-synchronised). The measured speed-up should be within 10% of the ratio of
   network evaluations (N / k; a CFG teacher counts its doubled batch as 2).
2. training: the package's loop (``training.loop.train``: Accelerate, AdamW + warm-up schedule, grad clipping,
   EMA, per-t-bin metrics, progress bar, checkpoint bookkeeping) vs a bare PyTorch loop doing the same maths
   (same model, batch, loss, optimiser, clipping and EMA). Target: overhead <= 5%.

    python tools/bench_rf_cifar.py --preset smoke [--device cuda] [--batch-size 64] [--train-steps 60]

Weights are random: speed does not depend on them. Each measurement is repeated and the best is kept, which
filters out other processes on a shared machine.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from distill_common.models.ema import EMA
from distill_common.runtime import environment_info, resolve_device, synchronize
from distill_eval.timing import measure_latency
from distill_rf_cifar.config import SCALES, LoopConfig
from distill_rf_cifar.generator import RFGenerator
from distill_rf_cifar.losses import RectifiedFlowLoss
from distill_rf_cifar.models import build_unet, count_parameters
from distill_rf_cifar.training import EpochOrder, ImageLabelData, TrainingCallback, train


def bench_sampling(model, device, batch: int, teacher_steps: int, student_steps: list[int], guidance: float,
                   repeats: int) -> list[dict]:
    gen = RFGenerator(model.to(device).eval(), default_steps=teacher_steps, default_guidance=guidance)
    conditions, seeds = [i % 10 for i in range(batch)], list(range(batch))
    rows = []
    configs = [("teacher", teacher_steps, guidance)] + [("student", k, 1.0) for k in student_steps]
    for role, steps, w in configs:
        timing = measure_latency(lambda s=steps, w=w: gen.generate(conditions, s, seeds, w), label=f"{role}@{steps}",
                                 batch_size=batch, device=device, warmup=1, repeats=repeats)
        evals = steps * (2 if w != 1.0 else 1)  # per image: a CFG forward doubles the batch
        rows.append({"role": role, "steps": steps, "guidance": w, "evals": evals,
                     "ms_per_image": min(timing.batch_seconds) * 1000 / batch})
    base = rows[0]
    for r in rows:
        r["speedup"] = base["ms_per_image"] / r["ms_per_image"]
        r["expected"] = base["evals"] / r["evals"]
        r["ratio"] = r["speedup"] / r["expected"]
    return rows


class _Windows(TrainingCallback):
    def __init__(self):
        self.rates: list[float] = []

    def on_metrics(self, step, metrics):
        self.rates.append(metrics["steps_per_second"])


def loop_steps_per_second(model, data, cfg: LoopConfig, window: int) -> float:
    """Steady-state steps/s of training.loop.train (best log window after the first)."""
    rec = _Windows()
    with tempfile.TemporaryDirectory() as tmp:
        train(cfg, copy.deepcopy(model), RectifiedFlowLoss(), data, Path(tmp), callback=rec, progress=True,
              description="train()")
    return max(rec.rates[1:])


def bare_steps_per_second(model, data, cfg: LoopConfig, device, window: int) -> float:
    """The same maths without the framework: best window of ``window`` steps after the first."""
    from diffusers.optimization import get_scheduler

    model = copy.deepcopy(model).to(device).train()
    loss_fn = RectifiedFlowLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    sched = get_scheduler(cfg.lr_schedule, opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps)
    ema = EMA(model, decay=cfg.ema_decay, foreach=True)
    order = EpochOrder(len(data), cfg.batch_size, cfg.seed)
    rates = []
    for _ in range(cfg.steps // window):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(window):
            batch = {k: v.to(device) for k, v in data.batch(order.next_indices()).items()}
            out = loss_fn(model, batch)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            ema.update(model)
        synchronize(device)
        rates.append(window / (time.perf_counter() - start))
    return max(rates[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="smoke", choices=sorted(SCALES), help="UNet size of this preset.")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--teacher-steps", type=int, default=16)
    parser.add_argument("--student-steps", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--guidance", type=float, default=1.0, help="Teacher CFG scale (students never use CFG).")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=60)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2, help="Alternating train()/bare rounds; the best is kept.")
    args = parser.parse_args()

    console = Console(width=max(120, Console().width))
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = build_unet(SCALES[args.preset]().model)
    env = environment_info(device)
    console.print(f"{args.preset} UNet, {count_parameters(model):,} parameters; {env['device_name']} "
                  f"({env['device']}, {env['num_threads']} threads, torch {env['torch_version']})", highlight=False)

    rows = bench_sampling(model, device, args.batch_size, args.teacher_steps, args.student_steps, args.guidance,
                          args.repeats)
    table = Table(title=f"sampling, batch {args.batch_size}")
    for col in ("model", "steps", "net evals/image", "ms/image", "images/s", "speed-up", "NFE ratio", "speed-up / ratio"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["role"], str(r["steps"]), str(r["evals"]), f"{r['ms_per_image']:.3f}",
                      f"{1000 / r['ms_per_image']:.1f}", f"{r['speedup']:.2f}×", f"{r['expected']:.2f}×",
                      f"{r['ratio']:.3f}")
    console.print(table)

    data = ImageLabelData(torch.randint(0, 256, (4096, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (4096,)))
    cfg = LoopConfig(steps=args.train_steps, batch_size=args.batch_size, log_every=args.window,
                     checkpoint_every=10**9, device=device.type, precision="fp32", warmup_steps=10)
    loop_rates, bare_rates = [], []
    for _ in range(args.rounds):
        bare_rates.append(bare_steps_per_second(model, data, cfg, device, args.window))
        loop_rates.append(loop_steps_per_second(model, data, cfg, args.window))
    bare, loop = max(bare_rates), max(loop_rates)
    table = Table(title=f"training steps/s, batch {args.batch_size} (best {args.window}-step window of {args.rounds} rounds)")
    for col in ("loop", "steps/s", "overhead"):
        table.add_column(col, justify="right")
    table.add_row("bare PyTorch (same maths)", f"{bare:.3f}", "-")
    table.add_row("training.loop.train", f"{loop:.3f}", f"{100 * (bare / loop - 1):+.1f}%")
    console.print(table)
    console.print(f"all rounds: bare {[round(r, 3) for r in bare_rates]}, train() {[round(r, 3) for r in loop_rates]}",
                  highlight=False)


if __name__ == "__main__":
    main()
