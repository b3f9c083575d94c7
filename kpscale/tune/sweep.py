"""A sweep file: the base training config, the search space over its dotted keys, the metric,
the scheduler and the resources of each trial. Checked in full against the training config
before any trial starts: an unknown key or a value the training config refuses is an error
naming the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from kpscale.config import Config, ConfigError, apply_overrides, read_config, read_yaml, validate, with_values
from kpscale.train.config import DEFAULT as DEFAULT_TRAIN_CONFIG
from kpscale.models import FAMILIES
from kpscale.train.config import TrainConfig

TRAIN_SECTIONS = tuple(TrainConfig.model_fields)  # overrides starting with these go to the base config


class Param(Config):
    """One swept key: exactly one of these. Ranges are [low, high]; randint includes high."""
    grid: list[Any] | None = None  # every value, in every combination with the other grids
    choice: list[Any] | None = None  # one at random per sample
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Param:
        given = [k for k in type(self).model_fields if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of grid, choice, uniform, loguniform, randint (got {given or 'none'})")
        values = getattr(self, given[0])
        if given[0] in ("grid", "choice") and not values:
            raise ValueError(f"{given[0]} needs at least one value")
        if given[0] in ("uniform", "loguniform", "randint") and not values[0] < values[1]:
            raise ValueError(f"{given[0]} range [{values[0]}, {values[1]}] is empty: low must be below high")
        if given[0] == "loguniform" and values[0] <= 0:
            raise ValueError(f"loguniform range [{values[0]}, {values[1]}] must be positive")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in type(self).model_fields if getattr(self, k) is not None)

    @property
    def values(self) -> list[Any]:
        """The values to check against the training config: every listed one, or both ends."""
        return list(getattr(self, self.kind))

    def domain(self):
        """The Ray Tune search domain."""
        from ray import tune

        values = getattr(self, self.kind)
        if self.kind == "randint":
            return tune.randint(values[0], values[1] + 1)  # Tune's high is exclusive
        if self.kind in ("grid", "choice"):
            return (tune.grid_search if self.kind == "grid" else tune.choice)(values)
        return getattr(tune, self.kind)(*values)  # tune.uniform, tune.loguniform


class Scheduler(Config):
    type: Literal["asha", "pbt", "fifo"] = "asha"  # fifo: every trial runs to the end
    grace_period: int = Field(100, ge=1)  # asha: steps before a trial can be stopped (the first rung)
    reduction_factor: float = Field(3.0, gt=1)  # asha: 1 in this many trials goes on at each rung
    perturbation_interval: int = Field(200, ge=1)  # pbt: steps between exploit/explore decisions
    quantile_fraction: float = Field(0.25, gt=0, le=0.5)  # pbt: bottom fraction copies the top one
    synch: bool = False  # pbt: every trial waits for the others at each perturbation


class TrialResources(Config):
    """Each trial is a Ray Train run with its own workers; these set its train section."""
    workers: int = Field(1, ge=1)
    cpus_per_worker: int = Field(1, ge=1)
    use_gpu: bool | None = None  # None: GPUs when the cluster has them


class SweepConfig(Config):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")  # the same name again restores the sweep
    base: str | None = None  # training config, relative to the sweep file; None: the package default
    overrides: list[str] = []  # key=value applied to the base, before the swept values
    # Dotted training-config key -> distribution; `base` (grid or choice of config files,
    # relative to the sweep file) varies the config each trial starts from, e.g. the model family.
    space: dict[str, Param] = Field(min_length=1)
    num_samples: int = Field(1, ge=1)  # random draws; with grids, repeats of the whole grid
    metric: str = "tracking_error_observed"
    mode: Literal["min", "max"] = "min"
    scheduler: Scheduler = Scheduler()
    resources_per_trial: TrialResources = TrialResources()
    max_concurrent_trials: int | None = Field(None, ge=1)  # None: as many as the cluster fits
    storage: str = "runs/sweeps"  # Tune state and each trial's checkpoints; shared storage on a cluster


BASE = "base"  # a space key of its own: the training config file each trial starts from


class Sweep:
    """A validated sweep: its config, and the training config tree every trial starts from
    (its base file, or the space's `base` value, then the sweep's overrides and `values`)."""

    def __init__(self, cfg: SweepConfig, folder: Path, to_base: list[str], source: str):
        self.cfg, self.source = cfg, source
        self._folder = folder
        # Each base file read once, here: trials run on other nodes, where the files may not be.
        self.bases = cfg.space[BASE].values if BASE in cfg.space else [cfg.base]
        self._trees = {base: apply_overrides(read_config(self.base_path(base)), [*cfg.overrides, *to_base])
                       for base in self.bases if self.base_path(base).is_file()}
        r = cfg.resources_per_trial
        # Dotted values every trial's config gets (the runner adds absolute data paths and the store).
        self.values: dict[str, Any] = {"train.workers": r.workers, "train.cpus_per_worker": r.cpus_per_worker,
                                       "train.use_gpu": r.use_gpu}

    @property
    def folder(self) -> str:
        storage = self.cfg.storage if "://" in self.cfg.storage else str(Path(self.cfg.storage).resolve())
        return f"{storage}/{self.cfg.name}"

    def base_path(self, base: str | None) -> Path:
        """A base config file as the sweep file names it (relative to the sweep file); None: the package default."""
        return (self._folder / base) if base else DEFAULT_TRAIN_CONFIG

    def tree(self, base: str | None) -> dict[str, Any]:
        if base not in self._trees:
            raise ConfigError(f"{self.source}: base {base!r}: {self.base_path(base)} does not exist")
        return with_values(self._trees[base], self.values)

    def trial_config(self, params: dict[str, Any]) -> TrainConfig:
        tree = self.tree(params.get(BASE, self.bases[0]))
        return validate(TrainConfig, with_values(tree, {k: v for k, v in params.items() if k != BASE}),
                        f"{self.source} trial {params}")

    @property
    def base_config(self) -> TrainConfig:
        """The sweep's own base: `base`, or the first value the space lists for it."""
        return self.trial_config({})


def load_sweep(path: str | Path, overrides: list[str] = ()) -> Sweep:
    """Read, override and check a sweep file: `model.*`, `data.*`, `train.*` and `tracking.*`
    overrides go to the base training config, the others to the sweep file."""
    path = Path(path)
    to_base = [o for o in overrides if o.split(".", 1)[0] in TRAIN_SECTIONS]
    source = f"{path}" + (f" + overrides {' '.join(overrides)}" if overrides else "")
    cfg = validate(SweepConfig, apply_overrides(read_yaml(path), [o for o in overrides if o not in to_base]), source)
    sweep = Sweep(cfg, path.parent, to_base, source)
    _check_space(sweep)
    _check_scheduler(sweep, sweep.base_config)
    return sweep


def _check_space(sweep: Sweep) -> None:
    for base in sweep.bases:
        if not sweep.base_path(base).is_file():
            where = f"space.{BASE}" if BASE in sweep.cfg.space else BASE
            raise ConfigError(f"{sweep.source}: {where}: {sweep.base_path(base)} does not exist")
        trial = sweep.trial_config({BASE: base})
        reported = FAMILIES[trial.model.name].metrics
        if sweep.cfg.metric not in reported:
            raise ConfigError(f"{sweep.source}: metric: {trial.model.name} trials do not report "
                              f"{sweep.cfg.metric!r}; use one of {', '.join(reported)}")
        known = trial.flat()
        for key, param in sweep.cfg.space.items():
            if key == BASE:
                continue
            if key not in known:
                raise ConfigError(f"{sweep.source}: space.{key}: unknown training config key"
                                  + (f" (in {base})" if len(sweep.bases) > 1 else ""))
            for value in param.values:
                try:
                    sweep.trial_config({BASE: base, key: value})
                except ConfigError as exc:
                    raise ConfigError(f"{sweep.source}: space.{key}: {param.kind} value {value!r} is refused by the "
                                      f"training config:\n{str(exc).splitlines()[-1]}") from None


def _check_scheduler(sweep: Sweep, base: TrainConfig) -> None:
    s, steps = sweep.cfg.scheduler, base.train.steps
    # Trials report at evaluations (and checkpoints): the scheduler sees the metric only then.
    if s.type == "asha" and s.grace_period > steps:
        raise ConfigError(f"{sweep.source}: scheduler.grace_period ({s.grace_period}) exceeds train.steps ({steps})")
    first_decision = s.grace_period if s.type == "asha" else s.perturbation_interval
    if s.type != "fifo" and not sweep.cfg.metric.startswith("train/") and base.train.eval_every > first_decision:
        raise ConfigError(f"{sweep.source}: train.eval_every ({base.train.eval_every}) must not exceed the "
                          f"scheduler's first decision at step {first_decision}, or it never sees {sweep.cfg.metric}")
    if s.type == "pbt":
        if base.train.checkpoint_every > s.perturbation_interval:
            raise ConfigError(f"{sweep.source}: pbt copies checkpoints: train.checkpoint_every "
                              f"({base.train.checkpoint_every}) must not exceed scheduler.perturbation_interval "
                              f"({s.perturbation_interval})")
        if BASE in sweep.cfg.space:
            raise ConfigError(f"{sweep.source}: space.{BASE}: pbt cannot mutate the config a trial starts from")
        for key, param in sweep.cfg.space.items():
            if param.kind == "grid":
                raise ConfigError(f"{sweep.source}: space.{key}: pbt mutates sampled values; use choice, not grid")
            if _changes_parameter_shapes(sweep, key, param.values):
                raise ConfigError(f"{sweep.source}: space.{key}: pbt cannot mutate a key that changes the "
                                  "model's parameter shapes (a copied checkpoint would not load)")


def _changes_parameter_shapes(sweep: Sweep, key: str, values: list[Any]) -> bool:
    import torch

    from kpscale.models import build_family

    if not key.startswith("model."):
        return False
    with torch.device("meta"):
        shapes = [{k: tuple(v.shape) for k, v in build_family(sweep.trial_config({key: v}).model).root.state_dict().items()}
                  for v in (values[0], values[-1])]
    return shapes[0] != shapes[1]
