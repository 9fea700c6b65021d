"""Guidance-conditioned distillation (Meng et al. 2023, stage one) measured: FID against the guidance scale w and
time per image, for the CFG teacher at 2 network evaluations per step and the w-conditioned student at 1.

    python tools/bench_rf_guided.py --teacher runs/rf_cifar/teacher/generator \
        [--student DIR | --train-steps 300] --guidance 1 2 4 --steps 8 --num-images 200 --reference-n 1000

Stage two (``--recipe guided_progressive``: stage one, then progressive rounds of the w-conditioned student from
``--progressive-start`` down to ``--steps``): the student at ``--steps`` beside the CFG teacher at every
``--teacher-steps`` count (e.g. 4 and 16), FID against w:

    python tools/bench_rf_guided.py --teacher reference --recipe guided_progressive --progressive-start 16 \
        --steps 4 --teacher-steps 4 16 --guidance 1 2 3 4 --train-steps 1200 --num-images 2000 --reference-n 10000

Without ``--student`` it first trains one from the teacher (``distill rf distill --recipe guided`` or
``guided_progressive``, untracked, into ``--work-dir``). Both sample with Euler at ``--steps`` on the same seeds and classes (class = seed % 10); FID is
distill_eval's (TF-Inception, cached reference statistics of CIFAR-10 train); ms/image is distill_eval.timing's best
of ``--repeats`` device-synchronised batches after a warm-up. Writes ``guided.{md,csv,json}`` and
``fid_vs_guidance.png`` into ``--output-dir``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402

from distill_common.runtime import environment_info  # noqa: E402
from distill_eval.fid import score_images  # noqa: E402
from distill_eval.inception import InceptionFeatureExtractor  # noqa: E402
from distill_eval.reference_stats import reference_stats  # noqa: E402
from distill_eval.reports import print_table, write_report  # noqa: E402
from distill_eval.timing import measure_latency  # noqa: E402
from distill_rf_cifar.generator import load_generator  # noqa: E402


def train_student(teacher: Path, work_dir: Path, steps: int, w_max: float, batch: int, device: str,
                  recipe: str = "guided", progressive_start: int = 16, end: int = 4) -> Path:
    from distill_rf_cifar.config import DistillConfig, LoopConfig, RecipeConfig
    from distill_rf_cifar.stages import distill_student

    cfg = DistillConfig(recipe=recipe, teacher=teacher, output_dir=work_dir / recipe, track=False,
                        options=RecipeConfig(guidance_min=1.0, guidance_max=w_max, progressive_start=progressive_start,
                                             guided_end=end),
                        train=LoopConfig(steps=steps, batch_size=batch, learning_rate=2e-4, warmup_steps=20,
                                         ema_decay=0.99, checkpoint_every=max(steps, 1), log_every=50,
                                         device=device, log_checkpoints=False))
    return distill_student(cfg).generator_dir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", type=Path, required=True)
    p.add_argument("--student", type=Path, default=None, help="a guided generator (default: train one)")
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--train-batch-size", type=int, default=64)
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    p.add_argument("--steps", type=int, default=8, help="Euler steps of the student (guided_progressive: its end)")
    p.add_argument("--teacher-steps", type=int, nargs="+", default=None,
                   help="Euler steps of the CFG teacher (default: --steps), e.g. 4 16")
    p.add_argument("--recipe", default="guided", choices=("guided", "guided_progressive"),
                   help="the student to train without --student: stage one, or stages one and two")
    p.add_argument("--progressive-start", type=int, default=16, help="guided_progressive: stage one's steps")
    p.add_argument("--num-images", type=int, default=200)
    p.add_argument("--reference-n", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--timing-batch", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--feature-precision", default="fp32", choices=("fp32", "bf16"),
                   help="Inception precision (stamped in the protocol; bf16 ~2x faster on CPUs with bf16 units)")
    p.add_argument("--sample-precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="both models' forwards while generating (autocast; the ODE state stays fp32)")
    p.add_argument("--work-dir", type=Path, default=Path("runs/rf_cifar/bench_guided"))
    p.add_argument("--output-dir", type=Path, default=None)
    a = p.parse_args()
    console = Console()
    out = a.output_dir or a.work_dir
    from distill_common.generator import resolve_generator_folder

    a.teacher = resolve_generator_folder(str(a.teacher))  # a folder, a URI or a shipped name ('reference')
    student_dir = a.student or train_student(a.teacher, a.work_dir, a.train_steps, max(a.guidance), a.train_batch_size,
                                             a.device, a.recipe, a.progressive_start, a.steps)
    teacher_steps = a.teacher_steps or [a.steps]
    teacher = load_generator(a.teacher, device=a.device, precision=a.sample_precision)
    student = load_generator(student_dir, device=a.device, batch_size=a.batch_size, precision=a.sample_precision)
    teacher.batch_size = a.batch_size
    extractor = InceptionFeatureExtractor(precision=a.feature_precision)
    reference = reference_stats("cifar10-train", extractor, n=a.reference_n, resolution=32)
    n = a.num_images
    conditions, seeds = [i % 10 for i in range(n)], list(range(n))
    tb = min(a.timing_batch, n)
    rows = []
    for w in a.guidance:
        for label, gen, steps in [*(("teacher (CFG)", teacher, s) for s in teacher_steps),
                                  ("guided student", student, a.steps)]:
            images = gen.generate(conditions, steps, seeds, guidance=w)
            nfe = gen.last_nfe
            fid = score_images(images, extractor, reference, batch_size=50, progress=False)
            timing = measure_latency(lambda g=gen, w=w, s=steps: g.generate(conditions[:tb], s, seeds[:tb], guidance=w),
                                     label=f"{label} w={w}", batch_size=tb, device=a.device, warmup=1,
                                     repeats=a.repeats)
            ci = fid.fid_interval
            rows.append({"model": label, "guidance": w, "steps": steps, "nfe": nfe, "precision": gen.precision,
                         "fid": fid.fid, "fid_ci95_low": ci.low if ci else None, "fid_ci95_high": ci.high if ci else None,
                         "ms_per_image": min(timing.batch_seconds) * 1000 / tb})
            interval = f" [{ci.low:.2f}, {ci.high:.2f}]" if ci else ""
            console.print(f"w={w:g} {label:>15} {steps:>3} steps: FID {fid.fid:7.2f}{interval}  NFE {nfe}  "
                          f"{rows[-1]['ms_per_image']:.2f} ms/image", highlight=False)
    for r in rows:
        same = [x for x in rows if x["model"] == "teacher (CFG)" and x["guidance"] == r["guidance"]]
        t_row = next((x for x in same if x["steps"] == r["steps"]), same[0])  # at the same steps where measured
        r["speedup_vs_teacher"] = t_row["ms_per_image"] / r["ms_per_image"]
    env = environment_info(torch.device(a.device))
    meta = {"teacher": str(a.teacher), "student": str(student_dir), "protocol": reference.protocol(n).as_dict(),
            "timing": f"best of {a.repeats} batches of {tb} after a warm-up, {env['device_name']}, "
                      f"{env['num_threads']} threads"}
    report = write_report(rows, out, "guided", meta=meta)
    fig, ax = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    for label, steps in dict.fromkeys((r["model"], r["steps"]) for r in rows):
        pts = [r for r in rows if r["model"] == label and r["steps"] == steps]
        label = f"{label}, {steps} steps"
        errs = [[r["fid"] - (r["fid_ci95_low"] or r["fid"]) for r in pts],
                [(r["fid_ci95_high"] or r["fid"]) - r["fid"] for r in pts]]
        ax[0].errorbar([r["guidance"] for r in pts], [r["fid"] for r in pts], yerr=errs, marker="o", capsize=3,
                       label=label)
        ax[1].plot([r["guidance"] for r in pts], [r["ms_per_image"] for r in pts], marker="o", label=label)
    ax[0].set(xlabel="guidance scale w", ylabel="FID", title=f"FID vs w (Euler, {n} images)")
    ax[1].set(xlabel="guidance scale w", ylabel="ms / image", title="time per image")
    for x in ax:
        x.grid(alpha=0.3)
        x.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "fid_vs_guidance.png")
    print_table(rows, ["model", "guidance", "steps", "nfe", "precision", "fid", "fid_ci95_low", "fid_ci95_high",
                       "ms_per_image", "speedup_vs_teacher"],
                title="guidance-conditioned student vs CFG teacher", console=console)
    console.print(f"report: {report['md']}\nplot: {out / 'fid_vs_guidance.png'}", highlight=False)


if __name__ == "__main__":
    from distill_common.errors import DistillError

    try:
        main()
    except DistillError as exc:  # a wrong path, a non-guided student, ...: one line, not a traceback
        raise SystemExit(f"error: {exc}") from None
