"""Launch a training run: resolve the data, join or start Ray, open the MLflow run, fit a
TorchTrainer whose workers run `kpscale.train.loop.train_loop`."""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path

import yaml

from kpscale.config import ConfigError
from kpscale.data.build import CARD_FILE
from kpscale.data.shards import MANIFEST
from kpscale.train.config import TrainConfig

log = logging.getLogger("kpscale.train")
CARDS = Path(__file__).resolve().parents[2] / "datasets"


def with_default_data(cfg: TrainConfig) -> TrainConfig:
    """Point data.train/test at the shards of the shipped card data.card in data/<card>,
    building them when missing."""
    if cfg.data.train is not None:
        return cfg
    folder, card = Path("data") / cfg.data.card, CARDS / f"{cfg.data.card}.yaml"
    if not (folder / "train" / MANIFEST).exists():
        from kpscale.config import load
        from kpscale.data.build import build
        from kpscale.data.card import DatasetCard

        if not card.exists():
            raise ConfigError(f"data.train is not set and data.card {cfg.data.card!r} is not a shipped card "
                              f"({card} is missing)")
        log.info("data.train not given and %s missing: building it from %s", folder, card)
        build(load(DatasetCard, card), folder)
    data = cfg.data.model_copy(update={"train": str((folder / "train").resolve()),
                                       "test": cfg.data.test or str((folder / "test").resolve())})
    return cfg.model_copy(update={"data": data})


def dataset_name(spec: str) -> str:
    card = Path(spec).parent / CARD_FILE
    if card.exists():
        return (yaml.safe_load(card.read_text()) or {}).get("name", "unknown")
    return Path(spec).name


def check_data(cfg: TrainConfig) -> None:
    """The model family's check of the training data against its config, from the split's
    manifest (a local one: remote shards are checked batch by batch as they stream)."""
    from kpscale.data.shards import read_manifest
    from kpscale.models import FAMILIES

    spec = Path(cfg.data.train)
    manifest = spec if spec.suffix == ".parquet" else spec / MANIFEST
    if not manifest.is_file():
        return
    try:
        FAMILIES[cfg.model.name].check_data(cfg.model, read_manifest(manifest).to_pydict(), cfg.data.train)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def run(cfg: TrainConfig):
    """Join the Ray cluster (RAY_ADDRESS, the job's cluster, else a new local one) and train."""
    log.info("config:\n%s", summary(cfg))
    check_data(cfg)
    start_ray()
    check_fits_cluster(cfg)
    return fit(cfg)


def start_ray() -> None:
    """Join the cluster of RAY_ADDRESS (set inside `ray job submit` too), else start a local Ray.

    The local Ray keeps its dashboard: Ray Train's placement-group cleaner asks the dashboard's
    state API every second whether the controller still lives (its run-state actor asks it too),
    and without it prints a warning each time. Its workers are told that dashboard's address:
    left to find it, the cleaner fails when another Ray runs on the machine (a test session's,
    a local cluster) and leaves a killed controller's workers' CPUs taken, so that the next
    Train run (a sweep's next trial) waits for them forever."""
    import socket

    import ray
    from ray._private.services import canonicalize_bootstrap_address

    if canonicalize_bootstrap_address(None) is not None:  # RAY_ADDRESS, or the Ray `ray start` began here
        ray.init(logging_level=logging.WARNING)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(logging_level=logging.WARNING, dashboard_port=port,
             runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}})


def summary(cfg: TrainConfig) -> str:
    """The resolved config, a line of `key=value` per section, for the log's first lines."""
    sections: dict[str, list[str]] = {}
    for key, value in cfg.flat().items():
        section, _, name = key.partition(".")
        sections.setdefault(section, []).append(f"{name}={value}")
    return "\n".join(textwrap.fill(" ".join(items), width=110, initial_indent=f"  {section:<9}",
                                    subsequent_indent=" " * 11, break_on_hyphens=False)
                      for section, items in sections.items())


def check_fits_cluster(cfg: TrainConfig) -> None:
    import ray

    resources, gpu = ray.cluster_resources(), uses_gpu(cfg)
    cpus = cfg.train.workers * cfg.train.cpus_per_worker
    if cpus > resources.get("CPU", 0) or (gpu and cfg.train.workers > resources.get("GPU", 0)):
        raise ConfigError(f"train.workers={cfg.train.workers} x train.cpus_per_worker={cfg.train.cpus_per_worker}"
                          f"{' and one GPU each' if gpu else ''} do not fit the Ray cluster "
                          f"({resources.get('CPU', 0):.0f} CPUs, {resources.get('GPU', 0):.0f} GPUs)")


def uses_gpu(cfg: TrainConfig) -> bool:
    import ray

    return cfg.train.use_gpu if cfg.train.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0


def fit(cfg: TrainConfig, parent_run_id: str | None = None, callbacks: list | None = None, tags: dict | None = None):
    """Fit a TorchTrainer on the connected Ray cluster, logging to the run's MLflow run (a child
    of `parent_run_id` in a sweep). `callbacks` are Ray Train UserCallbacks, e.g. Tune's."""
    import mlflow
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from kpscale.models import FAMILIES
    from kpscale.tracking import git_commit, open_run, run_page, tracking_uri
    from kpscale.train import allocator
    from kpscale.train.loop import train_loop

    use_gpu = uses_gpu(cfg)
    storage = cfg.train.storage if "://" in cfg.train.storage else str(Path(cfg.train.storage).resolve())
    uri = tracking_uri(cfg.tracking.uri)
    marker = f"{storage}/{cfg.train.run_name}/mlflow_run_id"
    run_tags = {"git_commit": git_commit(), "dataset": dataset_name(cfg.data.train), "model": cfg.model.name,
                **(tags or {})}
    if parent_run_id:
        run_tags["mlflow.parentRunId"] = parent_run_id  # shown nested under the sweep in the MLflow UI
    datasets = {"training": cfg.data.train, **({"evaluation": cfg.data.test} if cfg.data.test else {})}
    run_id = open_run(uri, cfg.tracking.experiment, marker, cfg.train.run_name, cfg, tags=run_tags, datasets=datasets)
    log.info("MLflow run %s in %s; checkpoints in %s/%s", run_id, uri, storage, cfg.train.run_name)
    trainer = TorchTrainer(
        train_loop,
        # The config and the family as objects: a family the workers' registry lacks (a test's) trains too.
        train_loop_config={"cfg": cfg, "family": FAMILIES[cfg.model.name], "mlflow_run_id": run_id,
                           "tracking_uri": uri, "storage": storage},
        scaling_config=ScalingConfig(num_workers=cfg.train.workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(storage_path=storage, name=cfg.train.run_name, callbacks=callbacks or [],
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                             # Ray starts workers at niceness 15 so its own processes stay responsive;
                             # a training worker is the work itself and should not yield to them.
                             # MLflow's progress bars (copying the model's files when it is logged)
                             # would land in the training log as lines of carriage returns.
                             worker_runtime_env={"env_vars": {"RAY_worker_niceness": "0",
                                                              "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
                                                              **allocator.ENV}}))
    # A sweep trial's run is closed by the sweep's summary, which knows whether Tune stopped it:
    # a stopped trial's fit may end either way, before or after the summary.
    closes_run = parent_run_id is None
    try:
        result = trainer.fit()
    except BaseException:
        if closes_run:
            mlflow.MlflowClient(uri).set_terminated(run_id, status="FAILED")
        raise
    if closes_run:
        mlflow.MlflowClient(uri).set_terminated(run_id, status="FINISHED")
    # No metrics: the run had already reached train.steps and trained nothing this time.
    step = result.metrics["step"] if result.metrics else cfg.train.steps
    log.info("finished at step %s: MLflow run %s (see %s), checkpoint %s", step, run_id, run_page(uri, run_id),
             result.checkpoint.path if result.checkpoint else None)
    return result
