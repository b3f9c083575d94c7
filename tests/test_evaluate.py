"""python -m kpscale.evaluate on a tiny trained model: every metric, curve, plot and the Parquet
trajectories land in an MLflow run nested under the training run; FVD and VGG cosine come
from weight files loaded through the same path real checkpoints take (random weights here, so
the numbers test the plumbing, not the scores)."""

import re
import subprocess
import sys

import mlflow
import numpy as np
import pytest
from PIL import Image
import torch
from torch import nn

from kpscale.evaluate.evaluator import PartResult
from kpscale.evaluate.fvd import fvd
from kpscale.evaluate.i3d import I3D
from kpscale.evaluate.snapshot import fixed_batches
from kpscale.evaluate.trajectories import read_trajectories
from kpscale.models import build_family
from kpscale.models.vgg import VGG
from kpscale.train.config import load_train_config
from conftest import CNN_VRNN, ROOT, TINY_MODEL, exit_status, run_main


SAMPLES, CLIPS = 2, 4


def _he_init(model: nn.Module) -> nn.Module:
    for m in model.modules():  # PyTorch's default init leaves random I3D logits nearly constant
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_normal_(m.weight)
    return model


def _model_folder(folder, cfg, seed: int):
    """A tiny model after a few Adam steps from `seed`, saved as a model folder."""
    torch.manual_seed(seed)
    model = build_family(cfg.model).root
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    for step in range(3):
        loss = model(torch.rand(2, cfg.window, 3, 64, 64), step, decode_predictions=False)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    folder.mkdir()
    torch.save(model.state_dict(), folder / "weights.pt")
    (folder / "config.yaml").write_text(cfg.to_yaml())
    return folder


@pytest.fixture(scope="module")
def trained_run(basketball, tmp_path_factory):
    """A tiny Struct-VRNN after a few Adam steps, logged as a training run's `model/` artifacts."""
    tmp = tmp_path_factory.mktemp("evaluate")
    cfg = load_train_config(None, [*TINY_MODEL, f"data.train={basketball / 'train'}"])
    folder = _model_folder(tmp / "model", cfg, seed=0)
    torch.save(_he_init(I3D()).state_dict(), tmp / "i3d_pretrained_400.pt")
    torch.save(_he_init(VGG()).state_dict(), tmp / "vgg16.pth")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(experiment_id=mlflow.set_experiment("kpscale").experiment_id, run_name="train") as run:
        mlflow.log_artifacts(str(folder), artifact_path="model")
    return {"tmp": tmp, "uri": uri, "run_id": run.info.run_id, "cfg": cfg}


def _arguments(trained_run, basketball, *extra, weights=True) -> list[str]:
    tmp = trained_run["tmp"]
    networks = ["--i3d", str(tmp / "i3d_pretrained_400.pt"), "--vgg", str(tmp / "vgg16.pth")] if weights else []
    return ["--run", trained_run["run_id"], "--data", str(basketball / "test"), "--fit-data", str(basketball / "train"),
            "--samples", str(SAMPLES), "--clips", str(CLIPS), "--batch-size", "3", "--fit-clips", "16", *networks,
            "--tracking-uri", trained_run["uri"], *extra]


def evaluate(trained_run, basketball, *extra, weights=True) -> subprocess.CompletedProcess:
    """kpscale.evaluate in this process (the command runs as a subprocess over Ray workers below,
    and without weights)."""
    from kpscale.evaluate.__main__ import main
    return run_main(main, *_arguments(trained_run, basketball, *extra, weights=weights))


def _child(client, trained_run, run_id):
    run = client.get_run(run_id)
    assert run.data.tags["mlflow.parentRunId"] == trained_run["run_id"]  # nested under the training run
    return run


def _check_run(trained_run, result, clips=CLIPS):
    assert result.returncode == 0, result.stderr[-3000:]
    client = mlflow.MlflowClient(trained_run["uri"])
    run = _child(client, trained_run, result.stdout.strip().rsplit(" ", 1)[-1])
    m = run.data.metrics
    for name in ("fvd", "psnr_closest", "psnr_furthest", "ssim_closest", "ssim_furthest", "vgg_cosine_closest",
                 "vgg_cosine_furthest", "tracking_error_observed", "tracking_error_predicted",
                 "tracking_error_no_dynamics", "tracking_error_null", "objects_found",
                 *(f"keypoint_distance/object_{n}" for n in range(6))):
        assert name in m, name
    assert m["clips"] == clips and m["fvd"] >= 0 and 0 <= m["objects_found"] <= 6
    # One sample per clip, chosen by VGG cosine: never further than the mean, or the furthest, by it.
    assert m["vgg_cosine_closest"] >= m["vgg_cosine_mean"] >= m["vgg_cosine_furthest"]
    assert re.search(r"closest/furthest: a sample per clip by +vgg_cosine\n", result.stdout)
    assert f"note: FVD from {clips} clips: below 400" in result.stdout
    cfg = trained_run["cfg"].model
    history = client.get_metric_history(run.info.run_id, "psnr_closest_by_frame")
    assert [h.step for h in history] == list(range(cfg.observed + 1, cfg.steps + 1))
    history = client.get_metric_history(run.info.run_id, "tracking_null_by_frame")
    assert [h.step for h in history] == list(range(1, cfg.steps + 1))
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert artifacts == {f"evaluation/{n}" for n in ("diversity.png", "tracking.png", "trajectories.parquet",
                                                      "summary.txt", "video.gif")}
    gif = Image.open(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="evaluation/video.gif",
                                                         tracking_uri=trained_run["uri"]))
    assert gif.n_frames == cfg.steps and gif.size == (3 * 2 * 68, 3 * 68)  # truth | a sampled future, framed, x3
    path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="evaluation/trajectories.parquet",
                                               tracking_uri=trained_run["uri"])
    table = read_trajectories(path)
    assert table.num_rows == clips * SAMPLES * cfg.steps * cfg.num_keypoints
    assert len(set(table.column("clip").to_pylist())) == clips  # every clip once, none twice
    assert "FVD (lower is better)" in result.stdout and "tracking error px, null model" in result.stdout
    return m


def test_parts_hold_exactly_the_first_clips_whatever_their_number(basketball):
    """--clips 7 at batch 3 is 7 clips, the same 7 on one part or split over 3 or 7 (Ray tasks)."""
    data = load_train_config(None, [f"data.train={basketball / 'train'}"]).data.model_copy(update={"batch_size": 3})

    def keys(world: int) -> list[str]:
        return [k for rank in range(world) for b in fixed_batches(str(basketball / "test"), data, 4, 7, rank, world)
                for k in b["key"]]
    alone = keys(1)
    assert len(alone) == 7 and keys(3) == alone and keys(7) == alone
    assert len(set(alone)) == 7
    every = [k for b in fixed_batches(str(basketball / "test"), data, 4, None) for k in b["key"]]
    assert every[:7] == alone and len(every) > 7


@pytest.fixture(scope="module")
def in_process(trained_run, basketball):
    """The metrics of one evaluation in the evaluating process, checked whole."""
    return _check_run(trained_run, evaluate(trained_run, basketball))


def test_evaluate_logs_every_metric_plot_and_trajectory(in_process):
    assert in_process["clips"] == CLIPS


@pytest.mark.slow
def test_evaluate_over_ray_workers_matches_in_process(trained_run, basketball, in_process):
    """Clips split over Ray tasks: the same clips, so the same deterministic metrics."""
    single = in_process
    spread = _check_run(trained_run, subprocess.run(
        [sys.executable, "-m", "kpscale.evaluate", *_arguments(trained_run, basketball, "--workers", "2")],
        cwd=ROOT, capture_output=True, text=True, timeout=600))
    for name in ("tracking_error_observed", "tracking_error_null", "tracking_error_no_dynamics",
                 "keypoint_distance/object_0", "objects_found"):
        assert spread[name] == pytest.approx(single[name], rel=1e-5), name


def test_evaluate_without_weights_reports_fvd_unavailable(trained_run, basketball, monkeypatch):
    monkeypatch.delenv("KPSCALE_I3D_WEIGHTS", raising=False)
    result = subprocess.run(
        [sys.executable, "-m", "kpscale.evaluate", "--run", trained_run["run_id"], "--data", str(basketball / "test"),
         "--fit-data", str(basketball / "train"), "--samples", "2", "--clips", "3", "--fit-clips", "8",
         "--tracking-uri", trained_run["uri"]], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FVD is unavailable" in result.stdout and "KPSCALE_I3D_WEIGHTS" in result.stdout
    run = mlflow.MlflowClient(trained_run["uri"]).get_run(result.stdout.strip().rsplit(" ", 1)[-1])
    assert "fvd" not in run.data.metrics and "vgg_cosine_closest" not in run.data.metrics  # no made-up numbers
    assert "psnr_closest" in run.data.metrics


@pytest.mark.parametrize("args, words", [
    (["--data", "/no/such/shards"], ["/no/such/shards"]),
    (["--samples", "0"], ["samples", "0"]),
])
def test_evaluate_refuses_bad_input(trained_run, basketball, args, words, capsys):
    from kpscale.evaluate.__main__ import main
    base = {"--run": trained_run["run_id"], "--data": str(basketball / "test")}
    base.update(dict(zip(args[::2], args[1::2])))
    assert exit_status(main, *[x for kv in base.items() for x in kv], "--tracking-uri", trained_run["uri"]) == 2
    err = capsys.readouterr().err
    assert all(word in err for word in words), err


def test_closest_and_furthest_are_whole_samples_chosen_by_one_criterion():
    """Per clip, one sample by its mean over the predicted steps: VGG cosine when there is VGG,
    else PSNR; every metric is then that sample's, not the best of each step or each metric."""
    from kpscale.evaluate.evaluator import summarise
    part = PartResult(keys=["a"])
    part.add("psnr", torch.tensor([[[10.0, 40.0], [20.0, 20.0]]]))  # [B=1, S=2, P=2]: sample 0 by PSNR
    part.add("ssim", torch.tensor([[[0.5, 0.5], [0.9, 0.9]]]))
    metrics, curves = summarise([part], observed=2, image_size=64)
    assert curves["psnr_closest"].tolist() == [10, 40] and curves["psnr_furthest"].tolist() == [20, 20]
    assert metrics["ssim_closest"] == pytest.approx(0.5) and metrics["ssim_furthest"] == pytest.approx(0.9)
    part.add("vgg_cosine", torch.tensor([[[0.1, 0.1], [0.9, 0.9]]]))  # sample 1 by VGG
    real, fake = torch.randn(4, 3), torch.randn(4, 2, 3)  # FVD: every sample of every clip is a generated video
    part.add("i3d_real", real)
    part.add("i3d_fake", fake)
    metrics, curves = summarise([part], observed=2, image_size=64)
    assert curves["psnr_closest"].tolist() == [20, 20] and metrics["ssim_closest"] == pytest.approx(0.9)
    assert metrics["fvd"] == pytest.approx(fvd(real, fake.flatten(0, 1)))


def test_future_predicts_beyond_the_training_horizon(trained_run, basketball, capsys):
    """--future 12 on a model trained to predict 4: 12 predicted frames per curve; more future
    than the clips hold (20 frames) is refused naming the numbers."""
    result = evaluate(trained_run, basketball, "--future", "12", "--clips", "4", weights=False)  # no I3D: faster
    assert result.returncode == 0, result.stderr[-3000:]
    client = mlflow.MlflowClient(trained_run["uri"])
    run_id = result.stdout.strip().rsplit(" ", 1)[-1]
    assert [h.step for h in client.get_metric_history(run_id, "psnr_closest_by_frame")] == list(range(5, 17))
    assert [h.step for h in client.get_metric_history(run_id, "tracking_predicted_by_frame")] == list(range(5, 17))
    from kpscale.evaluate.__main__ import main
    assert exit_status(main, "--run", trained_run["run_id"], "--data", str(basketball / "test"), "--future", "30",
                       "--clips", "4", "--tracking-uri", trained_run["uri"]) == 2
    err = capsys.readouterr().err
    assert "--future 30" in err and "20 frames" in err


def test_start_evaluates_later_windows_and_refuses_one_past_the_clips_end(trained_run, basketball, capsys):
    """--start 12: the held-out and fitted windows begin at frame 12 of every clip, so the
    tracking error is that of frames 13-20 (another figure than from frame 1); --start 13 with 8
    frames to score runs past the 20-frame clips and is refused naming the numbers."""
    first = evaluate(trained_run, basketball, "--clips", "4", weights=False)
    later = evaluate(trained_run, basketball, "--clips", "4", "--start", "12", weights=False)
    assert first.returncode == later.returncode == 0, later.stderr[-3000:]
    client = mlflow.MlflowClient(trained_run["uri"])
    m0, m12 = (client.get_run(r.stdout.strip().rsplit(" ", 1)[-1]).data.metrics for r in (first, later))
    assert m12["clips"] == 4 and m12["tracking_error_null"] != m0["tracking_error_null"]
    from kpscale.evaluate.__main__ import main
    assert exit_status(main, "--run", trained_run["run_id"], "--data", str(basketball / "test"), "--start", "13",
                       "--clips", "4", "--tracking-uri", trained_run["uri"]) == 2
    err = capsys.readouterr().err
    assert "from --start 13" in err and "20 frames, 13 skipped + 4 observed + 4 predicted need 21" in err


@pytest.mark.slow
def test_compare_pools_seeds_of_a_model_and_logs_the_runs_as_children(basketball, tmp_path):
    data = [f"data.train={basketball / 'train'}"]
    runs = [_model_folder(tmp_path / "a0", load_train_config(None, [*TINY_MODEL, *data, "train.seed=0"]), 0),
            _model_folder(tmp_path / "a1", load_train_config(None, [*TINY_MODEL, *data, "train.seed=1"]), 1),
            _model_folder(tmp_path / "rnn", load_train_config(None, [*TINY_MODEL, *data, "model.latent_size=0",
                                                                      "model.num_samples=1"]), 0),
            _model_folder(tmp_path / "cnn", load_train_config(CNN_VRNN, [*data, *(o for o in TINY_MODEL
                                                                               if "num_keypoints" not in o)]), 0)]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    from kpscale.compare import main  # in this process: the command runs as a subprocess in tests/test_train.py
    result = run_main(main, *map(str, runs), "--data", str(basketball / "test"), "--samples", "2", "--clips", "4",
                      "--fit-clips", "16", "--tracking-uri", uri)
    assert result.returncode == 0, result.stderr[-3000:]
    vrnn, rnn = "latent_size=16 name=struct_vrnn num_samples=2", "latent_size=0 name=struct_vrnn num_samples=1"
    cnn = "latent_size=16 name=cnn_vrnn num_samples=2"

    def slug(label: str) -> str:  # MLflow metric names allow no "="
        return label.replace("=", "-")
    assert f"{vrnn} (2 runs)" in result.stdout and f"{rnn} (1 run)" in result.stdout and f"{cnn} (1 run)" in result.stdout
    found = next(line for line in result.stdout.splitlines() if line.startswith("objects_found"))
    assert found.split()[-1] == "-" and len(found.split()) == 4  # 3 models; CNN-VRNN has no keypoints to find objects with
    assert "tracking error px, predicted (best of the samples), per frame" in result.stdout

    client = mlflow.MlflowClient(uri)
    parent = client.get_run(result.stdout.strip().rsplit(" ", 1)[-1])
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_model = {c.data.tags["model"]: c.data.metrics for c in children}
    assert set(by_model) == set(map(str, runs))
    for child in by_model.values():  # the dynamics' own share, paired within each run
        assert child["tracking_error_below_no_dynamics"] == pytest.approx(
            child["tracking_error_no_dynamics"] - child["tracking_error_predicted"], abs=1e-5)
    assert "below no dynamics (no dynamics - predicted; paired per run), per frame" in result.stdout
    for name in ("tracking_error_predicted", "psnr_closest", "tracking_error_below_no_dynamics"):
        pooled = np.array([by_model[str(runs[0])][name], by_model[str(runs[1])][name]])
        mean, ci95 = parent.data.metrics[f"{slug(vrnn)}/{name}_mean"], parent.data.metrics[f"{slug(vrnn)}/{name}_ci95"]
        assert mean == pytest.approx(pooled.mean(), rel=1e-6)
        assert ci95 == pytest.approx(12.706 * pooled.std(ddof=1) / np.sqrt(2), rel=1e-6)  # t(0.975, 1 dof)
        assert parent.data.metrics[f"{slug(rnn)}/{name}_mean"] == pytest.approx(by_model[str(runs[2])][name], rel=1e-6)
        assert parent.data.metrics[f"{slug(cnn)}/{name}_mean"] == pytest.approx(by_model[str(runs[3])][name], rel=1e-6)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "comparison")}
    assert {"comparison/comparison.txt", "comparison/tracking_predicted.png", "comparison/psnr_closest.png"} <= artifacts
