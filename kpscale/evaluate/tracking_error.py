"""Tracking error (paper Sec. 5.2): fit a linear map from a model's states (keypoints (x, y, mu)
flattened, or CNN-VRNN's feature vector) to the ground-truth object positions on training clips, then measure the mean distance between mapped
and true positions on held-out clips, in pixels. The null model predicts each object's mean
training position; a model whose keypoints track objects must be well below it. Predicted
futures are scored by the best of several samples and compared with "no dynamics", the last
observed keypoints held still."""

from __future__ import annotations

import torch
from torch import Tensor

from kpscale.evaluate.media import keypoint_pixels


def features(states: Tensor) -> Tensor:
    """[..., D] -> [..., D + 1]: the states and a constant for the offset."""
    states = states.double()
    return torch.cat([states, torch.ones_like(states[..., :1])], -1)


def fit(states: Tensor, positions: Tensor, ridge: float = 1e-4) -> Tensor:
    """Least squares (slightly ridge-regularised, since unused keypoints make columns
    collinear) from states [M, D] to positions [M, N, 2]; returns weights [D + 1, 2N]."""
    x, y = features(states), positions.flatten(-2).double()
    gram = x.T @ x + ridge * len(x) * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    return torch.linalg.solve(gram, x.T @ y)


def apply(weights: Tensor, states: Tensor) -> Tensor:
    """States [..., D] -> positions [..., N, 2]."""
    return (features(states) @ weights).unflatten(-1, (-1, 2)).float()


def distance(predicted: Tensor, positions: Tensor) -> Tensor:
    """Per-object Euclidean distance [..., N]."""
    return (predicted - positions).norm(dim=-1)


def per_step_errors(weights: Tensor, states: Tensor, positions: Tensor) -> Tensor:
    """Error [B, T] (mean over objects) of states [B, T, D] mapped onto positions [B, T, N, 2]:
    observed steps, or a deterministic baseline such as `no_dynamics`."""
    return distance(apply(weights, states), positions).mean(-1)


def null_error_per_step(train_positions: Tensor, test_positions: Tensor) -> Tensor:
    """Error [B, T] (mean over objects) of predicting each object's mean training position;
    train positions [..., N, 2], test positions [B, T, N, 2]."""
    mean = train_positions.reshape(-1, *train_positions.shape[-2:]).mean(0)
    return distance(mean.expand_as(test_positions), test_positions).mean(-1)


def null_error(train_positions: Tensor, test_positions: Tensor) -> float:
    """Error of predicting each object's mean training position, positions [..., N, 2]."""
    return null_error_per_step(train_positions, test_positions).mean().item()


def no_dynamics(observed: Tensor, steps: int) -> Tensor:
    """The paper's "no dynamics" baseline: the last of the observed states [B, T_obs, ...] held
    for `steps` future steps -> [B, steps, ...]. A dynamics model must beat it to earn its keep."""
    return observed[:, -1:].expand(-1, steps, *observed.shape[2:])


def nearest_keypoint_distance(keypoints: Tensor, positions: Tensor, heatmap_size: int, image_size: int,
                              min_presence: float = 0.1) -> Tensor:
    """Distance [..., N] in pixels from each object to the nearest keypoint that is present (mu at
    least `min_presence`; a faded keypoint draws nothing), inf when none is: keypoints
    [..., K, 3], object positions [..., N, 2] in pixels. Unlike the regression, which can combine
    many keypoints, this says whether a keypoint sits on the object itself."""
    pixels = torch.from_numpy(keypoint_pixels(keypoints, heatmap_size, image_size))
    d = (positions.cpu()[..., :, None, :] - pixels[..., None, :, :]).norm(dim=-1)  # [..., N, K]
    return d.masked_fill(keypoints[..., None, :, 2].cpu() < min_presence, float("inf")).amin(-1)


def objects_found(distances: Tensor, image_size: int) -> dict[str, float]:
    """Metrics from distances [..., N] (`nearest_keypoint_distance`): `keypoint_distance/object_<n>`,
    each object's mean distance (inf counted as the image size), and `objects_found`, how many
    objects have a keypoint on them: within image_size / 16 pixels on average (4 px at 64x64,
    about the radius of a Basketball player)."""
    per_object = distances.clamp(max=image_size).flatten(0, -2).mean(0)
    return {"objects_found": float((per_object <= image_size / 16).sum()),
            **{f"keypoint_distance/object_{n}": d.item() for n, d in enumerate(per_object)}}


def best_of_samples(weights: Tensor, sampled: Tensor, positions: Tensor, per_object: bool = False) -> Tensor:
    """Per-step error [B, T] (mean over objects) of the sampled future closest to the truth:
    sampled states [B, S, T, D], positions [B, T, N, 2]; `.mean(1)` gives the per-clip error.

    As the paper (Sec. 5.2) does to account for stochasticity: the best sample is chosen once per
    clip by its mean error over all steps and objects (Human3.6M), or with `per_object` once per
    object by that object's mean error over the steps (Basketball: "separately for each player").
    Choosing per step would be cheating: it peeks at the truth of every frame and stitches a
    trajectory no sample drew."""
    errors = distance(apply(weights, sampled), positions[:, None])  # [B, S, T, N]
    score = errors.mean(2, keepdim=True) if per_object else errors.mean((2, 3), keepdim=True)
    best = score.argmin(1, keepdim=True).expand(-1, -1, *errors.shape[2:])  # [B, 1, T, N]
    return errors.gather(1, best).squeeze(1).mean(-1)
