"""Sweeps: sweep files checked before Ray starts, and real Ray Tune sweeps of Ray Train runs on a
local Ray: ASHA stops a poor trial, MLflow holds a parent run with one child per trial and the
best config, an interrupted sweep restored keeps its finished trials, and PBT continues a trial
from another trial's checkpoint."""

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from ray._private.utils import get_num_cpus

from kpscale.config import ConfigError
from kpscale.train.config import load_train_config
from kpscale.tune.sweep import load_sweep
from conftest import ROOT

TINY_SWEEP = ROOT / "tuning" / "tiny.yaml"


@pytest.mark.parametrize("path", sorted((ROOT / "tuning").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_sweeps_are_valid(path):
    sweep = load_sweep(path)
    assert sweep.cfg.space and sweep.cfg.name == path.stem
    for key, param in sweep.cfg.space.items():
        if key != "base":
            assert sweep.trial_config({key: param.values[0]}).flat()[key] == param.values[0]


def test_the_baselines_sweep_is_the_papers_models_by_seeds_grid():
    sweep = load_sweep(ROOT / "tuning" / "baselines.yaml")
    assert sweep.cfg.scheduler.type == "fifo" and sweep.cfg.metric == "tracking_error_predicted"
    models = {}
    for base in sweep.cfg.space["base"].values:
        for seed in sweep.cfg.space["train.seed"].values:
            cfg = sweep.trial_config({"base": base, "train.seed": seed})
            assert cfg.train.seed == seed and cfg.train.steps == 2400  # every model at the default's budget
            models.setdefault((cfg.model.name, cfg.model.latent_size, cfg.model.num_samples), []).append(seed)
    assert models == {("struct_vrnn", 16, 10): [0, 1, 2], ("struct_vrnn", 0, 1): [0, 1, 2],
                      ("cnn_vrnn", 16, 10): [0, 1, 2]}


def test_a_base_grid_is_checked_per_base_and_refused_by_pbt(tmp_path):
    struct = ROOT / "kpscale/models/struct_vrnn/configs/basketball_cpu.yaml"
    cnn = ROOT / "kpscale/models/cnn_vrnn/configs/basketball_cpu.yaml"
    with pytest.raises(ConfigError, match="nowhere.yaml does not exist"):
        load_sweep(TINY_SWEEP, [f"space={{base: {{grid: [{struct}, {tmp_path / 'nowhere.yaml'}]}}}}"])
    with pytest.raises(ConfigError, match=r"space.model.num_keypoints: unknown training config key \(in .*cnn_vrnn"):
        load_sweep(TINY_SWEEP, ["overrides=[]", f"space={{base: {{grid: [{struct}, {cnn}]}}, "
                                                "model.num_keypoints: {grid: [8, 12]}}"])
    with pytest.raises(ConfigError, match="pbt cannot mutate the config a trial starts from"):
        load_sweep(TINY_SWEEP, ["overrides=[]", "scheduler.type=pbt", "scheduler.perturbation_interval=400",
                                f"space={{base: {{choice: [{struct}, {cnn}]}}}}"])


def test_compare_takes_the_finished_trials_of_a_sweep(tmp_path):
    from kpscale.compare import sweep_trials

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("kpscale")
    sweep = client.create_run(experiment).info.run_id

    def child(status: str, **tags) -> str:
        run = client.create_run(experiment, tags={"mlflow.parentRunId": sweep, **tags}).info.run_id
        client.set_terminated(run, status)
        return run
    finished = [child("FINISHED"), child("FINISHED")]
    child("KILLED"), child("FAILED"), child("FINISHED", kind="evaluation")
    client.set_terminated(client.create_run(experiment).info.run_id)  # not the sweep's
    assert sorted(sweep_trials(sweep, uri)) == sorted(finished)
    with pytest.raises(ConfigError, match="no finished trials"):
        sweep_trials(finished[0], uri)


def test_basketball_sweep_covers_the_papers_knobs():
    space = load_sweep(ROOT / "tuning" / "basketball.yaml").cfg.space
    assert {"model.beta", "model.separation_weight", "model.sparsity_weight", "model.num_keypoints"} <= set(space)
    assert min(space["model.num_keypoints"].values) > 6  # more keypoints than the 6 objects


@pytest.mark.parametrize("overrides, words", [
    (["space={model.num_keypointz: {grid: [4, 8]}}"], ["space.model.num_keypointz", "unknown training config key"]),
    (["space={model.beta: {uniform: [-1.0, 1.0]}}"], ["space.model.beta", "-1.0", "greater than or equal to 0"]),
    (["space={model.beta: {loguniform: [0.0, 1.0]}}"], ["space.model.beta", "must be positive"]),
    (["space={train.lr: {uniform: [0.1, 0.01]}}"], ["space.train.lr", "low must be below high"]),
    (["space={train.lr: {grid: [0.1], choice: [0.2]}}"], ["space.train.lr", "exactly one of"]),
    (["space={model.num_keypoints: {choice: [1, 4]}}"], ["space.model.num_keypoints", "choice value 1"]),
    (["metric=accuracy"], ["metric", "struct_vrnn trials do not report 'accuracy'", "tracking_error_observed"]),
    (["scheduler.grace_period=100"], ["scheduler.grace_period (100) exceeds train.steps (12)"]),
    (["scheduler.type=pbt"], ["space.train.lr", "use choice, not grid"]),
    (["scheduler.type=pbt", "space={model.num_keypoints: {choice: [4, 8]}}", "scheduler.perturbation_interval=4"],
     ["space.model.num_keypoints", "parameter shapes"]),
    (["nme=x"], ["nme", "unknown key"]),
])
def test_bad_sweeps_are_refused_naming_the_key(overrides, words):
    with pytest.raises(ConfigError) as err:
        load_sweep(TINY_SWEEP, overrides)
    for word in words:
        assert word in str(err.value)


def test_eval_metric_needs_an_evaluation_before_the_first_rung():
    with pytest.raises(ConfigError, match=r"train.eval_every \(8\) must not exceed"):
        load_sweep(TINY_SWEEP, ["metric=tracking_error_observed", "train.eval_every=8"])


def test_cli_refuses_a_bad_sweep_before_ray_starts(tmp_path):
    result = subprocess.run([sys.executable, "-m", "kpscale.tune", "--sweep", str(TINY_SWEEP),
                             "space={model.nope: {grid: [1, 2]}}", f"storage={tmp_path}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "space.model.nope: unknown training config key" in result.stderr
    assert "Traceback" not in result.stderr and "Ray" not in result.stderr and not any(tmp_path.iterdir())


def _sweep(basketball, tmp_path, *overrides) -> list[str]:
    return [sys.executable, "-m", "kpscale.tune", "--sweep", str(TINY_SWEEP), f"data.train={basketball / 'train'}",
            f"data.test={basketball / 'test'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            f"storage={tmp_path / 'sweeps'}", *overrides]


def _trial_reports(folder: Path) -> dict[str, int]:
    """Trial id -> number of results Tune recorded for it."""
    return {d.name.split("_")[2] + "_" + d.name.split("_")[3]: len((d / "result.json").read_text().splitlines())
            for d in folder.glob("run_trial_*") if (d / "result.json").exists()}


@pytest.mark.slow
def test_tiny_sweep_asha_mlflow_best_config_and_restore(basketball, tmp_path):
    from ray.tune import ExperimentAnalysis

    # One trial at a time, in grid order: the poor trial (lr 1e-7) meets the finished good one's
    # result at its first rung and ASHA stops it there; the sweep is interrupted as the third
    # trial starts. (Tune does not save ASHA's rungs, so a poor trial started after the restore
    # would have nothing to be compared with.)
    # Each trial's worker takes every CPU of the cluster, so that a placement group a finished
    # trial left behind would hold the next trial back.
    grid = ["space={train.lr: {grid: [0.01, 1.0e-7, 0.01]}}", "max_concurrent_trials=1", "train.steps=8",
            f"train.cpus_per_worker={get_num_cpus()}"]
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        first = subprocess.Popen(_sweep(basketball, tmp_path, *grid), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + 400
        while log.read_text(errors="replace").count("completed after") < 2:  # the good trial, then the stopped one
            assert first.poll() is None and time.time() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.5)
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=180) == 130, log.read_text(errors="replace")[-3000:]
    assert "run the same command again to resume" in log.read_text(errors="replace")
    folder = tmp_path / "sweeps" / "tiny"
    trials = ExperimentAnalysis(str(folder)).trials
    done_before = {t.trial_id for t in trials if t.status == "TERMINATED"}
    assert len(done_before) == 2
    reports_before = _trial_reports(folder)

    second = subprocess.run(_sweep(basketball, tmp_path, *grid), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "restoring sweep tiny" in second.stderr
    reports_after = _trial_reports(folder)
    assert len(reports_after) == 3
    for trial in done_before:  # finished trials were not run again
        assert reports_after[trial] == reports_before[trial]
        assert f"Trial run_trial_{trial} started" not in second.stdout + second.stderr

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("kpscale").experiment_id
    (parent,) = client.search_runs([experiment], filter_string="tags.sweep = 'true'")
    children = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.data.tags["trial_id"] for c in children) == sorted(reports_after)  # one run per trial
    assert sorted(c.data.params["train.lr"] for c in children) == ["0.01", "0.01", "1e-07"]
    stopped = [c for c in children if c.data.tags.get("stopped_early") == "true"]
    assert [c.data.params["train.lr"] for c in stopped] == ["1e-07"] and stopped[0].info.status == "KILLED"
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_stopped_early"] == len(stopped)
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert finished and all(c.data.tags.get("stopped_early") is None for c in finished)
    best_loss = min(client.get_metric_history(c.info.run_id, "train/loss")[-1].value for c in finished)
    assert parent.data.metrics["best/train/loss"] == pytest.approx(best_loss)
    assert parent.data.params["best.train.lr"] == "0.01"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert artifacts == {"sweep/best.yaml", "sweep/metric_vs_params.png", "sweep/trials.csv"}
    png = Path(client.download_artifacts(parent.info.run_id, "sweep/metric_vs_params.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    best = load_train_config(folder / "best.yaml", [])  # ready to train as it is
    assert best.train.lr == 0.01 and best.train.run_name == "tiny-best" and best.model.num_keypoints == 4
    assert best.data.train == str(basketball / "train") and best.train.init_checkpoint is None


@pytest.mark.slow
def test_pbt_continues_a_trial_from_another_trials_checkpoint(basketball, tmp_path):
    # Synchronous PBT: both trials meet at each perturbation, however far apart they started.
    result = subprocess.run(_sweep(basketball, tmp_path, "name=pbt", "space={train.lr: {choice: [0.01, 1.0e-7]}}",
                                   "num_samples=2", "scheduler.type=pbt", "scheduler.perturbation_interval=4",
                                   "scheduler.quantile_fraction=0.5", "scheduler.synch=true", "train.steps=8", "train.eval_every=8",
                                   "train.keep_checkpoints=4"),
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = sorted(p.name for p in (tmp_path / "sweeps" / "pbt" / "train").iterdir())
    # A poor trial went on from a better trial's checkpoint (TRIAL-from-DONOR-STEP), before the end ...
    copies = sorted((int(r.rsplit("-", 1)[1]), r) for r in runs if "-from-" in r)
    assert copies and copies[0][0] < 8, runs
    donor_step, name = copies[0]
    trial = name.split("-from-")[0]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (copy,) = client.search_runs([client.get_experiment_by_name("kpscale").experiment_id],
                                 filter_string=f"attributes.run_name = '{name}'")
    assert copy.data.tags["trial_id"] == trial
    steps = [m.step for m in client.get_metric_history(copy.info.run_id, "train/loss")]
    assert steps and min(steps) > donor_step  # ... at the donor's step, not from scratch
    # A trial at its last step is done, not paused to be perturbed and restarted with nothing to train.
    assert "nothing left to train" not in result.stdout + result.stderr
    (parent,) = client.search_runs([client.get_experiment_by_name("kpscale").experiment_id],
                                   filter_string="tags.sweep = 'true'")
    assert parent.data.metrics["trials_finished"] == 2 and parent.data.metrics["trials_failed"] == 0
    table = result.stdout[result.stdout.index("sweep pbt: 2 trials"):]  # each trial once, under its own id
    assert sorted(re.findall(r"^\s+(\w+_\d+)\s", table, re.M)) == sorted({r.split("-from-")[0] for r in runs})
