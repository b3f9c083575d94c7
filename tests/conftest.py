import contextlib
import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from kpscale.config import load
from kpscale.data.build import build
from kpscale.data.card import DatasetCard

ROOT = Path(__file__).resolve().parents[1]
CARD = ROOT / "datasets" / "basketball.yaml"

torch.set_num_threads(1)

CNN_VRNN = ROOT / "kpscale/models/cnn_vrnn/configs/basketball_cpu.yaml"  # the baseline's shipped config
# A Struct-VRNN small enough for a training step in well under a second on one core.
TINY_MODEL = ["model.filters=4", "model.num_keypoints=4", "model.rnn_size=16", "model.hidden_size=16",
              "model.num_samples=2", "model.observed=4", "model.predicted=4", "model.layers_per_scale=1"]


def build_basketball(out: Path, *overrides: str) -> Path:
    card = load(DatasetCard, CARD, ["workers=1", *overrides])
    build(card, out, progress=False)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session", autouse=True)
def ray_head():
    """One Ray head for the session, on loopback, that every command a test starts joins through
    RAY_ADDRESS, as commands join the cluster under `ray job submit`: a Ray started and stopped by
    each command took ~12 s of it. Ports of its own (the local-cluster test starts a head beside
    it), and a temp folder of its own, so that a command run without RAY_ADDRESS starts its own
    Ray rather than finding this one. Without the token `ray start` asks for by default: Ray
    reads its auth mode when imported, before a fixture could set it for this process's
    ray.init (tests/test_local_cluster.py covers a token cluster).

    Every DeepSpeed of the session, in its workers and in this process, runs beside a stale lock
    of a JIT build in its torch extensions folder, as a user's first run after a Ctrl+C during
    a build would (kpscale.train.engine.skip_shm_comm_op; torch's lock has no timeout). Ray
    Train's controllers poll their workers every 0.5 s rather than Ray's 2 s, so a run's end
    is seen sooner."""
    temp = Path(tempfile.mkdtemp(prefix="kpt-", dir="/tmp"))  # Ray's socket paths must stay short
    port = free_port()
    (temp / "torch_extensions" / "deepspeed_shm_comm").mkdir(parents=True)
    (temp / "torch_extensions" / "deepspeed_shm_comm" / "lock").touch()
    env = {"RAY_AUTH_MODE": "disabled", "TORCH_EXTENSIONS_DIR": str(temp / "torch_extensions"),
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
    dashboard = free_port()
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--ray-client-server-port={free_port()}",
         f"--dashboard-agent-listen-port={free_port()}", f"--temp-dir={temp / 'ray'}", "--disable-usage-stats"],
        # Its workers (Ray Train's placement-group cleaners) find its dashboard even while a
        # test's command runs a Ray of its own beside it (kpscale.train.launch.start_ray).
        env={**os.environ, **env, "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard}"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)  # the head's daemons share this process group, which teardown ends
    output = head.communicate(timeout=180)[0]
    if head.returncode != 0:
        os.killpg(head.pid, signal.SIGKILL)
        pytest.fail(f"ray start failed:\n{output[-3000:]}")
    try:
        with pytest.MonkeyPatch.context() as patch:
            for key, value in {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}.items():
                patch.setenv(key, value)
            yield os.environ["RAY_ADDRESS"]
    finally:
        os.killpg(head.pid, signal.SIGKILL)  # as `ray stop --force`: Ray's daemons ignore SIGTERM
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="session")
def basketball(tmp_path_factory) -> Path:
    """A small basketball dataset with uneven shards: train 16+16+16+2, test 10."""
    return build_basketball(tmp_path_factory.mktemp("basketball"), "splits.train=50", "splits.test=10",
                            "clips_per_shard=16", "clip_length=20")


@pytest.fixture(scope="session")
def moving_mnist(tmp_path_factory) -> Path:
    """A small colour Moving MNIST: train 96, test 32, in shards of 32."""
    card = load(DatasetCard, ROOT / "datasets" / "moving_mnist.yaml",
                ["workers=1", "splits={train: 96, test: 32}", "clips_per_shard=32"])
    out = tmp_path_factory.mktemp("moving_mnist")
    build(card, out, progress=False)
    return out


@pytest.fixture
def basketball_copy(basketball, tmp_path) -> Path:
    """A copy the test may damage."""
    return Path(shutil.copytree(basketball, tmp_path / "basketball"))


@pytest.fixture(autouse=True)
def _quiet_logs(caplog):
    caplog.set_level(logging.INFO)


def registered_step(folder: Path) -> int:
    """The step of the latest checkpoint that Ray Train's controller has registered in the run
    folder: the one a resumed or restarted run starts from (registration lags the checkpoint
    folder on a loaded machine)."""
    try:
        latest = json.loads((folder / "checkpoint_manager_snapshot.json").read_text())["latest_checkpoint_result"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):  # not written yet, or being rewritten
        return 0
    return int((latest or {}).get("metrics", {}).get("step", 0))


def train_at_once(commands: dict[str, list[str]], common: list[str]) -> dict[str, str]:
    """`python -m kpscale.train ARGS COMMON` for each {name: ARGS}, all at once (a run's Ray Train
    launch waits on process starts more than it computes); the MLflow run id of each, once every
    one has finished successfully."""
    trainings = {name: subprocess.Popen([sys.executable, "-m", "kpscale.train", *args, *common], cwd=ROOT,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for name, args in commands.items()}
    try:
        outputs = {name: training.communicate(timeout=300)[0] for name, training in trainings.items()}
    finally:
        for training in trainings.values():
            training.kill()
    runs = {}
    for name, output in outputs.items():
        assert trainings[name].returncode == 0, output[-3000:]
        runs[name] = re.search(r"finished at step \d+: MLflow run (\w+)", output).group(1)
    return runs


def exit_status(main, *args: str) -> int:
    """An entry point's main(argv) called in this process, as `python -m` runs it (each entry point
    also runs as a subprocess in some test): its exit status, argparse's exits included."""
    try:
        return main(list(args))
    except SystemExit as exit_:
        return exit_.code


def run_main(main, *args: str) -> subprocess.CompletedProcess:
    """exit_status's call, with what the entry point printed, as subprocess.run would return it."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = exit_status(main, *args)
    return subprocess.CompletedProcess(list(args), status, out.getvalue(), err.getvalue())
