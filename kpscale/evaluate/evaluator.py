"""Held-out evaluation of a trained model: sampled futures scored by frame metrics, FVD features,
tracking error against its baselines, and keypoint trajectories. `evaluate_part` does one part of
the held-out clips (a Ray task, or the whole set in-process); `summarise` merges the parts."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch
from pydantic import Field

from kpscale.config import Config
from kpscale.data.shards import read_actions
from kpscale.evaluate import frames, reward_prediction, tracking_error
from kpscale.evaluate.fvd import FVD, fvd
from kpscale.evaluate.reward_prediction import RewardModel
from kpscale.evaluate.snapshot import fixed_batches
from kpscale.evaluate.trajectories import trajectory_table
from kpscale.train.config import TrainConfig


class EvaluateConfig(Config):
    run: str  # MLflow run id of a training run, or a model folder (weights.pt + config.yaml)
    data: str  # held-out shards: folder, glob, manifest or URL
    fit_data: str | None = None  # training shards for the tracking regression; None: the run's data.train
    samples: int = Field(10, ge=1)  # sampled futures per clip (the paper: 50 for tracking)
    future: int | None = Field(None, ge=1)  # predicted steps; None: the model's model.predicted
    start: int = Field(0, ge=0)  # the frame of every clip (held-out and fitted) where its window starts
    clips: int | None = Field(None, ge=1)  # held-out clips to evaluate; None: all
    fit_clips: int = Field(256, ge=1)
    batch_size: int = Field(8, ge=1)
    workers: int = Field(1, ge=1)  # Ray tasks; 1 evaluates in this process
    cpus_per_worker: int = Field(1, ge=1)
    per_object: bool = True  # best sample chosen per object (the paper's Basketball rule)
    i3d: str | None = None  # i3d_pretrained_400.pt; None: $KPSCALE_I3D_WEIGHTS, else FVD is unavailable
    vgg: str | None = None  # torchvision vgg16 weights; None: $KPSCALE_VGG_WEIGHTS, else no VGG cosine
    # An .npy of actions [T, A] every clip is rolled forward under, in place of its own (an
    # action-conditioned model's counterfactual); None: each clip's actions.
    actions: str | None = None
    tracking_uri: str | None = None
    seed: int = 0

    def given_actions(self) -> torch.Tensor | None:
        """The actions of `actions` as [1, T, A], or None."""
        return None if self.actions is None else torch.from_numpy(read_actions(self.actions, "--actions"))[None]


def rollout_actions(cfg: TrainConfig, batch: dict, given: torch.Tensor | None) -> dict:
    """What an action-conditioned model rolls a batch forward under, as `sample_future`'s
    keyword: the clips' own actions, or `given` [1, T, A] for every clip; nothing for a model
    that takes no actions."""
    if not getattr(cfg.model, "action_conditioned", False):
        return {}
    return {"actions": batch.get("actions") if given is None else given.expand(len(batch["video"]), -1, -1)}


@dataclass
class PartResult:
    """Per-clip arrays of one part; `summarise` concatenates them along the clip axis."""
    keys: list[str] = field(default_factory=list)
    arrays: dict[str, list[np.ndarray]] = field(default_factory=dict)
    tables: list[pa.Table] = field(default_factory=list)

    def add(self, name: str, value: torch.Tensor) -> None:
        self.arrays.setdefault(name, []).append(value.detach().float().cpu().numpy())


@torch.no_grad()
def evaluate_part(model, cfg: TrainConfig, ecfg: EvaluateConfig, weights: torch.Tensor | None,
                  fit_positions: torch.Tensor | None, reward_model: RewardModel | None, i3d: FVD | None, vgg,
                  rank: int, world: int, progress=None) -> PartResult:
    """Evaluate part `rank` of `world` of the first `ecfg.clips` held-out clips (all when None) on
    the model's device.
    `weights` is the tracking regression (None when the data has no coordinates), `reward_model`
    the reward prediction's (None when the data has no rewards); `i3d` (an FVD feature extractor)
    and `vgg` may be None."""
    torch.manual_seed(ecfg.seed + rank)
    device = next(model.parameters()).device
    obs, pred, size = cfg.model.observed, ecfg.future or cfg.model.predicted, cfg.model.image_size
    data = cfg.data.model_copy(update={"batch_size": ecfg.batch_size})
    given = ecfg.given_actions()
    out = PartResult()
    for batch in fixed_batches(ecfg.data, data, obs + pred, ecfg.clips, rank, world):
        video = batch["video"].to(device)
        encoded = model.represent(video)  # [B, T, D]: every frame, for tracking and export
        sampled, generated = model.sample_future(video, pred, ecfg.samples,
                                                 **rollout_actions(cfg, batch, given))  # [B, S, T, ...]
        b, s = sampled.shape[:2]
        truth = video[:, None, obs:].expand(-1, s, -1, -1, -1, -1).flatten(0, 1)
        futures = generated[:, :, obs:].flatten(0, 1)
        out.add("psnr", frames.psnr_per_step(futures, truth).unflatten(0, (b, s)))  # [B, S, P]
        out.add("ssim", frames.ssim_per_step(futures, truth).unflatten(0, (b, s)))
        if vgg is not None:
            out.add("vgg_cosine", frames.vgg_cosine_per_step(vgg, futures, truth).unflatten(0, (b, s)))
        if i3d is not None:  # real: the clip; generated: its observed frames, then each sampled future
            out.add("i3d_real", i3d.features(video))
            out.add("i3d_fake", torch.stack([i3d.features(torch.cat([video[:, :obs], generated[:, n, obs:]], 1))
                                             for n in range(s)], 1))  # [B, S, D]
        if reward_model is not None:
            latent, rewards = reward_prediction.rollouts(model, [batch], pred, ecfg.samples, device,
                                                         lambda b: rollout_actions(cfg, b, given))
            error, null = reward_prediction.squared_errors(reward_model, latent, rewards)
            out.add("reward_error", error)  # [B, T]
            out.add("reward_null_error", null)
        detected = model.keypoints(encoded)  # [B, T, K, 3], None for a model without keypoints
        if weights is not None:
            coords = batch["coords"].to(device)
            out.add("track_observed", tracking_error.per_step_errors(weights, encoded[:, :obs], coords[:, :obs]))
            if detected is not None:
                out.add("keypoint_distance", tracking_error.nearest_keypoint_distance(  # [B, obs, N]
                    detected[:, :obs], coords[:, :obs], cfg.model.heatmap_size, size))
            out.add("track_predicted", tracking_error.best_of_samples(weights, sampled[:, :, obs:], coords[:, obs:],
                                                                      ecfg.per_object))
            out.add("track_no_dynamics", tracking_error.per_step_errors(
                weights, tracking_error.no_dynamics(encoded[:, :obs], pred), coords[:, obs:]))
            out.add("track_null", tracking_error.null_error_per_step(fit_positions, coords))
        if detected is not None:  # export the detected keypoints on observed frames, the sampled ones after
            exported = torch.cat([detected[:, None, :obs].expand(-1, s, -1, -1, -1),
                                  model.keypoints(sampled[:, :, obs:])], 2)
            out.tables.append(trajectory_table(batch["key"], exported, obs, size, cfg.model.heatmap_size))
        out.keys += batch["key"]
        if progress is not None:
            progress.update(b)
    return out


def selection_criterion(arrays: dict) -> str | None:
    """The frame metric that picks the closest and furthest sample of each clip."""
    return next((name for name in ("vgg_cosine", "psnr") if name in arrays), None)


def summarise(parts: list[PartResult], observed: int, image_size: int) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Scalar metrics for MLflow and the summary table, and per-step curves for the plots.

    Frame metrics are reported for the closest sample (the paper's headline view) and the
    furthest, each chosen once per clip by one criterion, its mean over the predicted steps
    (`selection_criterion`): VGG cosine similarity when there is VGG, as the paper does, else
    PSNR. Choosing per step or per metric would stitch sequences that no sample produced.
    PSNR/SSIM/VGG cosine are all "higher is better"."""
    arrays = {name: np.concatenate([a for p in parts for a in p.arrays.get(name, [])])
              for name in {n for p in parts for n in p.arrays}}
    metrics: dict[str, float] = {"clips": float(sum(len(p.keys) for p in parts))}
    curves: dict[str, np.ndarray] = {}
    criterion = selection_criterion(arrays)
    if criterion:
        score = arrays[criterion].mean(2)  # [B, S]
        rows = np.arange(len(score))
        best, worst = score.argmax(1), score.argmin(1)
    for name in ("psnr", "ssim", "vgg_cosine"):
        if name in arrays:
            closest, furthest = arrays[name][rows, best].mean(0), arrays[name][rows, worst].mean(0)  # [P]
            curves[f"{name}_closest"], curves[f"{name}_furthest"] = closest, furthest
            metrics[f"{name}_closest"], metrics[f"{name}_furthest"] = closest.mean(), furthest.mean()
            metrics[f"{name}_mean"] = arrays[name].mean()
    if "i3d_real" in arrays:
        metrics["fvd"] = fvd(torch.from_numpy(arrays["i3d_real"]), torch.from_numpy(arrays["i3d_fake"]).flatten(0, 1))
    if "keypoint_distance" in arrays:
        metrics.update(tracking_error.objects_found(torch.from_numpy(arrays["keypoint_distance"]), image_size))
    if "track_observed" in arrays:
        curves["tracking_null"] = arrays["track_null"].mean(0)  # [T]
        metrics["tracking_error_null"] = curves["tracking_null"].mean()
        before, after = np.full(observed, np.nan), np.full(len(curves["tracking_null"]) - observed, np.nan)
        for name in ("observed", "predicted", "no_dynamics"):
            curve = arrays[f"track_{name}"].mean(0)
            metrics[f"tracking_error_{name}"] = curve.mean()
            # Laid on the clip's frames, NaN where a curve has no value.
            curves[f"tracking_{name}"] = np.concatenate([curve, after] if name == "observed" else [before, curve])
        # The dynamics' own share, paired within the run: the keypoints (or vector) both rest on cancel.
        metrics["tracking_error_below_no_dynamics"] = (metrics["tracking_error_no_dynamics"]
                                                       - metrics["tracking_error_predicted"])
        curves["tracking_below_no_dynamics"] = curves["tracking_no_dynamics"] - curves["tracking_predicted"]
    if "reward_error" in arrays:  # normalised per step over the clips (the paper's Figure 9), NaN at step 0
        curves["reward_error"] = arrays["reward_error"].mean(0) / arrays["reward_null_error"].mean(0)
        for name, steps in (("observed", slice(1, observed)), ("predicted", slice(observed, None))):
            metrics[f"reward_error_{name}"] = float(np.mean(curves["reward_error"][steps]))
        metrics["reward_mse_predicted"] = float(arrays["reward_error"][:, observed:].mean())
        metrics["reward_mse_null"] = float(arrays["reward_null_error"][:, observed:].mean())
    return metrics, curves
