"""`ray job submit --working-dir . -- python -m kpscale.train ...` against a real `ray start
--head` on loopback with token authentication, as on a cluster."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import pytest

from conftest import ROOT, TINY_MODEL

VENV_BIN = str(Path(sys.executable).parent)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_job_agent(env: dict, address: str, timeout: float = 120) -> None:
    """`ray start` returns before the node's job agent has registered; on a loaded machine a
    submission then fails with "No available agent". Submit a no-op job until one is taken."""
    deadline = time.time() + timeout
    while True:
        probe = subprocess.run([f"{VENV_BIN}/ray", "job", "submit", "--address", address, "--", "python", "-c", "0"],
                               env=env, capture_output=True, text=True, timeout=120)
        if probe.returncode == 0:
            return
        assert "No available agent" in probe.stdout + probe.stderr, probe.stdout[-2000:] + probe.stderr[-2000:]
        assert time.time() < deadline, "the Ray job agent did not come up"
        time.sleep(2)


@pytest.fixture
def ray_head(tmp_path):
    # The job's `python` is the first on PATH of the head's processes: the project's venv.
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    subprocess.run([f"{VENV_BIN}/ray", "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    port, dashboard = _free_port(), _free_port()
    temp = tempfile.mkdtemp(prefix="kpray", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    start = subprocess.run([f"{VENV_BIN}/ray", "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                            "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2",
                            "--include-dashboard=true", f"--temp-dir={temp}", "--disable-usage-stats"],
                           env=env, capture_output=True, text=True, timeout=180)
    assert start.returncode == 0, start.stdout[-2000:] + start.stderr[-2000:]
    address = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_for_job_agent(env, address)
        yield env, address
    finally:
        subprocess.run([f"{VENV_BIN}/ray", "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_ray_job_submit_trains_end_to_end(ray_head, basketball, tmp_path):
    env, address = ray_head
    overrides = [*TINY_MODEL, "data.batch_size=2", "train.warmup_steps=1", "train.steps=4", "train.log_every=2",
                 "train.eval_every=4", "train.eval_clips=4", "train.checkpoint_every=4", "train.workers=2",
                 "train.cpus_per_worker=1",
                 f"data.train={basketball / 'train'}", f"data.test={basketball / 'test'}",
                 f"train.storage={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    submit = subprocess.run([f"{VENV_BIN}/ray", "job", "submit", "--address", address, "--working-dir", str(ROOT),
                             "--", "python", "-m", "kpscale.train", *overrides],
                            env=env, capture_output=True, text=True, timeout=600)
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    assert "succeeded" in submit.stdout
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("kpscale").experiment_id])
    assert run.info.status == "FINISHED" and run.data.metrics["tracking_error_null"] > 0
    assert "videos/step-0000004.gif" in [a.path for a in client.list_artifacts(run.info.run_id, "videos")]

    # Without the token the job server refuses the submission.
    no_token = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
    no_token["HOME"] = str(tmp_path / "home")  # no ~/.ray/auth_token there
    refused = subprocess.run([f"{VENV_BIN}/ray", "job", "submit", "--address", address, "--", "python", "-c", "1"],
                             env=no_token, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    assert "token" in (refused.stdout + refused.stderr).lower()
