"""Ship rf_cifar's reference teacher: export a trained teacher as package data, measure it, write its model card.

    python tools/reference_teacher.py export runs/rf_cifar/reference-teacher --command "distill rf train-teacher ..."
    python tools/reference_teacher.py sweep  --num-images 1000            # pick the sampler / steps / guidance
    python tools/reference_teacher.py card   --num-images 10000 --reference-n 10000 --configs euler:32:2.0 ...

``export`` copies the run's exported EMA weights (``generator/model.safetensors``) into
``packages/rf_cifar/src/distill_rf_cifar/reference_teacher/`` in fp16 storage, with ``model_config.json``, a
``generator.json`` whose defaults are the measured best setting, and ``training.json`` (command, commit, steps,
wall time, hardware, data). ``sweep`` scores a grid of (sampler, steps, guidance) on a small protocol;
``card`` scores the chosen settings on the long protocol (and the fp32 weights against the fp16 ones), each FID
with its 95% bootstrap interval (distill_eval.intervals), and writes ``MODEL_CARD.md`` with the weights' sha256.
Results are kept in ``runs/rf_cifar/reference-card/*.json``, keyed by the scored weights' sha256, so a cut-off run
resumes and a re-shipped teacher is never scored from its predecessor's results.

A warm-started teacher (``distill rf train-teacher --init reference``) continues the shipped one: ``export`` keeps the
earlier training stages and the FID-against-images curve in ``training.json`` and adds the new stage and the images
seen; ``card --require-improvement`` appends the new weights' best FID to the curve and refuses (exit 1, nothing
written) unless it improves beyond the interval of the previous point on the same protocol (no previous point, or
one on another protocol, is refused too), so that only a measured gain re-ships:

    python tools/reference_teacher.py export ~/distill-work/cifar-teacher-warm --command "..." --wall-time-s 5400
    python tools/reference_teacher.py card --num-images 10000 --configs heun:8:2 euler:16:2 --require-improvement
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import subprocess
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress

from distill_common import checkpoint as ckpt
from distill_rf_cifar.generator import (
    MODEL_CONFIG_FILE,
    MODEL_FILE,
    REFERENCE_TEACHER,
    RFGenerator,
    load_model,
)

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "runs" / "rf_cifar" / "reference-card"
console = Console()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _training_record(folder: Path) -> dict | None:
    path = folder / "training.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _stage_images(stage: dict) -> int:
    return int(stage["steps"]) * int(stage.get("batch_size", 64))


def _with_history(training: dict, previous: dict | None, manifest: dict) -> dict:
    """A warm-started run's record: the earlier stages (from the shipped ``training.json``), this one, the images
    seen over all of them, and the FID-against-images curve measured so far (``card`` appends to it)."""
    stages = [] if previous is None else previous.get("stages") or [
        {k: previous.get(k) for k in ("command", "commit", "steps", "wall_time_s", "hardware", "precision", "run_id")}
        | {"batch_size": previous.get("batch_size", 64)}]
    run_id = training.get("run_id")
    reexport = bool(stages) and run_id is not None and stages[-1].get("run_id") == run_id  # the same run, again
    if (previous is not None and not reexport and manifest.get("init_sha256")
            and previous.get("sha256") not in (None, manifest["init_sha256"])):
        raise SystemExit("error: the run was warm-started from other weights than the shipped ones; pass --output to "
                         "export it elsewhere")
    this = {k: training[k] for k in ("command", "commit", "steps", "wall_time_s", "hardware", "precision", "run_id",
                                      "batch_size")}
    stages = [*(stages[:-1] if reexport else stages), this]  # a re-export replaces its own stage
    return {**training, "stages": stages, "images_seen": sum(_stage_images(st) for st in stages),
            "fid_curve": [] if previous is None else list(previous.get("fid_curve", []))}


def export(args: argparse.Namespace) -> None:
    """Run folder -> package data (fp16 weights unless --fp32)."""
    run = Path(args.run_dir)
    gen = run / "generator"
    stage = json.loads((run / "stage.json").read_text())
    manifest = json.loads((gen / "generator.json").read_text())
    model = load_model(gen)
    state = {k: (v.half() if v.is_floating_point() and not args.fp32 else v) for k, v in model.state_dict().items()}
    out = Path(args.output or REFERENCE_TEACHER)
    previous = _training_record(out) if manifest.get("init") else None  # a warm start continues the shipped history
    out.mkdir(parents=True, exist_ok=True)
    ckpt.save_weights(state, out / MODEL_FILE)
    (out / MODEL_CONFIG_FILE).write_text((gen / MODEL_CONFIG_FILE).read_text())
    sampler, steps, guidance = args.default.split(":")
    keep = {k: v for k, v in manifest.items() if k not in ("default_steps", "default_guidance", "sampler")}
    (out / "generator.json").write_text(json.dumps({**keep, "role": "teacher", "name": "reference",
                                                    "sampler": sampler, "default_steps": int(steps),
                                                    "default_guidance": float(guidance),
                                                    "storage_dtype": "float32" if args.fp32 else "float16"}, indent=2))
    steps = stage.get("info", {}).get("steps") or manifest.get("train_steps")
    training = {"command": args.command, "commit": args.commit or git_commit(), "steps": steps,
                "wall_time_s": args.wall_time_s, "hardware": f"{cpu_name()}, {args.threads} thread(s), no GPU",
                "data": "CIFAR-10 train, 50,000 images (the shared WebDataset shards, JPEG q~75 re-encodings), "
                        "random horizontal flips", "precision": args.precision,
                "parameters": manifest.get("parameters"), "run_id": stage.get("run_id"),
                "batch_size": manifest.get("train_batch_size", 64)}
    training = _with_history(training, previous, manifest)
    ckpt.write_json(out / "training.json", training)
    shipped_manifest = json.loads((out / "generator.json").read_text())
    if shipped_manifest.get("images_seen") is None:  # a warm start from the shipped weights carries it on from here
        ckpt.write_json(out / "generator.json", {**shipped_manifest, "images_seen": training["images_seen"]})
    # A provisional card naming the new weights' sha256 (the loader checks shipped weights against it) until
    # ``card`` measures them and writes the full one.
    digest = sha256(out / MODEL_FILE)
    (out / "MODEL_CARD.md").write_text(f"# Model card: rf_cifar reference teacher\n\n- sha256: `{digest}`\n\n"
                                       "Evaluation pending: `python tools/reference_teacher.py card`.\n")
    console.print(f"exported {out} ({(out / MODEL_FILE).stat().st_size / 1e6:.2f} MB, sha256 {digest})")


def _from_evaluation(gen: RFGenerator, sampler: str, steps: int, guidance: float, n: int, reference, extractor,
                     key: str, folder: str | None) -> dict | None:
    """The same setting already scored by ``distill rf evaluate --output-dir folder`` on the same protocol (its
    ``images/teacher_s{steps}/result.json``; Euler, at the guidance its report row says), or None."""
    if not folder or sampler != "euler":
        return None
    side_path = Path(folder) / "images" / f"teacher_s{steps}" / "result.json"
    report = Path(folder) / "fid_vs_nfe.json"
    if not side_path.is_file() or not report.is_file():
        return None
    rows = json.loads(report.read_text())
    rows = rows.get("rows", []) if isinstance(rows, dict) else rows
    row = next((r for r in rows if r.get("key") == f"teacher_s{steps}"), None)
    if row is None or abs(float(row["guidance"]) - guidance) > 1e-9:  # the guidance the evaluation sampled with
        return None
    side = json.loads(side_path.read_text())
    want = {**reference.protocol(n).as_dict(), "feature_precision": extractor.precision}
    if side.get("protocol") != want or side.get("sample_precision", "fp32") != gen.precision:
        return None
    return {"key": key, "sampler": sampler, "steps": steps, "guidance": guidance, "nfe": side["nfe"],
            "sample_precision": gen.precision, "fid": side["fid"], "fid_low": side.get("fid_ci95_low"),
            "fid_high": side.get("fid_ci95_high"), "kid": side["kid"], "kid_std": side["kid_std"],
            "ms_per_image": side["ms_per_image"], "protocol": side["protocol"], "source": str(side_path)}


def _score(gen: RFGenerator, sampler: str, steps: int, guidance: float, n: int, reference, extractor, key: str,
           batch: int, resamples: int, from_eval: str | None = None) -> dict:
    """FID with its interval for one setting; cached in WORK/<key>.json (or taken from a ``distill rf evaluate``
    folder that scored the same setting on the same protocol, see :func:`_from_evaluation`)."""
    from distill_eval.fid import score_images

    cache = WORK / f"{key}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    imported = _from_evaluation(gen, sampler, steps, guidance, n, reference, extractor, key, from_eval)
    if imported is not None:
        WORK.mkdir(parents=True, exist_ok=True)
        ckpt.write_json(cache, imported)
        console.print(f"{key:>28}: FID {imported['fid']:.2f} (from {from_eval})", highlight=False)
        return imported
    seeds = list(range(n))
    conditions = [s % 10 for s in seeds]
    images, nfe, seconds = [], 0, 0.0
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(f"generate {key}", total=n)
        for i in range(0, n, batch):
            start = time.perf_counter()
            images.append((gen.generate(conditions[i:i + batch], steps, seeds[i:i + batch], guidance, sampler=sampler)
                           * 255).round().to(torch.uint8))
            seconds += time.perf_counter() - start
            nfe = gen.last_nfe
            bar.update(task, advance=len(images[-1]))
    res = score_images(torch.cat(images), extractor, reference, batch_size=100, progress=False,
                       bootstrap_resamples=resamples)
    out = {"key": key, "sampler": sampler, "steps": steps, "guidance": guidance, "nfe": nfe, "fid": res.fid,
           "sample_precision": gen.precision,
           "fid_low": res.fid_interval.low if res.fid_interval else None,
           "fid_high": res.fid_interval.high if res.fid_interval else None,
           "kid": res.kid_mean, "kid_std": res.kid_std, "ms_per_image": 1000 * seconds / n,
           "protocol": res.protocol.as_dict()}
    WORK.mkdir(parents=True, exist_ok=True)
    ckpt.write_json(cache, out)
    interval = f" [{out['fid_low']:.2f}, {out['fid_high']:.2f}]" if res.fid_interval else ""
    console.print(f"{key:>28}: FID {out['fid']:.2f}{interval}  NFE {nfe}", highlight=False)
    return out


def _setup(args: argparse.Namespace):
    from distill_eval.inception import InceptionFeatureExtractor
    from distill_eval.reference_stats import reference_stats

    extractor = InceptionFeatureExtractor(precision=args.feature_precision)
    reference = reference_stats("cifar10-train", extractor, n=args.reference_n, resolution=32,
                                data_root=args.data_root, progress=True)
    return extractor, reference


def _settings(specs: list[str]) -> list[tuple[str, int, float]]:
    from distill_rf_cifar.samplers import SAMPLERS

    out = []
    for spec in specs:
        try:
            sampler, steps, guidance = spec.split(":")
            setting = (sampler, int(steps), float(guidance))
        except ValueError:
            raise SystemExit(f"error: --configs {spec!r} is not SAMPLER:STEPS:GUIDANCE (e.g. euler:16:2)") from None
        if sampler not in SAMPLERS:
            raise SystemExit(f"error: unknown sampler {sampler!r} in --configs {spec!r}; choose from {', '.join(SAMPLERS)}")
        out.append(setting)
    return out


def _curve_with(training: dict, best: dict, weights_sha: str) -> tuple[dict, list[dict], bool | None]:
    """``training`` with ``best`` as the curve point of these weights (replacing an earlier point of the same weights),
    the curve, and whether it improves beyond the previous point's interval (None when there is none to compare on
    the same protocol): its upper bound lies below the previous lower bound."""
    stages = training.get("stages") or [training]
    seen = training.get("images_seen") or sum(_stage_images(st) for st in stages)
    point = {"images_seen": seen, "setting": f"{best['sampler']}:{best['steps']}:{best['guidance']:g}",
             "fid": best["fid"], "fid_low": best["fid_low"], "fid_high": best["fid_high"], "sha256": weights_sha,
             "protocol": best["protocol"]}
    curve = [c for c in training.get("fid_curve", []) if c.get("sha256") != weights_sha] + [point]
    previous = curve[-2] if len(curve) > 1 else None
    improved = None
    if previous is not None and previous.get("protocol") == point["protocol"]:
        improved = point["fid_high"] < previous["fid_low"]
    return {**training, "sha256": weights_sha, "fid_curve": curve}, curve, improved


def _refusal(curve: list[dict], improved: bool | None, folder: Path) -> str | None:
    """The one-line error of ``card --require-improvement`` (None when the new point ships): the new interval must lie
    below the previous point's on the same protocol; no previous point, or one on another protocol, is no evidence."""
    if improved:
        return None
    restore = f"not shipped (restore the weights: git checkout -- {folder})"
    if len(curve) < 2:
        return (f"error: the FID curve has no earlier point to improve on; {restore}, or drop --require-improvement "
                "for a first ship")
    prev, new = curve[-2], curve[-1]
    if improved is None:
        fields = sorted(k for k in set(prev.get("protocol") or {}) | set(new.get("protocol") or {})
                        if (prev.get("protocol") or {}).get(k) != (new.get("protocol") or {}).get(k))
        return (f"error: the previous FID {prev['fid']:.2f} was measured on another protocol (differing: "
                f"{', '.join(fields) or 'protocol missing'}); score on its protocol (--num-images, --reference-n, "
                f"feature precision) to compare; {restore}")
    return (f"error: FID {new['fid']:.2f} [{new['fid_low']:.2f}, {new['fid_high']:.2f}] does not improve beyond the "
            f"interval of the shipped {prev['fid']:.2f} [{prev['fid_low']:.2f}, {prev['fid_high']:.2f}]; {restore}")


def _weights_tag(folder: Path) -> str:
    return sha256(folder / MODEL_FILE)[:10]


def sweep(args: argparse.Namespace) -> list[dict]:
    settings = _settings(args.configs)  # a malformed setting fails before minutes of reference statistics
    extractor, reference = _setup(args)
    gen = RFGenerator(load_model(args.teacher), batch_size=args.batch_size, precision=args.sample_precision)
    prec = "" if gen.precision == "fp32" else f"_{gen.precision}"
    weights = _weights_tag(Path(args.teacher))  # the cache belongs to these weights, not to whatever ships later
    rows = [_score(gen, s, k, w, args.num_images, reference, extractor,
                   f"{args.tag}{weights}_n{args.num_images}_{s}{k}_w{w:g}{prec}_{extractor.precision}",
                   args.batch_size, args.resamples, getattr(args, "from_eval", None)) for s, k, w in settings]
    best = min(rows, key=lambda r: r["fid"])
    console.print(f"best: {best['sampler']}:{best['steps']}:{best['guidance']:g} FID {best['fid']:.2f}")
    return rows


def card(args: argparse.Namespace) -> None:
    """The long protocol on the shipped weights, the fp32-vs-fp16 storage check, and MODEL_CARD.md."""
    if args.from_eval and not (Path(args.from_eval) / "fid_vs_nfe.json").is_file():
        raise SystemExit(f"error: --from-eval {args.from_eval} holds no fid_vs_nfe.json; pass the --output-dir of a "
                         "finished 'distill rf evaluate' run, or leave --from-eval out to score every setting here")
    folder = REFERENCE_TEACHER
    training = json.loads((folder / "training.json").read_text())
    if args.require_improvement and not training.get("fid_curve"):  # known before minutes of scoring
        raise SystemExit(_refusal([], None, folder))
    rows = sweep(args)
    manifest = json.loads((folder / "generator.json").read_text())
    storage = []
    if args.fp32_run:  # same setting, fp32 weights of the run vs the shipped fp16 ones
        extractor, reference = _setup(args)
        s, k, w = manifest["sampler"], manifest["default_steps"], manifest["default_guidance"]
        for label, source in (("fp32 weights (run)", Path(args.fp32_run) / "generator"), ("fp16 weights (shipped)", folder)):
            gen = RFGenerator(load_model(source), batch_size=args.batch_size, precision=args.sample_precision)
            tag = "fp32" if "fp32" in label else "fp16"
            storage.append((label, _score(gen, s, k, w, args.storage_images, reference, extractor,
                                          f"storage_{tag}_{_weights_tag(folder)}_n{args.storage_images}_{s}{k}_w{w:g}_{gen.precision}", args.batch_size,
                                          args.resamples)))
    sweep_rows = [json.loads(p.read_text()) for p in sorted(WORK.glob(f"{args.sweep_tag}{_weights_tag(folder)}_n*.json"))]
    protocol = rows[0]["protocol"]
    best = min(rows, key=lambda r: r["fid"])
    training, curve, improved = _curve_with(training, best, sha256(folder / MODEL_FILE))
    refusal = _refusal(curve, improved, folder) if args.require_improvement else None
    if refusal:
        raise SystemExit(refusal)
    ckpt.write_json(folder / "training.json", training)
    stages = training.get("stages") or [training]
    lines = [
        "# Model card: rf_cifar reference teacher",
        "",
        "A class-conditional rectified-flow teacher for CIFAR-10 (32x32), trained by this project with its own",
        "`distill rf train-teacher` on two CPU cores, and shipped with `distill-rf-cifar` so that every student",
        "recipe, the main job (`make demo`) and the method comparison start from the same, reasonable teacher.",
        "Load it anywhere a teacher or generator is accepted as `--teacher reference` (or `rf_cifar:reference`).",
        "",
        "## Weights",
        "",
        f"- file: `{MODEL_FILE}` ({(folder / MODEL_FILE).stat().st_size / 1e6:.2f} MB, "
        f"{manifest.get('storage_dtype', 'float32')} storage of the EMA weights; loaded as fp32)",
        f"- sha256: `{sha256(folder / MODEL_FILE)}`",
        f"- parameters: {manifest.get('parameters'):,}; architecture: `{MODEL_CONFIG_FILE}` (diffusers UNet2DModel "
        "with a class embedding, label 10 = the null class for classifier-free guidance)",
        "- convention: x_t = t·x1 + (1 − t)·x0, x0 ~ N(0, I) noise, x1 data in [−1, 1]; the network predicts the "
        "velocity x1 − x0; sample by integrating t: 0 → 1",
        f"- defaults in `generator.json`: sampler {manifest['sampler']}, {manifest['default_steps']} steps, "
        f"guidance {manifest['default_guidance']:g}",
        "",
        "## Training",
        "",
        f"- images seen: {training.get('images_seen') or sum(_stage_images(st) for st in stages):,} "
        f"over {len(stages)} stage(s), each resuming the one before from its shipped weights",
        f"- data: {training['data']}",
        *[line for i, st in enumerate(stages, 1) for line in (
            f"- stage {i}: `{st['command']}`",
            f"  - commit `{st['commit']}`; {st['steps']} steps of batch {st.get('batch_size', 64)}; wall time "
            f"{st['wall_time_s'] / 3600:.2f} h; {st['hardware']}; {st['precision']}")],
        "",
        "## FID against images seen",
        "",
        "Each point is the best setting of the table below at the time it shipped (10,000 vs 10,000 protocol).",
        "",
        "| images seen | best setting | FID [95% interval] | weights sha256 |",
        "|---:|---|---|---|",
        *[f"| {c['images_seen']:,} | {c['setting']} | {c['fid']:.2f} [{c['fid_low']:.2f}, {c['fid_high']:.2f}] | "
          f"`{c['sha256'][:12]}` |" for c in curve],
        "",
        "## Evaluation",
        "",
        f"Protocol: FID against the statistics of {protocol['reference_n']:,} images of `{protocol['reference_set']}`"
        f" (the shared JPEG re-encodings: **not** comparable with published CIFAR-10 FIDs), {protocol['generated_n']:,}"
        f" generated images (seeds 0..N−1, class = seed mod 10), {protocol.get('resolution', 32)} px, resize "
        f"{protocol.get('resize', 'none')}, Inception features in {protocol.get('feature_precision', 'fp32')} "
        f"(extractor {protocol.get('extractor_hash', '?')}). Intervals: 95% normal bootstrap interval over the generated "
        "images (FID ± 1.96 bootstrap SE, reference statistics fixed). NFE counts network evaluations per image (a CFG step is 2). "
        "Generation precision (the network's forwards under autocast, the ODE state in fp32) is given per row.",
        "",
        "| sampler | steps | guidance | NFE | generation | FID [95% interval] | KID ×1e3 (± std over subsets) |",
        "|---|---:|---:|---:|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: r["fid"]):
        bold = "**" if r is best else ""
        lines.append(f"| {r['sampler']} | {r['steps']} | {r['guidance']:g} | {r['nfe']} | {r.get('sample_precision', 'fp32')} | {bold}{r['fid']:.2f}{bold} "
                     f"[{r['fid_low']:.2f}, {r['fid_high']:.2f}] | {1e3 * r['kid']:.2f} ± {1e3 * r['kid_std']:.2f} |")
    if sweep_rows:
        sp = sweep_rows[0]["protocol"]
        lines += ["", f"Sweep rows on a small protocol ({sp['generated_n']:,} generated vs {sp['reference_n']:,} reference "
                  f"images, same method otherwise; small-N bias makes them far higher than the rows above):", "",
                  "| sampler | steps | guidance | NFE | generation | FID [95% interval] |", "|---|---:|---:|---:|---|---|"]
        for r in sorted(sweep_rows, key=lambda r: (r["sampler"], r["steps"], r["guidance"])):
            lines.append(f"| {r['sampler']} | {r['steps']} | {r['guidance']:g} | {r['nfe']} | {r.get('sample_precision', 'fp32')} | {r['fid']:.2f} "
                         f"[{r['fid_low']:.2f}, {r['fid_high']:.2f}] |")
    if storage:
        lines += ["", "fp16 storage check (same setting and seeds):", "", "| weights | N | FID [95% interval] |",
                  "|---|---:|---|"]
        for label, r in storage:
            lines.append(f"| {label} | {r['protocol']['generated_n']:,} | {r['fid']:.2f} [{r['fid_low']:.2f}, "
                         f"{r['fid_high']:.2f}] |")
    for paragraph in args.note:
        lines += ["", paragraph]
    lines += ["", "Reproduce: `python tools/reference_teacher.py card` (see its --help); training: the command above.",
              ""]
    (folder / "MODEL_CARD.md").write_text("\n".join(lines))
    console.print(f"wrote {folder / 'MODEL_CARD.md'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export")
    ex.add_argument("run_dir")
    ex.add_argument("--output", default=None)
    ex.add_argument("--command", required=True)
    ex.add_argument("--commit", default=None)
    ex.add_argument("--wall-time-s", type=float, required=True)
    ex.add_argument("--threads", default="1-2")
    ex.add_argument("--precision", default="bf16 autocast")
    ex.add_argument("--default", default="euler:32:2.0", help="SAMPLER:STEPS:GUIDANCE written as the defaults")
    ex.add_argument("--fp32", action="store_true")
    for name in ("sweep", "card"):
        p = sub.add_parser(name)
        p.add_argument("--teacher", default=str(REFERENCE_TEACHER))
        p.add_argument("--configs", nargs="+", default=["euler:16:1", "euler:16:1.5", "euler:16:2", "euler:16:3",
                                                        "heun:8:2", "euler:32:2"])
        p.add_argument("--num-images", type=int, default=1000)
        p.add_argument("--reference-n", type=int, default=10000)
        p.add_argument("--feature-precision", default="bf16", choices=("fp32", "bf16", "fp32+compile", "bf16+compile"))
        p.add_argument("--resamples", type=int, default=200)
        p.add_argument("--batch-size", type=int, default=64, help="generation batch (bf16 autocast is fastest at 64 here)")
        p.add_argument("--sample-precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                       help="precision of the teacher's forwards (auto: bf16 on CPUs with bf16 units, fp16 on CUDA)")
        p.add_argument("--data-root", default=None)
        p.add_argument("--tag", default="sweep_" if name == "sweep" else "card_")
        if name == "card":
            p.add_argument("--sweep-tag", default="sweep_")
            p.add_argument("--fp32-run", default=None, help="the training run folder, to compare fp32 vs fp16 storage")
            p.add_argument("--storage-images", type=int, default=2000)
            p.add_argument("--note", nargs="*", default=[], help="paragraphs added after the results")
            p.add_argument("--require-improvement", action="store_true",
                           help="exit 1 (writing nothing) unless the best FID improves beyond the interval of the "
                           "previous curve point on the same protocol: the rule for re-shipping a warm-started teacher")
            p.add_argument("--from-eval", default=None, help="a 'distill rf evaluate' output folder whose teacher rows "
                           "on the same protocol are used instead of scoring them again")
    args = ap.parse_args()
    from distill_common.errors import DistillError

    try:
        {"export": export, "sweep": sweep, "card": card}[args.cmd](args)
    except DistillError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
