"""The evaluation a training run does at intervals and at its end: tracking errors against the
null model on held-out clips, and a sample video, both logged to MLflow by the caller."""

from __future__ import annotations

import torch

from kpscale.data.stream import ClipLoader
from kpscale.evaluate import tracking
from kpscale.evaluate.media import panel
from kpscale.train.config import TrainConfig


def _clips(spec: str, cfg: TrainConfig, limit: int):
    """Up to `limit` clips in a fixed order: the same on every rank and at every evaluation."""
    loader_cfg = cfg.data.model_copy(update={"shuffle": False, "even": False, "drop_last": False, "num_workers": 0})
    loader = ClipLoader(spec, loader_cfg, window=cfg.window, rank=0, world_size=1)
    seen = 0
    for batch in loader:
        if "coords" not in batch:
            raise ValueError(f"{spec}: tracking error needs ground-truth coords, the clips have none")
        yield batch
        seen += len(batch["key"])
        if seen >= limit:
            return


@torch.no_grad()
def evaluate(model, cfg: TrainConfig, device: torch.device, dtype: torch.dtype,
             fit_clips: int = 256, test_clips: int = 128) -> tuple[dict[str, float], object]:
    """Metrics {tracking_error_observed, tracking_error_predicted, tracking_error_null} in pixels,
    and the video panel of the first held-out clip. Runs on every rank (ZeRO-3 needs all of
    them for a forward pass); only rank 0 logs."""
    was_training = model.training
    model.eval()
    obs, mcfg = cfg.model.observed, cfg.model
    fit_kp, fit_pos = [], []
    for batch in _clips(cfg.data.train, cfg, fit_clips):
        keypoints = model.detector(batch["video"].to(device, dtype) - 0.5)[0]
        fit_kp.append(keypoints.float().flatten(0, 1))
        fit_pos.append(batch["coords"].flatten(0, 1).to(device))
    weights = tracking.fit(torch.cat(fit_kp), torch.cat(fit_pos))

    observed, predicted, positions, video = [], [], [], None
    for batch in _clips(cfg.data.test or cfg.data.train, cfg, test_clips):
        clip, coords = batch["video"].to(device, dtype), batch["coords"].to(device)
        keypoints = model.detector(clip - 0.5)[0].float()
        observed.append(tracking.distance(tracking.apply(weights, keypoints[:, :obs]), coords[:, :obs]).mean((1, 2)))
        sampled, _ = model.sample_future(clip, mcfg.predicted, mcfg.num_samples)
        predicted.append(tracking.best_of_samples(weights, sampled[:, :, obs:].float(), coords[:, obs:]))
        positions.append(coords)
        if video is None:
            out = model(clip[:1], step=0)
            video = panel(batch["video"][0], out["reconstruction"][0], out["keypoints"][0],
                          out["predicted_frames"][0], obs, mcfg.heatmap_size)
    metrics = {
        "tracking_error_observed": torch.cat(observed).mean().item(),
        "tracking_error_predicted": torch.cat(predicted).mean().item(),
        "tracking_error_null": tracking.null_error(torch.cat(fit_pos).cpu(), torch.cat(positions).cpu()),
    }
    model.train(was_training)
    return metrics, video
