"""Class accuracy: prompt adherence without CLIP weights.

A CIFAR-10 classifier that this project trained and ships (``reference_classifier/``, with its model card and
sha256) labels generated images; **class accuracy** is the share of images assigned to the class named in their
caption (text-to-image) or to their class label (class-conditional rf_cifar). It is the CPU stand-in for
CLIPScore's text-image alignment (Hessel et al. 2021) where no CLIP weights exist. The interval is Wilson's score
interval for a binomial proportion (Wilson 1927), which stays inside [0, 1] at accuracies near 100%.

The network is a ResNet-9-style CIFAR classifier (the DAWNBench design of Page 2018, "How to train your ResNet"),
at a quarter of its width.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from distill_common.errors import ConfigError, ModelLoadError

CLASSIFIER_DIR = Path(__file__).parent / "reference_classifier"
CLASSIFIER_WEIGHTS = "model.safetensors"
CLASSIFIER_CONFIG = "config.json"
CLASSIFIER_NAME = "reference"
CLASSIFIER_RESOLUTION = 32


def _conv_bn(cin: int, cout: int, pool: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv_bn(channels, channels), _conv_bn(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class CifarClassifier(nn.Module):
    """ResNet-9 (Page 2018) with base width ``width``: logits (B, classes) for images (B, 3, 32, 32) in [-1, 1]."""

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        w = width
        self.width, self.num_classes = width, num_classes
        self.features = nn.Sequential(
            _conv_bn(3, w),
            _conv_bn(w, 2 * w, pool=True), Residual(2 * w),
            _conv_bn(2 * w, 4 * w, pool=True),
            _conv_bn(4 * w, 8 * w, pool=True), Residual(8 * w),
            nn.AdaptiveMaxPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(8 * w, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images)) * 0.125


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson's 95% score interval for a proportion ``successes / n``."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class ClassAccuracy:
    """Share of images classified as their intended class, with its 95% Wilson interval and per-class shares."""

    accuracy: float
    low: float
    high: float
    n: int
    per_class: tuple[float, ...]

    def as_dict(self) -> dict:
        return asdict(self)

    def cell(self) -> str:
        """``91.2% [90.0, 92.3]`` for tables."""
        return f"{100 * self.accuracy:.1f}% [{100 * self.low:.1f}, {100 * self.high:.1f}]"


def save_classifier(model: CifarClassifier, folder: str | Path) -> None:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / CLASSIFIER_WEIGHTS))
    (folder / CLASSIFIER_CONFIG).write_text(json.dumps({"width": model.width, "num_classes": model.num_classes}))


def _check_sha256(folder: Path) -> None:
    from distill_common.reference_sd import verify_sha256sums

    if (folder / "SHA256SUMS").is_file():
        verify_sha256sums(folder, folder / "SHA256SUMS")


@lru_cache(maxsize=4)
def _load_cached(folder: str) -> CifarClassifier:
    path = Path(folder)
    if not (path / CLASSIFIER_WEIGHTS).is_file() or not (path / CLASSIFIER_CONFIG).is_file():
        raise ModelLoadError(f"no classifier in {path} (expected {CLASSIFIER_WEIGHTS} and {CLASSIFIER_CONFIG}); "
                             f"pass '{CLASSIFIER_NAME}' or a folder written by save_classifier")
    _check_sha256(path)
    from safetensors.torch import load_file

    config = json.loads((path / CLASSIFIER_CONFIG).read_text())
    model = CifarClassifier(int(config["width"]), int(config["num_classes"]))
    state = load_file(str(path / CLASSIFIER_WEIGHTS))
    if any(not torch.isfinite(v).all() for v in state.values() if v.is_floating_point()):
        raise ModelLoadError(f"{path / CLASSIFIER_WEIGHTS} holds NaN or inf values; retrain or reinstall it")
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval().requires_grad_(False)


def load_classifier(name_or_path: str | Path = CLASSIFIER_NAME) -> CifarClassifier:
    """The shipped classifier (``reference``, sha256-checked) or one saved in a folder."""
    folder = CLASSIFIER_DIR if str(name_or_path) == CLASSIFIER_NAME else Path(name_or_path)
    return _load_cached(str(folder.resolve()))


def _as_unit(images: torch.Tensor) -> torch.Tensor:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ConfigError(f"class accuracy needs RGB images (N, 3, H, W), got shape {tuple(images.shape)}")
    x = images.float() / 127.5 - 1.0 if images.dtype == torch.uint8 else images.float()
    if x.shape[-1] != CLASSIFIER_RESOLUTION or x.shape[-2] != CLASSIFIER_RESOLUTION:
        x = F.interpolate(x, size=(CLASSIFIER_RESOLUTION, CLASSIFIER_RESOLUTION), mode="bilinear",
                          antialias=True, align_corners=False)
    return x


@torch.no_grad()
def predict(images: torch.Tensor, classifier: nn.Module | None = None, batch_size: int = 500) -> torch.Tensor:
    """Predicted class of each image: uint8 (N, 3, H, W) or float in [-1, 1]; resized to 32 px when needed."""
    model = classifier if classifier is not None else load_classifier()
    model.eval()
    out = [model(_as_unit(images[i:i + batch_size])).argmax(1) for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def class_accuracy(images: torch.Tensor, labels, classifier: nn.Module | None = None,
                   batch_size: int = 500) -> ClassAccuracy:
    """The share of ``images`` that the classifier assigns to ``labels`` (intended class indices)."""
    labels = torch.as_tensor(list(labels) if not isinstance(labels, torch.Tensor) else labels, dtype=torch.long)
    if len(labels) != len(images):
        raise ConfigError(f"class accuracy got {len(images)} images but {len(labels)} labels; pass one label per image")
    if len(images) == 0:
        raise ConfigError("class accuracy needs at least one image")
    pred = predict(images, classifier, batch_size)
    hits = pred == labels
    low, high = wilson_interval(int(hits.sum()), len(hits))
    num_classes = getattr(classifier, "num_classes", 10)
    per_class = tuple(float(hits[labels == c].float().mean()) if (labels == c).any() else float("nan")
                      for c in range(num_classes))
    return ClassAccuracy(float(hits.float().mean()), low, high, len(hits), per_class)


class ClassifierTask:
    """Training task for :func:`distill_common.reference_sd.training.train_component`: cross-entropy with label
    smoothing 0.1, random crops (4 px reflect padding) and horizontal flips (Page 2018)."""

    name = "classifier"

    def __init__(self, model: CifarClassifier, images_uint8: torch.Tensor, labels: torch.Tensor) -> None:
        self.model, self.images, self.labels = model, images_uint8, labels
        self.modules = {"classifier": model}

    def loss(self, generator: torch.Generator, batch_size: int):
        idx = torch.randint(len(self.images), (batch_size,), generator=generator)
        x = F.pad(self.images[idx].float() / 127.5 - 1.0, (4, 4, 4, 4), mode="reflect")
        dx, dy = torch.randint(9, (2, batch_size), generator=generator)
        rows = (dy[:, None] + torch.arange(32))[:, None, :, None].expand(-1, 3, -1, 40)
        x = torch.gather(x, 2, rows)
        cols = (dx[:, None] + torch.arange(32))[:, None, None, :].expand(-1, 3, 32, -1)
        x = torch.gather(x, 3, cols)
        flip = torch.rand(batch_size, generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        logits = self.model(x).float()
        y = self.labels[idx]
        loss = F.cross_entropy(logits, y, label_smoothing=0.1)
        return loss, {"acc": (logits.argmax(1) == y).float().mean().item()}

    def export(self, folder: Path) -> None:
        save_classifier(self.model, folder / "classifier")
