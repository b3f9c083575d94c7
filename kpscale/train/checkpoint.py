"""Checkpoints: a DeepSpeed checkpoint plus each rank's RNG state, in one folder that every rank
reports to Ray Train, which gathers them into the run's storage and keeps the last few.

DeepSpeed loads its files with `torch.load(weights_only=False)`, which runs arbitrary pickled
code; kpscale swaps in an engine that loads with `weights_only=True`, allowing only the three
DeepSpeed classes its checkpoints hold (found by loading ZeRO 0-3 checkpoints, fp32 and bf16).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

SAFE_GLOBALS = [LossScaler, ZeroStageEnum, fragment_address]
PROGRESS = "progress.json"
FROZEN = "frozen.pt"  # the modules no engine holds, which a later stage keeps as they are


class SafeCheckpointEngine(TorchCheckpointEngine):
    def load(self, path: str, map_location=None):
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)


def tag(name: str, engines: dict) -> str:
    """One DeepSpeed tag per engine: `state` alone, `state-<optimiser>` beside others."""
    return "state" if len(engines) == 1 else f"state-{name}"


def save(engines: dict, folder: str | Path, progress: dict, rank: int, frozen: dict[str, torch.Tensor] | None = None) -> None:
    """Every engine of the stage, this rank's RNG, and (rank 0) the frozen modules' weights.
    `progress`: {"step", "epoch", "stage"}. Collective under ZeRO-3: every rank must call it."""
    for name, engine in engines.items():
        engine.save_checkpoint(str(folder), tag=tag(name, engines), client_state=progress)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, Path(folder) / f"rng-rank{rank}.pt")
    if rank == 0:
        (Path(folder) / PROGRESS).write_text(json.dumps(progress))
        if frozen:
            torch.save(frozen, Path(folder) / FROZEN)


def stage(folder: str | Path) -> str | None:
    """The stage a checkpoint was saved in, read before any engine is built (the stage says
    which engines to build); None for a checkpoint of a single-stage run."""
    path = Path(folder) / PROGRESS
    return json.loads(path.read_text()).get("stage") if path.exists() else None


def load(engines: dict, folder: str | Path, rank: int) -> dict:
    """Restore every engine (model, optimizer, schedule) and this rank's RNG; returns the
    checkpoint's progress."""
    client = {}
    for name, engine in engines.items():
        engine.checkpoint_engine = SafeCheckpointEngine()
        path, client = engine.load_checkpoint(str(folder), tag=tag(name, engines))
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint '{tag(name, engines)}' in {folder}")
    rng_file = Path(folder) / f"rng-rank{rank}.pt"
    if rng_file.exists():  # absent when resuming at another world size
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return {key: client[key] for key in ("step", "epoch", "stage") if key in client}


def load_frozen(folder: str | Path) -> dict[str, torch.Tensor]:
    path = Path(folder) / FROZEN
    return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else {}
