"""Noise -> image pairs from the teacher's ODE (the couplings of reflow and of k-step distillation, Liu et al. 2023).

A pair folder holds safetensors shards ``pairs-00000.safetensors`` (tensors ``noise``, ``image`` (raw ODE
endpoint, ~[-1, 1]), ``label``, ``seed``) and ``manifest.json``: the teacher's weights sha256, sampler, steps,
guidance, seed ranges and the finished shards. Pair i has seed ``seed_start + i``, its noise drawn from
``torch.Generator().manual_seed(seed)`` and label ``seed % 10``, so a pair depends on its seed only. Generation
resumes: finished shards are kept and the first missing one is made next. A student naming a teacher whose
weights differ from the manifest's is refused.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors import safe_open
from safetensors.torch import load_file

from distill_common import checkpoint as ckpt
from distill_common.errors import ConfigError, DataError
from distill_common.generator import resolve_generator_folder
from distill_rf_cifar.config import PairsConfig
from distill_rf_cifar.flow import noise_for_seeds
from distill_rf_cifar.generator import load_generator, weights_sha256
from distill_rf_cifar.training.data import PairData

MANIFEST = "manifest.json"
FORMAT = "distill-rf-pairs/1"
SETTINGS = ("teacher_sha256", "sampler", "steps", "guidance", "rtol", "atol", "seed_start", "shard_size", "storage_dtype",
            "precision")
LEGACY = {"precision": "fp32"}  # what manifests written before a setting existed used


def shard_name(index: int) -> str:
    return f"pairs-{index:05d}.safetensors"


def label_for_seed(seed: int, num_classes: int) -> int:
    return seed % num_classes if num_classes else 0


def read_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise DataError(f"{folder} holds no {MANIFEST}; make pairs first with 'distill rf make-pairs --output-dir {folder}'")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is corrupt ({exc}); delete the folder and make the pairs again") from None


@dataclass
class PairsResult:
    folder: Path
    manifest: dict[str, Any]
    generated_shards: int  # made by this call (0 when everything was already there)


def make_pairs(cfg: PairsConfig, progress: bool = True) -> PairsResult:
    """Generate the missing shards of ``cfg.output_dir`` (see module doc)."""
    out = Path(cfg.output_dir)
    cfg = dataclasses.replace(cfg, teacher=resolve_generator_folder(cfg.teacher))  # a name such as 'reference'
    teacher_sha = weights_sha256(cfg.teacher)
    generator = load_generator(cfg.teacher, device=cfg.device, precision=cfg.precision)
    settings = {"precision": generator.precision, "teacher_sha256": teacher_sha, "sampler": cfg.sampler, "steps": cfg.steps, "guidance": cfg.guidance,
                "rtol": cfg.rtol, "atol": cfg.atol, "seed_start": cfg.seed_start, "shard_size": cfg.shard_size,
                "storage_dtype": cfg.storage_dtype}
    done: dict[int, dict[str, Any]] = {}
    if (out / MANIFEST).is_file():
        old = read_manifest(out)
        diff = [k for k in SETTINGS if old.get(k, LEGACY.get(k)) != settings[k]]
        if diff:
            detail = ", ".join(f"{k} {old.get(k, LEGACY.get(k))!r} -> {settings[k]!r}" for k in diff)
            hint = (f"; to resume them, set the pairs precision to {old.get('precision', LEGACY['precision'])} "
                    "(make-pairs --precision, pipeline --pairs-precision)" if "precision" in diff else "")
            raise ConfigError(f"{out} holds pairs made with other settings ({detail}); pass a new --output-dir "
                              f"or delete that folder{hint}")
        done = {s["index"]: s for s in old["shards"] if (out / s["file"]).is_file()}
    num_shards = -(-cfg.num_pairs // cfg.shard_size)
    manifest = {"format": FORMAT, **settings, "teacher_checkpoint": str(Path(cfg.teacher).resolve()),
                "num_classes": generator.num_classes, "label_rule": "seed % num_classes",
                "noise_rule": "torch.randn((3, 32, 32), generator=torch.Generator().manual_seed(seed))",
                "convention": "x_t = t*x1 + (1-t)*x0; noise = x0 at t=0, image = x1 at t=1",
                "num_pairs": cfg.num_pairs, "shards": []}
    dtype = getattr(torch, cfg.storage_dtype)
    generated = 0
    columns = (TextColumn("[bold]pairs"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("pairs", total=cfg.num_pairs)
        for index in range(num_shards):
            lo = cfg.seed_start + index * cfg.shard_size
            hi = min(lo + cfg.shard_size, cfg.seed_start + cfg.num_pairs)
            if index in done and done[index]["seeds"] == [lo, hi]:
                manifest["shards"].append(done[index])
                bar.advance(task, hi - lo)
                continue
            seeds = list(range(lo, hi))
            noise, images, nfe = [], [], 0
            for i in range(0, len(seeds), cfg.batch_size):
                chunk = seeds[i : i + cfg.batch_size]
                x0 = noise_for_seeds(chunk)  # (b, 3, 32, 32)
                labels = torch.tensor([label_for_seed(s, generator.num_classes) for s in chunk])
                endpoint = generator.sample(x0, labels, cfg.steps, cfg.guidance, cfg.sampler)
                if not bool(torch.isfinite(endpoint).all()):  # never stored as pairs of NaN images
                    raise DataError(f"the teacher {cfg.teacher} yields NaN or infinite images (sampler {cfg.sampler}, "
                                    f"{cfg.steps} steps, guidance {cfg.guidance:g}); check its weights or pass a smaller "
                                    "--guidance")
                images.append(endpoint)
                noise.append(x0)
                nfe = max(nfe, generator.last_nfe)
                bar.advance(task, len(chunk))
            tensors = {"noise": torch.cat(noise).to(dtype), "image": torch.cat(images).to(dtype),
                       "label": torch.tensor([label_for_seed(s, generator.num_classes) for s in seeds]),
                       "seed": torch.tensor(seeds, dtype=torch.long)}
            out.mkdir(parents=True, exist_ok=True)
            ckpt.save_weights(tensors, out / shard_name(index), metadata={"teacher_sha256": teacher_sha})
            manifest["shards"].append({"index": index, "file": shard_name(index), "seeds": [lo, hi], "count": hi - lo,
                                       "nfe": nfe})
            # unfinished: the counts that exist, so a cut-off run never claims pairs it did not make
            ckpt.write_json(out / MANIFEST, {**manifest, "seed_ranges": _ranges(manifest["shards"]),
                                             "num_pairs": sum(sh["count"] for sh in manifest["shards"]),
                                             "target_pairs": cfg.num_pairs, "complete": False})
            generated += 1
    manifest["seed_ranges"] = _ranges(manifest["shards"])
    manifest["complete"] = True
    ckpt.write_json(out / MANIFEST, manifest)  # written last: every shard it lists exists
    return PairsResult(out, manifest, generated)


def _ranges(shards: list[dict[str, Any]]) -> list[list[int]]:
    """Merge the shards' [lo, hi) seed ranges."""
    merged: list[list[int]] = []
    for lo, hi in sorted(s["seeds"] for s in shards):
        if merged and merged[-1][1] == lo:
            merged[-1][1] = hi
        else:
            merged.append([lo, hi])
    return merged


def check_complete(manifest: dict[str, Any], pairs_dir: str | Path) -> None:
    """Refuse the pairs of a cut-off make-pairs (its manifest counts only the shards that exist)."""
    have = sum(int(sh.get("count", 0)) for sh in manifest.get("shards", []))
    if manifest.get("complete") is False or have != manifest.get("num_pairs", have):
        target = manifest.get("target_pairs", manifest.get("num_pairs"))
        raise DataError(f"the pairs in {pairs_dir} are unfinished ({have} of {target} made; make-pairs was cut off); "
                        f"rerun 'distill rf make-pairs --output-dir {pairs_dir}' to finish them (it resumes)")


def check_teacher(pairs_dir: str | Path, teacher: str | Path) -> dict[str, Any]:
    """Refuse unfinished pairs and pairs made by another teacher than ``teacher`` (by weights sha256); returns the
    manifest."""
    manifest = read_manifest(pairs_dir)
    check_complete(manifest, pairs_dir)
    sha = weights_sha256(teacher)
    if manifest.get("teacher_sha256") != sha:
        raise ConfigError(
            f"pairs in {pairs_dir} were made by teacher {str(manifest.get('teacher_sha256'))[:12]} "
            f"({manifest.get('teacher_checkpoint')}) but the config names {teacher} ({sha[:12]}); "
            "pass the teacher that made them or make new pairs with this teacher"
        )
    return manifest


def load_pairs(pairs_dir: str | Path, teacher: str | Path | None = None) -> PairData:
    """All finished shards as one :class:`PairData` (checked against ``teacher`` when given)."""
    manifest = check_teacher(pairs_dir, teacher) if teacher is not None else read_manifest(pairs_dir)
    check_complete(manifest, pairs_dir)
    want = manifest.get("teacher_sha256")
    noise, images, labels = [], [], []
    for shard in manifest["shards"]:
        path = Path(pairs_dir) / shard["file"]
        if not path.is_file():
            raise DataError(f"pair shard {path} is missing; rerun 'distill rf make-pairs' to regenerate it")
        try:
            with safe_open(str(path), framework="pt") as handle:  # the shard's own record of its teacher
                made_by = (handle.metadata() or {}).get("teacher_sha256")
        except Exception as exc:
            raise DataError(f"pair shard {path} is unreadable ({exc}); delete it and rerun 'distill rf make-pairs'") from None
        if made_by != want:
            raise DataError(
                f"pair shard {path} was made by teacher {str(made_by)[:12]} but {Path(pairs_dir) / MANIFEST} "
                f"{'and the teacher in use name' if teacher is not None else 'names'} {str(want)[:12]}; the shards "
                "and the manifest come from different teachers: make the pairs again with 'distill rf make-pairs'"
            )
        tensors = load_file(str(path))
        if tensors["noise"].shape[0] != shard.get("count", tensors["noise"].shape[0]):
            raise DataError(f"pair shard {path} holds {tensors['noise'].shape[0]} pairs, its manifest says "
                            f"{shard['count']}; delete it and rerun 'distill rf make-pairs'")
        noise.append(tensors["noise"])
        images.append(tensors["image"])
        labels.append(tensors["label"])
    if not noise:
        raise DataError(f"{pairs_dir} holds no finished pair shards; run 'distill rf make-pairs' first")
    return PairData(torch.cat(noise), torch.cat(images), torch.cat(labels))
