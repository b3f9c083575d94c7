"""MLflow: where runs go, and the run a training job logs to (the same one when it resumes)."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import fsspec
import mlflow

from kpscale.config import Config


def tracking_uri(configured: str | None) -> str:
    """Config, else $MLFLOW_TRACKING_URI, else a SQLite file in the working folder (no server).
    Made absolute so that Ray workers, whatever their working folder, log to the same store."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def open_run(uri: str, experiment: str, marker: str, name: str, cfg: Config, tags: dict) -> str:
    """The MLflow run of a training run: created with params and tags the first time, found
    again through `marker` (a file or URL beside the checkpoints) when the run resumes."""
    mlflow.set_tracking_uri(uri)
    fs, path = fsspec.core.url_to_fs(marker)
    if fs.exists(path):
        run_id = fs.cat_file(path).decode().strip()
        mlflow.MlflowClient().update_run(run_id, status="RUNNING")
        return run_id
    experiment_id = mlflow.set_experiment(experiment).experiment_id
    with mlflow.start_run(experiment_id=experiment_id, run_name=name, tags=tags) as run:
        params = cfg.flat()
        items = list(params.items())
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per call
            mlflow.log_params(dict(items[i:i + 100]))
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, run.info.run_id.encode())
    return run.info.run_id


def model_folder(run: str, uri: str | None = None) -> Path:
    """A model folder (weights.pt, config.yaml): `run` itself when it is a folder, else the
    `model/` artifacts of the MLflow run `run`, downloaded."""
    from kpscale.config import ConfigError

    folder = Path(run)
    if not folder.is_dir():
        try:
            folder = Path(mlflow.artifacts.download_artifacts(run_id=run, artifact_path="model",
                                                              dst_path=tempfile.mkdtemp(),
                                                              tracking_uri=tracking_uri(uri)))
        except Exception as exc:
            raise ConfigError(f"{run!r} is neither a folder nor an MLflow run with a logged model ({exc})") from None
    for name in ("weights.pt", "config.yaml"):
        if not (folder / name).exists():
            raise ConfigError(f"{folder} has no {name}: not a kpscale model")
    return folder
