"""Inception under torch.compile with inductor's on-disk cache, cold and warm (issue 23, item 6).

Each measurement is a fresh Python process (a compile cached in memory would hide the disk cache's effect) with
``TORCHINDUCTOR_CACHE_DIR`` pointing at one folder, FX-graph and AOT-autograd caches on: the first process finds it
empty (cold: the full compile), the second finds the first one's artifacts (warm). Each reports the time of its first
compiled call (the compile, with that call's own forward), the steady images/s of the compiled model, and the eager
images/s in the same process; images/s x 11.5 GFLOP per image (Inception-v3 at 299 px) against the CPU's measured
matmul peak in the same precision (tools/bench_rf_throughput.py) gives the share of the peak.

    python tools/bench_inception_compile_cache.py --precision bf16 --n 256 --batch-size 64       # ~5 min on 2 cores
    python tools/bench_inception_compile_cache.py --network tiny --n 8 --batch-size 4             # smoke, seconds

The compiled path pays off in a run when (warm compile seconds) < images x (1/eager - 1/compiled images/s).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

INCEPTION_GFLOP = 11.5  # per 299 x 299 image


def _network(name: str, precision: str):
    """A callable images (uint8 B, 3, 32, 32) -> features: distill_eval's Inception, or a tiny conv net (smoke)."""
    if name == "inception":
        from distill_eval.inception import InceptionFeatureExtractor

        return InceptionFeatureExtractor(precision=precision), INCEPTION_GFLOP
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten()).eval()

    def tiny(images: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            return net(images.float() / 255).float()

    return tiny, 2 * 3 * 8 * 9 * 32 * 32 / 1e9


def child(args: argparse.Namespace) -> None:
    """One process: eager images/s, first compiled call (compile), compiled images/s; one JSON line on stdout."""
    torch.manual_seed(0)
    net, gflop = _network(args.network, args.precision)
    images = torch.randint(0, 256, (args.n, 3, 32, 32), dtype=torch.uint8)
    batches = [images[i:i + args.batch_size] for i in range(0, args.n, args.batch_size)]

    def rate(fn) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for b in batches:
                fn(b)
        return args.n / (time.perf_counter() - start)

    with torch.inference_mode():
        net(batches[0])  # eager warm-up
    eager = rate(net)
    compiled = torch.compile(net, dynamic=False)
    start = time.perf_counter()
    with torch.inference_mode():
        compiled(batches[0])
        if len(batches[-1]) != len(batches[0]):
            compiled(batches[-1])  # the last, smaller batch compiles its own graph
    first = time.perf_counter() - start
    print(json.dumps({"first_call_seconds": first, "compiled_images_per_second": rate(compiled),
                      "eager_images_per_second": eager, "gflop_per_image": gflop}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--network", default="inception", choices=("inception", "tiny"))
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    parser.add_argument("--n", type=int, default=256, help="images per timed pass")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--cache-dir", type=Path, default=None, help="inductor cache folder (default: a fresh "
                        "temporary one, so the first run is cold)")
    parser.add_argument("--output", type=Path, default=Path("runs/bench/inception_compile_cache.json"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.n < 1 or args.batch_size < 1:
        parser.error("--n and --batch-size must be >= 1")
    if args.child:
        child(args)
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_rf_throughput import matmul_peak_gflops

    peak = matmul_peak_gflops(torch.float32 if args.precision == "fp32" else torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache_dir or Path(tmp) / "inductor"
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
               "TORCHINDUCTOR_AUTOGRAD_CACHE": "1"}
        cmd = [sys.executable, __file__, "--child", "--network", args.network, "--precision", args.precision,
               "--n", str(args.n), "--batch-size", str(args.batch_size)]
        runs = {}
        for label in ("cold", "warm"):
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if out.returncode:
                raise SystemExit(f"{label} run failed:\n{out.stderr[-2000:]}")
            runs[label] = json.loads(out.stdout.strip().splitlines()[-1])
    gflop = runs["cold"]["gflop_per_image"]
    print(f"{args.network}, {args.precision}, batch {args.batch_size}, {args.n} images; matmul peak {peak:.1f} GFLOP/s "
          f"({torch.get_num_threads()} threads)")
    print(f"{'run':<6} {'first call s':>12} {'compiled img/s':>15} {'eager img/s':>12} {'% peak (compiled)':>18}")
    for label, r in runs.items():
        share = 100 * r["compiled_images_per_second"] * gflop / peak
        print(f"{label:<6} {r['first_call_seconds']:12.1f} {r['compiled_images_per_second']:15.1f} "
              f"{r['eager_images_per_second']:12.1f} {share:17.1f}%")
        r["share_of_matmul_peak"] = share / 100
    gain = 1 / runs["warm"]["eager_images_per_second"] - 1 / runs["warm"]["compiled_images_per_second"]
    breakeven = runs["warm"]["first_call_seconds"] / gain if gain > 0 else float("inf")
    print(f"the warm compile pays off above {breakeven:,.0f} images per process")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"network": args.network, "precision": args.precision, "n": args.n,
                                       "batch_size": args.batch_size, "matmul_peak_gflops": peak, "runs": runs,
                                       "breakeven_images": breakeven}, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
