"""Run a sweep: join or start Ray, open the parent MLflow run, then fit a Ray Tune Tuner whose
trials are Ray Train runs (`kpscale.tune.trial`), or restore the Tuner when the sweep's folder
already holds one, so that finished trials are kept and unfinished ones resume."""

from __future__ import annotations

import logging
from pathlib import Path

from kpscale.tune.sweep import Sweep

log = logging.getLogger("kpscale.tune")


def run_sweep(sweep: Sweep) -> dict:
    from ray import tune

    from kpscale.tracking import git_commit, open_run, tracking_uri
    from kpscale.train.launch import check_data, check_fits_cluster, dataset_name, start_ray, with_default_data
    from kpscale.tune.report import summarise
    from kpscale.tune.trial import LAST_STEP, run_trial

    base = with_default_data(sweep.base_config)  # before any Ray resources: may build the default data
    check_data(base)
    uri = tracking_uri(base.tracking.uri)
    # Trials run in their own working folders: every path they see must be absolute.
    sweep.values.update({"data.train": _absolute(base.data.train), "data.test": _absolute(base.data.test),
                         "tracking.uri": uri})
    start_ray()
    check_fits_cluster(base)
    parent = open_run(uri, base.tracking.experiment, f"{sweep.folder}/mlflow_run_id", sweep.cfg.name, sweep.cfg,
                      tags={"git_commit": git_commit(), "dataset": dataset_name(base.data.train), "sweep": "true"})
    log.info("sweep %s: MLflow parent run %s in %s; Tune state in %s", sweep.cfg.name, parent, uri, sweep.folder)
    # The trial function only waits on its Ray Train run, whose workers hold the CPUs and GPUs;
    # Tune's default of 1 CPU per trial would halve the trials a small machine runs at once.
    trainable = tune.with_resources(tune.with_parameters(run_trial, sweep=sweep, parent_run_id=parent),
                                    {"cpu": 0, "memory": 256 * 2**20})
    if tune.Tuner.can_restore(sweep.folder):
        log.info("restoring sweep %s from %s: finished trials are kept, unfinished ones resume", sweep.cfg.name,
                 sweep.folder)
        tuner = tune.Tuner.restore(sweep.folder, trainable, resume_unfinished=True, resume_errored=True)
    else:
        s, fitting = sweep.cfg, _fitting_trials(base)
        if s.max_concurrent_trials and s.max_concurrent_trials > fitting:
            log.warning("max_concurrent_trials=%d but the cluster fits %d trials at once: the others' Train runs "
                        "will wait for resources", s.max_concurrent_trials, fitting)
        tuner = tune.Tuner(
            trainable,
            param_space={key: param.domain() for key, param in s.space.items()},
            tune_config=tune.TuneConfig(metric=s.metric, mode=s.mode, num_samples=s.num_samples,
                                        scheduler=_scheduler(sweep, base.train.steps),
                                        max_concurrent_trials=s.max_concurrent_trials or fitting),
            # Tune's checkpoints are pointers of a few bytes to Train checkpoints: all are kept, so
            # PBT never reaches for one that is gone. A trial at its last step is done: no scheduler
            # pauses it there (PBT would, to perturb it, and restart it with nothing left to train).
            run_config=tune.RunConfig(name=s.name, storage_path=sweep.folder.rsplit("/", 1)[0],
                                      stop={LAST_STEP: True}))
    results = tuner.fit()
    trials = tune.ExperimentAnalysis(sweep.folder).trials
    unfinished = [t for t in trials if t.status not in ("TERMINATED", "ERROR")]
    if unfinished:  # interrupted (Ctrl+C, a stopped job): Tune saved its state
        raise SweepInterrupted(f"sweep {sweep.cfg.name} interrupted with {len(unfinished)} unfinished trials; run the "
                               f"same command again to resume it from {sweep.folder}")
    return summarise(results, trials, sweep, base, parent, uri)


class SweepInterrupted(RuntimeError):
    pass


def _absolute(spec: str | None) -> str | None:
    if spec is None or "://" in spec or spec.startswith("pipe:"):
        return spec
    return str(Path(spec).resolve())


def _fitting_trials(base) -> int:
    import ray

    from kpscale.train.launch import uses_gpu

    resources = ray.cluster_resources()
    fits = int(resources.get("CPU", 0) // (base.train.workers * base.train.cpus_per_worker))
    if uses_gpu(base):
        fits = min(fits, int(resources.get("GPU", 0) // base.train.workers))
    return max(1, fits)


def _scheduler(sweep: Sweep, steps: int):
    from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining

    s = sweep.cfg.scheduler
    if s.type == "asha":
        return ASHAScheduler(time_attr="step", max_t=steps, grace_period=s.grace_period,
                             reduction_factor=s.reduction_factor)
    if s.type == "pbt":
        return PopulationBasedTraining(time_attr="step", perturbation_interval=s.perturbation_interval,
                                       quantile_fraction=s.quantile_fraction, synch=s.synch,
                                       hyperparam_mutations={k: p.domain() for k, p in sweep.cfg.space.items()})
    return None  # FIFO: every trial runs to the end
