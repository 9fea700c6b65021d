"""FID (Heusel et al. 2017) for the small image sets of periodic evaluation, exact and fast.

With ``Sigma_i = A_i A_i^T`` (``A_i``: the centred features as columns, divided by ``sqrt(n_i - 1)``), the
nonzero eigenvalues of ``Sigma_1 Sigma_2`` are the squared singular values of ``A_1^T A_2`` (n_1 x n_2), so

    ``tr sqrt(Sigma_1 Sigma_2) = ||A_1^T A_2||_*``  (the nuclear norm)

and ``FID = |mu_1 - mu_2|^2 + ||A_1||_F^2 + ||A_2||_F^2 - 2 ||A_1^T A_2||_*`` costs O(D n_1 n_2) instead of
the O(D^3) non-symmetric eigendecomposition of a 2048 x 2048 matrix that torch-fidelity performs (about 20 s
on one CPU core). It needs every reference feature, which ``ReferenceStats`` keeps for sets of up to 10,000
images; otherwise (or when n >= D) it falls back to ``distill_eval.fid.score_images``. Results agree with
torch-fidelity's to floating-point precision (tested) and carry the same protocol stamp.
"""

from __future__ import annotations

from typing import Any

import torch


def _centred(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = features.detach().to("cpu", torch.float64)
    mu = x.mean(dim=0)
    return mu, (x - mu).T / (x.shape[0] - 1) ** 0.5  # (D,), (D, n)


def fid_low_rank(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """FID between two feature sets (N_a, D) and (N_b, D) through the nuclear-norm identity above."""
    if features_a.shape[0] < 2 or features_b.shape[0] < 2:
        raise ValueError("FID needs at least 2 samples per set")
    mu_a, a = _centred(features_a)
    mu_b, b = _centred(features_b)
    nuclear = torch.linalg.svdvals(a.T @ b).sum()
    return float((mu_a - mu_b).square().sum() + a.square().sum() + b.square().sum() - 2 * nuclear)


def score_small_set(images: torch.Tensor, extractor: Any, reference: Any, batch_size: int = 32) -> Any:
    """``distill_eval.fid.score_images`` with the low-rank FID when both sets are smaller than the feature
    size."""
    from distill_eval.fid import extract_features, kid_from_features, score_images
    from distill_eval.protocol import FIDResult

    dims = reference.features.shape[1]
    if (
        images.shape[0] >= dims
        or reference.features.shape[0] != reference.reference_n
        or reference.reference_n >= dims
    ):
        return score_images(images, extractor, reference, batch_size=batch_size, progress=False)
    if images.shape[-1] != reference.resolution:
        from distill_common.errors import ConfigError

        raise ConfigError(
            f"generated images are {images.shape[-1]}px but the reference statistics were taken at "
            f"{reference.resolution}px; generate at the reference resolution"
        )
    features = extract_features(images, extractor, batch_size=batch_size, progress=False)
    size = min(1000, features.shape[0], reference.features.shape[0])
    kid_mean, kid_std = kid_from_features(features, reference.features, 100, size)
    return FIDResult(
        fid=fid_low_rank(features, reference.features),
        kid_mean=kid_mean,
        kid_std=kid_std,
        protocol=reference.protocol(features.shape[0]),
    )
