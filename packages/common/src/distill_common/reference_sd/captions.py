"""Captions for the reference text-to-image model: CIFAR-10 class names in prompt templates.

Training draws one of :data:`TRAIN_TEMPLATES` per image; evaluation uses :data:`HELD_OUT_TEMPLATES`, which share
no template with training, so prompt adherence is measured on wordings the model never saw (the CLIP zero-shot
templates of Radford et al. 2021 are the model for both lists).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from distill_common.data.cifar10 import CIFAR10_CLASSES
from distill_common.errors import DataError

TRAIN_TEMPLATES: tuple[str, ...] = (
    "a photo of {a} {c}",
    "a blurry photo of {a} {c}",
    "a picture of {a} {c}",
    "an image of {a} {c}",
    "a close-up photo of {a} {c}",
    "a small photo of the {c}",
    "a low resolution photo of {a} {c}",
    "a cropped photo of the {c}",
    "a good photo of {a} {c}",
    "a bright photo of the {c}",
    "a dark photo of {a} {c}",
    "a pixelated photo of the {c}",
)
HELD_OUT_TEMPLATES: tuple[str, ...] = (
    "a snapshot of {a} {c}",
    "a photograph showing {a} {c}",
    "there is {a} {c} in this picture",
    "a jpeg photo of the {c}",
    "an old photo of {a} {c}",
)
TEMPLATE_SETS = {"train": TRAIN_TEMPLATES, "held_out": HELD_OUT_TEMPLATES}


def article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def caption(template: str, class_name: str) -> str:
    return template.format(a=article(class_name), c=class_name)


def template_set(name: str) -> tuple[str, ...]:
    if name not in TEMPLATE_SETS:
        raise DataError(f"unknown caption template set {name!r}; choose one of: {', '.join(TEMPLATE_SETS)}")
    return TEMPLATE_SETS[name]


def class_captions(templates: str | Sequence[str] = "train") -> list[list[str]]:
    """``captions[class_index][template_index]`` for the CIFAR-10 classes."""
    chosen = template_set(templates) if isinstance(templates, str) else tuple(templates)
    return [[caption(t, c) for t in chosen] for c in CIFAR10_CLASSES]


def evaluation_prompts(n: int, templates: str = "held_out") -> tuple[list[str], list[int]]:
    """``n`` prompts cycling over classes then templates, and the class index of each (balanced classes)."""
    table = class_captions(templates)
    prompts, labels = [], []
    for i in range(n):
        cls = i % len(CIFAR10_CLASSES)
        prompts.append(table[cls][(i // len(CIFAR10_CLASSES)) % len(table[cls])])
        labels.append(cls)
    return prompts, labels


_CLASS_RE = re.compile(r"\b(" + "|".join(CIFAR10_CLASSES) + r")s?\b", re.IGNORECASE)


def class_of_caption(text: str) -> int | None:
    """The CIFAR-10 class named in ``text`` (first match), or None when no class name (or more than one) is named."""
    found = {m.group(1).lower() for m in _CLASS_RE.finditer(text)}
    if len(found) != 1:
        return None
    return CIFAR10_CLASSES.index(found.pop())
