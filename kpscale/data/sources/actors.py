"""Articulated actors: a jointed figure performing one of several actions, seen by a fixed camera.

The figure is a skeleton of 15 joints whose bones have a forward/back angle in the body's
sagittal plane and a fixed sideways offset (shoulders, hips); it is seen from a yaw between
profile and three-quarter view and facing left or right. Each action is a periodic function
of a phase, so a clip's tempo, starting phase and amplitude are drawn per clip. The lowest
ankle stands on the ground line (a jump lifts the whole body off it). Limbs are anti-aliased
capsules of visible width in per-clip colours over a per-clip background (sky gradient, ground,
soft texture); the far-side limbs are drawn first and darker.

Walkers and runners move slower than their stride would carry them, so that they stay in the
frame for the whole clip; their legs partly slide. Coordinates are the 15 joints in pixels
(x right, y down, origin at the top-left image corner), also where a limb hides them.
"""

from __future__ import annotations

import colorsys

import numpy as np
import torch

from kpscale.data.card import ActorsOptions
from kpscale.data.shards import Clip
from kpscale.data.sources import clip_rng, numbered

JOINTS = ("head", "neck", "right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow",
          "left_wrist", "pelvis", "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle")
J = {name: i for i, name in enumerate(JOINTS)}
# Frames per cycle at tempo 1; horizontal speed in pixels a frame at 64 px and tempo 1.
PERIODS = {"walk": 16, "run": 10, "wave": 12, "jump": 14, "squat": 18, "kick": 16}
TRAVEL = {"walk": 0.45, "run": 1.0}
ACTIONS = tuple(PERIODS)


def _angles(action: str, phase: np.ndarray, amp: float) -> dict[str, np.ndarray]:
    """Per-frame angles in degrees. Bones hang down at 0 and turn forwards with positive angles;
    knees bend backwards, elbows forwards. 'lift' raises the body off the ground (fraction of
    its height), 'lean' tilts the torso forwards."""
    s, c = np.sin(phase), np.cos(phase)
    zero = np.zeros_like(phase)
    a = dict(lean=zero + 0.0, lift=zero + 0.0)
    if action in ("walk", "run"):
        swing, knee, arm, elbow, lean = (25, 35, 20, 20, 3) if action == "walk" else (40, 70, 45, 85, 12)
        offset = 0 if action == "walk" else 10
        a.update(right_thigh=offset + swing * amp * s, left_thigh=offset - swing * amp * s,
                 right_knee=10 + knee * amp * np.maximum(0, c), left_knee=10 + knee * amp * np.maximum(0, -c),
                 right_arm=-arm * amp * s, left_arm=arm * amp * s, right_elbow=zero + elbow,
                 left_elbow=zero + elbow, lean=zero + lean)
    elif action == "wave":  # the near arm raised, its forearm swinging side to side overhead
        a.update(right_thigh=zero, left_thigh=zero, right_knee=zero + 3, left_knee=zero + 3,
                 right_arm=zero + 140, right_elbow=30 + 35 * amp * s, left_arm=zero + 5, left_elbow=zero + 10)
    elif action == "jump":  # crouch (s < 0), then fly with the arms up (s > 0)
        crouch, air = np.maximum(0, -s), np.maximum(0, s)
        arm = 160 * amp * air - 40 * crouch
        a.update(right_thigh=35 * amp * crouch, left_thigh=35 * amp * crouch + 3, right_knee=60 * amp * crouch,
                 left_knee=60 * amp * crouch + 3, right_arm=arm, left_arm=arm - 5, right_elbow=zero + 10,
                 left_elbow=zero + 10, lean=10 * crouch, lift=0.22 * amp * air)
    elif action == "squat":  # hips and knees bend together, the arms reach forwards
        down = amp * (1 - c) / 2
        a.update(right_thigh=95 * down, left_thigh=95 * down + 3, right_knee=120 * down, left_knee=120 * down + 3,
                 right_arm=5 + 80 * down, left_arm=5 + 80 * down, right_elbow=zero + 5, left_elbow=zero + 5,
                 lean=25 * down)
    elif action == "kick":  # the near leg kicks forwards, the body leans back, the arms balance
        p = np.maximum(0, s) ** 2
        a.update(right_thigh=-10 + 90 * amp * p, right_knee=5 + 180 * p * (1 - p), left_thigh=zero,
                 left_knee=zero + 5, right_arm=-30 * p, left_arm=40 * p, right_elbow=zero + 20,
                 left_elbow=zero + 20, lean=-15 * p)
    else:
        raise ValueError(f"unknown action {action!r}; known: {', '.join(ACTIONS)}")
    return a


def _bone(angle: np.ndarray) -> np.ndarray:
    """Unit vectors [T, 2] (forward, up) of bones at these angles."""
    r = np.radians(angle)
    return np.stack([np.sin(r), -np.cos(r)], -1)


def pose(action: str, frames: int, rng: np.random.Generator, opts: ActorsOptions) -> tuple[np.ndarray, dict, float]:
    """Joints [T, 15, 3] in body units (forward, up, sideways; height 1, feet on the ground at
    up = 0 unless lifted), the body's sizes in those units, and its travel in pixels a frame at 64 px."""
    tempo = rng.uniform(*opts.tempo)
    amp = rng.uniform(*opts.amplitude)
    phase = rng.uniform(0, 2 * np.pi) + 2 * np.pi * tempo * np.arange(frames) / PERIODS[action]

    def vary() -> float:  # one body proportion
        return rng.uniform(0.88, 1.12)
    size = dict(head=0.075 * vary(), torso=0.30 * vary(), upper_arm=0.16 * vary(), forearm=0.15 * vary(),
                thigh=0.24 * vary(), shin=0.23 * vary(), shoulders=0.08 * vary(), hips=0.055 * vary(),
                limb_width=0.085 * vary(), torso_width=0.13 * vary())
    a = _angles(action, phase, amp)
    out = np.zeros((frames, len(JOINTS), 3))
    torso = _bone(180 - a["lean"])  # pointing up, tilted forwards
    neck = size["torso"] * torso
    out[:, J["neck"], :2] = neck
    out[:, J["head"], :2] = neck + (size["head"] * 1.4) * torso
    for side, sign in (("right", 1.0), ("left", -1.0)):
        shoulder, hip = neck.copy(), np.zeros_like(neck)
        elbow = shoulder + size["upper_arm"] * _bone(a[f"{side}_arm"])
        wrist = elbow + size["forearm"] * _bone(a[f"{side}_arm"] + a[f"{side}_elbow"])
        knee = hip + size["thigh"] * _bone(a[f"{side}_thigh"])
        ankle = knee + size["shin"] * _bone(a[f"{side}_thigh"] - a[f"{side}_knee"])
        for name, xy, lateral in (("shoulder", shoulder, size["shoulders"]), ("elbow", elbow, size["shoulders"]),
                                  ("wrist", wrist, size["shoulders"]), ("hip", hip, size["hips"]),
                                  ("knee", knee, size["hips"]), ("ankle", ankle, size["hips"])):
            out[:, J[f"{side}_{name}"], :2] = xy
            out[:, J[f"{side}_{name}"], 2] = sign * lateral
    ankles = out[:, [J["right_ankle"], J["left_ankle"]], 1]
    out[..., 1] -= ankles.min(1, keepdims=True)  # the lowest foot on the ground
    out[..., 1] += a["lift"][:, None]
    return out, size, TRAVEL.get(action, 0.0) * tempo


# (first joint, second joint, width key, colour key); drawn far side first, near side last.
BONES = [(f"left_{a}", f"left_{b}", "limb_width", part) for a, b, part in
         (("hip", "knee", "trousers"), ("knee", "ankle", "trousers"), ("shoulder", "elbow", "shirt"),
          ("elbow", "wrist", "skin"))]
BONES += [("neck", "pelvis", "torso_width", "shirt"), ("left_hip", "right_hip", "limb_width", "trousers"),
          ("left_shoulder", "right_shoulder", "limb_width", "shirt")]
BONES += [(a.replace("left", "right"), b.replace("left", "right"), w, c) for a, b, w, c in BONES[:4]]


def _capsule(px: np.ndarray, py: np.ndarray, a: np.ndarray, b: np.ndarray, radius: float) -> np.ndarray:
    """Coverage [T, H, W] of segments a[t] -> b[t] (pixels) thickened to `radius`, anti-aliased."""
    ab = b - a
    apx = px[None] - a[:, 0, None, None]
    apy = py[None] - a[:, 1, None, None]
    length2 = np.maximum((ab ** 2).sum(-1), 1e-9)[:, None, None]
    t = np.clip((apx * ab[:, 0, None, None] + apy * ab[:, 1, None, None]) / length2, 0, 1)
    d = np.hypot(apx - t * ab[:, 0, None, None], apy - t * ab[:, 1, None, None])
    return np.clip(radius + 0.5 - d, 0, 1)


def _colour(rng: np.random.Generator, avoid: list[np.ndarray], saturation=(0.35, 1.0), value=(0.5, 1.0)) -> np.ndarray:
    """A random RGB colour (0-255) at least 90 apart from each colour in `avoid` where possible."""
    for _ in range(50):
        rgb = np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(*saturation), rng.uniform(*value))) * 255
        if all(np.linalg.norm(rgb - other) > 90 for other in avoid):
            break
    return rgb


def _background(size: int, rng: np.random.Generator, ground: float) -> np.ndarray:
    """[H, W, 3] float: a vertical sky gradient, a ground band below `ground` (pixels), and a
    soft texture of a few random waves."""
    sky_top = _colour(rng, [], (0.1, 0.6), (0.15, 0.9))
    sky_low = _colour(rng, [], (0.1, 0.6), (0.15, 0.9))
    floor = _colour(rng, [sky_low], (0.1, 0.7), (0.1, 0.8))
    y, x = np.mgrid[0:size, 0:size] + 0.5
    mix = (y / ground).clip(0, 1)[..., None]
    image = np.where((y < ground)[..., None], sky_top * (1 - mix) + sky_low * mix, floor)
    for _ in range(3):
        k = rng.normal(size=2) * 6 / size
        image += rng.uniform(4, 10) * np.sin(k[0] * x + k[1] * y + rng.uniform(0, 2 * np.pi))[..., None]
    return image


def place(action: str, opts: ActorsOptions, frames: int, size: int, rng: np.random.Generator):
    """The figure in the frame: (joints [T, 15, 2] in pixels, drawing sizes in pixels, ground
    line's y)."""
    body, dims, travel = pose(action, frames, rng, opts)
    height = rng.uniform(*opts.height) * size  # standing height in pixels
    ground = rng.uniform(0.84, 0.92) * size
    facing = rng.choice([-1.0, 1.0])
    yaw = np.radians(rng.uniform(*opts.yaw_degrees))
    travel *= size / 64
    span = travel * (frames - 1)
    margin = 0.2 * size
    start = rng.uniform(margin, max(margin, size - margin - span)) if travel else rng.uniform(0.35, 0.65) * size
    if facing < 0:
        start = size - start
    x0 = start + facing * travel * np.arange(frames)
    joints = np.empty((frames, len(JOINTS), 2))
    joints[..., 0] = x0[:, None] + facing * height * (body[..., 0] * np.cos(yaw) + body[..., 2] * np.sin(yaw))
    joints[..., 1] = ground - height * body[..., 1]
    return joints, {k: v * height for k, v in dims.items()}, ground


def draw(joints: np.ndarray, dims: dict, colours: dict, background: np.ndarray) -> np.ndarray:
    """Frames uint8 [T, 3, H, W]: the bones as capsules over `background` [H, W, 3], far side
    first and darker, the head after the torso."""
    size = background.shape[0]
    image = np.broadcast_to(background, (len(joints), size, size, 3)).copy()
    py, px = np.mgrid[0:size, 0:size] + 0.5
    for index, (a, b, width, part) in enumerate(BONES):
        far = index < 4
        alpha = _capsule(px, py, joints[:, J[a]], joints[:, J[b]], dims[width] / 2)[..., None]
        image = image * (1 - alpha) + colours[part] * (0.7 if far else 1.0) * alpha
        if index == 6:
            head = joints[:, J["head"]]
            alpha = _capsule(px, py, head, head, dims["head"])[..., None]
            image = image * (1 - alpha) + colours["skin"] * alpha
    return np.round(image.clip(0, 255)).astype(np.uint8).transpose(0, 3, 1, 2)


def make_clip(action: str, opts: ActorsOptions, frames: int, size: int, rng: np.random.Generator):
    """(frames uint8 [T, 3, H, W], joints float32 [T, 15, 2] in pixels)."""
    joints, dims, ground = place(action, opts, frames, size, rng)
    background = _background(size, rng, ground)
    shirt = _colour(rng, [background[size // 2, size // 2], background[int(ground) - 1, 0]])
    colours = dict(shirt=shirt, trousers=_colour(rng, [shirt]), skin=_colour(rng, [], (0.2, 0.6), (0.55, 1.0)))
    return torch.from_numpy(draw(joints, dims, colours, background)), joints.astype(np.float32)


plan = numbered


def make(card, root, split: str, index: int) -> Clip:
    # Classes take turns, so every split is balanced.
    opts = card.actors
    action = opts.actions[index % len(opts.actions)]
    rng = clip_rng(card, split, index)
    frames, joints = make_clip(action, opts, card.clip_length, card.resolution, rng)
    meta = {"label": action, "joints": list(JOINTS),
            "source": {"generator": "kpscale.actors", "seed": card.seed, "split": split, "index": index}}
    return Clip(key=f"{split}-{index:07d}", frames=frames, fps=card.fps, meta=meta, coords=joints)
