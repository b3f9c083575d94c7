"""Synthetic top-down basketball: players and a ball as coloured dots on a court.

Players are point masses steered towards a personal spot that shifts towards the ball, pushed
apart when close, and jittered by smooth noise; the player a pass is meant for runs to meet the
ball. The holder keeps the ball a few frames, then passes to another player; the pass homes in
on the receiver, so every pass is caught. Positions live in [0, 1]^2 (x right, y down) and are
returned in pixels of the rendered frames: (0, 0) is the top-left corner of the top-left pixel.
"""

from __future__ import annotations

import numpy as np
import torch

from kpscale.data.card import BasketballOptions
from kpscale.data.shards import Clip
from kpscale.data.sources import clip_rng, numbered

COURT = np.array([92, 68, 48], np.float32)
LINES = np.array([128, 100, 76], np.float32)
PLAYER_COLOURS = np.array(
    [[230, 45, 45], [60, 120, 255], [40, 200, 70], [245, 215, 40], [225, 60, 225],
     [40, 220, 220], [255, 150, 40], [150, 90, 255]], np.float32)
BALL_COLOUR = np.array([250, 250, 250], np.float32)
BURN_IN = 20


def simulate(opts: BasketballOptions, frames: int, rng: np.random.Generator) -> np.ndarray:
    """Positions [frames, players + 1, 2] in court units; the ball is the last object."""
    n = opts.players
    r = opts.player_radius
    pos = _spread(n, rng, min_dist=4 * r)
    vel = np.zeros((n, 2))
    home = _spread(n, rng, min_dist=4 * r)
    holder, receiver = int(rng.integers(n)), -1
    hold = int(rng.integers(opts.hold_frames[0], opts.hold_frames[1] + 1))
    ball = pos[holder].copy()
    facing = rng.normal(size=(n, 2))
    out = np.empty((frames + BURN_IN, n + 1, 2))
    for t in range(frames + BURN_IN):
        # Where each player wants to be: its spot pulled a third of the way towards the ball;
        # the receiver of a pass runs at the ball instead.
        home = np.clip(home + rng.normal(scale=0.01, size=home.shape), 0.15, 0.85)
        target = home + 0.33 * (ball - home)
        if receiver >= 0:
            target[receiver] = ball
        acc = 0.08 * (target - pos) - 0.25 * vel
        diff = pos[:, None] - pos[None]
        dist = np.linalg.norm(diff, axis=-1) + np.eye(n)
        push = np.clip(5 * r - dist, 0, None) / dist
        acc += 0.05 * (diff * push[..., None]).sum(1)
        acc += rng.normal(scale=0.1 * opts.player_speed, size=acc.shape)
        vel = _cap(vel + acc, opts.player_speed)
        pos = np.clip(pos + vel, r, 1 - r)
        moving = np.linalg.norm(vel, axis=1) > 1e-3
        facing[moving] = vel[moving]

        if receiver >= 0:  # ball in flight, homing on the receiver
            gap = pos[receiver] - ball
            if np.linalg.norm(gap) <= opts.pass_speed + r:
                holder, receiver = receiver, -1
                hold = int(rng.integers(opts.hold_frames[0], opts.hold_frames[1] + 1))
            else:
                ball = ball + _cap(gap, opts.pass_speed)
        if receiver < 0:
            hold -= 1
            if hold <= 0:
                receiver = _pick_receiver(pos, holder, rng)
            unit = facing[holder] / (np.linalg.norm(facing[holder]) + 1e-9)
            ball = np.clip(pos[holder] + unit * (r + opts.ball_radius) * 0.8, 0, 1)
        out[t, :n], out[t, n] = pos, ball
    return out[BURN_IN:]


def _spread(n: int, rng: np.random.Generator, min_dist: float) -> np.ndarray:
    points = rng.uniform(0.15, 0.85, size=(n, 2))
    for _ in range(200):  # re-draw points that start on top of each other
        d = np.linalg.norm(points[:, None] - points[None], axis=-1) + np.eye(n)
        close = (d < min_dist).any(1)
        if not close.any():
            break
        points[close] = rng.uniform(0.15, 0.85, size=(int(close.sum()), 2))
    return points


def _cap(v: np.ndarray, limit: float) -> np.ndarray:
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    return v * np.minimum(1, limit / np.maximum(norm, 1e-12))


def _pick_receiver(pos: np.ndarray, holder: int, rng: np.random.Generator) -> int:
    """Passes go to players at a middling distance more often than to the nearest one."""
    d = np.linalg.norm(pos - pos[holder], axis=1)
    weight = np.exp(-((d - 0.4) ** 2) / 0.05)
    weight[holder] = 0
    return int(rng.choice(len(pos), p=weight / weight.sum()))


def render(positions: np.ndarray, opts: BasketballOptions, size: int) -> np.ndarray:
    """Anti-aliased dots on a court: uint8 [T, 3, size, size]."""
    centre = (np.arange(size) + 0.5) / size
    image = np.broadcast_to(_court(size, centre), (len(positions), size, size, 3)).copy()
    radii = [opts.player_radius] * opts.players + [opts.ball_radius]
    colours = list(PLAYER_COLOURS[: opts.players]) + [BALL_COLOUR]
    for k, (radius, colour) in enumerate(zip(radii, colours)):
        dx = centre[None, None, :] - positions[:, k, 0, None, None]
        dy = centre[None, :, None] - positions[:, k, 1, None, None]
        dist = np.sqrt(dx**2 + dy**2) * size
        alpha = np.clip(radius * size + 0.5 - dist, 0, 1)[..., None]
        image = image * (1 - alpha) + colour * alpha
    return np.round(image).astype(np.uint8).transpose(0, 3, 1, 2)


def _court(size: int, centre: np.ndarray) -> np.ndarray:
    x, y = np.meshgrid(centre, centre)
    width = 0.6 / size  # about one pixel wide at any resolution
    on_line = (np.abs(x - 0.5) < width) | (np.abs(np.hypot(x - 0.5, y - 0.5) - 0.15) < width)
    return np.where(on_line[..., None], LINES, COURT)


def make_clip(opts: BasketballOptions, frames: int, size: int, rng: np.random.Generator):
    """(frames uint8 [T, 3, H, W], coords float32 [T, players + 1, 2] in pixels)."""
    positions = simulate(opts, frames, rng)
    video = render(positions, opts, size)
    return torch.from_numpy(video), (positions * size).astype(np.float32)


plan = numbered


def make(card, root, split: str, index: int) -> Clip:
    rng = clip_rng(card, split, index)
    frames, coords = make_clip(card.basketball, card.clip_length, card.resolution, rng)
    meta = {"label": "basketball", "source": {"generator": "kpscale.basketball", "seed": card.seed,
                                              "split": split, "index": index}}
    return Clip(key=f"{split}-{index:07d}", frames=frames, fps=card.fps, meta=meta, coords=coords)
