"""bf16 autocast vs fp32 for the rf_cifar training loop, side by side in one run (Issue: use the CPU's bf16 units).

Two runs of the package's one training loop (``training.loop.train``) from the same initial weights, seed, data
order and noise, differing only in ``--precision``: prints the loss curves window by window (their ratio), the final
EMA weights' distance, and the seconds per step of each (their ratio). On a CPU with AVX512-BF16/AMX the step ratio
should be near 2 and the curves should agree within a few percent; on CUDA compare fp16/bf16 the same way.

    python tools/bench_precision.py --preset cpu --steps 300 [--device cuda] [--low fp16]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import tempfile

import torch
from rich.console import Console
from rich.table import Table

from distill_common.runtime import environment_info, resolve_device
from distill_rf_cifar.config import SCALES
from distill_rf_cifar.losses import RectifiedFlowLoss
from distill_rf_cifar.models import build_unet, count_parameters
from distill_rf_cifar.training import TrainingCallback, train
from distill_rf_cifar.training.data import load_cifar_training_data


class _Curve(TrainingCallback):
    def __init__(self) -> None:
        self.loss: dict[int, float] = {}
        self.rate: list[float] = []

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.loss[step] = metrics["loss"]
        self.rate.append(metrics["steps_per_second"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="cpu", choices=sorted(SCALES))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--window", type=int, default=25, help="steps per loss window")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--low", default="bf16", choices=("bf16", "fp16"), help="the reduced precision compared to fp32")
    ap.add_argument("--data-root", default=None)
    args = ap.parse_args()

    device = resolve_device(args.device)
    pipeline = SCALES[args.preset]()
    data = load_cifar_training_data(args.data_root, limit=args.steps * args.batch_size, show_progress=False)
    torch.manual_seed(0)
    initial = build_unet(pipeline.model)
    curves, finals = {}, {}
    for precision in ("fp32", args.low):
        loop = dataclasses.replace(pipeline.teacher, steps=args.steps, batch_size=args.batch_size, precision=precision,
                                   device=args.device, log_every=args.window, sample_every=0,
                                   checkpoint_every=args.steps, keep_checkpoints=1)
        curve = _Curve()
        with tempfile.TemporaryDirectory() as tmp:
            _, _, ema = train(loop, copy.deepcopy(initial), RectifiedFlowLoss(pipeline.flow.time_sampler, pipeline.flow.label_dropout), data, tmp,
                              callback=curve, progress=False, description=precision)
        curves[precision], finals[precision] = curve, {k: v.float().clone() for k, v in ema.shadow.items()}

    console = Console()
    low = args.low
    table = Table(title=f"rf_cifar '{args.preset}' UNet ({count_parameters(initial):,} parameters), batch "
                        f"{args.batch_size}, {device} ({environment_info(device)['device_name']}, "
                        f"{torch.get_num_threads()} threads): fp32 vs {low} autocast")
    for col in ("steps", "loss fp32", f"loss {low}", f"{low} / fp32"):
        table.add_column(col, justify="right")
    ratios = []
    for step, fp32 in curves["fp32"].loss.items():
        other = curves[low].loss[step]
        ratios.append(other / fp32)
        table.add_row(f"{step - args.window + 1}-{step}", f"{fp32:.4f}", f"{other:.4f}", f"{other / fp32:.3f}")
    console.print(table)
    rate32 = sorted(curves["fp32"].rate[1:] or curves["fp32"].rate)[len(curves["fp32"].rate) // 2 - 1]
    rate_low = sorted(curves[low].rate[1:] or curves[low].rate)[len(curves[low].rate) // 2 - 1]
    drift = max(float((finals["fp32"][k] - finals[low][k]).norm() / (finals["fp32"][k].norm() + 1e-12))
                for k in finals["fp32"] if finals["fp32"][k].is_floating_point())
    console.print(f"loss ratio {low}/fp32 per window: mean {sum(ratios) / len(ratios):.3f}, "
                  f"min {min(ratios):.3f}, max {max(ratios):.3f}", highlight=False)
    console.print(f"median s/step: fp32 {1 / rate32:.3f}, {low} {1 / rate_low:.3f} → {low} is "
                  f"{rate_low / rate32:.2f}x fp32; largest relative EMA-weight difference {drift:.3g}", highlight=False)


if __name__ == "__main__":
    main()
