"""Checkpoints: a DeepSpeed checkpoint plus each rank's RNG state, in one folder that every rank
reports to Ray Train, which gathers them into the run's storage and keeps the last few.

DeepSpeed loads its files with `torch.load(weights_only=False)`, which runs arbitrary pickled
code; kpscale swaps in an engine that loads with `weights_only=True`, allowing only the three
DeepSpeed classes its checkpoints hold (found by loading ZeRO 0-3 checkpoints, fp32 and bf16).
"""

from __future__ import annotations

from pathlib import Path

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

TAG = "state"
SAFE_GLOBALS = [LossScaler, ZeroStageEnum, fragment_address]


class SafeCheckpointEngine(TorchCheckpointEngine):
    def load(self, path: str, map_location=None):
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)


def save(engine, folder: str | Path, step: int, epoch: int, rank: int) -> None:
    """Collective under ZeRO-3: every rank must call it."""
    engine.save_checkpoint(str(folder), tag=TAG, client_state={"step": step, "epoch": epoch})
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, Path(folder) / f"rng-rank{rank}.pt")


def load(engine, folder: str | Path, rank: int) -> dict:
    """Restore model, optimizer, schedule and this rank's RNG; returns {"step", "epoch"}."""
    engine.checkpoint_engine = SafeCheckpointEngine()
    path, client = engine.load_checkpoint(str(folder), tag=TAG)
    if path is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint '{TAG}' in {folder}")
    rng_file = Path(folder) / f"rng-rank{rank}.pt"
    if rng_file.exists():  # absent when resuming at another world size
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return {"step": client["step"], "epoch": client["epoch"]}
