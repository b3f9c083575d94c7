"""MLflow: where runs go, and the run a training job logs to (the same one when it resumes)."""

from __future__ import annotations

import os
import subprocess
import tempfile
import warnings
from pathlib import Path

import fsspec
import mlflow
import yaml
from mlflow.entities import Param
from mlflow.exceptions import MlflowException

from kpscale.config import Config


def tracking_uri(configured: str | None) -> str:
    """Config, else $MLFLOW_TRACKING_URI, else a SQLite file in the working folder (no server).
    Made absolute so that Ray workers, whatever their working folder, log to the same store."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


def git_commit() -> str:
    """The checkout's commit; under `ray job submit` (which uploads no .git) the submitter's,
    passed as KPSCALE_GIT_COMMIT in the entrypoint."""
    if os.environ.get("KPSCALE_GIT_COMMIT"):
        return os.environ["KPSCALE_GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def tag_experiment_kind(experiment_id: str) -> None:
    """Mark the experiment as model training: the MLflow UI files an experiment without a kind
    under GenAI's evaluation runs. Runs starting together (a sweep's trials, jobs submitted at
    once) may both find the tag missing; the store refuses the second insert of the same key."""
    client = mlflow.MlflowClient()
    kind = ("mlflow.experimentKind", "custom_model_development")
    if client.get_experiment(experiment_id).tags.get(kind[0]) == kind[1]:
        return
    try:
        client.set_experiment_tag(experiment_id, *kind)
    except MlflowException:
        if client.get_experiment(experiment_id).tags.get(kind[0]) != kind[1]:  # not the other run's insert
            raise


def open_run(uri: str, experiment: str, marker: str, name: str, cfg: Config, tags: dict,
             datasets: dict[str, str] | None = None) -> str:
    """The MLflow run of a training run: created with params, tags and its datasets ({context:
    shard spec}) the first time, found again through `marker` (a file or URL beside the
    checkpoints) when the run resumes."""
    mlflow.set_tracking_uri(uri)
    fs, path = fsspec.core.url_to_fs(marker)
    if fs.exists(path):
        run_id = fs.cat_file(path).decode().strip()
        mlflow.MlflowClient().update_run(run_id, status="RUNNING")
        return run_id
    experiment_id = mlflow.set_experiment(experiment).experiment_id
    tag_experiment_kind(experiment_id)
    with mlflow.start_run(experiment_id=experiment_id, run_name=name, tags=tags) as run:
        params = cfg.flat()
        items = list(params.items())
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per call
            mlflow.log_params(dict(items[i:i + 100]))
        for context, spec in (datasets or {}).items():
            mlflow.log_input(dataset(spec), context=context)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, run.info.run_id.encode())
    return run.info.run_id


def dataset(spec: str):
    """Shards as an MLflow dataset: named after their card and split, the manifest's digest."""
    import hashlib

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    from kpscale.data.shards import MANIFEST

    fs, path = fsspec.core.url_to_fs(spec)
    manifest = path if path.endswith(".parquet") else f"{path.rstrip('/')}/{MANIFEST}"
    digest = hashlib.sha256(fs.cat_file(manifest)).hexdigest()[:16] if fs.exists(manifest) else None
    split = Path(path.rstrip("/"))
    card = str(split.parent / "card.yaml")
    card_name = (yaml.safe_load(fs.cat_file(card)) or {}).get("name") if fs.exists(card) else None
    name = f"{card_name or split.parent.name}/{split.name}"
    with warnings.catch_warnings():  # MLflow registers its local artifact source twice and warns that it is ambiguous
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(spec)
    return MetaDataset(source=source, name=name, digest=digest)


def run_page(uri: str, run_id: str) -> str:
    """Where a person sees a run: its page in the MLflow UI's model-training view (the UI opens
    in its GenAI view unless the link or the user picks another), after `mlflow ui` for a local store."""
    experiment = mlflow.MlflowClient(uri).get_run(run_id).info.experiment_id
    path = f"/#/experiments/{experiment}/runs/{run_id}?workflowType=machine_learning"
    if uri.startswith("http"):
        return uri.rstrip("/") + path
    return f"mlflow ui --backend-store-uri {uri}, then http://127.0.0.1:5000{path}"


def stage_run(parent_id: str, stage: str, params: dict) -> str:
    """The nested run of one stage of a multi-stage training run: created under the run with the
    run's tags and the stage's params, or found again when the run resumes. Its metrics, videos
    and figures are the stage's; the parent keeps the whole run's curves and the model."""
    client = mlflow.MlflowClient()
    parent = client.get_run(parent_id)
    found = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}' and "
                               f"tags.kpscale_stage = '{stage}'")
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    tags = {k: v for k, v in parent.data.tags.items() if not k.startswith("mlflow.")}
    run = client.create_run(parent.info.experiment_id, run_name=f"{parent.info.run_name}/{stage}",
                            tags={**tags, "mlflow.parentRunId": parent_id, "kpscale_stage": stage})
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
    return run.info.run_id


def log_model(weights: dict, cfg: Config) -> None:
    """The trained model as an MLflow pyfunc model `model` of the active run (listed under its
    Logged models, registrable): weights.pt and config.yaml as its artifacts, kpscale/pyfunc_model.py
    as its code."""
    import numpy as np
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    # Clips [B, T, C, H, W] in, sampled futures [B, S, T', C, H, W] out (kpscale/pyfunc_model.py).
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1,) * 5)]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1,) * 6)]))
    # A job stopped after logging the model but before its last checkpoint registered trains the
    # last steps again when resumed: the run keeps one model, the latest.
    client, run = mlflow.MlflowClient(), mlflow.active_run().info
    for old in client.search_logged_models([run.experiment_id], filter_string=f"source_run_id = '{run.run_id}'"):
        if old.name == "model":
            client.delete_logged_model(old.model_id)
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        # The signature gives the shapes; an input example would be a whole clip in every model.
        warnings.filterwarnings("ignore", message=".*An input example was not provided")  # MLflow colours it
        torch.save(weights, f"{folder}/weights.pt")
        Path(f"{folder}/config.yaml").write_text(cfg.to_yaml())
        mlflow.pyfunc.log_model(name="model", python_model=str(Path(__file__).parent / "pyfunc_model.py"),
                                artifacts={"weights": f"{folder}/weights.pt", "config": f"{folder}/config.yaml"},
                                signature=signature, code_paths=[str(Path(__file__).parent)],
                                pip_requirements=_requirements())


def _requirements() -> list[str]:
    import importlib.metadata

    return [r for r in importlib.metadata.requires("kpscale") or [] if "extra ==" not in r]


def model_folder(run: str, uri: str | None = None) -> Path:
    """A model folder (weights.pt, config.yaml): `run` itself when it is a folder, else the model
    an MLflow run logged (run id, runs:/ or models:/ URI), downloaded."""
    from kpscale.config import ConfigError

    folder = Path(run)
    if not folder.is_dir():
        source = run if ":/" in run else f"runs:/{run}/model"
        try:
            mlflow.set_tracking_uri(tracking_uri(uri))
            folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tempfile.mkdtemp(),
                                                              tracking_uri=tracking_uri(uri)))
        except Exception as exc:
            raise ConfigError(f"{run!r} is neither a folder nor an MLflow run with a logged model ({exc})") from None
        if (folder / "artifacts" / "weights.pt").exists():  # a pyfunc model's layout
            folder = folder / "artifacts"
    for name in ("weights.pt", "config.yaml"):
        if not (folder / name).exists():
            raise ConfigError(f"{folder} has no {name}: not a kpscale model")
    return folder
