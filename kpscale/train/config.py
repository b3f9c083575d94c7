"""The training config: model, data, train and tracking sections, validated as a whole before
any Ray resources are requested. The default (no --config) is `kpscale/models/struct_vrnn/configs/basketball_cpu.yaml`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from kpscale.config import Config, load
from kpscale.data.stream import DataConfig
from kpscale.models import ModelConfig, StructVRNNConfig

DEFAULT = Path(__file__).parents[1] / "models" / "struct_vrnn" / "configs" / "basketball_cpu.yaml"


class TrainSection(Config):
    steps: int = Field(3000, ge=1)
    workers: int = Field(1, ge=1)  # Ray Train workers, one GPU each when GPUs are used
    cpus_per_worker: int = Field(1, ge=1)
    use_gpu: bool | None = None  # None: GPUs when the Ray cluster has them
    zero_stage: int = Field(2, ge=0, le=3)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    lr: float = Field(1e-3, gt=0)
    lr_schedule: Literal["constant", "cosine", "linear"] = "cosine"
    warmup_steps: int = Field(100, ge=1)  # DeepSpeed's warmup schedules refuse 0
    grad_clip: float = Field(10.0, ge=0)  # 0: off; the official code clips the norm at 10
    # L2 on conv kernels (official: loss += weight_decay * sum(w^2) over every conv kernel).
    weight_decay: float = Field(1e-4, ge=0)
    seed: int = 0
    log_every: int = Field(25, ge=1)
    eval_every: int = Field(400, ge=1)  # tracking errors and a sample video; also at the end
    eval_clips: int = Field(128, ge=1)  # held-out clips per evaluation (as many again to fit)
    checkpoint_every: int = Field(500, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=0)  # worker failures survived by restarting from a checkpoint
    storage: str = "runs"  # Ray Train storage: checkpoints; shared storage on a multi-node cluster
    run_name: str = Field("struct_vrnn-basketball", pattern=r"^[A-Za-z0-9_.-]+$")  # same name: resume
    # A checkpoint folder (or URI) a new run starts from, step and optimizer included; a run
    # with checkpoints of its own resumes from those instead. Sweeps use it for PBT.
    init_checkpoint: str | None = None


class TrackingSection(Config):
    experiment: str = "kpscale"
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite file mlflow.db in the working folder


class TrainConfig(Config):
    model: ModelConfig = StructVRNNConfig()
    data: DataConfig = DataConfig()
    train: TrainSection = TrainSection()
    tracking: TrackingSection = TrackingSection()

    @property
    def window(self) -> int:
        return self.model.observed + self.model.predicted

    @model_validator(mode="after")
    def _schedule_fits(self) -> TrainConfig:
        if self.train.lr_schedule != "constant" and self.train.warmup_steps >= self.train.steps:
            raise ValueError(f"train.warmup_steps ({self.train.warmup_steps}) must be below "
                             f"train.steps ({self.train.steps}) for a decaying schedule")
        return self


def load_train_config(path: str | Path | None, overrides: list[str]) -> TrainConfig:
    return load(TrainConfig, path or DEFAULT, overrides)
