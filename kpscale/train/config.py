"""The training config: model, data, train and tracking sections, validated as a whole before
any Ray resources are requested. The default (no --config) is `kpscale/models/struct_vrnn/configs/basketball_cpu.yaml`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from kpscale.config import Config, load
from kpscale.data.stream import DataConfig
from kpscale.models import FAMILIES, ModelConfig, StructVRNNConfig, build_family
from kpscale.models.family import Family

DEFAULT = Path(__file__).parents[1] / "models" / "struct_vrnn" / "configs" / "basketball_cpu.yaml"


class StageSection(Config):
    name: str  # one of the family's stages
    steps: int = Field(ge=1)
    # Weights this stage starts from when it starts (not when resumed): an MLflow run id or a
    # model folder of a run that trained the modules the stage freezes.
    init_from: str | None = None
    freeze: list[str] = []  # modules kept as they are, besides those the stage itself freezes


class TrainSection(Config):
    # With stages: the sum of the stages' steps (of `stage` alone when given), set if omitted.
    steps: int = Field(3000, ge=1)
    stages: list[StageSection] = []  # empty: the family's first stage for `steps` steps
    stage: str | None = None  # run only this one of `stages`
    workers: int = Field(1, ge=1)  # Ray Train workers, one GPU each when GPUs are used
    cpus_per_worker: int = Field(1, ge=1)
    use_gpu: bool | None = None  # None: GPUs when the Ray cluster has them
    zero_stage: int = Field(2, ge=0, le=3)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    # torch.compile each engine's module; None: on GPU, where fusing the dynamics' many small
    # kernels pays, not on CPU, where compiling takes minutes.
    compile: bool | None = None
    compile_backend: str = "inductor"  # aot_eager traces without generating kernels: a quick check
    # torch.compile's mode: "reduce-overhead" replays each step's kernels as CUDA graphs (GPU only;
    # whether it pays with DeepSpeed's engine is for `python -m kpscale.bench gpu` to say).
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
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
    # i3d_pretrained_400.pt for the families whose evaluation reports FVD during training
    # (class_conditional, per class); None: $KPSCALE_I3D_WEIGHTS, else no FVD, said once.
    i3d: str | None = None
    checkpoint_every: int = Field(500, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=0)  # worker failures survived by restarting from a checkpoint
    storage: str = "runs"  # Ray Train storage: checkpoints; shared storage on a multi-node cluster
    run_name: str = Field("struct_vrnn-basketball", pattern=r"^[A-Za-z0-9_.-]+$")  # same name: resume
    # A checkpoint folder (or URI) a new run starts from, step and optimizer included; a run
    # with checkpoints of its own resumes from those instead. Sweeps use it for PBT.
    init_checkpoint: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _steps_of_the_stages(cls, values):
        if not isinstance(values, dict) or not values.get("stages"):
            return values
        stages = [s for s in values["stages"] if values.get("stage") in (None, s.get("name") if isinstance(s, dict)
                                                                           else s.name)]
        total = sum(int(s["steps"] if isinstance(s, dict) else s.steps) for s in stages)
        if "steps" in values and values["steps"] != total:
            raise ValueError(f"train.steps ({values['steps']}) is not the sum of the steps of the stages it runs "
                             f"({total}): set the stages' steps (train.stages.N.steps) and leave train.steps out")
        return {**values, "steps": total}

    @model_validator(mode="after")
    def _stage_is_listed(self) -> TrainSection:
        if self.stage is not None and self.stage not in [s.name for s in self.stages]:
            raise ValueError(f"train.stage {self.stage!r} is not one of train.stages "
                             f"({', '.join(s.name for s in self.stages) or 'none given'})")
        return self

    def plan(self) -> list[StageSection]:
        """The stages this run trains, in order."""
        return [s for s in self.stages if self.stage in (None, s.name)]


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

    def stages(self, family: type[Family]) -> list[StageSection]:
        """The stages this run trains, in order; none listed: the family's first, for train.steps."""
        return self.train.plan() or [StageSection(name=family.stages[0].name, steps=self.train.steps)]

    @model_validator(mode="after")
    def _stages_fit_the_family(self) -> TrainConfig:
        family = FAMILIES[self.model.name]
        known = [s.name for s in family.stages]
        for i, section in enumerate(self.train.stages):
            if section.name not in known:
                raise ValueError(f"train.stages.{i}.name: {self.model.name} has no stage {section.name!r} "
                                 f"(its stages: {', '.join(known)})")
        for i, section in enumerate(self.train.plan()):
            frozen = [*family.stages[known.index(section.name)].frozen, *section.freeze]
            if i == 0 and frozen and not section.init_from and not self.train.init_checkpoint:
                raise ValueError(f"stage {section.name} keeps {', '.join(frozen)} as they are, but nothing trained "
                                 f"them: run an earlier stage first in train.stages, or give the stage's init_from "
                                 f"(a run that trained them)")
        if any(s.freeze for s in self.train.stages):
            with torch.device("meta"):
                modules = build_family(self.model).modules()
            for i, section in enumerate(self.train.stages):
                if unknown := sorted(set(section.freeze) - set(modules)):
                    raise ValueError(f"train.stages.{i}.freeze: {self.model.name} has no module "
                                     f"{', '.join(unknown)} (its modules: {', '.join(modules)})")
        return self

    @model_validator(mode="after")
    def _schedule_fits(self) -> TrainConfig:
        shortest = min(self.stages(FAMILIES[self.model.name]), key=lambda s: s.steps)
        if self.train.lr_schedule != "constant" and self.train.warmup_steps >= shortest.steps:
            where = f"train.steps ({shortest.steps})" if not self.train.stages else \
                f"the steps of stage {shortest.name} ({shortest.steps}), whose optimisers' schedules it starts"
            raise ValueError(f"train.warmup_steps ({self.train.warmup_steps}) must be below {where} "
                             "for a decaying schedule")
        return self


def load_train_config(path: str | Path | None, overrides: list[str]) -> TrainConfig:
    return load(TrainConfig, path or DEFAULT, overrides)
