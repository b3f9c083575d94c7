"""Keypoint tracking error (paper Sec. 5.2): fit a linear map from keypoints (x, y, mu) to the
ground-truth object positions on training clips, then measure the mean distance between mapped
and true positions on held-out clips, in pixels. The null model predicts each object's mean
training position; a model whose keypoints track objects must be well below it."""

from __future__ import annotations

import torch
from torch import Tensor


def features(keypoints: Tensor) -> Tensor:
    """[..., K, 3] -> [..., 3K + 1]: flattened keypoints and a constant for the offset."""
    flat = keypoints.flatten(-2).double()
    return torch.cat([flat, torch.ones_like(flat[..., :1])], -1)


def fit(keypoints: Tensor, positions: Tensor, ridge: float = 1e-4) -> Tensor:
    """Least squares (slightly ridge-regularised, since unused keypoints make columns
    collinear) from keypoints [M, K, 3] to positions [M, N, 2]; returns weights [3K + 1, 2N]."""
    x, y = features(keypoints), positions.flatten(-2).double()
    gram = x.T @ x + ridge * len(x) * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    return torch.linalg.solve(gram, x.T @ y)


def apply(weights: Tensor, keypoints: Tensor) -> Tensor:
    """Keypoints [..., K, 3] -> positions [..., N, 2]."""
    return (features(keypoints) @ weights).unflatten(-1, (-1, 2)).float()


def distance(predicted: Tensor, positions: Tensor) -> Tensor:
    """Per-object Euclidean distance [..., N]."""
    return (predicted - positions).norm(dim=-1)


def null_error(train_positions: Tensor, test_positions: Tensor) -> float:
    """Error of predicting each object's mean training position, positions [M, N, 2]."""
    mean = train_positions.reshape(-1, *train_positions.shape[-2:]).mean(0)
    return distance(mean.expand_as(test_positions), test_positions).mean().item()


def best_of_samples(weights: Tensor, sampled: Tensor, positions: Tensor) -> Tensor:
    """Per-clip error of the sampled future closest to the truth: sampled keypoints
    [B, S, T, K, 3], positions [B, T, N, 2] -> [B] (mean over steps and objects)."""
    errors = distance(apply(weights, sampled), positions[:, None]).mean((-1, -2))  # [B, S]
    return errors.min(1).values
