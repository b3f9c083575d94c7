"""What the training loop needs from a model family (docs/family-contract.md).

A family says *what* to train: its modules (the root module's children), its stages (which
optimisers step, in which order, and which modules stay frozen), one loss per optimiser, and
its evaluation. The loop says *how*: one DeepSpeed engine per optimiser, which parameters may
take a gradient at each moment, checkpoints, resumption, logging. As in PyTorch Lightning's
manual optimisation for GANs, a loss may run through another optimiser's modules; the loop then
turns their gradients off (Lightning's `toggle_optimizer`), because a gradient left there would
be added to the other optimiser's next step (ZeRO-0) or break its reduction (ZeRO-1 to 3).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from kpscale.config import Config


@dataclass(frozen=True)
class Optimiser:
    """One DeepSpeed engine. `module` holds exactly the parameters it trains; a module another
    optimiser trains is held as a plain attribute (`borrow`), never as a submodule, and called
    as a module (under ZeRO-3 its own engine's hooks gather its parameters)."""

    module: nn.Module
    lr: float | None = None  # None: train.lr
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass(frozen=True)
class Stage:
    name: str
    optimisers: tuple[str, ...]  # each loop step steps them once each, in this order
    frozen: tuple[str, ...] = ()  # modules used and not trained: an earlier stage (or init_from) trained them
    # Not None: the stage trains on shards derived from data.train at its start by the model so
    # far (Family.derive), written once under {train.storage}/{train.run_name}/<derived>.
    derived: str | None = None
    frames: bool = True  # False: its batches hold labels and sidecars, no decoded frames


class Family:
    """The one object the loop talks to. Subclasses set `config` and `stages` and build `root`,
    the module whose children are the family's named modules and whose state dict is the
    model's weights file."""

    config: ClassVar[type[Config]]
    stages: ClassVar[tuple[Stage, ...]]
    # What a sweep may optimise: the evaluation's metrics, and loss terms as logged (train/...).
    metrics: ClassVar[tuple[str, ...]]
    root: nn.Module

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def modules(self) -> dict[str, nn.Module]:
        return dict(self.root.named_children())

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def optimiser(self, name: str) -> Optimiser:
        raise NotImplementedError

    def loss(self, stage: str, optimiser: str, engine, batch: dict[str, Tensor], step: Tensor,
             outputs: dict[str, dict]) -> dict:
        """{"loss": scalar, "terms": {name: scalar}, ...} for `optimiser`, from one call of its
        `engine` (DeepSpeed's forward bookkeeping runs there). `outputs`: what the optimisers
        before it returned this step; `step` counts from the run's start, a 0-d int64 tensor on
        the batch's device: schedules computed from it stay on the device, and a compiled
        step (CUDA graphs too) stays one graph as it advances."""
        raise NotImplementedError

    @classmethod
    def check_data(cls, cfg: Config, manifest: dict[str, list], spec: str) -> None:
        """Refuse training data the model cannot use (ValueError naming the field and `spec`),
        before any Ray resources are taken. `manifest`: the columns of the split's manifest
        (kpscale.data.shards.MANIFEST_SCHEMA)."""

    def derive(self, name: str, video: Tensor) -> dict[str, np.ndarray]:
        """The sidecars (kpscale.data.shards.SIDECARS) of a clip [T, 3, H, W] in [0, 1] in the
        derived shards `name` of a stage (Stage.derived); the clip's other parts are copied."""
        raise NotImplementedError

    def figures(self, folder: str) -> list[Path]:
        """Images of the last evaluation written into `folder` (a confusion matrix...), logged beside its video."""
        return []

    def evaluate(self, cfg, stage: str, device: torch.device, dtype: torch.dtype) -> tuple[dict[str, float], object]:
        """Metrics and a video panel (uint8 frames [T, H, W, 3], kpscale.evaluate.media.panel) on
        held-out clips, during training. On every rank (a ZeRO-3
        forward pass needs them all)."""
        raise NotImplementedError

    def describe(self, metrics: dict[str, float]) -> str:
        """The evaluation's log line."""
        raise NotImplementedError

    def predictor(self) -> nn.Module:
        """What kpscale.evaluate and kpscale.predict call (represent, keypoints, sample_future)."""
        return self.root


def borrow(owner: nn.Module, name: str, module: nn.Module) -> None:
    """Give `owner` an attribute `name` that calls `module` without making it a submodule: its
    parameters stay out of `owner.parameters()`, so out of the engine wrapping `owner`."""
    object.__setattr__(owner, name, module)
