"""Class accuracy: the classifier metric's arithmetic, interval, loading and training task."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from distill_common.errors import ConfigError, ModelLoadError
from distill_eval.classifier import (
    CLASSIFIER_DIR,
    CifarClassifier,
    ClassifierTask,
    class_accuracy,
    load_classifier,
    predict,
    save_classifier,
    wilson_interval,
)


class ColourJudge(nn.Module):
    """Predicts class = index of the brightest channel (0, 1, 2): a classifier with a known answer."""

    num_classes = 10

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.full((x.shape[0], 10), -1e9)
        logits[:, :3] = x.mean(dim=(2, 3))
        return logits


def _images(channels: list[int], size: int = 32) -> torch.Tensor:
    images = torch.zeros(len(channels), 3, size, size, dtype=torch.uint8)
    for i, c in enumerate(channels):
        images[i, c] = 255
    return images


def test_class_accuracy_known_answer_and_per_class():
    images = _images([0, 1, 2, 0, 1, 2, 0, 0])
    labels = [0, 1, 2, 0, 1, 1, 2, 0]  # 6 of 8 right: images 5 and 6 are wrong
    acc = class_accuracy(images, labels, ColourJudge())
    assert acc.accuracy == pytest.approx(0.75) and acc.n == 8
    assert acc.per_class[0] == 1.0 and acc.per_class[1] == pytest.approx(2 / 3) and acc.per_class[2] == 0.5
    assert acc.low < 0.75 < acc.high
    assert acc.cell().startswith("75.0% [")


def test_other_resolutions_and_float_images_are_resized():
    big = _images([2, 1], size=64)
    assert predict(big, ColourJudge()).tolist() == [2, 1]
    unit = big.float() / 127.5 - 1
    assert class_accuracy(unit, [2, 1], ColourJudge()).accuracy == 1.0


def test_wilson_interval_matches_the_formula_and_stays_in_range():
    low, high = wilson_interval(81, 100)  # textbook: 81/100 -> [0.7222, 0.8749]
    assert low == pytest.approx(0.7222, abs=1e-3) and high == pytest.approx(0.8749, abs=1e-3)
    assert wilson_interval(100, 100)[1] == 1.0 and wilson_interval(0, 50)[0] == 0.0


def test_bad_inputs_are_one_line_errors():
    with pytest.raises(ConfigError, match="labels"):
        class_accuracy(_images([0, 1]), [0], ColourJudge())
    with pytest.raises(ConfigError, match="RGB"):
        class_accuracy(torch.zeros(2, 1, 32, 32), [0, 1], ColourJudge())
    with pytest.raises(ModelLoadError, match="no classifier"):
        load_classifier("/nonexistent/classifier")


def test_save_load_round_trip_and_nan_weights_refused(tmp_path: Path):
    model = CifarClassifier(4).eval()
    save_classifier(model, tmp_path / "c")
    loaded = load_classifier(tmp_path / "c")
    x = torch.randn(3, 3, 32, 32)
    assert torch.allclose(model(x), loaded(x))
    bad = CifarClassifier(4)
    with torch.no_grad():
        bad.head.weight[0, 0] = float("nan")
    save_classifier(bad, tmp_path / "bad")
    with pytest.raises(ModelLoadError, match="NaN"):
        load_classifier(tmp_path / "bad")


def test_training_task_augments_and_learns_a_separable_toy(tmp_path: Path):
    from distill_common.reference_sd.training import ComponentTrainConfig, train_component

    images = _images([0, 1, 2] * 20)
    labels = torch.tensor([0, 1, 2] * 20)
    model = CifarClassifier(4)
    cfg = ComponentTrainConfig(steps=30, batch_size=16, learning_rate=5e-3, warmup_steps=2, ema_decay=0.0,
                               precision="fp32", checkpoint_every=30)
    train_component(ClassifierTask(model, images, labels), cfg, tmp_path)
    trained = load_classifier(tmp_path / "export" / "classifier")
    assert class_accuracy(images, labels, trained).accuracy == 1.0


@pytest.mark.skipif(not (CLASSIFIER_DIR / "model.safetensors").is_file(), reason="classifier not shipped here")
def test_shipped_classifier_reaches_85_percent_on_cifar10_test(data_root: Path):
    from distill_common.data.cifar10 import open_cifar10

    ds = open_cifar10(data_root, "test", limit=2000, preload=True)
    labels = torch.as_tensor([ds[i][1] for i in range(len(ds))])
    acc = class_accuracy(ds.uint8_images(), labels)
    assert acc.accuracy >= 0.85
