"""Pretrained weights for the metric networks (I3D for FVD, VGG-16 for frame similarity). A
metric computed with random weights is a silent lie, so a missing file is an error, never a
fallback."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn


class WeightsUnavailable(RuntimeError):
    """The pretrained weights a metric needs were not supplied or not found."""


def resolve_weights(path: str | Path | None, env_var: str, what: str, how: str) -> Path:
    """The weights file from `path`, else from the environment variable `env_var`.

    `what` names the metric that needs them ("FVD"), `how` says where to get the file; both go
    into the error raised when neither is given or the file does not exist."""
    source = "" if path else f" (from {env_var})"
    path = path or os.environ.get(env_var)
    if not path:
        raise WeightsUnavailable(f"{what} is unavailable: no weights given. {how}")
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsUnavailable(f"{what} is unavailable: weights file {path}{source} not found. {how}")
    return path


def load_state_dict_strict(model: nn.Module, path: str | Path, prefix: str = "") -> nn.Module:
    """Load a plain state dict (weights_only: no pickled code runs) into `model`, all keys
    matching; a mismatch names the file and the first offending keys rather than dumping
    PyTorch's list of every key. With `prefix`, only the file's keys starting with it are
    loaded, for files that hold more than `model` (torchvision's vgg16 file also holds the
    classifier, which the VGG metric does not use); those must still match `model` exactly."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise RuntimeError(f"{path}: expected a state dict, got {type(state).__name__}")
    if prefix:
        state = {k: v for k, v in state.items() if k.startswith(prefix)}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        # BatchNorm fills in num_batches_tracked for checkpoints from old PyTorch versions.
        expected = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
        missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - model.state_dict().keys())
        if not missing and not unexpected:  # names agree, so shapes do not
            raise RuntimeError(f"{path}: does not fit {type(model).__name__}: {e}") from e
        raise RuntimeError(f"{path}: keys do not match {type(model).__name__}: "
                           f"{len(missing)} missing (first: {missing[:5]}), "
                           f"{len(unexpected)} unexpected (first: {unexpected[:5]})") from e
    return model
