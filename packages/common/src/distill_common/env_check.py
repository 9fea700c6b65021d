"""``distill env``: a self-check of this machine, like ``accelerate env``.

Each line names one thing (versions, device, bf16, data root, tracking store, caches, output folder) and ends in
``OK``, ``note`` (works, but read the text) or ``FIX`` with what to do. Nothing is created, downloaded or
written: the tracking store is looked at, never opened.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
import textwrap
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

OK, NOTE, FIX = "OK", "note", "FIX"
THIRD_PARTY = ("torch", "torchvision", "mlflow", "diffusers", "transformers", "accelerate", "typer", "rich")


@dataclass
class Check:
    name: str
    value: str
    status: str = OK
    fix: str = ""


def _version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _versions() -> list[Check]:
    from distill_common.versions import package_versions

    out = [Check("python", f"{platform.python_version()} ({sys.executable})",
                 OK if sys.version_info >= (3, 11) else FIX, "" if sys.version_info >= (3, 11) else
                 "use Python 3.11 or newer (make setup builds .venv with python3)")]
    ours = package_versions()
    out.append(Check("distill packages", ", ".join(f"{k.removeprefix('distill-')} {v}" for k, v in ours.items())))
    missing = [d for d in THIRD_PARTY if _version(d) is None]
    out.append(Check("libraries", ", ".join(f"{d} {_version(d)}" for d in THIRD_PARTY if _version(d)),
                     FIX if missing else OK, f"missing {', '.join(missing)}: run make setup" if missing else ""))
    on_path = shutil.which("distill")
    venv_bin = Path(sys.executable).parent
    if on_path is None or Path(on_path).parent != venv_bin:
        out.append(Check("commands on PATH", f"distill is {on_path or 'not on PATH'}", NOTE,
                         f"source {venv_bin.parent}/bin/activate puts distill and mlflow on PATH"))
    else:
        out.append(Check("commands on PATH", f"distill and mlflow from {venv_bin}"))
    return out


def _device() -> list[Check]:
    import torch

    from distill_common.runtime import cpu_has_fast_bf16

    threads = torch.get_num_threads()
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        dev = Check("device", f"cuda: {names} (torch CUDA {torch.version.cuda})")
        bf16 = torch.cuda.is_bf16_supported()
        prec = Check("bf16", "supported on the GPU (--precision auto picks fp16 on CUDA)" if bf16 else
                     "not supported on this GPU", OK if bf16 else NOTE, "" if bf16 else "trainers use fp16 or fp32")
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        dev = Check("device", f"mps (Apple GPU), {threads} CPU threads")
        prec = Check("bf16", "fp32 on mps", NOTE, "")
    else:
        dev = Check("device", f"cpu only, {threads} torch threads on {os.cpu_count()} cores ({platform.processor() or platform.machine()})", NOTE,
                    "no GPU: the demo takes ~9 min on 2 cores; larger presets want a GPU")
        fast = cpu_has_fast_bf16()
        forced = os.environ.get("DISTILL_CPU_BF16")
        prec = Check("bf16", ("native bf16 units: --precision auto uses bf16 autocast" if fast else
                              "no native bf16 units: --precision auto uses fp32")
                     + (f" (DISTILL_CPU_BF16={forced})" if forced else ""), OK if fast else NOTE,
                     "" if fast else "runs are about 2-3x slower than on a CPU with AVX512-BF16 or AMX")
    return [dev, prec]


def _data_root() -> list[Check]:
    from distill_common.data.root import DATA_ROOT_ENV, resolve_data_root
    from distill_common.errors import DistillError

    try:
        root = resolve_data_root(None)
    except DistillError as exc:
        if os.environ.get(DATA_ROOT_ENV):  # configured, but wrong: every data-reading command would stop
            return [Check("data root", os.environ[DATA_ROOT_ENV], FIX, str(exc))]
        return [Check("data root", "none", NOTE, f"{exc}; without one, CIFAR-10 is downloaded once into the cache")]
    source = f"${DATA_ROOT_ENV}" if os.environ.get(DATA_ROOT_ENV) else "../shared/data next to the repository"
    cifar = root / "cifar10"
    if cifar.is_dir() and (any(cifar.glob("train-*.tar")) or (cifar / "cifar-10-batches-py").is_dir()):
        out = [Check("data root", f"{root} (from {source}); cifar10/ found")]
    else:
        out = [Check("data root", f"{root} (from {source})", FIX,
                     f"no cifar10/ in it (train-*.tar shards or cifar-10-batches-py/); put it there or point "
                     f"{DATA_ROOT_ENV} at the folder that holds it")]
    coco = root / "coco2017"
    out.append(Check("COCO 2017", f"{coco} found" if coco.is_dir() else f"not in {root}", OK if coco.is_dir() else NOTE,
                     "" if coco.is_dir() else "only distill prune and flash train/eval need it"))
    return out


def _tracking() -> list[Check]:
    from distill_common import tracking
    from distill_common.errors import DistillError

    uri = tracking.tracking_uri()
    where = "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "default: ./mlflow.db"
    if tracking.is_remote(uri):
        try:
            tracking.check_reachable(uri, timeout=3.0)
            return [Check("tracking store", f"{uri} ({where}), server answers")]
        except DistillError as exc:
            return [Check("tracking store", f"{uri} ({where})", FIX, str(exc))]
    db = uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else None
    state = ("exists" if Path(db).exists() else "created by the first tracked run") if db else "other store"
    try:
        tracking.check_store_writable(uri)
        return [Check("tracking store", f"{uri} ({where}; {state})")]
    except DistillError as exc:
        return [Check("tracking store", f"{uri} ({where})", FIX, str(exc))]


def _caches() -> list[Check]:
    from distill_common.models.tokenizer import distill_cache_dir

    out = []
    cache = distill_cache_dir()
    existing = next((p for p in (cache, *cache.parents) if p.exists()), None)
    if existing is not None and os.access(existing, os.W_OK):
        inception = (cache / "inception").is_dir() and any((cache / "inception").iterdir())
        stats = len(list((cache / "reference_stats").glob("*"))) if (cache / "reference_stats").is_dir() else 0
        out.append(Check("distill cache", f"{cache} (" + ("Inception weights cached" if inception else
                                                          "no Inception weights yet: the first evaluation converts them")
                         + f", {stats} reference statistics)"))
    else:
        out.append(Check("distill cache", str(cache), FIX, "not writable; set DISTILL_CACHE_DIR to a writable folder"))
    hf = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")).expanduser()
    offline = os.environ.get("HF_HUB_OFFLINE", "") in ("1", "true", "yes")
    out.append(Check("Hugging Face cache", f"{hf}{' (HF_HUB_OFFLINE=1: no downloads)' if offline else ''}",
                     OK, ""))
    return out


def _output() -> list[Check]:
    cwd = Path.cwd()
    if os.access(cwd, os.W_OK):
        return [Check("working folder", f"{cwd} (runs/ and mlflow.db go here) is writable")]
    return [Check("working folder", str(cwd), FIX, "not writable: run distill from a writable folder")]


def collect() -> list[Check]:
    """Every check, in the order printed; a check that fails to run becomes a FIX line, never an exception."""
    checks: list[Check] = []
    for part in (_versions, _device, _data_root, _tracking, _caches, _output):
        try:
            checks += part()
        except Exception as exc:  # a self-check must report, not crash
            checks.append(Check(part.__name__.strip("_"), "check failed", FIX, f"{type(exc).__name__}: {exc}"))
    return checks


def report(console=None) -> int:
    """Print the checks; exit status 1 when any needs fixing."""
    from rich.console import Console
    from rich.markup import escape

    console = console or Console()
    checks = collect()
    width = max(len(c.name) for c in checks)
    colour = {OK: "green", NOTE: "yellow", FIX: "bold red"}
    indent = " " * (width + 7)
    text_width = max(console.width - len(indent), 30)
    for c in checks:  # wrapped under their own column, so the status column stays readable at 80 columns
        lines = textwrap.wrap(c.value, text_width, break_on_hyphens=False) or [""]
        lines += textwrap.wrap(f"→ {c.fix}", text_width, break_on_hyphens=False) if c.fix else []
        console.print(f"[{colour[c.status]}]{c.status:>4}[/] {c.name:<{width}}  {escape(lines[0])}", highlight=False)
        for line in lines[1:]:
            console.print(indent + escape(line), highlight=False)
    bad = sum(c.status == FIX for c in checks)
    console.print("everything needed is in place" if not bad else f"{bad} thing(s) to fix (→ lines above)",
                  highlight=False)
    return 1 if bad else 0
