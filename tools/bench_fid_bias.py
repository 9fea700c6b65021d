"""How many generated images does a FID gap need? FID of folders of generated images at several sample sizes.

    python tools/bench_fid_bias.py runs/rf_cifar/long-protocol/images/{teacher_s4,progressive_s4,teacher_s16} \
        --limit 2000 --sizes 400 600 800 1000 2000 --reference-n 2000 10000 --feature-precision bf16

FID's finite-sample bias is shared by every model scored at one N, so it does not reorder them, but it adds the same
tens of points to each and so shrinks a *relative* gap ("15% better than the teacher"). For each reference size and
each sample size m this prints, per folder, the mean FID over the disjoint blocks of m images
(:func:`distill_eval.fid.fid_by_sample_size`), and each folder's relative gap to the first folder. Inception features
of each folder are cached in ``--output`` (safetensors), so a rerun with other sizes is cheap.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file, save_file

console = Console()


def folder_features(folder: Path, limit: int | None, extractor, batch_size: int, cache: Path) -> torch.Tensor:
    from distill_eval.cli import _folder_images
    from distill_eval.features import extract_features

    key = cache / f"{folder.parent.name}-{folder.name}-n{limit}-{extractor.extractor_hash}-{extractor.precision}.safetensors"
    if key.is_file():
        return load_file(key)["features"]
    images = _folder_images(folder, limit=limit)
    features = extract_features(images, extractor, batch_size)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = key.with_suffix(".tmp")
    save_file({"features": features.contiguous()}, tmp)
    tmp.replace(key)
    return features


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", type=Path, help="folders of generated PNGs; the first is the baseline")
    ap.add_argument("--limit", type=int, default=None, help="use the first N images of each folder (by name)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[400, 1000, 2000])
    ap.add_argument("--reference", default="cifar10-train")
    ap.add_argument("--reference-n", type=int, nargs="+", default=[2000])
    ap.add_argument("--feature-precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", type=Path, default=Path("runs/bench_fid_bias"))
    args = ap.parse_args()

    from distill_common.errors import DistillError
    from distill_eval.fid import fid_by_sample_size
    from distill_eval.inception import InceptionFeatureExtractor
    from distill_eval.reference_stats import reference_stats

    try:
        extractor = InceptionFeatureExtractor(precision=args.feature_precision)
        feats = {f.name: folder_features(f, args.limit, extractor, args.batch_size, args.output / "features")
                 for f in args.folders}
        names = list(feats)
        base = names[0]
        out = []
        for ref_n in args.reference_n:
            reference = reference_stats(args.reference, extractor, n=ref_n, data_root=args.data_root)
            by_name = {name: fid_by_sample_size(f, reference, args.sizes, seed=args.seed) for name, f in feats.items()}
            table = Table(title=f"FID at N generated vs {ref_n:,} {args.reference} ({args.feature_precision} features; "
                                f"mean over disjoint blocks of N)")
            table.add_column("N", justify="right")
            table.add_column("blocks", justify="right")
            for name in names:
                table.add_column(name, justify="right")
            for name in names[1:]:
                table.add_column(f"{name} vs {base}", justify="right")
            for i, size in enumerate(sorted(set(args.sizes))):
                row = {name: by_name[name][i].mean for name in names}
                gaps = {name: 1 - row[name] / row[base] for name in names[1:]}
                table.add_row(str(size), str(by_name[base][i].blocks), *(f"{row[n]:.1f}" for n in names),
                              *(f"{-100 * g:+.1f}%" for g in gaps.values()))
                out.append({"reference_n": ref_n, "n": size, "blocks": by_name[base][i].blocks, "fid": row,
                            "gap_to_baseline": gaps, "feature_precision": args.feature_precision})
            console.print(table)
        args.output.mkdir(parents=True, exist_ok=True)
        (args.output / "fid_by_n.json").write_text(json.dumps(out, indent=2))
        console.print(f"rows: {args.output / 'fid_by_n.json'}")
    except DistillError as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
