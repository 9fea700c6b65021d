"""``distill rf train-teacher --init``: a warm start from a generator's weights (the shipped ``reference``, a folder or
a URI), with its architecture; a run folder with checkpoints resumes from its full state, not from the init again."""

from __future__ import annotations

import json
import shutil

import torch
from typer.testing import CliRunner

from distill_rf_cifar.cli import app
from distill_rf_cifar.generator import load_model

runner = CliRunner()
ARGS = ["--data-limit", "16", "--train-batch-size", "4", "--train-checkpoint-every", "1", "--train-device", "cpu",
        "--train-precision", "fp32", "--train-warmup-steps", "0", "--sampling-steps", "2", "--no-track"]


def _run(tmp_path, init, out, *extra):
    result = runner.invoke(app, ["train-teacher", "--init", str(init), "--output-dir", str(out), "--data-root",
                                 str(_run.data_root), *ARGS, *extra])
    assert result.exit_code == 0, result.output
    return result


def test_warm_start_takes_the_init_weights_and_a_rerun_resumes_from_the_checkpoint(tmp_path, teacher_dir, data_root):
    _run.data_root = data_root
    init = tmp_path / "init"
    shutil.copytree(teacher_dir, init)
    start = load_model(init).state_dict()
    # a learning rate of ~0: after one step the weights are the init's (a scratch start would be random ones)
    _run(tmp_path, init, tmp_path / "still", "--train-steps", "1", "--train-learning-rate", "1e-12",
         "--model-base-channels", "64")  # --model-* give way to the init's architecture
    still = load_model(tmp_path / "still" / "generator").state_dict()
    assert all(torch.allclose(still[k], v, atol=1e-6) for k, v in start.items())
    manifest = json.loads((tmp_path / "still" / "generator" / "generator.json").read_text())
    assert manifest["init"] == str(init) and len(manifest["init_sha256"]) == 64
    assert manifest["images_seen"] is None  # the init generator does not say how many it saw
    # a warm start from a generator that records it counts on: 1 step of batch 4 more
    again = json.loads((tmp_path / "still" / "generator" / "generator.json").read_text())
    (tmp_path / "still" / "generator" / "generator.json").write_text(json.dumps({**again, "images_seen": 100,
                                                                                 "total_train_steps": 10}))
    _run(tmp_path, tmp_path / "still" / "generator", tmp_path / "second", "--train-steps", "1",
         "--train-learning-rate", "1e-12")
    second = json.loads((tmp_path / "second" / "generator" / "generator.json").read_text())
    assert second["images_seen"] == 104 and second["total_train_steps"] == 11 and second["train_batch_size"] == 4

    # kill after step 1, then spoil the init: the rerun must continue from the checkpoint (full state), so it ends on
    # the weights of an uninterrupted run
    _run(tmp_path, init, tmp_path / "full", "--train-steps", "2", "--train-learning-rate", "1e-3")
    _run(tmp_path, init, tmp_path / "killed", "--train-steps", "2", "--train-learning-rate", "1e-3",
         "--train-stop-at-step", "1")
    assert not (tmp_path / "killed" / "generator").exists()
    spoiled = load_model(init)
    with torch.no_grad():
        for p in spoiled.parameters():
            p.add_(1.0)
    from distill_common import checkpoint as ckpt

    ckpt.save_weights(spoiled.state_dict(), init / "model.safetensors")
    _run(tmp_path, init, tmp_path / "killed", "--train-steps", "2", "--train-learning-rate", "1e-3")
    full = load_model(tmp_path / "full" / "generator").state_dict()
    resumed = load_model(tmp_path / "killed" / "generator").state_dict()
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert not all(torch.allclose(full[k], start[k]) for k in full)  # it did train


def test_init_names_are_checked(tmp_path):
    result = runner.invoke(app, ["train-teacher", "--init", "no_such_teacher", "--output-dir", str(tmp_path / "t"),
                                 *ARGS])
    assert result.exit_code != 0  # the one-line error lists the shipped names
    assert "neither a folder nor a shipped generator; pass a shipped name (" in str(result.exception) and "reference" in str(result.exception)


def test_reference_is_a_valid_init(tmp_path):
    from distill_rf_cifar.generator import named_generators

    assert "reference" in named_generators()  # what --init reference resolves to
    result = runner.invoke(app, ["train-teacher", "--init", "reference", "--output-dir", str(tmp_path / "t"),
                                 "--dry-run", *ARGS])
    assert result.exit_code == 0, result.output
