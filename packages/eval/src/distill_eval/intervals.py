"""Confidence intervals from the bootstrap (Efron, "Bootstrap Methods: Another Look at the Jackknife", 1979),
and the FID interval over the generated images.

:func:`bootstrap_interval` resamples the observations (rows) with replacement ``resamples`` times with a seeded
generator and returns a two-sided interval through ``scipy.stats.bootstrap``. The default method is the *basic*
(reverse-percentile) bootstrap, ``[2 t - q(1 - a/2), 2 t - q(a/2)]`` (Davison & Hinkley, "Bootstrap Methods and
their Application", 1997, eq. 5.6): it corrects for a statistic's bias, which matters for FID because a resample
with replacement holds only ~63% distinct images and so scores *worse* than the set it was drawn from. The
percentile method ``[q(a/2), q(1 - a/2)]`` is available for unbiased statistics.

:class:`FidBootstrap` is the FID of a resample of the generated features against *fixed* reference statistics
(the reference is large and its statistics are cached; only the generated side is resampled). It is exact, and
cheap enough for ~200 resamples: with ``R = Sigma_ref^(1/2)`` computed once and ``Z = X R`` for the generated
features ``X`` (n x d), the resample with counts ``c`` has

    FID* = |mu* - mu_ref|^2 + tr Sigma* + tr Sigma_ref - 2 tr sqrt(R Sigma* R),

where ``R Sigma* R = Zc^T diag(c) Zc / (n - 1)`` (``Zc``: rows of Z centred on the weighted mean). Its nonzero
eigenvalues are those of ``diag(c)^(1/2) Zc Zc^T diag(c)^(1/2)`` (m x m over the m distinct images, built from
the precomputed n x n Gram matrix ``Z Z^T``) when n < d, else of the d x d matrix itself: one symmetric
``eigvalsh`` per resample, no d x d matrix square root.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import scipy.linalg
import torch
from rich.console import Console
from scipy.stats import bootstrap, norm

from distill_common.errors import ConfigError, unknown_choice
from distill_common.progress import progress_task
from distill_eval.features import as_features, psd_sqrt

BOOTSTRAP_METHODS = ("normal", "basic", "percentile")
DEFAULT_RESAMPLES = 200
DEFAULT_LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate and its two-sided confidence interval."""

    estimate: float
    low: float
    high: float
    level: float = DEFAULT_LEVEL
    method: str = "basic"
    resamples: int = DEFAULT_RESAMPLES
    seconds: float = 0.0  # time the resampling took

    def overlaps(self, other: Interval) -> bool:
        """True when the two intervals share a point: the difference of the estimates is not established."""
        return self.low <= other.high and other.low <= self.high

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    @property
    def width(self) -> float:
        return self.high - self.low

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check(resamples: int, level: float, method: str) -> None:
    if method not in BOOTSTRAP_METHODS:
        raise unknown_choice("bootstrap method", method, BOOTSTRAP_METHODS)
    if resamples < 2:
        raise ConfigError(f"the bootstrap needs at least 2 resamples, got {resamples}; pass --bootstrap-resamples 200")
    if not 0 < level < 1:
        raise ConfigError(f"confidence level {level} must lie strictly between 0 and 1; pass e.g. 0.95")


def bootstrap_indices(
    n: int,
    statistic: Callable[[np.ndarray], float],
    *,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    method: str = "basic",
    seed: int = 0,
    progress: bool = True,
    console: Console | None = None,
) -> Interval:
    """Interval of ``statistic(indices)`` where ``indices`` (length n, values in 0..n-1) is the full sample
    ``0..n-1`` for the estimate and a resample drawn with replacement for each of ``resamples`` replicates.

    With ``progress``, a resampling that runs over two seconds shows a bar (:func:`distill_common.progress
    .progress_task`): a task of the rich ``Progress`` already live (on ``console`` or rich's global console) when
    there is one, so it is safe inside another bar. The numbers do not depend on it."""
    _check(resamples, level, method)
    if n < 2:
        raise ConfigError(f"the bootstrap needs at least 2 observations, got {n}")
    start = time.perf_counter()
    estimate = float(statistic(np.arange(n)))
    with progress_task(f"bootstrap ({resamples} resamples)", resamples, console=console, enabled=progress) as advance:
        def replicate(idx: np.ndarray) -> float:
            value = float(statistic(np.asarray(idx)))
            advance(1)
            return value

        result = bootstrap((np.arange(n),), replicate, n_resamples=resamples, confidence_level=level,
                           method="percentile" if method == "normal" else method, vectorized=False,
                           rng=np.random.default_rng(seed))
    if method == "normal":  # estimate +- z * bootstrap standard error (Efron & Tibshirani 1993, eq. 13.2)
        half = float(norm.ppf(0.5 + level / 2) * np.std(result.bootstrap_distribution, ddof=1))
        low, high = estimate - half, estimate + half
    else:
        low, high = (float(v) for v in result.confidence_interval)
    return Interval(estimate, low, high, level, method, resamples, time.perf_counter() - start)


def bootstrap_interval(
    data: np.ndarray | torch.Tensor,
    statistic: Callable[[Any], float],
    *,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    method: str = "basic",
    seed: int = 0,
    progress: bool = True,
    console: Console | None = None,
) -> Interval:
    """Bootstrap interval of ``statistic(data)``, resampling the rows (first axis) of ``data``; ``progress`` and
    ``console`` as in :func:`bootstrap_indices`."""
    n = len(data)
    return bootstrap_indices(n, lambda idx: statistic(data[idx]), resamples=resamples, level=level, method=method,
                             seed=seed, progress=progress, console=console)


class FidBootstrap:
    """FID of (re)samples of ``generated`` features against fixed reference statistics; see the module doc.

    ``fid(counts)`` takes how often each generated image occurs in the resample (all ones: the full set).
    ``reference_sqrt`` is ``Sigma_ref^(1/2)`` when already known (it costs one d x d ``eigh`` otherwise).
    """

    def __init__(self, generated: torch.Tensor | np.ndarray, mu_ref: torch.Tensor | np.ndarray,
                 sigma_ref: torch.Tensor | np.ndarray, reference_sqrt: torch.Tensor | None = None) -> None:
        x = as_features(generated, "generated features")
        mu_r = torch.as_tensor(mu_ref).detach().to("cpu", torch.float64)
        sigma_r = torch.as_tensor(sigma_ref).detach().to("cpu", torch.float64)
        n, d = x.shape
        if mu_r.shape != (d,) or sigma_r.shape != (d, d):
            raise ConfigError(f"reference statistics have shape mu {tuple(mu_r.shape)}, sigma {tuple(sigma_r.shape)} "
                              f"but the generated features are {d}-d; use the same feature extractor for both")
        root = psd_sqrt(sigma_r) if reference_sqrt is None else reference_sqrt.to("cpu", torch.float64)
        self.n, self.d = n, d
        # per-resample work is plain numpy: torch's thread pool adds more overhead than it saves on these sizes
        self.x, self.mu_r = x.numpy(), mu_r.numpy()
        self.sq_norms = np.square(self.x).sum(1)  # |x_i|^2
        self.trace_ref = float(sigma_r.diagonal().sum())
        self.z = (x @ root).numpy()  # (n, d)
        self.gram = self.z @ self.z.T if n < d else None  # (n, n)

    def fid(self, counts: np.ndarray | torch.Tensor) -> float:
        """FID of the multiset with ``counts[i]`` copies of generated image i; ``counts`` summing to less than n is
        a subset (a 0/1 vector: FID at that smaller sample size)."""
        c = np.asarray(counts, dtype=np.float64)
        if c.shape != (self.n,) or (c < 0).any() or c.sum() < 2:
            raise ValueError(f"counts must be a length-{self.n} vector of non-negative counts summing to 2 or more")
        n = c.sum()
        mu = c @ self.x / n
        mean_term = float(np.square(mu - self.mu_r).sum())
        trace_gen = float((c @ self.sq_norms - n * np.square(mu).sum()) / (n - 1))
        keep = np.flatnonzero(c)
        ck = c[keep]
        root_c = np.sqrt(ck)
        if self.gram is not None:
            g = self.gram[np.ix_(keep, keep)]
            z_dot_mean = g @ ck / n  # z_i . z_bar
            mean_sq = ck @ z_dot_mean / n  # z_bar . z_bar
            kernel = (g - z_dot_mean[:, None] - z_dot_mean[None, :] + mean_sq) * np.outer(root_c, root_c) / (n - 1)
        else:
            zk = self.z[keep]
            zc = (zk - ck @ zk / n) * root_c[:, None]
            kernel = (zc @ zc.T if len(keep) < self.d else zc.T @ zc) / (n - 1)  # same nonzero eigenvalues
        # LAPACK's MRRR driver: measured faster than the divide-and-conquer one and torch's eigvalsh on this CPU
        eigenvalues = scipy.linalg.eigvalsh(kernel, driver="evr", check_finite=False, overwrite_a=True)
        trace_sqrt = float(np.sqrt(np.clip(eigenvalues, 0, None)).sum())
        return mean_term + trace_gen + self.trace_ref - 2 * trace_sqrt

    def of_indices(self, indices: np.ndarray) -> float:
        return self.fid(np.bincount(indices, minlength=self.n))

    def interval(self, *, resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL, method: str = "normal",
                 seed: int = 0, progress: bool = True, console: Console | None = None) -> Interval:
        """Bootstrap interval over the generated images; the lower end is clamped at 0 (FID is a squared distance).

        The default ``normal`` interval, FID ± z·SE with SE the bootstrap standard error, is centred on the reported
        FID and estimates where the FID *at this N* lies: the quantity a protocol (which fixes N) compares, since
        the finite-N bias is shared by every model scored under it. ``basic`` instead shifts the interval by the
        bootstrap's bias estimate towards the infinite-N FID (at N = 500 that shift can exceed the width, so the
        interval no longer contains the reported FID). ``progress`` and ``console``: the bar of
        :func:`bootstrap_indices`."""
        res = bootstrap_indices(self.n, self.of_indices, resamples=resamples, level=level, method=method, seed=seed,
                                progress=progress, console=console)
        return Interval(res.estimate, max(res.low, 0.0), max(res.high, 0.0), level, method, resamples, res.seconds)
