"""Benchmark: Flash LoRA (LCM, 2/4/8 steps, guidance 0) vs the 30-step CFG baseline, and fused vs unfused LoRA.

Runs the package's own generators (the code `distill flash generate` uses) on the tiny SD pipeline (or
--base-model) and prints, side by side:

1. time per image of each configuration (1 warm-up + N timed batches, device-synchronised), split into the UNet,
   the text encoder, the VAE decoder and the rest (scheduler steps, CFG arithmetic, pipeline bookkeeping), with
   the number of UNet calls and UNet batch rows (classifier-free guidance doubles the rows, not the calls);
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
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from distill_common.runtime import Timer, environment_info, resolve_device, resolve_precision, synchronize, torch_dtype
from distill_eval.timing import measure_latency
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
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    return p.parse_args()


class StageClock:
    """Device-synchronised time spent in the UNet, text encoder and VAE decoder, through hooks on the pipeline."""

    def __init__(self, pipe: Any, timer: Timer) -> None:
        self.timer = timer
        self.handles = []
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
            synchronize(self.timer.device)
            self.started[name] = time.perf_counter()
        return hook

    def _stop(self, name: str) -> Callable:
        def hook(module, args, output):
            synchronize(self.timer.device)
            self.timer.sections[name] = self.timer.sections.get(name, 0.0) + time.perf_counter() - self.started[name]
            self.timer.counts[name] = self.timer.counts.get(name, 0) + 1
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


def unet_call_ms(pipe: Any, rows: int, repeats: int, device: torch.device) -> float:
    """Median ms of one UNet forward on ``rows`` latents (SD 1.5 text length 77)."""
    unet = pipe.unet
    side = unet.config.sample_size
    x = torch.randn(rows, unet.config.in_channels, side, side, device=device, dtype=unet.dtype)
    ctx = torch.randn(rows, 77, unet.config.cross_attention_dim, device=device, dtype=unet.dtype)
    t = torch.full((rows,), 499, device=device)
    result = measure_latency(lambda: unet(x, t, encoder_hidden_states=ctx), label="unet", batch_size=1,
                             device=device, warmup=2, repeats=max(repeats, 5) * 3)
    return result.ms_per_image


def main() -> None:
    args = parse_args()
    console = Console()
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
                      str(lora_file))
    prompts = [f"a photograph of object number {i}" for i in range(args.batch_size)]
    seeds = list(range(args.batch_size))

    # -- 1. configurations: baseline (base weights, own scheduler, CFG) then the fused Flash LoRA (LCM, guidance 0)
    pipe = load_base_pipeline(args.base_model, device, dtype)
    base_call_ms = unet_call_ms(pipe, args.batch_size, args.repeats, device)
    cfg_call_ms = unet_call_ms(pipe, 2 * args.batch_size, args.repeats, device)
    row_cost = cfg_call_ms / base_call_ms  # ~2: the UNet costs per row; ~1: per call
    baseline = FlashGenerator(pipe, None, default_steps=args.baseline_steps, default_guidance=args.baseline_guidance)
    configs = [("baseline", args.baseline_steps, args.baseline_guidance, baseline)]
    rows: list[dict[str, Any]] = []

    def run(label: str, steps: int, guidance: float, gen: FlashGenerator) -> dict[str, Any]:
        fn = lambda: gen.generate(prompts, steps, seeds, guidance)  # noqa: E731
        total = measure_latency(fn, label=label, batch_size=args.batch_size, device=device, repeats=args.repeats)
        timer = Timer(device)
        clock = StageClock(gen.pipe, timer)
        try:
            staged = measure_latency(fn, label=label, batch_size=args.batch_size, device=device,
                                     repeats=args.repeats, stage_timer=timer)
        finally:
            clock.remove()
        stages = {k: 1000 * v for k, v in staged.stages.items()}  # ms per image
        staged_total = staged.ms_per_image
        calls, unet_rows = gen.unet_evaluations(steps, guidance)
        return {"config": label, "steps": steps, "guidance": guidance, "unet_calls": calls, "unet_rows": unet_rows,
                "ms_per_image": total.ms_per_image, "unet_ms": stages.get("unet", 0.0),
                "text_ms": stages.get("text_encoder", 0.0), "vae_ms": stages.get("vae_decode", 0.0),
                "rest_ms": staged_total - sum(stages.values())}

    rows.append(run("baseline", args.baseline_steps, args.baseline_guidance, baseline))
    apply_lora(pipe, lora, fuse=True)
    flash = FlashGenerator(pipe, FlashSchedule.from_scheduler(pipe.scheduler))
    for s in args.steps:
        rows.append(run(f"flash s{s}", s, 0.0, flash))
        configs.append((f"flash s{s}", s, 0.0, flash))

    table = Table(title=f"time per image, batch {args.batch_size}, {device} {precision}")
    for col in ("config", "UNet calls", "UNet rows", "ms/img", "UNet ms", "text ms", "VAE ms", "rest ms"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["config"], str(r["unet_calls"]), str(r["unet_rows"]), f"{r['ms_per_image']:.1f}",
                      f"{r['unet_ms']:.1f}", f"{r['text_ms']:.1f}", f"{r['vae_ms']:.1f}", f"{r['rest_ms']:.1f}")
    console.print(table)

    base = rows[0]
    ratio_table = Table(title=f"speed-up vs baseline ({args.baseline_steps} steps, CFG {args.baseline_guidance:g}); "
                              f"measured row cost c = t(2B)/t(B) = {row_cost:.2f}")
    for col in ("config", "end-to-end", "denoise loop", "UNet evals (calls)", "UNet evals (rows)",
                "UNet evals (c-weighted)", "loop vs evals", f"within {TARGET:.0%}"):
        ratio_table.add_column(col, justify="right")
    checks = []
    for r in rows[1:]:
        end_to_end = base["ms_per_image"] / r["ms_per_image"]
        loop = (base["unet_ms"] + base["rest_ms"]) / (r["unet_ms"] + r["rest_ms"])
        by_calls = base["unet_calls"] / r["unet_calls"]
        by_rows = base["unet_rows"] / r["unet_rows"]
        weighted = base["unet_calls"] * row_cost / r["unet_calls"]
        deviation = loop / weighted - 1
        r.update(speedup=end_to_end, loop_speedup=loop, expected_calls=by_calls, expected_rows=by_rows,
                 expected_weighted=weighted, deviation=deviation)
        checks.append(abs(deviation) <= TARGET)
        ratio_table.add_row(r["config"], f"{end_to_end:.2f}x", f"{loop:.2f}x", f"{by_calls:.1f}", f"{by_rows:.1f}",
                            f"{weighted:.1f}", f"{deviation:+.1%}", "yes" if checks[-1] else "NO")
    console.print(ratio_table)

    # -- 3. LoRA step time: unfused adapter vs fused vs none (one UNet call on B rows)
    step = {"no LoRA": base_call_ms}
    unfused_pipe = load_base_pipeline(args.base_model, device, dtype)
    apply_lora(unfused_pipe, lora, fuse=False)
    step["LoRA unfused (peft layers)"] = unet_call_ms(unfused_pipe, args.batch_size, args.repeats, device)
    step["LoRA fused + unloaded"] = unet_call_ms(pipe, args.batch_size, args.repeats, device)
    lora_table = Table(title=f"UNet step time, batch {args.batch_size} (LoRA rank from {lora.file.name})")
    lora_table.add_column("UNet")
    lora_table.add_column("ms/step", justify="right")
    lora_table.add_column("vs no LoRA", justify="right")
    for name, ms in step.items():
        lora_table.add_row(name, f"{ms:.2f}", f"{ms / base_call_ms - 1:+.1%}")
    console.print(lora_table)
    env = environment_info(device)
    console.print(f"{env.get('device_name')} · torch {env['torch_version']} · threads {env['num_threads']} · "
                  f"{precision} · model {args.base_model}", highlight=False)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "lora_step_ms": step, "row_cost": row_cost,
                                         "environment": env, "precision": precision,
                                         "batch_size": args.batch_size}, indent=2))
    if not all(checks):
        console.print(f"[yellow]denoising-loop speed-up deviates more than {TARGET:.0%} from the UNet evaluations[/]")


if __name__ == "__main__":
    main()
