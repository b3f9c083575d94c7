"""The local cluster as a user drives it (infra/local_cluster.sh): a Ray head with token
authentication and an MLflow server on loopback; `ray job submit --working-dir .` of a training
run, seen through the MLflow server's REST API (a sweep is the same kpscale.train runs, nested:
tests/test_tune.py); a job without the token refused;
a job stopped mid-run and submitted again resumes; the run page in headless Chromium."""

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import mlflow
import pytest
import ray
from PIL import Image

from conftest import ROOT, TINY_MODEL, free_port, registered_step
from kpscale.tracking import model_folder

VENV_BIN = str(Path(sys.executable).parent)


def _cluster(env: dict, action: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "infra/local_cluster.sh", action], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture
def local_cluster(tmp_path):
    env = {**os.environ, "KPSCALE_CLUSTER_DIR": str(tmp_path / "cluster"), "KPSCALE_BIN": VENV_BIN,
           "RAY_PORT": str(free_port()), "RAY_DASHBOARD_PORT": str(free_port()), "MLFLOW_PORT": str(free_port()),
           "RAY_NUM_CPUS": "2", "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    try:
        started = _cluster(env, "start")
    except subprocess.TimeoutExpired:
        _cluster(env, "stop")  # what did start (a Ray head, an MLflow server) must not outlive the test
        raise
    if started.returncode != 0:
        _cluster(env, "stop")
        pytest.fail(started.stdout[-3000:] + started.stderr[-3000:])
    for line in (tmp_path / "cluster" / "env").read_text().splitlines():
        key, value = line.removeprefix("export ").split("=", 1)
        env[key] = value
    head = int((tmp_path / "cluster" / "ray.pgid").read_text())
    try:
        yield env
    finally:
        stopped = _cluster(env, "stop")
        assert stopped.returncode == 0, stopped.stderr
        with socket.socket() as s:  # the MLflow server is gone
            assert s.connect_ex(("127.0.0.1", int(env["MLFLOW_PORT"]))) != 0
        with pytest.raises(ProcessLookupError):  # and so is the Ray head, while the session's head lives on
            os.killpg(head, 0)
        ray.init(logging_level="ERROR")
        ray.shutdown()


def _job(env: dict, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([f"{VENV_BIN}/ray", "job", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _rest(env: dict, endpoint: str, body: dict | None = None, **params) -> dict:
    """GET with query parameters, or POST `body` as JSON (as runs/search wants)."""
    url = f"{env['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(params)}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def _runs(env: dict, filter_string: str) -> list[dict]:
    experiment = _rest(env, "experiments/get-by-name", experiment_name="kpscale")["experiment"]["experiment_id"]
    return _rest(env, "runs/search", {"experiment_ids": [experiment], "filter": filter_string}).get("runs", [])


@pytest.mark.slow
def test_local_cluster_jobs_log_to_the_mlflow_server(local_cluster, basketball, tmp_path):
    env = local_cluster
    # Without the cluster's token (or with another one) the job server refuses a submission.
    outsider = {k: v for k, v in env.items() if k not in ("RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN")}
    outsider["HOME"] = str(tmp_path / "home")  # no ~/.ray/auth_token there
    for extra in ({}, {"RAY_AUTH_TOKEN": "0" * 64}):
        refused = _job({**outsider, **extra}, "submit", "--", "python", "-c", "0", timeout=120)
        assert refused.returncode != 0 and "token" in (refused.stdout + refused.stderr).lower()

    # A training job, stopped mid-run with `ray job stop`, then submitted again: it resumes. 48 steps
    # leave the stop (a CLI start of seconds) time to land before the job ends on a fast machine.
    # The upload holds no .git: the submitter passes its commit in the entrypoint (README, Cluster).
    train = ["--working-dir", ".", "--", "KPSCALE_GIT_COMMIT=0123abcd", "python", "-m", "kpscale.train", *TINY_MODEL, "data.batch_size=2",
             f"data.train={basketball / 'train'}", f"data.test={basketball / 'test'}", "train.steps=48",
             "train.warmup_steps=1", "train.log_every=4", "train.checkpoint_every=4", "train.eval_every=24",
             "train.eval_clips=4", "train.workers=2", "train.cpus_per_worker=1", "train.run_name=job",
             f"train.storage={tmp_path / 'runs'}"]
    assert _job(env, "submit", "--no-wait", "--submission-id", "train-1", *train).returncode == 0
    deadline, checked = time.time() + 300, time.time() + 15
    while registered_step(tmp_path / "runs" / "job") < 8:
        if time.time() > checked:  # `ray job status` is a 3 s CLI start: every 15 s, not every poll
            assert time.time() < deadline and "FAILED" not in _job(env, "status", "train-1").stdout, \
                _job(env, "logs", "train-1").stdout[-3000:]
            checked = time.time() + 15
        time.sleep(1)
    assert _job(env, "stop", "train-1").returncode == 0
    assert "was stopped" in _job(env, "status", "train-1").stdout
    again = _job(env, "submit", "--submission-id", "train-2", *train)
    assert again.returncode == 0 and "succeeded" in again.stdout, again.stdout[-3000:] + again.stderr[-3000:]
    resumed = [int(s) for s in re.findall(r"rank 0 resumed at step (\d+)", again.stdout)]
    assert resumed and 8 <= resumed[0] < 48

    # Everything reached the MLflow server: one run (the resumed job logs to the same run).
    (run,) = _runs(env, "attributes.run_name = 'job'")
    run_id = run["info"]["run_id"]
    assert run["info"]["status"] == "FINISHED"
    metrics = {m["key"]: m for m in run["data"]["metrics"]}
    assert metrics["train/loss"]["step"] == 48 and metrics["tracking_error_observed"]["value"] > 0
    videos = [f["path"] for f in _rest(env, "artifacts/list", run_id=run_id, path="videos")["files"]]
    assert {"videos/step-0000024.gif", "videos/step-0000048.gif"} <= set(videos)
    query = urllib.parse.urlencode({"path": "videos/step-0000048.gif", "run_uuid": run_id})
    with urllib.request.urlopen(f"{env['MLFLOW_TRACKING_URI']}/get-artifact?{query}", timeout=30) as gif:
        assert gif.read(6) == b"GIF89a"
    experiment = _rest(env, "experiments/get-by-name", experiment_name="kpscale")["experiment"]
    assert {t["key"]: t["value"] for t in experiment["tags"]}["mlflow.experimentKind"] == "custom_model_development"
    assert run["data"]["tags"] and {t["key"]: t["value"] for t in run["data"]["tags"]}["git_commit"] == "0123abcd"
    # The model is the run's one logged model (also when the stopped job had logged it already),
    # loadable by kpscale.predict from the server.
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    assert [m.name for m in client.search_logged_models([run["info"]["experiment_id"]],
                                                        filter_string=f"source_run_id = '{run_id}'")] == ["model"]
    assert (model_folder(run_id, env["MLFLOW_TRACKING_URI"]) / "weights.pt").is_file()

    # What a user sees: the run page with its metrics, and the video artifact.
    shots = subprocess.run([sys.executable, "infra/mlflow_screenshot.py", "--tracking-uri",
                            env["MLFLOW_TRACKING_URI"], "--run", run_id, "--out", str(tmp_path / "shots")],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert shots.returncode == 0, shots.stderr[-3000:]
    page = (tmp_path / "shots" / "run.html").read_text()
    assert "job" in page and "tracking_error_observed" in page
    assert "Logged models (1)" in page and "Evaluation runs" not in page  # the model-training view
    for name in ("run.png", "video.png"):
        image = Image.open(tmp_path / "shots" / name).convert("L")
        assert image.size == (1600, 1100)
        low, high = image.getextrema()
        assert high - low > 100  # rendered content, not a blank page
