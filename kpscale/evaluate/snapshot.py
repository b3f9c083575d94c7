"""The evaluation a training run does at intervals and at its end: tracking errors against the
null model on held-out clips, and a sample video, both logged to MLflow by the caller."""

from __future__ import annotations

import torch

from kpscale.data.stream import ClipLoader, DataConfig, ShardRef, resolve_shards
from kpscale.evaluate import tracking_error
from kpscale.evaluate.media import panel
from kpscale.train.config import TrainConfig


def fixed_batches(spec: str, data: DataConfig, window: int, limit: int | None, rank: int = 0, world: int = 1):
    """Batches of part `rank` of `world` of the first `limit` clips of `spec` (all when None), in
    a fixed order and from their first frame: the parts together hold exactly those clips, each
    once, whatever `world` is, and the same at every evaluation."""
    loader_cfg = data.model_copy(update={"shuffle": False, "even": False, "drop_last": False, "num_workers": 0,
                                         "random_window": False})
    yield from ClipLoader(first_clips(resolve_shards(spec), limit), loader_cfg, window=window, rank=rank,
                          world_size=world)


def first_clips(shards: list[ShardRef], limit: int | None) -> list[ShardRef]:
    """The shards holding the first `limit` clips in order, the last one cut to what is needed."""
    kept, left = [], limit
    for ref in shards:
        if left is not None and left <= 0:
            break
        kept.append(ref if left is None or ref.count <= left else ShardRef(ref.url, left))
        left = None if left is None else left - ref.count
    return kept


def _clips(spec: str, cfg: TrainConfig, limit: int):
    for batch in fixed_batches(spec, cfg.data, cfg.window, limit):
        if "coords" not in batch:
            raise ValueError(f"{spec}: tracking error needs ground-truth coords, the clips have none")
        yield batch


@torch.no_grad()
def fit_regression(model, spec: str, cfg: TrainConfig, limit: int, device: torch.device,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The tracking regression from the model's states (`represent`) fitted on up to `limit`
    clips of `spec` (training clips), and the object positions it saw [M, N, 2] (the null
    model's means come from them)."""
    states, positions = [], []
    for batch in _clips(spec, cfg, limit):
        states.append(model.represent(batch["video"].to(device, dtype)).float().flatten(0, 1))
        positions.append(batch["coords"].flatten(0, 1).to(device))
    return tracking_error.fit(torch.cat(states), torch.cat(positions)), torch.cat(positions)


@torch.no_grad()
def evaluate(model, cfg: TrainConfig, device: torch.device, dtype: torch.dtype,
             fit_clips: int = 256, test_clips: int = 128) -> tuple[dict[str, float], object]:
    """Metrics {tracking_error_observed, tracking_error_predicted, tracking_error_no_dynamics,
    tracking_error_null} in pixels, for a keypoint model objects_found and
    keypoint_distance/object_<n> (tracking_error.objects_found), and the video panel of the first
    held-out clip. Runs on every rank (ZeRO-3 needs all of them for a forward pass); only
    rank 0 logs."""
    was_training = model.training
    model.eval()
    obs, mcfg = cfg.model.observed, cfg.model
    weights, fit_positions = fit_regression(model, cfg.data.train, cfg, fit_clips, device, dtype)

    observed, predicted, held, positions, nearest, video = [], [], [], [], [], None
    for batch in _clips(cfg.data.test or cfg.data.train, cfg, test_clips):
        clip, coords = batch["video"].to(device, dtype), batch["coords"].to(device)
        states = model.represent(clip).float()
        observed.append(tracking_error.per_step_errors(weights, states[:, :obs], coords[:, :obs]).mean(1))
        keypoints = model.keypoints(states)
        if keypoints is not None:
            nearest.append(tracking_error.nearest_keypoint_distance(keypoints[:, :obs], coords[:, :obs],
                                                                    mcfg.heatmap_size, mcfg.image_size))
        sampled, _ = model.sample_future(clip, mcfg.predicted, mcfg.num_samples, actions=batch.get("actions"))
        predicted.append(tracking_error.best_of_samples(weights, sampled[:, :, obs:].float(),
                                                        coords[:, obs:]).mean(1))
        held.append(tracking_error.per_step_errors(
            weights, tracking_error.no_dynamics(states[:, :obs], mcfg.predicted), coords[:, obs:]).mean(1))
        positions.append(coords)
        if video is None:
            actions = batch.get("actions")
            out = model(clip[:1], step=0, actions=None if actions is None else actions[:1])
            drawn = model.keypoints(out["states"][0].flatten(1))
            video = panel(batch["video"][0], out["reconstruction"][0], out["predicted_frames"][0], obs, drawn,
                          None if drawn is None else mcfg.heatmap_size)
    metrics = {
        "tracking_error_observed": torch.cat(observed).mean().item(),
        "tracking_error_predicted": torch.cat(predicted).mean().item(),
        "tracking_error_no_dynamics": torch.cat(held).mean().item(),
        "tracking_error_null": tracking_error.null_error(fit_positions.cpu(), torch.cat(positions).cpu()),
    }
    if nearest:
        metrics.update(tracking_error.objects_found(torch.cat(nearest), mcfg.image_size))
    model.train(was_training)
    return metrics, video
