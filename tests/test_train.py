"""The training plane: config validation before Ray, DeepSpeed checkpoints that resume exactly,
and a real multi-worker Ray Train run that checkpoints and survives a killed worker."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter

os.environ["DS_ACCELERATOR"] = "cpu"  # before DeepSpeed is imported: there is no GPU here

import mlflow
import pytest
import torch
from PIL import Image

from kpscale.models import build_family
from kpscale.predict import load_trained
from kpscale.train.config import load_train_config
from conftest import CNN_VRNN, ROOT, TINY_MODEL, exit_status, registered_step, run_main, train_at_once

TINY = [*TINY_MODEL, "data.batch_size=2", "data.num_workers=0", "train.warmup_steps=1", "train.log_every=2"]


@pytest.mark.parametrize("override, words", [
    ("train.zero_stage=5", ["train.zero_stage", "5"]),
    ("model.num_keypointz=3", ["model.num_keypointz", "unknown key"]),
    ("data.train=/no/such/shards", ["data.train", "/no/such/shards"]),
    ("train.steps=10", ["warmup_steps", "train.steps"]),
    ("model.image_size=96", ["model.image_size", "96"]),
    ("train.warmup_steps=0", ["train.warmup_steps", "0"]),
])
def test_invalid_configs_are_refused_before_ray_starts(override, words, capsys):
    import ray

    from kpscale.train.__main__ import main
    extra = ["train.warmup_steps=50"] if override == "train.steps=10" else []
    assert exit_status(main, *TINY, override, *extra) == 2
    err = capsys.readouterr().err
    assert all(word in err for word in words), err
    assert len(err.splitlines()) == 2 and "'model':" not in err  # the headline and one line naming the value
    assert not ray.is_initialized()


def test_default_config_loads_and_fits_the_window():
    cfg = load_train_config(None, [])
    assert cfg.window == cfg.model.observed + cfg.model.predicted == 16
    assert cfg.train.workers == 1 and cfg.data.train is None


def _engine(cfg, seed=0):
    from kpscale.train.engine import build_engine
    torch.manual_seed(seed)
    return build_engine(build_family(cfg.model).optimiser("model"), cfg, bf16=False, steps=cfg.train.steps)


def _steps(engine, batches, first_step):
    for i, video in enumerate(batches):
        out = engine(video, first_step + i, decode_predictions=False)
        engine.backward(out["loss"])
        engine.step()


def _init_single_process(monkeypatch, port):
    import deepspeed

    from kpscale.train.engine import skip_shm_comm_op
    skip_shm_comm_op()
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo")


def test_weight_decay_shrinks_conv_kernels_only(monkeypatch):
    """With no loss gradient, a DeepSpeed Adam step moves each conv kernel towards zero and leaves
    biases and the dynamics' dense layers where they were (the official L2 on conv kernels). The
    decay is coupled, as in Keras: Adam normalises the L2 gradient, so every kernel element moves
    by the learning rate, where decoupled AdamW would move it by lr * decay * |w| (~1e-5 of that)."""
    _init_single_process(monkeypatch, 29710)
    cfg = load_train_config(None, [*TINY, "train.zero_stage=2", "train.lr_schedule=constant", "train.weight_decay=1e-4"])
    engine = _engine(cfg)
    before = {name: p.detach().clone() for name, p in engine.module.named_parameters()}
    applied = 0.0
    for step in range(3):  # the warmup gives the first two steps a learning rate of 0
        out = engine(torch.rand(2, 8, 3, 64, 64), step, decode_predictions=False)
        engine.backward(0 * out["loss"])
        applied += engine.get_lr()[0]
        engine.step()
    assert applied > 0
    kernels = {f"{name}.weight" for name, m in engine.module.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert kernels and len(kernels) < len(before)
    for name, p in engine.module.named_parameters():
        if name in kernels:
            assert p.abs().sum() < before[name].abs().sum(), name
            moved = (before[name] - p.detach()).abs()  # below lr only where |2 * decay * w| nears Adam's eps
            assert moved.median().item() == pytest.approx(applied, rel=1e-2) and moved.max().item() <= applied * 1.001, \
                f"{name} moved by {moved.median():.3g} (median), not the learning rate {applied}: not coupled L2"
        else:
            torch.testing.assert_close(p, before[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_checkpoint_resumes_exactly(tmp_path, stage, monkeypatch):
    """Two steps, save, load into a fresh engine, two more == four uninterrupted steps: the
    optimizer, the LR schedule and the RNG (used by the VRNN's sampling) all continue."""
    import deepspeed

    from kpscale.train import checkpoint
    _init_single_process(monkeypatch, 29700 + stage)
    cfg = load_train_config(None, [*TINY, f"train.zero_stage={stage}", "train.steps=4"])
    g = torch.Generator().manual_seed(1)
    batches = [torch.rand(2, 8, 3, 64, 64, generator=g) for _ in range(4)]

    straight = _engine(cfg)
    _steps(straight, batches, 0)

    first = _engine(cfg)
    _steps(first, batches[:2], 0)
    checkpoint.save({"model": first}, tmp_path, {"step": 2, "epoch": 0, "stage": "train"}, rank=0)
    torch.manual_seed(123)  # scramble the RNG: load must restore it
    resumed = _engine(cfg, seed=7)  # other initial weights: load must replace them
    assert checkpoint.load({"model": resumed}, tmp_path, rank=0) == {"step": 2, "epoch": 0, "stage": "train"}
    _steps(resumed, batches[2:], 2)

    assert resumed.global_steps == straight.global_steps == 4
    assert resumed.get_lr() == straight.get_lr()
    for (name, a), b in zip(straight.module.named_parameters(), resumed.module.parameters()):
        if stage == 3:  # ZeRO-3 partitions parameters; gather them to compare
            with deepspeed.zero.GatheredParameters([a, b]):
                torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_a_compiled_engine_trains_as_the_eager_one_in_one_graph(monkeypatch):
    """train.compile's engine.compile, stepped as the loop steps it (the step a counter on the
    device): the same parameters as an eager engine stepped with Python ints, after steps that
    cross the end of the KL and teacher-forcing ramps, in one graph without a break. A graph
    break (a host read of a tensor, as the exploration term's greedy assignment once made) would
    stall the GPU; a second graph (the step as a Python int becomes a graph input) would make
    CUDA graphs record anew at every step. aot_eager traces as inductor does without generating
    kernels. The dynamics are deterministic here (Struct-RNN, teacher forcing throughout): a
    traced graph may draw its random numbers in another order than eager."""
    import torch._dynamo

    _init_single_process(monkeypatch, 29710)
    cfg = load_train_config(None, [*TINY, "train.zero_stage=0", "train.steps=4", "model.exploration_weight=1",
                                   "model.kl_anneal_steps=4", "model.scheduled_sampling_steps=4",
                                   "model.latent_size=0", "model.num_samples=1", "model.p_true_end_observed=1",
                                   "model.p_true_end_predicted=1"])
    g = torch.Generator().manual_seed(1)
    batches = [torch.rand(2, 8, 3, 64, 64, generator=g) for _ in range(3)]
    eager, compiled = _engine(cfg), _engine(cfg)
    compiled.compile(backend="aot_eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for engine, as_tensor in ((eager, False), (compiled, True)):
        torch.manual_seed(5)
        for step, video in zip((1, 3, 6), batches):
            out = engine(video, torch.tensor(step) if as_tensor else step, decode_predictions=False)
            engine.backward(out["loss"])
            engine.step()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert dict(torch._dynamo.utils.counters["graph_break"]) == {}
    for (name, a), b in zip(eager.module.named_parameters(), compiled.module.parameters()):
        torch.testing.assert_close(a, b, msg=name)


def test_the_meter_sums_into_tensors_of_its_own():
    """With CUDA graphs (train.compile_mode=reduce-overhead) a step's replay overwrites the last
    step's outputs in place: the meter must not keep an output as its running sum."""
    from kpscale.train.loop import Meter

    meter, output = Meter(), torch.tensor(2.0)
    meter.add(1, {"loss": output})
    output.fill_(7.0)  # the next replay
    meter.add(1, {"loss": output})
    assert meter.sums["loss"].item() == 9.0


def test_a_local_ray_beside_another_tells_its_workers_where_its_state_api_is():
    """Ray Train's placement-group cleaner asks the state API, with no address, whether its
    controller lives; with two Rays on the machine (the session's head and the local Ray that
    a command without RAY_ADDRESS starts) Ray cannot tell which, the cleaner's thread dies, and
    a killed Train run's workers keep their CPUs for good. start_ray's workers are told."""
    probe = """
import ray
from kpscale.train.launch import start_ray
start_ray()

@ray.remote(num_cpus=0)
def ask():
    from ray.util.state import list_actors
    try:
        return f"{len(list_actors(limit=100))} actors"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"

print(ray.get(ask.remote()))
"""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # the session's head runs beside
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("actors"), result.stdout


def _run(client, tmp_path):
    experiment = client.get_experiment_by_name("kpscale")
    (run,) = client.search_runs([experiment.experiment_id])
    return run


def repeated_lines(output: str) -> dict[str, int]:
    """Lines that occur more than twice once timestamps, process ids and Ray's "[repeated Nx]"
    tags are removed: a warning printed in a loop, whatever its pid or time."""
    counts = Counter()
    for line in output.splitlines():
        line = re.sub(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ", "", line)
        line = re.sub(r"pid=\d+(, ip=[\d.]+)?", "pid=", re.sub(r"\s*\[repeated \d+x across cluster\]", "", line))
        counts[line.strip()] += 1
    return {line: n for line, n in counts.items() if n > 2 and line}


def test_repeated_lines_are_counted_whatever_their_pid_and_time():
    flood = "\n".join(f"(PlacementGroupCleaner pid={100 + i}) Failed to query actor state.{' [repeated 4x across cluster]' * (i % 2)}"
                      for i in range(5))
    steps = "\n".join(f"2026-11-29 01:59:0{i},521 INFO kpscale.train: step {i}: loss 1.0" for i in range(5))
    assert repeated_lines(flood + "\n" + steps) == {"(PlacementGroupCleaner pid=) Failed to query actor state.": 5}


@pytest.mark.slow
def test_two_workers_zero2_checkpoint_and_a_killed_worker(basketball, tmp_path):
    """Two ZeRO-2 workers checkpoint; when one of them is killed, Ray Train restarts the group from
    the latest checkpoint and the run ends as an uninterrupted one would. (A run resumed by a
    second invocation: tests/test_local_cluster.py and tests/test_family.py; resumed exactly, per
    ZeRO stage: test_checkpoint_resumes_exactly.) Until the kill its output is the training, no
    warning printed in a loop, beside the stale build lock every test's DeepSpeed meets
    (conftest.ray_head)."""
    log = tmp_path / "train.log"
    with open(log, "w") as out:
        run = subprocess.Popen(
            [sys.executable, "-m", "kpscale.train", *TINY, f"data.train={basketball / 'train'}",
             f"data.test={basketball / 'test'}", "train.workers=2", "train.cpus_per_worker=1", "train.zero_stage=2",
             "train.steps=16", "train.checkpoint_every=4", "train.eval_every=4", "train.eval_clips=8",
             "train.max_failures=2", f"train.storage={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
             "train.run_name=resume-test"],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        # Kill once the controller has registered a checkpoint of this run: it restores the latest registered one.
        deadline = time.time() + 240
        while registered_step(tmp_path / "runs" / "resume-test") < 8:
            assert run.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, f"no checkpoint of step 8 within 240 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
        before_kill = log.read_text()
        workers = subprocess.run(["pgrep", "-f", "RayTrainWorker"], capture_output=True, text=True).stdout.split()
        assert workers, "no Ray Train worker process found"
        os.kill(int(workers[-1]), signal.SIGKILL)
        assert run.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        if run.poll() is None:
            run.kill()
    assert "step 4: tracking error" in before_kill and repeated_lines(before_kill) == {}
    output = log.read_text()
    resumed = [int(s) for s in re.findall(r"rank 0 resumed at step (\d+)", output)]
    assert "worker health check failed" in output and len(resumed) == 1 and resumed[0] >= 8
    # The checkpoints Ray Train keeps (keep_checkpoints=2; one being written at the kill stays
    # beside them, unregistered), the last with every rank's state.
    snapshot = json.loads((tmp_path / "runs" / "resume-test" / "checkpoint_manager_snapshot.json").read_text())
    assert [c["metrics"]["step"] for c in snapshot["checkpoint_results"]] == [12, 16]
    names = {p.name for p in (tmp_path / "runs" / "resume-test" / snapshot["checkpoint_results"][-1]["checkpoint_dir_name"]).rglob("*")}
    assert {"rng-rank0.pt", "rng-rank1.pt", "latest"} <= names
    assert any("optim_states" in n for n in names)

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = _run(client, tmp_path)  # one run, across the restart
    assert run.info.status == "FINISHED"
    assert run.data.params["train.zero_stage"] == "2" and run.data.params["model.num_keypoints"] == "4"
    assert run.data.tags["dataset"] == "basketball" and len(run.data.tags["git_commit"]) == 40
    # Steps between the restored checkpoint and the kill are trained (and logged) again.
    logged = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(set(logged)) == list(range(2, 17, 2)) and logged[-1] == 16
    for metric in ("train/reconstruction", "train/separation", "train/sparsity", "train/kl", "train/future",
                   "train/exploration", "train/clips_per_s", "train/data_wait_fraction", "train/skipped_clips"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, metric)] == logged, metric
    for metric in ("tracking_error_observed", "tracking_error_predicted", "tracking_error_no_dynamics",
                   "tracking_error_null", "objects_found",
                   *(f"keypoint_distance/object_{n}" for n in range(6))):
        evaluated = {m.step for m in client.get_metric_history(run.info.run_id, metric)}
        assert sorted(evaluated) == list(range(4, 17, 4)), metric
    assert 0 <= run.data.metrics["objects_found"] <= 6
    videos = [a.path for a in client.list_artifacts(run.info.run_id, "videos")]
    assert "videos/step-0000016.gif" in videos
    # The logged model loads back from the run id, strictly, for kpscale.predict.
    model, cfg = load_trained(run.info.run_id, f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert cfg.model.num_keypoints == 4 and not model.training


SCORING = ["--samples", "3", "--clips", "6", "--fit-clips", "16"]  # kpscale.evaluate's and kpscale.compare's


@pytest.fixture(scope="module")
def baselines(basketball, tmp_path_factory):
    """The paper's two baselines, each trained by kpscale.train for 4 steps into one MLflow store
    and scored by kpscale.evaluate: (store uri, {name: (training run, evaluation run)})."""
    from kpscale.evaluate.__main__ import main as evaluate_main

    folder = tmp_path_factory.mktemp("baselines")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    client.create_experiment("kpscale")  # the store's tables, before two trainings write to it at once
    common = [f"data.train={basketball / 'train'}", f"data.test={basketball / 'test'}", "train.steps=4",
              "train.eval_every=4", "train.eval_clips=8", f"train.storage={folder / 'runs'}", f"tracking.uri={uri}"]
    commands = {"struct_rnn": [*TINY, "model.latent_size=0", "model.num_samples=1", f"data.cache={folder / 'cache'}"],
                "cnn_vrnn": [*(o for o in TINY if not o.startswith("model.num_keypoints")), "--config", str(CNN_VRNN)]}
    runs = {}
    for name, run_id in train_at_once(commands, common).items():
        evaluated = run_main(evaluate_main, "--run", run_id, "--data", str(basketball / "test"), *SCORING,
                             "--tracking-uri", uri)
        assert evaluated.returncode == 0, evaluated.stderr[-3000:]
        runs[name] = client.get_run(run_id), client.get_run(evaluated.stdout.strip().rsplit(" ", 1)[-1])
    return uri, runs


@pytest.mark.slow
def test_struct_rnn_baseline_trains_and_evaluates_through_the_same_commands(baselines):
    """The paper's Struct-RNN (deterministic dynamics) is a config of the same model: it trains
    with kpscale.train and is scored by kpscale.evaluate, whose samples all coincide. It trained
    from data.cache: its 4 steps of 2 clips decoded 8 clips into the cache, as MLflow says."""
    run, evaluation = baselines[1]["struct_rnn"]
    assert run.data.params["model.latent_size"] == "0" and "tracking_error_no_dynamics" in run.data.metrics
    assert run.data.metrics["train/cache_misses"] == 8 and run.data.metrics["train/cache_hits"] == 0
    child = evaluation.data.metrics
    assert child["psnr_closest"] == pytest.approx(child["psnr_furthest"], rel=1e-6)  # one future, drawn 3 times
    assert child["tracking_error_predicted"] > 0 and child["tracking_error_no_dynamics"] > 0


@pytest.mark.slow
def test_cnn_vrnn_baseline_trains_and_evaluates_through_the_same_commands(baselines, tmp_path):
    """The paper's CNN-VRNN (a feature vector, no keypoints) trains from its shipped config with
    kpscale.train and is scored by kpscale.evaluate: tracking by regression from the vector,
    and nothing of keypoints (no objects found, no keypoint column in the video, no trajectories)."""
    uri, runs = baselines
    client = mlflow.MlflowClient(uri)
    run, evaluation = runs["cnn_vrnn"]
    assert run.data.params["model.name"] == "cnn_vrnn" and run.data.params["model.representation_size"] == "36"
    assert run.data.params["train.run_name"] == "cnn_vrnn-basketball"
    metrics = run.data.metrics
    assert {"tracking_error_observed", "tracking_error_predicted", "tracking_error_no_dynamics"} <= set(metrics)
    assert "objects_found" not in metrics and "train/separation" not in metrics
    gif = client.download_artifacts(run.info.run_id, "videos/step-0000004.gif", str(tmp_path))
    with Image.open(gif) as image:  # truth | reconstruction | predicted, 3x scale, 4 px borders
        assert image.size[0] == 3 * 3 * (64 + 4)
    child = evaluation.data.metrics
    assert child["psnr_closest"] >= child["psnr_furthest"] and "objects_found" not in child
    assert child["tracking_error_predicted"] > 0 and child["tracking_error_observed"] > 0
    artifacts = {a.path for a in client.list_artifacts(evaluation.info.run_id, "evaluation")}
    assert "evaluation/tracking.png" in artifacts and "evaluation/trajectories.parquet" not in artifacts


@pytest.mark.slow
def test_compare_scores_training_runs_as_evaluate_does(baselines, basketball):
    """kpscale.compare on the two training runs' ids: a child run each with the very figures
    kpscale.evaluate gave them (same clips, same seeds), and each model's mean on the parent."""
    uri, runs = baselines
    ids = {run.info.run_id: evaluation for run, evaluation in runs.values()}
    result = subprocess.run([sys.executable, "-m", "kpscale.compare", *ids, "--data", str(basketball / "test"),
                             *SCORING, "--tracking-uri", uri], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "name=cnn_vrnn" in result.stdout and "name=struct_vrnn" in result.stdout and "(1 run)" in result.stdout
    client = mlflow.MlflowClient(uri)
    parent = client.get_run(result.stdout.strip().rsplit(" ", 1)[-1])
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.data.tags["model"] for c in children) == sorted(ids)
    for child in children:
        evaluated = ids[child.data.tags["model"]].data.metrics
        for name in ("tracking_error_observed", "tracking_error_predicted", "tracking_error_no_dynamics",
                     "psnr_closest"):
            assert child.data.metrics[name] == pytest.approx(evaluated[name], rel=1e-6), name
    means = sorted(v for k, v in parent.data.metrics.items() if k.endswith("/tracking_error_predicted_mean"))
    assert means == pytest.approx(sorted(c.data.metrics["tracking_error_predicted"] for c in children), rel=1e-6)
