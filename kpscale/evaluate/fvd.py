"""Frechet Video Distance (Unterthiner et al. 2018): the Frechet distance between Gaussians fitted
to I3D logits of real and of generated clips. Lower is better; 0 for identical statistics."""

from __future__ import annotations

import torch
from torch import Tensor

from kpscale.evaluate.i3d import I3D, preprocess


def _sym_sqrt(matrix: Tensor) -> Tensor:
    """Square root of a symmetric positive semi-definite matrix; rounding's negative eigenvalues -> 0."""
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), in float64.

    sigma1 sigma2 is not symmetric, and scipy's sqrtm of it picks up complex parts and blows up
    when the covariances are singular, as they are with fewer samples than feature dimensions.
    Its eigenvalues are those of the symmetric PSD s sigma2 s with s = sigma1^(1/2), so the trace
    comes from two symmetric eigendecompositions: real, clipped at 0, no inverse anywhere."""
    mu1, sigma1, mu2, sigma2 = (torch.as_tensor(a, dtype=torch.float64) for a in (mu1, sigma1, mu2, sigma2))
    s = _sym_sqrt(sigma1)
    product = s @ sigma2 @ s
    trace_sqrt = torch.linalg.eigvalsh((product + product.T) / 2).clamp(min=0).sqrt().sum()
    distance = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt
    return max(distance.item(), 0.0)  # >= 0 in exact arithmetic; rounding can leave -1e-12


def gaussian_stats(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean [D] and unbiased covariance [D, D] of features [N, D], in float64."""
    features = torch.as_tensor(features, dtype=torch.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need features [N, D] with N >= 2 for a covariance, got {tuple(features.shape)}")
    return features.mean(0), torch.cov(features.T)


def fvd(real_features: Tensor, fake_features: Tensor) -> float:
    """Frechet distance between the Gaussians of two feature sets [N, D] and [M, D]."""
    return frechet_distance(*gaussian_stats(real_features), *gaussian_stats(fake_features))


class FVD:
    """Accumulates I3D logits of real and generated clips over batches; `compute` gives the FVD."""

    def __init__(self, i3d: I3D, device: torch.device | str, batch_size: int = 8):
        self.i3d, self.device, self.batch_size = i3d.to(device).eval(), torch.device(device), batch_size
        self.real: list[Tensor] = []
        self.fake: list[Tensor] = []

    @torch.no_grad()
    def features(self, video: Tensor) -> Tensor:
        """[B, T, 3, H, W] in [0, 1] -> logits [B, 400] (float64, CPU), `batch_size` clips at a time
        since 224x224 I3D activations are large."""
        chunks = [self.i3d(preprocess(chunk.to(self.device))) for chunk in video.split(self.batch_size)]
        return torch.cat(chunks).double().cpu()

    def update(self, real_video: Tensor, fake_video: Tensor) -> None:
        self.real.append(self.features(real_video))
        self.fake.append(self.features(fake_video))

    def compute(self) -> float:
        return fvd(torch.cat(self.real), torch.cat(self.fake))
