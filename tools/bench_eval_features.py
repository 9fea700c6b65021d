"""Benchmark: Inception feature extraction of distill_eval vs torch-fidelity called directly, and reference-stats caching.

Both sides use the same converted weights: torch-fidelity gets them as a ``feature_extractor_weights_path``
file and runs its own batching loop (``torch_fidelity.utils.get_featuresdict_from_dataset``, in-process
loading as with ``save_cpu_ram``). Prints images/s side by side (target ratio >= 1.0), checks the features
agree, then times reference statistics with and without the cache.

    python tools/bench_eval_features.py --n 256 --batch-size 64 [--data-root ../shared/data] [--device cpu]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.utils import get_featuresdict_from_dataset

from distill_common.data.cifar10 import Cifar10Shards
from distill_common.runtime import resolve_device, synchronize
from distill_eval.fid import extract_features, fid_from_features
from distill_eval.inception import NUM_FEATURES, InceptionFeatureExtractor, load_inception_state
from distill_eval.reference_stats import reference_stats


class UInt8Images(Dataset):
    """torch-fidelity's input contract: a Dataset of uint8 (3, H, W) tensors."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


def best_of(repeats: int, fn, device: torch.device) -> tuple[float, object]:
    """Fastest wall time of ``repeats`` runs (CUDA-synchronised), and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256, help="CIFAR-10 test images to extract")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="runs per side; the fastest counts")
    parser.add_argument("--data-root", default=None, help="folder holding cifar10/ (default: $DISTILL_DATA_ROOT)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    console = Console()
    device = resolve_device(args.device)
    images = Cifar10Shards(args.data_root, "test", limit=args.n, show_progress=False).uint8_images().clone()
    console.print(f"{images.shape[0]} CIFAR-10 test images {tuple(images.shape[1:])}, batch {args.batch_size}, "
                  f"device {device}, torch threads {torch.get_num_threads()}")

    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        ours_cl = InceptionFeatureExtractor(cache_dir=cache, channels_last=True).to(device)
        ours = InceptionFeatureExtractor(cache_dir=cache, channels_last=False).to(device)
        state, _ = load_inception_state(cache_dir=cache)
        weights_file = Path(tmp) / "inception.pth"  # torch-fidelity's own weights format
        torch.save({**state, **{k.replace("running_mean", "num_batches_tracked"): torch.tensor(0)
                                for k in state if k.endswith("running_mean")},
                    "fc.weight": torch.zeros(1008, NUM_FEATURES), "fc.bias": torch.zeros(1008)}, weights_file)
        fidelity = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                               feature_extractor_weights_path=str(weights_file)).to(device)

        def run_fidelity() -> torch.Tensor:
            out = get_featuresdict_from_dataset(UInt8Images(images), fidelity, args.batch_size,
                                                cuda=device.type == "cuda", save_cpu_ram=True, verbose=False)
            return out["2048"]

        runs = {
            "torch-fidelity direct": run_fidelity,
            "distill_eval (NCHW)": lambda: extract_features(images, ours, args.batch_size, progress=False),
            "distill_eval (channels_last, default)": lambda: extract_features(images, ours_cl, args.batch_size,
                                                                              progress=False),
        }
        for fn in runs.values():
            fn()  # warm-up
        timings: dict[str, tuple[float, torch.Tensor]] = {name: (float("inf"), None) for name in runs}
        for _ in range(args.repeats):  # interleaved, so load from other processes hits every side alike
            for name, fn in runs.items():
                seconds, features = best_of(1, fn, device)
                timings[name] = (min(seconds, timings[name][0]), features)
        rows = [(name, timings[name][0]) for name in runs]
        base_seconds, base_features = timings["torch-fidelity direct"]
        table = Table(title="Inception-v3 pool features (2048-d)")
        for column in ("extractor", "seconds", "images/s", "ratio vs torch-fidelity", "max |diff|"):
            table.add_column(column)
        for name, seconds in rows:
            diff = (timings[name][1].cpu() - base_features.cpu()).abs().max().item()
            table.add_row(name, f"{seconds:.2f}", f"{images.shape[0] / seconds:.1f}", f"{base_seconds / seconds:.2f}",
                          f"{diff:.2e}")
        console.print(table)

        ref_cache = Path(tmp) / "refs"
        miss, stats = best_of(1, lambda: reference_stats("cifar10-test", ours_cl, cache_dir=ref_cache, n=args.n,
                                                          data_root=args.data_root, batch_size=args.batch_size,
                                                          progress=False), device)
        hit, _ = best_of(args.repeats, lambda: reference_stats("cifar10-test", ours_cl, cache_dir=ref_cache, n=args.n,
                                                                data_root=args.data_root, progress=False), device)
        fid_seconds, fid = best_of(1, lambda: fid_from_features(stats.features, base_features), device)
        table = Table(title=f"reference statistics, cifar10-test n={args.n}")
        table.add_column("step")
        table.add_column("seconds")
        table.add_row("compute (decode + features + mu/sigma + write cache)", f"{miss:.2f}")
        table.add_row("cache hit (read safetensors)", f"{hit:.4f}")
        table.add_row(f"FID from 2048-d statistics (value {fid:.3f}, same images)", f"{fid_seconds:.2f}")
        console.print(table)


if __name__ == "__main__":
    main()
