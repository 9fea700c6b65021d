"""Teacher training throughput side by side (issue 23): fp32 vs bf16 autocast, torch.compile of the training step's
model, channels_last, batch size. Reports steps/s, images/s, the step's FLOPs (torch.utils.flop_counter, forward +
backward of the UNet) and the share of the CPU's measured matmul peak in the same precision, plus the speed-up over
the fp32 eager baseline at the same batch size; a setting that wins by >= 10% is marked.

The step is the teacher's: ``losses.RectifiedFlowLoss`` (logit-normal t, label dropout), backward, gradient clipping
at 1, AdamW; random images stand in for CIFAR-10 (the cost does not depend on the pixels). ``training.loop.train``
adds 0.3% to this bare step (tools/bench_rf_cifar.py), so the ranking carries over to the loop. The compile time is
reported apart (it is paid once per run, hours for the teacher's long run). On a shared machine take the best of
``--rounds``.

    python tools/bench_rf_throughput.py                                 # reference UNet, batch 32 64 128, ~10 min
    python tools/bench_rf_throughput.py --model tiny --batch-sizes 8 --steps 2 --warmup 1 --no-compile   # smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time
from pathlib import Path

import torch

from distill_common.runtime import synchronize

MODELS = ("reference", "smoke", "tiny")


def matmul_peak_gflops(dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 5,
                       device: str = "cpu") -> float:
    """The best GFLOP/s of an n x n matmul (2 n^3 FLOPs) in ``dtype``: the machine's practical peak."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up (thread pool, packing buffers)
    best = float("inf")
    for _ in range(repeats):
        synchronize(torch.device(device))
        start = time.perf_counter()
        a @ b
        synchronize(torch.device(device))
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def unet_config(name: str):
    from distill_rf_cifar.config import UNetConfig, smoke_pipeline
    from distill_rf_cifar.generator import REFERENCE_TEACHER

    if name == "reference":
        from distill_common.config import from_dict

        return from_dict(UNetConfig, json.loads((REFERENCE_TEACHER / "model_config.json").read_text()))
    if name == "smoke":
        return smoke_pipeline().model
    return UNetConfig(base_channels=8, channel_mults=[1, 2], res_blocks=1, attention_resolutions=[],
                      mid_attention=False, dropout=0.0, norm_groups=4)


@dataclasses.dataclass
class Setting:
    precision: str  # fp32 | bf16
    compile: bool
    channels_last: bool
    batch_size: int

    @property
    def name(self) -> str:
        return (f"{self.precision}{' compile' if self.compile else ''}{' channels_last' if self.channels_last else ''}"
                f" b{self.batch_size}")


def step_flops(cfg, batch_size: int) -> float:
    """FLOPs of one training step (forward + backward of the UNet) from torch's flop counter, eager fp32."""
    from torch.utils.flop_counter import FlopCounterMode

    from distill_rf_cifar.losses import RectifiedFlowLoss
    from distill_rf_cifar.models import build_unet

    model = build_unet(cfg)
    batch = {"x1": torch.rand(batch_size, 3, 32, 32) * 2 - 1, "y": torch.arange(batch_size) % 10}
    with FlopCounterMode(display=False) as counter:
        RectifiedFlowLoss()(model, batch).loss.backward()
    return float(counter.get_total_flops())


def measure(cfg, s: Setting, steps: int, warmup: int, device: str) -> dict:
    from distill_rf_cifar.losses import RectifiedFlowLoss
    from distill_rf_cifar.models import build_unet

    torch.manual_seed(0)
    torch._dynamo.reset()
    model = build_unet(cfg).to(device).train()
    fmt = torch.channels_last if s.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    net = torch.compile(model) if s.compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = RectifiedFlowLoss()
    x1 = (torch.rand(s.batch_size, 3, 32, 32, device=device) * 2 - 1).contiguous(memory_format=fmt)
    batch = {"x1": x1, "y": torch.arange(s.batch_size, device=device) % 10}

    def one_step() -> None:
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=s.precision == "bf16"):
            out = loss_fn(net, batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    for _ in range(warmup):  # the compile happens here
        one_step()
    synchronize(torch.device(device))
    warmup_seconds = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        one_step()
    synchronize(torch.device(device))
    seconds = time.perf_counter() - start
    return {"warmup_seconds": warmup_seconds, "steps_per_second": steps / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="reference", choices=MODELS, help="UNet: the reference teacher's, the "
                        "smoke preset's, or a tiny one (smoke test of this script)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=("fp32", "bf16"))
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile settings")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (they include the compile)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat every setting; the best round counts")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", type=Path, default=Path("runs/bench/rf_throughput.json"))
    args = parser.parse_args()
    if min(args.batch_sizes) < 1 or args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        parser.error("--batch-sizes and --steps must be >= 1, --warmup >= 0, --rounds >= 1")

    from rich.console import Console
    from rich.table import Table

    console = Console()
    cfg = unet_config(args.model)
    peak = {p: matmul_peak_gflops(torch.float32 if p == "fp32" else torch.bfloat16, device=args.device)
            for p in args.precisions}
    console.print("matmul peak (2048^3, best of 5): " + ", ".join(f"{p} {g:.1f} GFLOP/s" for p, g in peak.items())
                  + f"; {torch.get_num_threads()} threads", highlight=False)
    settings = [Setting(p, c, cl, b) for b, p, c, cl in itertools.product(
        args.batch_sizes, args.precisions, [False] if args.no_compile else [False, True], [False, True])]
    flops = {b: step_flops(cfg, b) for b in args.batch_sizes}
    rows = []
    for s in settings:
        runs = [measure(cfg, s, args.steps, args.warmup, args.device) for _ in range(args.rounds)]
        best = max(runs, key=lambda r: r["steps_per_second"])
        gflops = flops[s.batch_size] * best["steps_per_second"] / 1e9
        rows.append({**dataclasses.asdict(s), "setting": s.name, **best,
                     "images_per_second": best["steps_per_second"] * s.batch_size,
                     "gflop_per_step": flops[s.batch_size] / 1e9, "achieved_gflops": gflops,
                     "share_of_matmul_peak": gflops / peak[s.precision]})
        console.print(f"  {s.name:<32} {best['steps_per_second']:7.3f} steps/s  (warm-up {best['warmup_seconds']:.1f} s)",
                      highlight=False)
    for r in rows:
        base = next(b for b in rows if b["batch_size"] == r["batch_size"] and b["precision"] == "fp32"
                    and not b["compile"] and not b["channels_last"]) if "fp32" in args.precisions else r
        r["speedup_vs_fp32_eager"] = r["steps_per_second"] / base["steps_per_second"]
        r["wins_10pct"] = r["speedup_vs_fp32_eager"] >= 1.10
    table = Table(title=f"teacher training step, {args.model} UNet, {args.device}")
    for c in ("setting", "steps/s", "images/s", "GFLOP/step", "GFLOP/s", "% of matmul peak", "× fp32 eager", "warm-up s"):
        table.add_column(c, justify="left" if c == "setting" else "right")
    for r in rows:
        table.add_row(r["setting"], f"{r['steps_per_second']:.3f}", f"{r['images_per_second']:.1f}",
                      f"{r['gflop_per_step']:.2f}", f"{r['achieved_gflops']:.1f}",
                      f"{100 * r['share_of_matmul_peak']:.1f}%",
                      f"{r['speedup_vs_fp32_eager']:.2f}{' ✓' if r['wins_10pct'] else ''}", f"{r['warmup_seconds']:.1f}")
    console.print(table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"model": args.model, "matmul_peak_gflops": peak, "steps": args.steps,
                                       "warmup": args.warmup, "rounds": args.rounds,
                                       "threads": torch.get_num_threads(), "rows": rows}, indent=2))
    console.print(f"wrote {args.output}", highlight=False)


if __name__ == "__main__":
    main()
