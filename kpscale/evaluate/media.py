"""Videos a person can watch in the MLflow UI: one GIF per clip with panels side by side,
ground truth | reconstruction | detected keypoints on the frames (keypoint models) | frames
decoded from the predicted states, framed green on observed steps and red on predicted ones."""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

OBSERVED, PREDICTED = np.array([40, 200, 70], np.uint8), np.array([230, 45, 45], np.uint8)


def palette(k: int) -> np.ndarray:
    return (np.array([colorsys.hsv_to_rgb(i / k, 0.9, 1.0) for i in range(k)]) * 255).astype(np.uint8)


def keypoint_pixels(keypoints: torch.Tensor, heatmap_size: int, image_size: int) -> np.ndarray:
    """(x, y) in [-1, 1] (y up) over the heatmap's pixel centres -> image pixel coordinates."""
    xy = keypoints[..., :2].float().cpu().numpy()
    cells = (np.stack([xy[..., 0], -xy[..., 1]], -1) + 1) / 2 * (heatmap_size - 1) + 0.5
    return cells * image_size / heatmap_size


def pixel_offsets(moves: dict[int, tuple[float, float]], num_keypoints: int, heatmap_size: int,
                  image_size: int) -> torch.Tensor:
    """{keypoint: (dx, dy) in image pixels, x right and y down} -> offsets [K, 2] in keypoint
    units (y up): the inverse of `keypoint_pixels`' scale, so a moved keypoint is drawn exactly
    (dx, dy) pixels away."""
    scale = 2 * heatmap_size / ((heatmap_size - 1) * image_size)
    offsets = torch.zeros(num_keypoints, 2)
    for k, (dx, dy) in moves.items():
        if not 0 <= k < num_keypoints:
            raise ValueError(f"keypoint {k} does not exist: the model has {num_keypoints} (0-{num_keypoints - 1})")
        offsets[k] = torch.tensor([dx * scale, -dy * scale])
    return offsets


def to_rgb(frames: torch.Tensor) -> np.ndarray:
    """Frames [T, 3, H, W] in [0, 1] -> uint8 [T, H, W, 3] for images and videos."""
    return (frames.float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def draw_keypoints(frames: np.ndarray, keypoints: torch.Tensor, heatmap_size: int) -> np.ndarray:
    """Dots on frames [T, H, W, 3] uint8, one colour per keypoint, opacity mu."""
    out = frames.astype(np.float32)
    t, h, w, _ = frames.shape
    xy = keypoint_pixels(keypoints, heatmap_size, w)
    mu = keypoints[..., 2].float().clamp(0, 1).cpu().numpy()
    colours = palette(keypoints.shape[-2]).astype(np.float32)
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    radius = max(1.0, w / 40)
    for k in range(keypoints.shape[-2]):
        d = np.hypot(xs[None] - xy[:, k, 0, None, None], ys[None] - xy[:, k, 1, None, None])
        alpha = (np.clip(radius + 0.5 - d, 0, 1) * mu[:, k, None, None])[..., None]
        out = out * (1 - alpha) + colours[k] * alpha
    return out.round().astype(np.uint8)


def panel(video: torch.Tensor, reconstruction: torch.Tensor | None, predicted: torch.Tensor, observed: int,
          keypoints: torch.Tensor | None = None, heatmap_size: int | None = None, scale: int = 3) -> np.ndarray:
    """One clip's frames [T, H', W', 3] uint8; inputs [T, 3, H, W] in [0, 1] and keypoints
    [T, K, 3] (no reconstruction, or a model without keypoints: no such column)."""
    truth = to_rgb(video)
    drawn = [] if keypoints is None else [draw_keypoints(truth, keypoints, heatmap_size)]
    columns = [truth, *([] if reconstruction is None else [to_rgb(reconstruction)]), *drawn, to_rgb(predicted)]
    t, h, w, _ = truth.shape
    frames = np.zeros((t, h + 4, len(columns) * (w + 4), 3), np.uint8)
    for step in range(t):
        frames[step] = OBSERVED if step < observed else PREDICTED
        for i, column in enumerate(columns):
            frames[step, 2:h + 2, i * (w + 4) + 2:i * (w + 4) + w + 2] = column[step]
    return frames.repeat(scale, 1).repeat(scale, 2)


def save_gif(frames: np.ndarray, path: str | Path, fps: float = 4.0) -> Path:
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return Path(path)
