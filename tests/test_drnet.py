"""DrNet's networks and losses (kpscale/models/drnet): shapes and ranges as the official code's,
which parameters each optimiser owns and which each loss reaches, and a scene discriminator that
learns to tell same-clip pose pairs from mixed ones."""

import math
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from kpscale.models.drnet.family import DrNetFamily, four_frames
from kpscale.models.drnet.model import DrNet, DrNetConfig

ROOT = Path(__file__).resolve().parents[1]
SMALL = DrNetConfig(filters=8, content_size=16, pose_size=4, discriminator_hidden=16, lstm_size=16, lstm_layers=2)


def _clips(batch=6, frames=15, seed=0):
    return torch.rand(batch, frames, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def _grads(family, out):
    family.root.zero_grad()
    out["loss"].backward()
    return {name for name, module in family.modules().items()
            if any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())}


def test_codes_skips_and_frames_have_the_official_shapes_and_ranges():
    torch.manual_seed(0)
    cfg = DrNetConfig()
    model = DrNet(cfg).eval()
    frames = torch.rand(2, 3, 64, 64)
    content, skips = model.content_encoder(frames)
    pose, _ = model.pose_encoder(frames)
    assert content.shape == (2, 128) and pose.shape == (2, 10) and content.abs().max() <= 1
    assert [tuple(s.shape[1:]) for s in skips] == [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)]
    out = model.decoder(content, skips, pose)
    assert out.shape == (2, 3, 64, 64) and 0 <= out.min() and out.max() <= 1
    # The pose changes the frame, and so do the content encoder's skips alone.
    assert not torch.allclose(out, model.decoder(content, skips, -pose))
    assert not torch.allclose(out, model.decoder(content, [s.flip(0) for s in skips], pose))


def test_each_optimiser_owns_its_networks_and_each_loss_reaches_what_it_should():
    torch.manual_seed(0)
    family = DrNetFamily(SMALL)
    owned = {name: {id(p) for p in family.optimiser(name).module.parameters()} for name in family.losses}
    assert sum(map(len, owned.values())) == len(set().union(*owned.values())) == len(list(family.root.parameters()))
    modules = family.modules()
    assert owned["scene_discriminator"] == {id(p) for p in modules["scene_discriminator"].parameters()}
    assert owned["predictor"] == {id(p) for p in modules["predictor"].parameters()}
    frames = four_frames(_clips())
    assert frames.shape == (6, 4, 3, 64, 64)
    out = family.losses["main"](frames)
    assert set(out["terms"]) == {"reconstruction", "similarity", "adversarial"} and out["loss"].isfinite()
    # The main loss reaches the discriminator it borrows; the loop turns those gradients off.
    assert _grads(family, out) == {"content_encoder", "pose_encoder", "decoder", "scene_discriminator"}
    assert _grads(family, family.losses["scene_discriminator"](frames)) == {"scene_discriminator"}
    assert _grads(family, family.losses["predictor"](_clips())) == {"predictor"}


def test_adversarial_term_is_weighted_maximum_entropy():
    torch.manual_seed(0)
    family = DrNetFamily(SMALL.model_copy(update={"adversarial_weight": 0.5}))
    torch.nn.init.zeros_(family.root.scene_discriminator.net[-1].weight)
    torch.nn.init.zeros_(family.root.scene_discriminator.net[-1].bias)
    out = family.losses["main"](four_frames(_clips()))
    # A discriminator that cannot tell (logit 0) is what the pose encoder aims at: BCE against 0.5 is log 2.
    assert out["terms"]["adversarial"].item() == pytest.approx(math.log(2), abs=1e-6)
    terms = out["terms"]
    expected = terms["reconstruction"] + terms["similarity"] + 0.5 * terms["adversarial"]
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_the_scene_discriminator_learns_which_pairs_share_a_clip():
    """Clips of different brightness give the (untrained) pose encoder clip-specific codes: the
    discriminator learns to tell same-clip pairs from mixed ones, its loss well under log 2."""
    torch.manual_seed(0)
    family = DrNetFamily(SMALL)
    optimiser = torch.optim.Adam(family.root.scene_discriminator.parameters(), lr=2e-3)
    losses, accuracies = [], []
    for step in range(300):
        levels = torch.rand(8, 1, 1, 1, 1, generator=torch.Generator().manual_seed(step))
        video = levels * torch.ones(8, 6, 3, 64, 64) + 0.02 * torch.rand(8, 6, 3, 64, 64)
        out = family.losses["scene_discriminator"](four_frames(video))
        optimiser.zero_grad()
        out["loss"].backward()
        optimiser.step()
        losses.append(out["loss"].item())
        accuracies.append(out["terms"]["accuracy"].item())
    assert sum(losses[:50]) / 50 > 0.65 and sum(losses[-50:]) / 50 < 0.5  # chance: log 2 = 0.69
    assert sum(accuracies[-50:]) / 50 > 0.75
    with pytest.raises(ValueError, match="at least 4 clips"):
        family.losses["scene_discriminator"](four_frames(_clips(batch=3)))


def test_sample_future_decodes_free_running_poses_with_the_last_observed_content():
    torch.manual_seed(0)
    model = DrNet(SMALL).eval()
    clips = _clips(batch=2)
    states, frames = model.sample_future(clips, future=12, num_samples=3)
    obs = SMALL.observed
    assert states.shape == (2, 3, obs + 12, 4) and frames.shape == (2, 3, obs + 12, 3, 64, 64)
    assert 0 <= frames.min() and frames.max() <= 1
    assert torch.equal(frames[:, 0], frames[:, 2])  # deterministic: every sample the same
    again = model.sample_future(clips, future=12, num_samples=1)[1]
    assert torch.equal(frames[:, :1], again)
    # Only the observed frames matter.
    later = clips.clone()
    later[:, obs:] = 0
    assert torch.equal(frames[:, :1], model.sample_future(later, future=12, num_samples=1)[1])
    # The observed part: their own poses with the last observed frame's content.
    torch.testing.assert_close(states[:, 0, :obs], model.represent(clips[:, :obs]))
    torch.testing.assert_close(frames[:, 0, obs - 1], model.swap(clips[:, obs - 1:obs], clips[:, obs - 1:obs])[:, 0])


@pytest.mark.parametrize("stage", [0, 3])
def test_both_stages_resume_exactly_through_the_loops_optimiser_steps(stage, tmp_path, monkeypatch):
    """Stage 1's two engines and stage 2's one, each: two steps, save, load into a fresh family
    (other weights, scrambled RNG), two more == four uninterrupted steps, batch norm included."""
    import deepspeed

    from kpscale.train import checkpoint
    from kpscale.train.config import load_train_config
    from kpscale.train.engine import build_engine
    from kpscale.train.loop import optimiser_steps
    from test_train import _init_single_process

    _init_single_process(monkeypatch, 29730 + stage)
    small = [f"model.{k}={v}" for k, v in SMALL.model_dump().items() if k != "name"]
    cfg = load_train_config(None, ["model={name: drnet}", *small, f"train.zero_stage={stage}", "train.steps=4",
                                   "train.warmup_steps=1", "data.batch_size=4"])
    batches = [{"video": _clips(batch=4, seed=i)} for i in range(4)]

    def run(family, engines, batches, first, name):
        trainable = {n: [p for p in e.module.parameters() if p.requires_grad] for n, e in engines.items()}
        for i, batch in enumerate(batches):
            optimiser_steps(family, name, engines, trainable, batch, first + i)

    for name in ("representation", "dynamics"):
        families, engines = [], []
        for seed in (0, 0, 7):
            torch.manual_seed(seed)
            family = DrNetFamily(cfg.model)
            for module in family.stage(name).frozen:
                family.modules()[module].requires_grad_(False).eval()
            families.append(family)
            engines.append({n: build_engine(family.optimiser(n), cfg, False, 4) for n in family.stage(name).optimisers})
        straight, first, resumed = families
        torch.manual_seed(11)  # the frame times the representation stage draws
        run(straight, engines[0], batches, 0, name)
        torch.manual_seed(11)
        run(first, engines[1], batches[:2], 0, name)
        frozen = {k: v for k, v in first.root.state_dict().items() if k.split(".")[0] in first.stage(name).frozen}
        assert bool(frozen) == (name == "dynamics")
        checkpoint.save(engines[1], tmp_path / name, {"step": 2, "epoch": 0, "stage": name}, rank=0, frozen=frozen)
        torch.manual_seed(123)
        assert checkpoint.load(engines[2], tmp_path / name, rank=0)["step"] == 2
        resumed.root.load_state_dict(checkpoint.load_frozen(tmp_path / name), strict=False)
        run(resumed, engines[2], batches[2:], 2, name)
        for optimiser in engines[0]:
            a_module, b_module = engines[0][optimiser].module, engines[2][optimiser].module
            for (key, a), b in zip(a_module.state_dict().items(), b_module.state_dict().values()):
                torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{name} {optimiser} {key}")
            for (key, a), b in zip(a_module.named_parameters(), b_module.parameters()):
                with deepspeed.zero.GatheredParameters([a, b], enabled=stage == 3):
                    torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{name} {optimiser} {key}")


def test_shipped_configs_hold_the_official_settings(basketball):
    """The paper configs against ../shared/reference/official-implementations.md; the CPU variant
    differs only where its file says so."""
    from kpscale.train.config import load_train_config

    configs = ROOT / "kpscale/models/drnet/configs"
    data = [f"data.train={basketball / 'train'}", f"data.test={basketball / 'test'}"]
    paper = load_train_config(configs / "paper_moving_mnist.yaml", data)
    kth = load_train_config(configs / "kth.yaml", data)
    cpu = load_train_config(configs / "moving_mnist_cpu.yaml", [])
    for cfg, (observed, predicted) in ((paper, (5, 10)), (kth, (10, 10))):
        m = cfg.model
        assert (m.filters, m.content_size, m.pose_size, m.discriminator_hidden) == (64, 128, 10, 100)
        assert (m.adversarial_weight, m.lstm_size, m.lstm_layers, m.adam_beta1) == (1e-4, 256, 2, 0.5)
        assert (m.observed, m.predicted) == (observed, predicted)
        assert (cfg.train.lr, cfg.data.batch_size, cfg.train.lr_schedule) == (2e-3, 100, "constant")
        assert [s.name for s in cfg.stages(DrNetFamily)] == ["representation", "dynamics"]
    assert cpu.model.model_copy(update={"filters": 64}) == paper.model
    assert cpu.data.card == "moving_mnist" and cpu.data.train is None
    assert cpu.train.steps == sum(s.steps for s in cpu.train.stages)


def _drnet_config(moving_mnist, *overrides):
    from kpscale.train.config import load_train_config

    return load_train_config(ROOT / "kpscale/models/drnet/configs/moving_mnist_cpu.yaml",
                             [f"data.train={moving_mnist / 'train'}", f"data.test={moving_mnist / 'test'}",
                              "model.filters=8", "model.lstm_size=32", "data.batch_size=16", *overrides])


def test_a_briefly_trained_model_moves_one_clips_digits_with_anothers_pose(moving_mnist, monkeypatch):
    """250 steps of stage 1 (DeepSpeed engines, the loop's optimiser steps): the digits decoded
    from clip A's content and clip B's pose sit nearer B's digit coordinates than A's, and nearer
    than before training (kpscale.bench swap's measurement, on held-out clips)."""
    from kpscale.bench.swap import swap_distances
    from kpscale.evaluate.snapshot import fixed_batches
    from kpscale.train.engine import build_engine
    from kpscale.train.loop import optimiser_steps
    from test_train import _init_single_process

    _init_single_process(monkeypatch, 29740)
    cfg = _drnet_config(moving_mnist, "train.zero_stage=0")
    torch.manual_seed(0)
    family = DrNetFamily(cfg.model)
    engines = {n: build_engine(family.optimiser(n), cfg, False, 250) for n in family.stage("representation").optimisers}
    trainable = {n: list(e.module.parameters()) for n, e in engines.items()}

    def distances():
        family.root.eval()
        found = [swap_distances(family.root, b["video"], b["coords"])
                 for b in fixed_batches(cfg.data.test, cfg.data, cfg.window, None)]
        family.root.train()
        return {k: torch.cat([d[k].flatten() for d in found]).mean().item() for k in found[0]}

    before = distances()
    step = 0
    while step < 250:
        for batch in fixed_batches(cfg.data.train, cfg.data, cfg.window, None):
            optimiser_steps(family, "representation", engines, trainable, batch, step)
            step += 1
            if step == 250:
                break
    after = distances()
    assert after["to_pose_clip"] < 0.8 * after["to_content_clip"], after
    assert after["to_pose_clip"] < before["to_pose_clip"] - 1, (before, after)
    assert after["reconstruction"] < before["reconstruction"], (before, after)


@pytest.mark.slow
def test_drnet_trains_both_stages_then_evaluates_predicts_and_swaps_through_the_commands(moving_mnist, tmp_path,
                                                                                         capsys):
    import mlflow

    from conftest import exit_status
    from kpscale.bench.__main__ import main as bench_main
    from kpscale.evaluate.__main__ import main as evaluate_main
    from kpscale.predict import main as predict_main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    data = [f"data.train={moving_mnist / 'train'}", f"data.test={moving_mnist / 'test'}"]
    train = subprocess.run(
        [sys.executable, "-m", "kpscale.train", "--config", "kpscale/models/drnet/configs/moving_mnist_cpu.yaml",
         *data, "model.filters=4", "model.lstm_size=16", "data.batch_size=4", "train.cpus_per_worker=1",
         "train.stages=[{name: representation, steps: 4}, {name: dynamics, steps: 2}]", "train.log_every=2",
         "train.eval_every=4", "train.eval_clips=8", "train.checkpoint_every=4", f"train.storage={tmp_path / 'runs'}",
         f"tracking.uri={uri}", "train.zero_stage=3", "train.workers=2"],
        cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    assert "optimisers scene_discriminator then main" in train.stderr
    assert "stage dynamics (steps 5-6)" in train.stderr and "content_encoder, pose_encoder, decoder frozen" in train.stderr
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("kpscale").experiment_id])
    (run,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    run_id = run.info.run_id
    assert run.data.tags["model"] == "drnet"
    assert sorted(r.data.tags["kpscale_stage"] for r in runs if r is not run) == ["dynamics", "representation"]
    assert {"train/main/reconstruction", "train/scene_discriminator/accuracy", "train/lr/main", "train/loss",
            "psnr_reconstruction", "psnr_predicted"} <= set(run.data.metrics)
    assert [i.dataset.name for i in run.inputs.dataset_inputs] == [f"moving_mnist/{s}" for s in ("train", "test")]

    def command(main, *args):  # in this process: each entry point runs as a subprocess in another test
        assert exit_status(main, *args, "--tracking-uri", uri) == 0
        return capsys.readouterr().out

    evaluated = command(evaluate_main, "--run", run_id, "--data", str(moving_mnist / "test"), "--clips", "8",
                        "--fit-clips", "16", "--samples", "2")
    child = evaluated.strip().rsplit(" ", 1)[-1]
    grid = Image.open(mlflow.artifacts.download_artifacts(run_id=child, artifact_path="evaluation/swap_grid.png",
                                                          dst_path=str(tmp_path / "grid"), tracking_uri=uri))
    assert grid.size == (7 * 66, 7 * 66)  # 6 clips, and the pose row and content column
    with tarfile.open(moving_mnist / "test" / "shard-000000.tar") as shard:
        clip = next(m for m in shard.getmembers() if m.name.endswith(".mp4"))
        (tmp_path / "clip.mp4").write_bytes(shard.extractfile(clip).read())
    predicted = command(predict_main, "--run", run_id, "--video", str(tmp_path / "clip.mp4"), "--future", "6",
                        "--samples", "2", "--out", str(tmp_path / "out.mp4"))
    assert "5 observed + 6 predicted frames" in predicted and (tmp_path / "out.mp4").stat().st_size > 0
    swapped = command(bench_main, "swap", "--run", f"runs:/{run_id}/model", "--data", str(moving_mnist / "test"),
                      "--clips", "16")
    assert "nearer the pose clip" in swapped
