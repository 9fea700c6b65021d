"""Benchmark: Flash LoRA (LCM, 2/4/8 steps, guidance 0) vs the 30-step CFG baseline, and fused vs unfused LoRA.

Runs the package's own generators (the code `distill flash generate` uses) on the tiny SD pipeline (or
--base-model) and prints, side by side:

1. time per image of each configuration (1 warm-up, then N rounds that visit every configuration in turn so the
   noise of a shared machine spreads evenly; best of N, median shown too; device-synchronised), split into the UNet,
   the text encoder, the VAE decoder and the rest (scheduler steps, CFG arithmetic, pipeline bookkeeping), with
   the number of UNet calls and UNet batch rows (classifier-free guidance doubles the rows, not the calls). On the
   CPU the process CPU time is shown too: other processes on a shared machine inflate wall time, not CPU time;
2. the baseline/Flash speed-up next to the ratio of UNet evaluations. Which count is "right" depends on the
   hardware: a compute-bound UNet (CPU, or a big GPU batch) costs per row, a latency-bound one (a tiny model on a
   GPU) per call. The script measures it: ``c = t_UNet(2B rows) / t_UNet(B rows)`` (2 = per row, 1 = per call), so
   one CFG call counts as ``c`` evaluations. Target: the denoising loop (UNet + rest) ratio within 15% of
   ``30 c / s``. The end-to-end ratio is lower because text encoding and VAE decoding cost the same for both;
3. UNet step time with the LoRA unfused (peft adapter layers), fused (merged and unloaded) and without LoRA.

    python tools/bench_lora_flash.py                       # tiny pipeline, CPU
    python tools/bench_lora_flash.py --device cuda --precision fp16 --batch-size 4
    python tools/bench_lora_flash.py --base-model /models/sd15 --lora-path /models/flash-sd --device cuda
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from distill_common.runtime import (
    Timer,
    environment_info,
    resolve_device,
    resolve_precision,
    synchronize,
    torch_dtype,
)
from distill_lora_flash.generator import FlashGenerator
from distill_lora_flash.loading import LoraSource, apply_lora, load_base_pipeline
from distill_lora_flash.schedule import FlashSchedule

TARGET = 0.15


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base-model", default=None, help="diffusers folder or hub id (default: the tiny SD pipeline)")
    p.add_argument("--lora-path", default=None, help="LoRA file/folder (default: a random LoRA of --lora-rank)")
    p.add_argument("--lora-rank", type=int, default=4)
    p.add_argument("--steps", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--baseline-steps", type=int, default=30)
    p.add_argument("--baseline-guidance", type=float, default=7.5)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    return p.parse_args()


class StageClock:
    """Device-synchronised time spent in the UNet, text encoder and VAE decoder, through hooks on the pipeline.

    ``timer`` accumulates wall seconds per stage, ``cpu`` process CPU seconds per stage."""

    def __init__(self, pipe: Any, timer: Timer) -> None:
        self.timer = timer
        self.cpu: dict[str, float] = {}
        self.cpu_started: dict[str, float] = {}
        self.handles = []
        self.enabled = False
        self.started: dict[str, float] = {}
        for name, module in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)):
            self.handles.append(module.register_forward_pre_hook(self._start(name)))
            self.handles.append(module.register_forward_hook(self._stop(name)))
        self.vae_decode = pipe.vae.decode
        clock = self

        def decode(*args, **kwargs):
            clock._start("vae_decode")(None, None)
            try:
                return clock.vae_decode(*args, **kwargs)
            finally:
                clock._stop("vae_decode")(None, None, None)


        pipe.vae.decode = decode
        self.pipe = pipe

    def _start(self, name: str) -> Callable:
        def hook(module, args):
            if not self.enabled:
                return
            synchronize(self.timer.device)
            self.started[name] = time.perf_counter()
            self.cpu_started[name] = time.process_time()
        return hook

    def _stop(self, name: str) -> Callable:
        def hook(module, args, output):
            if not self.enabled:
                return
            synchronize(self.timer.device)
            self.timer.sections[name] = self.timer.sections.get(name, 0.0) + time.perf_counter() - self.started[name]
            self.timer.counts[name] = self.timer.counts.get(name, 0) + 1
            self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - self.cpu_started[name]
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.pipe.vae.decode = self.vae_decode


def random_lora(base_model: str, rank: int, folder: Path) -> Path:
    from distill_common.models import add_lora, load_sd_components, save_lora

    unet = load_sd_components(base_model, include=("unet",)).unet
    torch.manual_seed(0)
    add_lora(unet, rank=rank, alpha=rank, init_lora_weights=False)
    return save_lora(unet, folder)


@dataclass
class Sample:
    wall: float  # seconds, device-synchronised
    cpu: float  # process CPU seconds (robust to other processes on a shared CPU; meaningless on CUDA)
    stages: dict[str, float] = field(default_factory=dict)  # wall seconds per stage (hooked runs only)
    cpu_stages: dict[str, float] = field(default_factory=dict)  # CPU seconds per stage (hooked runs only)


def timed_call(fn: Callable[[], Any], device: torch.device, clock: StageClock | None = None) -> Sample:
    if clock is not None:
        clock.timer.reset()
        clock.cpu.clear()
        clock.enabled = True
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        fn()
    synchronize(device)
    sample = Sample(time.perf_counter() - wall, time.process_time() - cpu)
    if clock is not None:
        clock.enabled = False
        sample.stages = dict(clock.timer.sections)
        sample.cpu_stages = dict(clock.cpu)
    return sample


def round_robin(fns: dict[str, Callable[[], Any]], device: torch.device, repeats: int,
                clocks: dict[str, StageClock] | None = None) -> dict[str, list[Sample]]:
    """One warm-up each, then ``repeats`` rounds visiting every configuration in turn (interleaving spreads the
    noise of a shared machine evenly over the configurations). With ``clocks`` every round also times the stages."""
    for fn in fns.values():
        with torch.inference_mode():
            fn()
    out: dict[str, list[Sample]] = {k: [] for k in fns}
    staged: dict[str, list[Sample]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            out[name].append(timed_call(fn, device))
            if clocks and name in clocks:
                staged[name].append(timed_call(fn, device, clocks[name]))
    if clocks:
        for name in clocks:
            fastest = min(staged[name], key=lambda s: s.wall)
            lowest_cpu = min(staged[name], key=lambda s: s.cpu)
            out[name].append(Sample(float("nan"), float("nan"), fastest.stages | {"_total": fastest.wall},
                                    lowest_cpu.cpu_stages | {"_total": lowest_cpu.cpu}))
    return out


def best(samples: list[Sample], attr: str) -> float:
    values = [getattr(s, attr) for s in samples if getattr(s, attr) == getattr(s, attr)]
    return min(values)


def median(samples: list[Sample], attr: str) -> float:
    values = sorted(getattr(s, attr) for s in samples if getattr(s, attr) == getattr(s, attr))
    return values[len(values) // 2]


def unet_step(pipe: Any, rows: int, device: torch.device) -> Callable[[], Any]:
    """One UNet forward on ``rows`` latents with SD's 77-token context."""
    unet = pipe.unet
    side = unet.config.sample_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, unet.config.in_channels, side, side, generator=g).to(device, unet.dtype)
    ctx = torch.randn(rows, 77, unet.config.cross_attention_dim, generator=g).to(device, unet.dtype)
    t = torch.full((rows,), 499, device=device)
    return lambda: unet(x, t, encoder_hidden_states=ctx)


def copy_pipeline(pipe: Any) -> Any:
    """A pipeline sharing the VAE and tokenizer but owning copies of the UNet and text encoder."""
    import copy

    from diffusers import StableDiffusionPipeline

    out = StableDiffusionPipeline(**{**pipe.components, "unet": copy.deepcopy(pipe.unet),
                                     "text_encoder": copy.deepcopy(pipe.text_encoder)}, requires_safety_checker=False)
    out.set_progress_bar_config(disable=True)
    return out


def main() -> None:
    args = parse_args()
    console = Console(width=150)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    dtype = torch_dtype(precision)
    if args.base_model is None:
        from distill_common.models.tiny_sd import tiny_sd_folder

        args.base_model = str(tiny_sd_folder())
    tmp = Path(tempfile.mkdtemp(prefix="bench-lora-flash-"))
    lora_file = Path(args.lora_path) if args.lora_path else random_lora(args.base_model, args.lora_rank, tmp)
    lora = LoraSource(lora_file if lora_file.is_file() else lora_file / "pytorch_lora_weights.safetensors",
                      str(args.lora_path) if args.lora_path else f"random, rank {args.lora_rank}")
    prompts = [f"a photograph of object number {i}" for i in range(args.batch_size)]
    seeds = list(range(args.batch_size))

    # baseline: base weights, own scheduler, CFG; flash: fused LoRA, LCM, guidance 0; unfused: peft adapter layers
    base_pipe = load_base_pipeline(args.base_model, device, dtype)
    flash_pipe = copy_pipeline(base_pipe)
    apply_lora(flash_pipe, lora, fuse=True)
    unfused_pipe = copy_pipeline(base_pipe)
    apply_lora(unfused_pipe, lora, fuse=False)
    schedule = FlashSchedule.from_scheduler(base_pipe.scheduler)
    gens = {"baseline": FlashGenerator(base_pipe, None, default_steps=args.baseline_steps,
                                       default_guidance=args.baseline_guidance)}
    plan = {"baseline": (args.baseline_steps, args.baseline_guidance)}
    for s in args.steps:
        gens[f"flash s{s}"] = FlashGenerator(flash_pipe, schedule)
        plan[f"flash s{s}"] = (s, 0.0)
    fns = {name: (lambda g=g, p=plan[name]: g.generate(prompts, p[0], seeds, p[1])) for name, g in gens.items()}
    clocks = {"baseline": StageClock(base_pipe, Timer(device))}
    flash_clock = StageClock(flash_pipe, Timer(device))
    clocks.update({name: flash_clock for name in gens if name != "baseline"})
    fns["unet B rows"] = unet_step(base_pipe, args.batch_size, device)
    fns["unet 2B rows"] = unet_step(base_pipe, 2 * args.batch_size, device)
    fns["unet fused"] = unet_step(flash_pipe, args.batch_size, device)
    fns["unet unfused"] = unet_step(unfused_pipe, args.batch_size, device)
    results = round_robin(fns, device, args.repeats, clocks)
    for clock in set(clocks.values()):
        clock.remove()
    metric = "cpu" if device.type == "cpu" else "wall"

    # 1. time per image and its split
    row_cost = {m: best(results["unet 2B rows"], m) / best(results["unet B rows"], m) for m in ("wall", metric)}
    rows: list[dict[str, Any]] = []
    for name, gen in gens.items():
        steps, guidance = plan[name]
        calls, unet_rows = gen.unet_evaluations(steps, guidance)
        split = {}
        for kind, staged in (("wall", results[name][-1].stages), ("cpu", results[name][-1].cpu_stages)):
            per_img = {k: 1000 * v / args.batch_size for k, v in staged.items()}
            per_img["rest"] = per_img["_total"] - sum(v for k, v in per_img.items() if k != "_total")
            split[kind] = per_img
        per_img = split[metric]
        rest = per_img["rest"]
        rows.append({"split_metric": metric, "wall_split_ms": split["wall"], "config": name, "steps": steps, "guidance": guidance, "unet_calls": calls, "unet_rows": unet_rows,
                     "ms_per_image": 1000 * best(results[name][:-1], "wall") / args.batch_size,
                     "ms_per_image_median": 1000 * median(results[name][:-1], "wall") / args.batch_size,
                     "cpu_ms_per_image": 1000 * best(results[name][:-1], "cpu") / args.batch_size,
                     "unet_ms": per_img.get("unet", 0.0), "text_ms": per_img.get("text_encoder", 0.0),
                     "vae_ms": per_img.get("vae_decode", 0.0), "rest_ms": rest})
    table = Table(title=f"time per image (best of {args.repeats}; median in brackets), batch {args.batch_size}, "
                        f"{device} {precision}; split in {metric} ms")
    for col in ("config", "UNet calls", "UNet rows", "ms/img", "CPU ms/img", "UNet", "text enc", "VAE dec", "rest"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["config"], str(r["unet_calls"]), str(r["unet_rows"]),
                      f"{r['ms_per_image']:.1f} ({r['ms_per_image_median']:.1f})", f"{r['cpu_ms_per_image']:.1f}",
                      f"{r['unet_ms']:.1f}", f"{r['text_ms']:.1f}", f"{r['vae_ms']:.1f}", f"{r['rest_ms']:.1f}")
    console.print(table)

    # 2. speed-up vs the ratio of UNet evaluations
    base = rows[0]
    c = row_cost[metric]
    ratio_table = Table(title=f"speed-up vs baseline ({args.baseline_steps} steps, CFG {args.baseline_guidance:g}); "
                              f"UNet cost of 2B rows / B rows: c = {c:.2f} (wall), {row_cost[metric]:.2f} ({metric})")
    for col in ("config", "end-to-end", f"end-to-end ({metric})", "denoise loop", "UNet evals: calls", "rows",
                "c-weighted", "loop vs evals", f"within {TARGET:.0%}"):
        ratio_table.add_column(col, justify="right")
    checks = []
    for r in rows[1:]:
        loop = (base["unet_ms"] + base["rest_ms"]) / (r["unet_ms"] + r["rest_ms"])
        weighted = base["unet_calls"] * c / r["unet_calls"]
        r.update(speedup=base["ms_per_image"] / r["ms_per_image"],
                 speedup_cpu=base["cpu_ms_per_image"] / r["cpu_ms_per_image"], loop_speedup=loop,
                 expected_calls=base["unet_calls"] / r["unet_calls"], expected_rows=base["unet_rows"] / r["unet_rows"],
                 expected_weighted=weighted, deviation=loop / weighted - 1)
        checks.append(abs(r["deviation"]) <= TARGET)
        ratio_table.add_row(r["config"], f"{r['speedup']:.2f}x", f"{r['speedup_cpu']:.2f}x", f"{loop:.2f}x",
                            f"{r['expected_calls']:.1f}", f"{r['expected_rows']:.1f}", f"{weighted:.1f}",
                            f"{r['deviation']:+.1%}", "yes" if checks[-1] else "NO")
    console.print(ratio_table)

    # 3. LoRA step time: unfused adapter vs fused vs none (one UNet call on B rows)
    step = {"no LoRA": results["unet B rows"], "LoRA unfused (peft layers)": results["unet unfused"],
            "LoRA fused + unloaded": results["unet fused"]}
    none_ms = {m: best(step["no LoRA"], m) for m in ("wall", metric)}
    lora_table = Table(title=f"UNet step time, batch {args.batch_size}, LoRA {lora.label}")
    for col in ("UNet", "ms/step", "vs no LoRA", f"{metric} ms/step", f"vs no LoRA ({metric})"):
        lora_table.add_column(col, justify="right")
    step_ms = {}
    for name, samples in step.items():
        ms = {m: best(samples, m) for m in ("wall", metric)}
        step_ms[name] = 1000 * ms["wall"]
        lora_table.add_row(name, f"{1000 * ms['wall']:.2f}", f"{ms['wall'] / none_ms['wall'] - 1:+.1%}",
                           f"{1000 * ms[metric]:.2f}", f"{ms[metric] / none_ms[metric] - 1:+.1%}")
    console.print(lora_table)
    env = environment_info(device)
    console.print(f"{env.get('device_name')} · torch {env['torch_version']} · threads {env['num_threads']} · "
                  f"{precision} · model {args.base_model}", highlight=False)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "lora_step_ms": step_ms, "row_cost": row_cost,
                                         "environment": env, "precision": precision,
                                         "batch_size": args.batch_size, "repeats": args.repeats}, indent=2))
    if not all(checks):
        console.print(f"[yellow]the denoising-loop speed-up deviates more than {TARGET:.0%} from the ratio of UNet "
                      "evaluations[/]")


if __name__ == "__main__":
    main()
