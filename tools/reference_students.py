"""Ship few-step students of rf_cifar's reference teacher as named generators (``reference-one-step``, ...).

    python tools/reference_students.py export runs/rf_cifar/students/four_step --name reference-four-step \
        --command "distill rf distill --recipe progressive ..." --hardware "AMD EPYC, 2 threads" --precision bf16
    distill rf evaluate --teacher reference --students four=rf_cifar:reference-four-step \
        --eval-num-images 10000 --eval-reference-n 10000 --output-dir runs/rf_cifar/ship-four
    python tools/reference_students.py card --name reference-four-step --eval-dir runs/rf_cifar/ship-four --label four

``export`` copies a student's generator folder (``RUN/generator`` or the folder itself) into
``packages/rf_cifar/src/distill_rf_cifar/reference_students/NAME/``: the EMA weights in fp16 storage, its
``model_config.json``, its ``generator.json`` (with ``name`` and the teacher named ``reference`` instead of a local
path) and ``training.json`` (command, commit, recipe, steps, wall time, and the hardware and precision given). It refuses a student distilled from
other weights than the shipped ``reference`` teacher. A provisional card names the weights' sha256, so the loader's
check passes while the student is scored.

``card`` reads a ``distill rf evaluate`` folder that scored the *shipped* folder (its image cache key must be the
shipped generator's fingerprint: weights, sampler, steps, precision and manifest) on a protocol of at least
``--min-images`` generated and reference images, and writes ``MODEL_CARD.md``: command, commit, sha256, FID with its
95% interval, class accuracy with its Wilson interval, NFE and ms per image, beside the teacher's rows of the same
evaluation. Nothing is written when a check fails.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from rich.console import Console

from distill_common import checkpoint as ckpt
from distill_common.errors import DistillError
from distill_common.tracking.run import git_commit
from distill_rf_cifar.generator import (
    MODEL_CONFIG_FILE,
    MODEL_FILE,
    REFERENCE_STUDENTS,
    REFERENCE_TEACHER,
    load_generator,
    load_model,
)

ROOT = Path(__file__).resolve().parents[1]
NAME_RULE = re.compile(r"reference-[a-z0-9][a-z0-9-]*")
TEACHER_NAME = re.compile(r"reference(-v\d+)?")  # the teachers' names, now and later versions
console = Console()


def _check_name(name: str) -> None:
    if not NAME_RULE.fullmatch(name) or TEACHER_NAME.fullmatch(name):
        raise SystemExit(f"error: --name {name!r}: use 'reference-' then lowercase letters, digits and '-' (e.g. "
                         "reference-four-step); reference and reference-vN are the teachers' names")


def _generator_folder(run: Path) -> Path:
    for folder in (run / "generator", run):
        if (folder / "generator.json").is_file() and (folder / MODEL_FILE).is_file():
            return folder
    raise SystemExit(f"error: {run} holds no generator (generator/generator.json + {MODEL_FILE}); pass a finished "
                     "student's run folder or its generator folder")


def export(args: argparse.Namespace, root: Path = REFERENCE_STUDENTS, teacher: Path = REFERENCE_TEACHER) -> Path:
    """Student run folder -> package data (fp16 storage unless --fp32) with a provisional card."""
    _check_name(args.name)
    source = _generator_folder(Path(args.run_dir))
    manifest = json.loads((source / "generator.json").read_text())
    if manifest.get("role") == "teacher":
        raise SystemExit(f"error: {source} is a teacher; ship teachers with tools/reference_teacher.py")
    shipped_teacher = ckpt.file_sha256(teacher / MODEL_FILE)
    if manifest.get("teacher_sha256") != shipped_teacher:
        raise SystemExit(f"error: {source} was distilled from teacher weights {str(manifest.get('teacher_sha256'))[:12]}, "
                         f"not the shipped reference ({shipped_teacher[:12]}); distil it from --teacher reference")
    model = load_model(source)
    state = {k: (v.half() if v.is_floating_point() and not args.fp32 else v) for k, v in model.state_dict().items()}
    stage_file = Path(args.run_dir) / "stage.json"
    stage = json.loads(stage_file.read_text()) if stage_file.is_file() else {}
    wall_time_s = args.wall_time_s if args.wall_time_s is not None else stage.get("info", {}).get("train_seconds")
    if wall_time_s is None:
        raise SystemExit(f"error: {stage_file} records no training time; pass --wall-time-s")
    out = root / args.name
    with ckpt.atomic_dir(out) as tmp:
        ckpt.save_weights(state, tmp / MODEL_FILE)
        (tmp / MODEL_CONFIG_FILE).write_text((source / MODEL_CONFIG_FILE).read_text())
        ckpt.write_json(tmp / "generator.json", {**manifest, "name": args.name, "teacher": "reference",
                                                 "storage_dtype": "float32" if args.fp32 else "float16"})
        ckpt.write_json(tmp / "training.json", {
            "command": args.command, "commit": args.commit or git_commit(ROOT), "recipe": manifest.get("recipe"),
            "steps": manifest.get("train_steps"), "wall_time_s": wall_time_s, "hardware": args.hardware,
            "precision": args.precision,
            "teacher": "reference", "teacher_sha256": shipped_teacher, "run_id": stage.get("run_id"),
            "parameters": manifest.get("parameters")})
        digest = ckpt.file_sha256(tmp / MODEL_FILE)
        (tmp / "MODEL_CARD.md").write_text(f"# Model card: rf_cifar {args.name}\n\n- sha256: `{digest}`\n\n"
                                           "Evaluation pending: `python tools/reference_students.py card`.\n")
    console.print(f"exported {out} ({(out / MODEL_FILE).stat().st_size / 1e6:.2f} MB, sha256 {digest})")
    return out


def _rows(eval_dir: Path) -> list[dict]:
    report = eval_dir / "fid_vs_nfe.json"
    if not report.is_file():
        raise SystemExit(f"error: {eval_dir} holds no fid_vs_nfe.json; pass the --output-dir of a finished "
                         "'distill rf evaluate' run")
    rows = json.loads(report.read_text())
    return rows.get("rows", []) if isinstance(rows, dict) else rows


def _sidecar(eval_dir: Path, key: str) -> dict:
    path = eval_dir / "images" / key / "result.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _fingerprint(folder: Path, precision: str) -> str:
    from distill_eval.benchmark import generator_fingerprint

    return generator_fingerprint(load_generator(folder, device="cpu", precision=precision))


def card(args: argparse.Namespace, root: Path = REFERENCE_STUDENTS, teacher: Path = REFERENCE_TEACHER) -> Path:
    """The shipped student's MODEL_CARD.md from an evaluation of the shipped folder."""
    _check_name(args.name)
    folder = root / args.name
    if not (folder / "training.json").is_file():
        raise SystemExit(f"error: {folder} is not exported; run 'export RUN --name {args.name}' first")
    eval_dir = Path(args.eval_dir)
    rows = _rows(eval_dir)
    mine = [r for r in rows if r.get("model") == args.label]
    if not mine:
        raise SystemExit(f"error: {eval_dir} has no rows for {args.label!r}; models: "
                         f"{', '.join(sorted({str(r.get('model')) for r in rows}))}")
    manifest = json.loads((folder / "generator.json").read_text())
    row = next((r for r in mine if r.get("steps") == manifest["default_steps"]), None)
    if row is None:
        raise SystemExit(f"error: {eval_dir} scored {args.label!r} at steps {sorted(r.get('steps') for r in mine)}, not "
                         f"at its {manifest['default_steps']}; evaluate with --eval-students-at-own-steps")
    side = _sidecar(eval_dir, row["key"])
    key = side.get("cache_key") or {}
    precision = side.get("sample_precision", "fp32")
    shipped = _fingerprint(folder, precision)
    if key.get("weights") != shipped:
        raise SystemExit(f"error: the images of {row['key']} in {eval_dir} were not made by the shipped {args.name} "
                         f"(fingerprint {str(key.get('weights'))[:12]} != {shipped[:12]}); evaluate "
                         f"--students {args.label}=rf_cifar:{args.name} after exporting")
    protocol = side.get("protocol") or {}
    small = {k: protocol.get(k) for k in ("generated_n", "reference_n") if (protocol.get(k) or 0) < args.min_images}
    if small:
        raise SystemExit(f"error: {eval_dir} scored {', '.join(f'{k} {v}' for k, v in small.items())} images, fewer "
                         f"than --min-images {args.min_images}; evaluate with --eval-num-images {args.min_images} "
                         f"--eval-reference-n {args.min_images}")
    if any(side.get(k) is None for k in ("fid_ci95_low", "fid_ci95_high", "class_acc", "class_acc_ci95_low",
                                         "class_acc_ci95_high")):
        raise SystemExit(f"error: {row['key']} in {eval_dir} has no FID interval or class accuracy; evaluate with "
                         "--eval-bootstrap-resamples 100 and --eval-class-accuracy")
    training = json.loads((folder / "training.json").read_text())
    teacher_rows = [(r, _sidecar(eval_dir, r["key"])) for r in rows if r.get("role") == "teacher"]
    reference = _fingerprint(teacher, precision)
    if any((s.get("cache_key") or {}).get("weights") != reference for _, s in teacher_rows):
        raise SystemExit(f"error: the teacher rows of {eval_dir} were not made by the shipped reference teacher; "
                         "evaluate with --teacher reference")
    digest = ckpt.file_sha256(folder / MODEL_FILE)

    def line(label: str, r: dict, s: dict) -> str:
        acc = (f"{100 * s['class_acc']:.1f}% [{100 * s['class_acc_ci95_low']:.1f}, {100 * s['class_acc_ci95_high']:.1f}]"
               if s.get("class_acc") is not None else "-")
        return (f"| {label} | {r.get('sampler', 'euler')} | {r['steps']} | {s.get('nfe', r.get('nfe'))} | "
                f"{s['fid']:.2f} [{s['fid_ci95_low']:.2f}, {s['fid_ci95_high']:.2f}] | {acc} | "
                f"{s.get('ms_per_image', float('nan')):.2f} |")

    lines = [
        f"# Model card: rf_cifar {args.name}",
        "",
        f"A {manifest['default_steps']}-step student of the shipped CIFAR-10 rectified-flow teacher (`reference`), "
        f"distilled by this project with the `{manifest.get('recipe')}` recipe. Load it by name wherever a generator "
        f"is accepted: `distill rf evaluate --students LABEL={args.name}`, `load_generator(\"{args.name}\")`.",
        "",
        "## Weights",
        "",
        f"- file: `{MODEL_FILE}` ({(folder / MODEL_FILE).stat().st_size / 1e6:.2f} MB, "
        f"{manifest.get('storage_dtype', 'float32')} storage; loaded as fp32)",
        f"- sha256: `{digest}`",
        f"- parameters: {manifest.get('parameters'):,}; architecture: `{MODEL_CONFIG_FILE}`",
        f"- defaults in `generator.json`: sampler {manifest.get('sampler', 'euler')}, steps {manifest['default_steps']}, "
        f"guidance {manifest.get('default_guidance', 1.0):g}",
        f"- teacher: `reference`, weights sha256 `{training['teacher_sha256']}`",
        "",
        "## Training",
        "",
        f"- command: `{training['command']}`",
        f"- commit `{training['commit']}`; recipe {training.get('recipe')}; {training.get('steps')} steps; wall time "
        f"{(training.get('wall_time_s') or 0) / 3600:.2f} h; {training['hardware']}; {training['precision']}",
        "",
        "## Evaluation",
        "",
        f"`distill rf evaluate`: {protocol['generated_n']:,} generated images (seeds 0..N−1, class = seed mod 10) "
        f"against the statistics of {protocol['reference_n']:,} images of `{protocol.get('reference_set')}` (the "
        "shared JPEG re-encodings: **not** comparable with published CIFAR-10 FIDs), Inception features in "
        f"{protocol.get('feature_precision', 'fp32')}, generation in {side.get('sample_precision', 'fp32')}. FID with "
        "its 95% bootstrap interval over the generated images; class accuracy by the shipped CIFAR-10 classifier "
        "with its 95% Wilson interval; ms per image on the CPU above.",
        "",
        "| model | sampler | steps | NFE | FID [95% interval] | class accuracy [95%] | ms / image |",
        "|---|---|---:|---:|---|---|---:|",
        line(f"**{args.name}**", row, side),
        *[line(r["model"], r, s) for r, s in teacher_rows if s.get("fid_ci95_low") is not None],
        "",
        "Reproduce: the training command above, then `tools/reference_students.py export` and `card` (see its "
        "--help).",
        "",
    ]
    ckpt.atomic_write_bytes(folder / "MODEL_CARD.md", "\n".join(lines).encode())
    console.print(f"wrote {folder / 'MODEL_CARD.md'}: FID {side['fid']:.2f}, class accuracy {100 * side['class_acc']:.1f}%")
    return folder


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="copy a student's generator into the package, with a provisional card")
    ex.add_argument("run_dir")
    ex.add_argument("--name", required=True, help="shipped name: reference-one-step, reference-four-step, ...")
    ex.add_argument("--command", required=True, help="the training command, for the card")
    ex.add_argument("--commit", default=None)
    ex.add_argument("--wall-time-s", type=float, default=None, help="training wall time (default: the run's "
                    "stage.json train_seconds)")
    ex.add_argument("--hardware", required=True, help="where it trained, e.g. 'AMD EPYC 9B14, 2 threads, no GPU'")
    ex.add_argument("--precision", required=True, help="how it trained, e.g. 'bf16 autocast'")
    ex.add_argument("--fp32", action="store_true", help="keep fp32 storage (default fp16, as the teacher)")
    cd = sub.add_parser("card", help="write MODEL_CARD.md from an evaluation of the shipped folder")
    cd.add_argument("--name", required=True)
    cd.add_argument("--eval-dir", required=True, help="the --output-dir of 'distill rf evaluate'")
    cd.add_argument("--label", required=True, help="the student's LABEL in that evaluation's --students")
    cd.add_argument("--min-images", type=int, default=10000, help="the fewest generated and reference images")
    args = ap.parse_args(argv)
    try:
        {"export": export, "card": card}[args.cmd](args)
    except DistillError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
