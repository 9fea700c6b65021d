"""EMA: warm-up schedule, update arithmetic against a hand computation, evaluation swap and exact resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distill_common.errors import ConfigError, ModelLoadError
from distill_common.models.ema import EMA


def small_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))


def step_(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Stand in for an optimiser step: move every trainable weight."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator))


def test_decay_warm_up_values() -> None:
    ema = EMA(small_model(), decay=0.5)
    # update n uses s = n - 1: 0 at the first update (the average starts as a copy), then (1 + s) / (10 + s) capped
    assert ema.decay_at(1) == 0.0
    assert ema.decay_at(2) == pytest.approx(2 / 11)
    assert ema.decay_at(3) == pytest.approx(3 / 12)
    assert ema.decay_at(9) == pytest.approx(0.5)  # 9/18 reaches the cap
    assert ema.decay_at(100) == 0.5
    long = EMA(small_model(), decay=0.9999)
    assert long.decay_at(1001) == pytest.approx(1001 / 1010)
    karras = EMA(small_model(), decay=0.9999, use_ema_warmup=True, power=3 / 4)
    assert karras.decay_at(11) == pytest.approx(1 - 11 ** -0.75)
    late = EMA(small_model(), decay=0.9, update_after_step=5)
    assert [late.decay_at(n) for n in (1, 6)] == [0.0, 0.0] and late.decay_at(7) == pytest.approx(2 / 11)


def test_update_matches_hand_computation() -> None:
    model = small_model()
    ema = EMA(model, decay=0.3)
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    for n_update in range(1, 7):
        step_(model, g)
        used = ema.update(model)
        decay = 0.0 if n_update == 1 else min(0.3, n_update / (9 + n_update))
        assert used == pytest.approx(decay)
        for name, p in model.named_parameters():
            expected[name] = decay * expected[name] + (1 - decay) * p.detach()
    assert ema.num_updates == 6
    for name, value in ema.shadow.items():
        torch.testing.assert_close(value, expected[name], atol=1e-6, rtol=0)
        assert not torch.allclose(value, dict(model.named_parameters())[name])  # it lags the live weights


def test_frozen_parameters_are_copied_and_only_trainable_tracks_less() -> None:
    model = small_model()
    model[0].requires_grad_(False)
    ema = EMA(model, decay=0.9)
    ema.update(model)
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[2].weight.add_(1.0)
    ema.update(model)
    assert torch.equal(ema.shadow["0.weight"], model[0].weight)  # frozen: follows the model exactly
    assert not torch.equal(ema.shadow["2.weight"], model[2].weight)
    assert EMA(model, only_trainable=True).names == ["2.weight", "2.bias"]


def test_swapped_in_and_copy_to() -> None:
    model = small_model()
    ema = EMA(model, decay=0.9)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        step_(model, g)
        ema.update(model)
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(5, 3, generator=g)
    with ema.swapped_in(model) as swapped:
        assert swapped is model
        for n, p in model.named_parameters():
            assert torch.equal(p, ema.shadow[n])
        averaged_out = model(x)
    for n, p in model.named_parameters():
        assert torch.equal(p, live[n])
    assert not torch.allclose(model(x), averaged_out)
    ema.copy_to(model)
    torch.testing.assert_close(model(x), averaged_out)


def _run(ema: EMA, model: torch.nn.Module, seed: int, n: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        step_(model, g)
        ema.update(model)


def test_state_dict_round_trip_resumes_exactly(tmp_path: Path) -> None:
    model = small_model()
    ema = EMA(model, decay=0.95)
    _run(ema, model, seed=2, n=4)
    state = ema.state_dict()
    snapshot = {n: t.clone() for n, t in ema.shadow.items()}
    _run(ema, model, seed=3, n=1)  # the saved state is a copy: later updates do not leak into it
    assert state["optimization_step"] == 4
    assert all(torch.equal(a, snapshot[n]) for a, n in zip(state["shadow_params"], ema.names, strict=True))

    resumed_model = small_model(seed=5)
    resumed_model.load_state_dict(model.state_dict())
    resumed = EMA(resumed_model, decay=0.5)  # settings come from the state, not the constructor
    ema.save(tmp_path / "ema.safetensors")
    resumed.load(tmp_path / "ema.safetensors")
    assert resumed.num_updates == ema.num_updates == 5 and resumed.decay_at(50) == ema.decay_at(50)
    _run(ema, model, seed=4, n=3)
    _run(resumed, resumed_model, seed=4, n=3)
    for n, t in ema.shadow.items():
        assert torch.equal(resumed.shadow[n], t)

    from_dict = EMA(small_model(seed=6), decay=0.5)
    from_dict.load_state_dict(state)
    assert from_dict.num_updates == 4
    assert all(torch.equal(from_dict.shadow[n], snapshot[n]) for n in snapshot)


def test_mismatched_models_are_refused(tmp_path: Path) -> None:
    ema = EMA(small_model(), decay=0.9)
    other = torch.nn.Linear(3, 2)
    with pytest.raises(ConfigError, match="lacks"):
        ema.update(other)
    with pytest.raises(ModelLoadError, match="different parameters"):
        EMA(other).load_state_dict(ema.state_dict())
    with pytest.raises(ModelLoadError, match="does not exist"):
        ema.load(tmp_path / "absent.safetensors")
    with pytest.raises(ConfigError, match="decay"):
        EMA(small_model(), decay=1.5)
