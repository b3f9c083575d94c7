"""DeepMind Control Suite episodes: a real dm_control task driven by random actions, rendered.

A clip is the start of one episode: the environment is loaded with a seed drawn from the clip's
generator (it sets the task's random initial state), then `clip_length` frames are stored, one
every `action_repeat` control steps, each action drawn uniformly within the action spec and
held for those steps. The sidecars are aligned with the frames:

- `actions[t]` [T, A]: the action applied after frame t; it moves the system from frame t to
  frame t + 1. The last one is applied too, but its outcome is not stored.
- `rewards[t]` [T]: the task's reward of the state frame t shows, `task.get_reward(physics)`;
  for t > 0 it is the reward the environment returns with frame t's observation.
- `coords[t]` [T, N, 2]: the centres of mass of every body of the model but the world body (`bodies`
  in the clip's json), projected by the camera into pixels: x right, y down, (0, 0) at the
  top-left corner of the top-left pixel. Bodies behind another one, or outside the frame, keep
  their projected position.

MuJoCo renders through OSMesa on CPU machines and EGL where an NVIDIA GPU is present, unless
MUJOCO_GL says otherwise; it is read when dm_control is first imported, so this module sets it
at import, which also covers build tasks in Ray workers, and imports dm_control only in the
functions that use it.
"""

from __future__ import annotations

import functools
import logging
import os

import numpy as np
import torch

from kpscale.data.shards import Clip
from kpscale.data.sources import SourceError, clip_rng, numbered

os.environ.setdefault("MUJOCO_GL", "egl" if os.path.exists("/dev/nvidiactl") else "osmesa")
# OSMesa's rasteriser (llvmpipe) starts a thread per core; a build runs a task per core already.
os.environ.setdefault("LP_NUM_THREADS", "1")


class _QuietCompilerWarning(logging.Filter):
    """MuJoCo 3 warns through absl about cheetah's `settotalmass` each time the model is
    compiled, once per clip; the model still compiles as the suite intends."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "settotalmass" not in record.getMessage()


logging.getLogger("absl").addFilter(_QuietCompilerWarning())


def valid_tasks() -> list[str]:
    from dm_control import suite

    return sorted(f"{domain}_{task}" for domain, task in suite.ALL_TASKS)


def is_task(domain: str, task: str) -> bool:
    from dm_control import suite

    return (domain, task) in suite.ALL_TASKS


def _load(domain: str, task: str, seed: int | None = None):
    from dm_control import suite

    if not is_task(domain, task):
        raise SourceError(f"dmcs: unknown dm_control task {domain}_{task}; valid: {', '.join(valid_tasks())}")
    return suite.load(domain, task, task_kwargs={"random": seed})


@functools.lru_cache(maxsize=None)
def task_limits(domain: str, task: str) -> tuple[int, int]:
    """(control steps an episode allows, cameras of the model) of a suite task."""
    env = _load(domain, task, 0)
    try:
        return int(env._step_limit), int(env.physics.model.ncam)
    finally:
        env.physics.free()


def project(physics, size: int, camera: int) -> np.ndarray:
    """The bodies' centres of mass but the world's [N, 2], in pixels of a `size` x `size` render
    from `camera`. Centres, not the bodies' frames: a body's frame sits at its joint, where the
    body it hangs from hides it, and a pole's frame at its hinge moves only with the cart."""
    from dm_control.mujoco.engine import Camera

    matrix = Camera(physics, height=size, width=size, camera_id=camera).matrix
    points = np.concatenate([physics.data.xipos[1:], np.ones((physics.model.nbody - 1, 1))], 1)
    xs, ys, w = matrix @ points.T
    # The matrix puts pixel centres at whole numbers; the shard format puts them at n + 0.5.
    return np.stack([xs / w, ys / w], 1) + 0.5


def body_names(physics) -> list[str]:
    model = physics.model
    return [model.id2name(i, "body") for i in range(1, model.nbody)]


def rollout(card, seed: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Frames uint8 [T, H, W, 3], actions [T, A], rewards [T], coords [T, N, 2] of one episode
    of `card`'s task loaded with `seed`, the actions drawn from `rng`; and the body names."""
    opts, size, length = card.dmcs, card.resolution, card.clip_length
    env = _load(opts.domain, opts.task, seed)
    try:
        env.reset()
        physics, spec = env.physics, env.action_spec()
        frames = np.empty((length, size, size, 3), np.uint8)
        actions = np.empty((length, *spec.shape), np.float32)
        rewards = np.empty(length, np.float32)
        coords = np.empty((length, physics.model.nbody - 1, 2), np.float32)
        for t in range(length):
            frames[t] = physics.render(height=size, width=size, camera_id=opts.camera)
            coords[t] = project(physics, size, opts.camera)
            rewards[t] = env.task.get_reward(physics)
            actions[t] = rng.uniform(spec.minimum, spec.maximum)
            for _ in range(opts.action_repeat):
                env.step(actions[t])
        return {"frames": frames, "actions": actions, "rewards": rewards, "coords": coords,
                "bodies": body_names(physics)}
    finally:
        # Freed here: left to the garbage collector at interpreter exit, the render context
        # prints "cannot schedule new futures after shutdown" tracebacks.
        env.physics.free()


plan = numbered


def make(card, root, split: str, index: int) -> Clip:
    opts = card.dmcs
    rng = clip_rng(card, split, index)
    seed = int(rng.integers(2**31))
    episode = rollout(card, seed, rng)
    meta = {"label": f"{opts.domain}_{opts.task}", "bodies": episode["bodies"], "action_repeat": opts.action_repeat,
            "camera": opts.camera,
            "source": {"generator": "dm_control", "domain": opts.domain, "task": opts.task, "env_seed": seed,
                       "seed": card.seed, "split": split, "index": index}}
    frames = torch.from_numpy(episode["frames"]).permute(0, 3, 1, 2).contiguous()
    return Clip(key=f"{split}-{index:07d}", frames=frames, fps=card.fps, meta=meta, coords=episode["coords"],
                actions=episode["actions"], rewards=episode["rewards"])
