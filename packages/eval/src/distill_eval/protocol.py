"""The measurement protocol stamped on every FID/KID number, and the refusal to compare across protocols.

FID depends on the feature extractor's exact weights, the reference set and its size, the number of
generated images (the estimator is biased in N; Chong & Forsyth, "Effectively Unbiased FID", CVPR 2020),
the image resolution, the resize filter (Parmar et al., "On Aliased Resizing and Surprising Subtleties
in GAN Evaluation", CVPR 2022) and the precision the Inception features were computed in (fp32, or bf16
autocast: ~0.2% FID drift). Two results are comparable only when all of these agree.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

from distill_common.errors import ConfigError, unknown_choice

if TYPE_CHECKING:
    from distill_eval.intervals import Interval

TAG_PREFIX = "fid_protocol."
RANK_KEYS = ("fid", "kid_mean")

# The one default protocol: `make demo` (rf pipeline --preset smoke), `distill eval benchmark` and `distill eval fid`
# all measure with it unless told otherwise, so a quick check reproduces the demo's numbers; where a command differs
# (other N, another reference), its output says so (:func:`protocol_differences`).
DEFAULT_PROTOCOL = {"generated_n": 360, "reference_set": "cifar10-train", "reference_n": 1000,
                    "feature_precision": "bf16"}
# How features are computed, stamped in every protocol and cache key: the forward's precision (bf16 = under
# torch.autocast, measured 2.2x fp32 on an AMX CPU), optionally under torch.compile ("+compile": 1.34x eager in bf16
# on 2 AMD EPYC cores; features differ from eager's in their last bits, so the two never share a cache or a ranking).
FEATURE_PRECISIONS = ("fp32", "bf16", "fp32+compile", "bf16+compile")
COMPILE_SUFFIX = "+compile"
RELIABLE_N = 2048  # Inception pool features: below this many images the covariance is singular and FID biased


def protocol_differences(**values: object) -> list[str]:
    """The fields of ``values`` (``generated_n=...``, ``reference_set=...``) that differ from DEFAULT_PROTOCOL,
    as "generated_n 256 (default 360)"; None values are skipped."""
    return [f"{k} {v} (default {DEFAULT_PROTOCOL[k]})" for k, v in values.items()
            if k in DEFAULT_PROTOCOL and v is not None and v != DEFAULT_PROTOCOL[k]]


def small_n_warning(*counts: int) -> str | None:
    """A warning when any image count is below RELIABLE_N, else None."""
    if min(counts) >= RELIABLE_N:
        return None
    return (f"N = {' vs '.join(f'{n:,}' for n in counts)} is below {RELIABLE_N:,}, the Inception feature dimension: "
            "FID is biased upward there and only comparable with other results at the same N")


@dataclass(frozen=True)
class MetricProtocol:
    """Everything an FID/KID value depends on besides the generator itself."""

    extractor_hash: str  # short sha256 of the Inception weights actually used
    reference_set: str  # e.g. "cifar10-train", "coco-val2017", "folder:<name>-<pathhash>"
    reference_n: int  # images in the reference statistics
    generated_n: int  # generated images scored
    resolution: int  # side of the square images both sets were evaluated at, before the extractor
    resize: str  # how images reach the extractor's 299x299 input: "none" | "bilinear" | "bicubic"
    feature_precision: str = "fp32"  # Inception forward: one of FEATURE_PRECISIONS ("bf16" = autocast)

    def as_tags(self) -> dict[str, str]:
        """MLflow tags (string values), one per field, under ``fid_protocol.``."""
        return {f"{TAG_PREFIX}{k}": str(v) for k, v in asdict(self).items()}

    def as_dict(self) -> dict[str, str | int]:
        return asdict(self)

    def differences(self, other: MetricProtocol) -> list[str]:
        """Names of the fields whose values differ, in declaration order."""
        return [f.name for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]


@dataclass(frozen=True)
class FIDResult:
    """FID (Heusel et al. 2017) with its bootstrap interval, and KID (Binkowski et al. 2018, mean and std over
    ``kid_subsets`` random subsets of ``kid_subset_size``) under one protocol."""

    fid: float
    kid_mean: float
    kid_std: float
    protocol: MetricProtocol
    fid_interval: Interval | None = None  # 95% bootstrap interval (± 1.96 SE) over the generated images
    kid_subsets: int = 0
    kid_subset_size: int = 0

    def as_metrics(self) -> dict[str, float]:
        """fid, fid_ci95_low/high (when an interval exists), kid_mean, kid_std; only finite values."""
        out = {"fid": self.fid, "kid_mean": self.kid_mean, "kid_std": self.kid_std}
        if self.fid_interval is not None:
            out.update(fid_ci95_low=self.fid_interval.low, fid_ci95_high=self.fid_interval.high)
        return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(v)}


def _protocol_of(item: FIDResult | MetricProtocol) -> MetricProtocol:
    return item.protocol if isinstance(item, FIDResult) else item


def check_comparable(a: FIDResult | MetricProtocol, b: FIDResult | MetricProtocol) -> None:
    """Raise ConfigError naming every protocol field that differs between ``a`` and ``b``."""
    pa, pb = _protocol_of(a), _protocol_of(b)
    diff = pa.differences(pb)
    if diff:
        detail = ", ".join(f"{name} {getattr(pa, name)!r} vs {getattr(pb, name)!r}" for name in diff)
        raise ConfigError(
            f"FID/KID results were measured under different protocols ({detail}); "
            "re-evaluate them with the same extractor, reference set, sample counts, resolution and resize"
        )


def rank_results(
    results: Mapping[Hashable, FIDResult] | Sequence[FIDResult], by: str = "fid"
) -> list[tuple[Hashable, FIDResult]]:
    """Sort results best (lowest) first after checking every protocol equals the first one's.

    A mapping keeps its keys as labels; a sequence is labelled by position.
    """
    if by not in RANK_KEYS:
        raise unknown_choice("ranking metric", by, RANK_KEYS)
    items = list(results.items()) if isinstance(results, Mapping) else list(enumerate(results))
    for _, result in items[1:]:
        check_comparable(items[0][1], result)
    return sorted(items, key=lambda kv: getattr(kv[1], by))
