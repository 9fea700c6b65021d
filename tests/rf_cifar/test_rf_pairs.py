"""Pairs: deterministic per seed, resumable by shard, settings and teacher mismatches refused."""

from __future__ import annotations

import json

import pytest
import torch
from rf_helpers import pairs_config, tiny_loop
from safetensors.torch import load_file

from distill_common.errors import ConfigError
from distill_rf_cifar.config import DistillConfig
from distill_rf_cifar.flow import noise_for_seeds
from distill_rf_cifar.generator import load_generator, weights_sha256
from distill_rf_cifar.pairs import check_teacher, load_pairs, make_pairs, read_manifest
from distill_rf_cifar.stages import distill_student


def test_manifest_records_teacher_sampler_and_seed_ranges(pairs_dir, teacher_dir):
    manifest = read_manifest(pairs_dir)
    assert manifest["teacher_sha256"] == weights_sha256(teacher_dir)
    assert (manifest["sampler"], manifest["steps"], manifest["guidance"]) == ("euler", 2, 1.0)
    assert manifest["seed_ranges"] == [[100, 124]]
    assert [s["seeds"] for s in manifest["shards"]] == [[100, 108], [108, 116], [116, 124]]
    data = load_pairs(pairs_dir, teacher_dir)
    assert len(data) == 24
    shard = load_file(str(pairs_dir / "pairs-00001.safetensors"))
    assert shard["seed"].tolist() == list(range(108, 116))
    assert shard["label"].tolist() == [s % 10 for s in range(108, 116)]
    assert torch.equal(shard["noise"], noise_for_seeds(list(range(108, 116))))
    # the image is the teacher's ODE endpoint from that noise
    assert manifest["precision"] in ("fp32", "bf16")  # 'auto' resolved and recorded
    gen = load_generator(teacher_dir, device="cpu", precision=manifest["precision"])
    again = gen.sample(shard["noise"][:2], shard["label"][:2], num_steps=2, sampler="euler")
    assert torch.allclose(again, shard["image"][:2], atol=1e-5)


def test_pairs_are_deterministic_per_seed(tmp_path, pairs_dir, teacher_dir):
    # other shard layout and batch size, seeds 112..119 only
    other = tmp_path / "other"
    make_pairs(pairs_config(teacher_dir, other, num_pairs=8, shard_size=5, seed_start=112, batch_size=3), progress=False)
    a = load_pairs(pairs_dir)
    b = load_pairs(other)
    assert torch.equal(a.noise[12:20], b.noise)
    assert torch.allclose(a.images[12:20], b.images, atol=1e-5)
    assert torch.equal(a.labels[12:20], b.labels)
    # the same command twice gives the same bytes
    twin = tmp_path / "twin"
    make_pairs(pairs_config(teacher_dir, twin), progress=False)
    for i in range(3):
        first = load_file(str(pairs_dir / f"pairs-{i:05d}.safetensors"))
        second = load_file(str(twin / f"pairs-{i:05d}.safetensors"))
        assert all(torch.equal(first[k], second[k]) for k in first)


def test_generation_resumes_with_the_first_missing_shard(tmp_path, teacher_dir):
    out = tmp_path / "pairs"
    cfg = pairs_config(teacher_dir, out)
    make_pairs(cfg, progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("pairs-*.safetensors")}
    (out / "pairs-00001.safetensors").unlink()
    result = make_pairs(cfg, progress=False)
    assert result.generated_shards == 1
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("pairs-*.safetensors")}
    assert after["pairs-00000.safetensors"] == before["pairs-00000.safetensors"]
    assert after["pairs-00002.safetensors"] == before["pairs-00002.safetensors"]
    assert make_pairs(cfg, progress=False).generated_shards == 0
    # growing the set extends it
    grown = make_pairs(pairs_config(teacher_dir, out, num_pairs=32), progress=False)
    assert grown.generated_shards == 1 and grown.manifest["seed_ranges"] == [[100, 132]]
    with pytest.raises(ConfigError, match=r"other settings \(steps 2 -> 3\).*new --output-dir"):
        make_pairs(pairs_config(teacher_dir, out, steps=3), progress=False)


def test_student_naming_another_teacher_is_refused(tmp_path, pairs_dir, other_teacher_dir):
    with pytest.raises(ConfigError) as err:
        check_teacher(pairs_dir, other_teacher_dir)
    message = str(err.value)
    assert "were made by teacher" in message and "\n" not in message
    cfg = DistillConfig(recipe="one_step", teacher=other_teacher_dir, pairs=pairs_dir, output_dir=tmp_path / "s",
                        train=tiny_loop(), track=False)
    with pytest.raises(ConfigError, match="were made by teacher"):
        distill_student(cfg, progress=False)
    assert not (tmp_path / "s").exists()  # refused before any work
    assert json.loads((pairs_dir / "manifest.json").read_text())["format"] == "distill-rf-pairs/1"
