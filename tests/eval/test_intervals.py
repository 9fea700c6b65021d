"""Bootstrap intervals: a known answer (the mean of Gaussian samples), coverage over repeated draws, the exact
resample FID, the bias-aware FID interval, and how reports mark differences inside the intervals."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from distill_common.errors import ConfigError
from distill_eval.features import feature_statistics
from distill_eval.fid import capped_kid_subset_size, fid_by_sample_size, fid_from_stats, kid_from_features
from distill_eval.intervals import FidBootstrap, Interval, bootstrap_interval
from distill_eval.reference_stats import ReferenceStats
from distill_eval.reports import cell, mark_separability, markdown_table, write_report


def test_bootstrap_of_a_gaussian_mean_matches_the_analytic_interval() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=1000)
    half = 1.959964 * x.std(ddof=1) / np.sqrt(x.size)  # the normal-theory 95% interval of the mean
    for method in ("basic", "percentile"):
        iv = bootstrap_interval(x, np.mean, resamples=1500, method=method, seed=1)
        assert iv.estimate == pytest.approx(x.mean())
        assert iv.low == pytest.approx(x.mean() - half, abs=0.1 * half)
        assert iv.high == pytest.approx(x.mean() + half, abs=0.1 * half)
    first, again = (bootstrap_interval(x, np.mean, resamples=200, seed=7) for _ in range(2))
    assert (first.low, first.high) == (again.low, again.high)  # seeded: reproducible


def test_coverage_over_repeated_draws_is_near_95_percent() -> None:
    rng = np.random.default_rng(1)
    draws, hits = 150, 0
    for i in range(draws):
        sample = rng.normal(5.0, 1.0, size=60)
        hits += bootstrap_interval(sample, np.mean, resamples=200, seed=i).contains(5.0)
    assert 0.87 <= hits / draws <= 0.995, hits / draws


def test_bad_bootstrap_settings_are_one_line_errors() -> None:
    with pytest.raises(ConfigError, match="valid choices"):
        bootstrap_interval(np.ones(5), np.mean, method="bca")
    with pytest.raises(ConfigError, match="at least 2 resamples"):
        bootstrap_interval(np.ones(5), np.mean, resamples=1)
    with pytest.raises(ConfigError, match="between 0 and 1"):
        bootstrap_interval(np.ones(5), np.mean, level=95)


@pytest.mark.parametrize("n,d", [(12, 32), (80, 16)])  # the n x n (Gram) path and the d x d path
def test_resample_fid_is_exact(n: int, d: int) -> None:
    rng = np.random.default_rng(2)
    ref = rng.normal(size=(400, d)) @ (np.eye(d) + 0.2 * rng.normal(size=(d, d)))
    gen = rng.normal(size=(n, d)) * 1.3 + 0.4
    mu, sigma = feature_statistics(ref)
    boot = FidBootstrap(gen, mu, sigma)
    assert boot.fid(np.ones(n)) == pytest.approx(fid_from_stats(*feature_statistics(gen), mu, sigma), rel=1e-6)
    idx = rng.integers(0, n, n)  # duplicates, as in a bootstrap resample
    direct = fid_from_stats(*feature_statistics(gen[idx]), mu, sigma)
    assert boot.of_indices(idx) == pytest.approx(direct, rel=1e-6)
    # the textbook formula with scipy's matrix square root agrees too
    s_gen = np.cov(gen[idx], rowvar=False)
    textbook = (np.square(gen[idx].mean(0) - mu).sum() + np.trace(s_gen + sigma)
                - 2 * np.trace(scipy.linalg.sqrtm(s_gen @ sigma).real))
    assert boot.of_indices(idx) == pytest.approx(textbook, rel=1e-6)


def gaussian_fid(mu1, s1, mu2, s2) -> float:
    return float(np.square(mu1 - mu2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real))


def test_basic_fid_interval_covers_the_population_fid_and_the_percentile_one_does_not() -> None:
    """Known population: generated ~ N(0.3, 1.5^2 I), reference statistics exact N(0, I); FID_inf = d(0.09 + 0.25).
    Resampling inflates FID, so the percentile interval sits too high; the basic interval corrects it."""
    d, n, draws = 4, 60, 40
    mu_r, sigma_r = np.zeros(d), np.eye(d)
    truth = gaussian_fid(np.full(d, 0.3), 2.25 * np.eye(d), mu_r, sigma_r)
    rng = np.random.default_rng(3)
    basic = percentile = 0
    for i in range(draws):
        boot = FidBootstrap(rng.normal(0.3, 1.5, size=(n, d)), mu_r, sigma_r)
        basic += boot.interval(resamples=100, seed=i, method="basic").contains(truth)
        percentile += boot.interval(resamples=100, seed=i, method="percentile").contains(truth)
    assert basic / draws >= 0.85, basic / draws  # measured 0.875 here
    assert percentile < basic  # measured 0.675


def test_kid_subsets_differ_so_the_std_is_a_real_spread() -> None:
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(500, 64)), rng.normal(0.1, 1.0, size=(500, 64))
    assert capped_kid_subset_size(500, 500) == 250 and capped_kid_subset_size(10_000, 50_000) == 1000
    assert capped_kid_subset_size(3, 500) == 2
    _, whole_set_std = kid_from_features(a, b, subsets=10, subset_size=500)
    mean, std = kid_from_features(a, b, subsets=50, subset_size=capped_kid_subset_size(500, 500))
    assert whole_set_std < 1e-12 < 1e-4 * abs(mean) < std  # one subset = the set: no spread; halves: a spread


def rows():
    return [
        {"model": "teacher", "role": "teacher", "steps": 4, "sampler": "euler", "fid": 30.0, "fid_ci95_low": 28.0,
         "fid_ci95_high": 32.0, "kid": 0.0123, "kid_std": 0.0011},
        {"model": "teacher", "role": "teacher", "steps": 16, "sampler": "euler", "fid": 20.0, "fid_ci95_low": 18.5,
         "fid_ci95_high": 21.5},
        {"model": "student", "role": "student", "steps": 4, "sampler": "euler", "fid": 21.0, "fid_ci95_low": 19.8,
         "fid_ci95_high": 22.4},
        {"model": "student", "role": "student", "steps": 16, "sampler": "euler", "fid": 24.0, "fid_ci95_low": 22.0,
         "fid_ci95_high": 26.0},
        {"model": "student", "role": "student", "steps": 1, "sampler": "euler", "fid": 40.0},  # no interval
    ]


def test_reports_mark_differences_inside_the_intervals(tmp_path) -> None:
    table = rows()
    mark_separability(table)
    assert [r.get("fid_vs_best") for r in table] == ["worse", "best", "≈ best", "worse", None]
    assert [r.get("fid_vs_teacher") for r in table] == [None, None, "better", "worse", None]
    assert cell(table[0], "fid") == "30.00 [28.00, 32.00]" and cell(table[4], "fid") == "40"
    assert cell(table[0], "kid") == "0.0123 ± 0.0011"
    md = markdown_table(table, ["model", "steps", "fid", "fid_ci95_low", "fid_ci95_high", "fid_vs_best", "kid",
                                "kid_std"])
    assert "fid_ci95_low" not in md and "| student | 4 | 21.00 [19.80, 22.40] | ≈ best |" in md
    paths = write_report(table, tmp_path, columns=["model", "fid", "fid_ci95_low", "fid_ci95_high", "fid_vs_best"])
    assert paths["csv"].read_text().splitlines()[0].startswith("model,fid,fid_ci95_low,fid_ci95_high,fid_vs_best")


def test_interval_helpers() -> None:
    a, b = Interval(10, 9, 11), Interval(12, 11.5, 13)
    assert a.overlaps(Interval(11, 10.9, 12)) and not a.overlaps(b) and a.width == 2
    assert torch.is_tensor(torch.as_tensor(a.low))


def test_normal_fid_interval_is_centred_on_the_fid_and_covers_the_expected_fid_at_that_n() -> None:
    """The default (normal) interval always contains the reported FID, and covers E[FID_n], the quantity a protocol
    with fixed N compares, in about 95% of draws (E[FID_n] by Monte Carlo over many independent sets)."""
    d, n = 4, 60
    mu_r, sigma_r = np.zeros(d), np.eye(d)
    rng = np.random.default_rng(5)
    sets = [rng.normal(0.3, 1.5, size=(n, d)) for _ in range(400)]
    expected = float(np.mean([FidBootstrap(x, mu_r, sigma_r).fid(np.ones(n)) for x in sets]))
    covered = 0
    for i, x in enumerate(sets[:40]):
        iv = FidBootstrap(x, mu_r, sigma_r).interval(resamples=200, seed=i)
        assert iv.method == "normal" and iv.low <= iv.estimate <= iv.high
        assert iv.high - iv.estimate == pytest.approx(iv.estimate - iv.low) or iv.low == 0.0
        covered += iv.contains(expected)
    assert covered / 40 >= 0.85, covered / 40


def test_students_meet_the_teacher_at_their_baked_guidance_and_at_equal_nfe() -> None:
    """A student distilled from w = 2 pairs samples at w = 1 but carries w = 2: it is compared with the guided
    teacher at its steps, and with the teacher row of the same NFE (a CFG step counts 2)."""
    def row(role, steps, nfe, guidance, fid, **extra):
        return {"model": role, "role": role, "steps": steps, "sampler": "euler", "nfe": nfe, "guidance": guidance,
                "fid": fid, "fid_ci95_low": fid - 2, "fid_ci95_high": fid + 2, **extra}

    table = [row("teacher", 2, 4, 2.0, 190.0), row("teacher", 4, 8, 2.0, 100.0),
             row("student", 4, 4, 1.0, 97.0, effective_guidance=2.0)]
    mark_separability(table)
    assert table[2]["fid_vs_teacher"] == "≈"  # vs teacher@4 steps, w = 2: intervals overlap
    assert table[2]["fid_vs_teacher_nfe"] == "better"  # vs teacher@2 steps = 4 NFE
    del table[2]["effective_guidance"], table[2]["fid_vs_teacher"], table[2]["fid_vs_teacher_nfe"]
    mark_separability(table)
    assert "fid_vs_teacher" not in table[2]  # w = 1 vs w = 2 are not the same setting


@pytest.mark.parametrize("n,d", [(12, 32), (80, 16), (80, 64)])  # Gram path; d x d; subset smaller than d
def test_subset_fid_is_the_fid_of_that_subset(n: int, d: int) -> None:
    rng = np.random.default_rng(5)
    ref = rng.normal(size=(300, d))
    gen = rng.normal(size=(n, d)) * 1.2 + 0.3
    mu, sigma = feature_statistics(ref)
    boot = FidBootstrap(gen, mu, sigma)
    keep = rng.choice(n, n // 2, replace=False)
    counts = np.zeros(n)
    counts[keep] = 1
    assert boot.fid(counts) == pytest.approx(fid_from_stats(*feature_statistics(gen[keep]), mu, sigma), rel=1e-6)
    with pytest.raises(ValueError, match="non-negative"):
        boot.fid(-np.ones(n))


def test_fid_by_sample_size_averages_disjoint_blocks_and_shows_the_small_n_bias() -> None:
    rng = np.random.default_rng(6)
    d = 24
    ref = torch.from_numpy(rng.normal(size=(2000, d)))
    gen = rng.normal(size=(800, d)) + 0.1  # a near-copy of the reference distribution: FID ~ |0.1|^2 d = 0.24
    reference = ReferenceStats("synthetic", 2000, 32, "none", "h", ref.mean(0), torch.cov(ref.T), ref.float())
    rows = fid_by_sample_size(gen, reference, [800, 200, 50], seed=3)
    assert [(r.size, r.blocks) for r in rows] == [(50, 16), (200, 4), (800, 1)]
    full = fid_from_stats(*feature_statistics(gen), reference.mu.numpy(), reference.sigma.numpy())
    assert rows[-1].mean == pytest.approx(full, rel=1e-6) and np.isnan(rows[-1].std)
    order = np.random.default_rng(3).permutation(800)
    blocks = [fid_from_stats(*feature_statistics(gen[order[b * 200:(b + 1) * 200]]), reference.mu.numpy(),
                             reference.sigma.numpy()) for b in range(4)]
    assert rows[1].mean == pytest.approx(np.mean(blocks), rel=1e-6)
    assert rows[0].mean > rows[1].mean > rows[2].mean  # the bias falls with N
    with pytest.raises(ConfigError, match="2..800"):
        fid_by_sample_size(gen, reference, [1000])


def _fid_case() -> FidBootstrap:
    rng = np.random.default_rng(4)
    return FidBootstrap(rng.normal(0.2, 1.1, size=(40, 8)), np.zeros(8), np.eye(8))


def test_bootstrap_inside_a_live_progress_is_a_task_of_it_and_keeps_its_numbers(monkeypatch) -> None:
    """Under a live rich Progress (a training or sweep bar) the bootstrap's bar is a task of that display, never a
    second live display (rich < 14 refuses one: LiveError), and the interval is the one computed without a bar."""
    import io

    from rich.console import Console
    from rich.errors import LiveError
    from rich.progress import Progress, TextColumn

    from distill_common import progress as progress_module

    plain = _fid_case().interval(resamples=60, seed=3, progress=False)
    monkeypatch.setattr(progress_module, "DEFAULT_DELAY", 0.0)  # show the bar at once
    console = Console(file=io.StringIO(), force_terminal=True, width=100)
    added: list[str] = []
    outer = Progress(TextColumn("{task.description} {task.fields[info]}"), console=console)
    with outer:
        outer.add_task("train", total=10, info="loss 0.1")  # the outer bar's columns read a field of its tasks

        def no_second_live(live):
            raise LiveError("Only one live display may be active at once")  # what rich < 14 does

        monkeypatch.setattr(console, "set_live", no_second_live)
        add_task = outer.add_task
        monkeypatch.setattr(outer, "add_task", lambda description, **kw: added.append(description)
                            or add_task(description, **kw))
        inside = _fid_case().interval(resamples=60, seed=3, console=console)
        outer.refresh()  # renders every task's columns: the added task carried the outer's fields
        assert [t.description for t in outer.tasks] == ["train"]  # the bootstrap's task is gone again
    assert added == ["bootstrap (60 resamples)"]
    assert (inside.estimate, inside.low, inside.high) == (plain.estimate, plain.low, plain.high)


def test_bootstrap_bar_of_its_own_only_when_nothing_is_live(monkeypatch) -> None:
    import io

    from rich.console import Console

    from distill_common import progress as progress_module

    plain = _fid_case().interval(resamples=30, seed=1, progress=False)
    console = Console(file=io.StringIO(), force_terminal=True, width=100)
    quick = _fid_case().interval(resamples=30, seed=1, console=console)  # well under 2 s: no bar drawn
    assert "bootstrap" not in console.file.getvalue()
    monkeypatch.setattr(progress_module, "DEFAULT_DELAY", 0.0)
    shown = _fid_case().interval(resamples=30, seed=1, console=console)
    assert "bootstrap (30 resamples)" in console.file.getvalue()
    assert not console._live_stack  # the bar stopped with the resampling
    assert (quick.low, quick.high) == (shown.low, shown.high) == (plain.low, plain.high)
