"""Swap benchmark: does DrNet's pose code carry where the digits are, and its content code which
digits? On held-out colour Moving MNIST clips (digit n drawn in colour channel n), each clip A is
decoded with the content of its first frame and the pose of every frame of another clip B. The
digits of the decoded frames are located as the intensity centroids of their colour channels and
compared with the coords sidecars: a disentangled model puts them where B's digits are, not A's.
The same location of B's own reconstruction says how well the centroids locate digits at all.
Distances in pixels."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml

from kpscale.config import ConfigError
from kpscale.evaluate.snapshot import fixed_batches


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="a DrNet training run's MLflow run id, or a model folder")
    parser.add_argument("--data", required=True, help="held-out colour Moving MNIST shards (e.g. data/moving_mnist/test)")
    parser.add_argument("--clips", type=int, default=200, help="held-out clips (each decoded with the next one's pose)")
    parser.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")


def digit_centroids(frames: torch.Tensor, digits: int) -> torch.Tensor:
    """frames [..., C, H, W] in [0, 1] -> (x, y) pixel centroids [..., digits, 2] of channels 0..digits-1."""
    # Above the channel's mean level: a blurred decoder's grey background would pull every
    # centroid towards the middle.
    channels = frames[..., :digits, :, :].float()
    weights = (channels - channels.mean((-2, -1), keepdim=True)).clamp(min=0)
    size = frames.shape[-1]
    grid = torch.arange(size, dtype=torch.float32) + 0.5
    mass = weights.sum((-2, -1)).clamp(min=1e-6)
    x = (weights.sum(-2) * grid).sum(-1) / mass
    y = (weights.sum(-1) * grid).sum(-1) / mass
    return torch.stack([x, y], -1)


@torch.no_grad()
def swap_distances(model, video: torch.Tensor, coords: torch.Tensor) -> dict[str, torch.Tensor]:
    """video [B, T, C, H, W] and coords [B, T, N, 2] of B >= 2 clips; clip i takes the pose of
    clip i+1 (cyclically). Per clip, frame and digit: distances of the decoded digits to the pose
    clip's coords and to the content clip's, and of the pose clip's own reconstruction to its coords."""
    digits = coords.shape[2]
    pose_video, pose_coords = video.roll(-1, 0), coords.roll(-1, 0)
    swapped = digit_centroids(model.swap(video, pose_video), digits)
    own = digit_centroids(model.swap(pose_video, pose_video), digits)
    return {"to_pose_clip": (swapped - pose_coords).norm(dim=-1), "to_content_clip": (swapped - coords).norm(dim=-1),
            "reconstruction": (own - pose_coords).norm(dim=-1)}


def check_colour_moving_mnist(spec: str) -> None:
    card_file = Path(spec).parent / "card.yaml"
    card = yaml.safe_load(card_file.read_text()) if card_file.exists() else {}
    if card.get("source") != "moving_mnist" or not card.get("moving_mnist", {}).get("colour", False):
        raise ConfigError(f"--data {spec}: the swap benchmark needs colour Moving MNIST (each digit in its own "
                          f"channel; {card_file} says otherwise or is missing)")


def run(args: argparse.Namespace) -> dict:
    from kpscale.predict import load_trained

    check_colour_moving_mnist(args.data)
    model, cfg = load_trained(args.run, args.tracking_uri)
    if not hasattr(model, "swap"):
        raise ConfigError(f"--run {args.run}: a {cfg.model.name} model has no content and pose codes to swap")
    sums: dict[str, list[torch.Tensor]] = {}
    for batch in fixed_batches(args.data, cfg.data, cfg.window, args.clips):
        if len(batch["video"]) < 2:
            continue
        for name, value in swap_distances(model, batch["video"], batch["coords"]).items():
            sums.setdefault(name, []).append(value.flatten())
    figures = {name: torch.cat(values) for name, values in sums.items()}
    nearer = (figures["to_pose_clip"] < figures["to_content_clip"]).float().mean().item()
    out = {f"distance_{name}_px": value.mean().item() for name, value in figures.items()}
    out["fraction_nearer_pose_clip"] = nearer
    print(f"kpscale.bench swap: {args.run} on {args.data}, {len(figures['to_pose_clip'])} digit positions")
    print(f"{'decoded digits to the pose clip':<42}{out['distance_to_pose_clip_px']:>8.2f} px")
    print(f"{'decoded digits to the content clip':<42}{out['distance_to_content_clip_px']:>8.2f} px")
    print(f"{'reconstruction to its own digits':<42}{out['distance_reconstruction_px']:>8.2f} px")
    print(f"{'nearer the pose clip':<42}{100 * nearer:>7.1f} %")
    return out
