"""Sampling: diffusers schedulers (DDPM, PNDM, DDIM) with CFG, and the ``sd_student_prune`` generator."""

from distill_sd_prune.sampling.generator import (
    FAMILY,
    SDStudentGenerator,
    load_generator,
    write_generator_folder,
    write_teacher_folder,
)
from distill_sd_prune.sampling.pipeline import (
    HEADLINE_GUIDANCE,
    HEADLINE_STEPS,
    SAMPLERS,
    build_pipeline,
    check_resolution,
    generate_images,
    make_scheduler,
)

__all__ = [
    "FAMILY",
    "HEADLINE_GUIDANCE",
    "HEADLINE_STEPS",
    "SAMPLERS",
    "SDStudentGenerator",
    "build_pipeline",
    "check_resolution",
    "generate_images",
    "load_generator",
    "make_scheduler",
    "write_generator_folder",
    "write_teacher_folder",
]
