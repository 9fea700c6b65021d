"""Generator folders, the distill.generators entry point, and the pyfunc model loaded by alias from the registry."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from distill_common import tracking
from distill_common.errors import ModelLoadError
from distill_common.generator import Generator, load_generator
from distill_rf_cifar.generator import RFGenerator


def test_generator_folder_round_trip(teacher_dir):
    manifest = json.loads((teacher_dir / "generator.json").read_text())
    assert manifest["family"] == "rf_cifar" and manifest["default_steps"] == 2
    assert {"model.safetensors", "model_config.json", "generator.json"} <= {p.name for p in teacher_dir.iterdir()}
    gen = load_generator(teacher_dir, device="cpu")  # via the entry point
    assert isinstance(gen, RFGenerator) and isinstance(gen, Generator)
    assert (gen.family, gen.condition_kind, gen.resolution) == ("rf_cifar", "class", 32)
    images = gen.generate([0, 5, 9], 2, [0, 1, 2])
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.float32
    assert 0 <= float(images.min()) and float(images.max()) <= 1
    assert torch.equal(images, gen.generate([0, 5, 9], 2, [0, 1, 2]))


def test_not_a_generator_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="not a generator folder"):
        load_generator(tmp_path, device="cpu")


@pytest.mark.slow
def test_pyfunc_model_loads_by_alias_and_returns_images(mlflow_uri, teacher_dir):
    import mlflow.pyfunc

    with tracking.start_run("rf_test", "teacher") as run:
        uri = tracking.log_generator_model(run, teacher_dir)
    version = tracking.register_model(uri, "rf_cifar-test", tags={"role": "teacher"})
    tracking.set_alias("rf_cifar-test", "champion", version)

    model = mlflow.pyfunc.load_model("models:/rf_cifar-test@champion")
    out = model.predict(pd.DataFrame({"condition": [3, 5, 3], "seed": [0, 1, 0], "steps": [2, 2, 2]}))
    assert len(out) == 3 and out["image"].iloc[0] == out["image"].iloc[2]  # same class and seed: same image
    pil = tracking.decode_image(out["image"].iloc[1])
    assert pil.size == (32, 32)
    gen = model.unwrap_python_model().generator
    images = gen.generate([1, 2], 4, [7, 8])
    assert images.shape == (2, 3, 32, 32) and 0 <= float(images.min()) and float(images.max()) <= 1
    direct = load_generator(teacher_dir, device="cpu").generate([1, 2], 4, [7, 8])
    assert torch.allclose(images, direct, atol=1e-6)


def test_sampling_precision_auto_follows_the_cpu_and_bf16_stays_close(monkeypatch, teacher_dir):
    from distill_common import runtime
    from distill_rf_cifar.flow import noise_for_seeds

    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: False)
    assert load_generator(teacher_dir, device="cpu", precision="auto").precision == "fp32"
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: True)
    fast = load_generator(teacher_dir, device="cpu", precision="auto")
    assert fast.precision == "bf16"
    assert load_generator(teacher_dir, device="cpu").precision == "fp32"  # fp32 unless asked
    x0, labels = noise_for_seeds(list(range(6))), torch.arange(6) % 10
    exact = load_generator(teacher_dir, device="cpu").sample(x0, labels, 4, 2.0)
    approx = fast.sample(x0, labels, 4, 2.0)
    assert approx.dtype == torch.float32  # the ODE state stays fp32
    assert not torch.equal(exact, approx)  # the forwards did run in bf16
    assert (exact - approx).abs().mean() < 0.02
    with pytest.raises(Exception, match="fp16 is not supported on the CPU"):
        fast.use_precision("fp16")
