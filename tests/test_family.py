"""The family contract (kpscale/models/family.py), proved by a toy family defined only here: a
generator and a critic with an optimiser each, the generator's loss running through the critic
(as DrNet's encoders run through its scene discriminator), then a second stage that trains a head
on the frozen generator. The loop's optimiser steps match plain PyTorch under ZeRO 0-3 and resume
exactly; through the unchanged loop on Ray the toy trains, checkpoints, resumes at a stage
boundary and logs to MLflow."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Literal

import mlflow
import numpy as np
import pytest
import ray
import torch
from torch import nn

from kpscale.config import Config
from kpscale.data.shards import read_manifest
from kpscale.models import FAMILIES
from kpscale.models.family import Family, Optimiser, Stage, borrow
from kpscale.tracking import model_folder
from kpscale.train.config import load_train_config
from test_train import _init_single_process


class ToyConfig(Config):
    name: Literal["toy"] = "toy"
    size: int = 6
    observed: int = 2
    predicted: int = 2


class Toy(nn.Module):
    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.generator = nn.Sequential(nn.Linear(cfg.size, cfg.size), nn.Tanh(), nn.Linear(cfg.size, cfg.size))
        self.critic = nn.Linear(cfg.size, 1)
        self.head = nn.Linear(cfg.size, 1)


class GeneratorLoss(nn.Module):
    def __init__(self, toy: Toy):
        super().__init__()
        self.generator = toy.generator
        borrow(self, "critic", toy.critic)

    def forward(self, noise):
        fake = self.generator(noise)
        loss = -self.critic(fake).mean() + 0.1 * fake.pow(2).mean()
        return {"loss": loss, "terms": {}, "fake": fake}


class CriticLoss(nn.Module):
    def __init__(self, toy: Toy):
        super().__init__()
        self.critic = toy.critic

    def forward(self, fake, real):
        return {"loss": self.critic(fake.detach()).mean() - self.critic(real).mean(), "terms": {}}


class HeadLoss(nn.Module):
    def __init__(self, toy: Toy):
        super().__init__()
        self.head = toy.head
        borrow(self, "generator", toy.generator)

    def forward(self, noise):
        return {"loss": (self.head(self.generator(noise)) - 1).pow(2).mean(), "terms": {}}


class ToyFamily(Family):
    config = ToyConfig
    # The head trains on derived shards (as Kim et al.'s motion stage on its pseudo-labels), without frames.
    stages = (Stage("adversarial", ("generator", "critic")),
              Stage("head", ("head",), frozen=("generator",), derived="toy_labels", frames=False))
    metrics = ("train/generator/loss",)

    def __init__(self, cfg):
        super().__init__(cfg)
        self.root = Toy(cfg)
        self.losses = {"generator": GeneratorLoss(self.root), "critic": CriticLoss(self.root),
                       "head": HeadLoss(self.root)}

    def optimiser(self, name):
        return Optimiser(self.losses[name], betas=(0.5, 0.999))

    def loss(self, stage, optimiser, engine, batch, step, outputs):
        if optimiser == "critic":
            return engine(outputs["generator"]["fake"], batch["video"].flatten(1)[:, :self.cfg.size])
        if optimiser == "head":
            return engine(batch["coords"].flatten(1)[:, :self.cfg.size])
        return engine(torch.randn(len(batch["video"]), self.cfg.size))  # the RNG a resumption must restore

    def derive(self, name, video):
        """Each frame's generator output on its mean colour, repeated: [T, 3, 2] as coords."""
        with torch.no_grad():
            out = self.root.generator(video.mean((2, 3)).repeat(1, 2))
        return {"coords": out.view(len(video), 3, 2).numpy()}

    def evaluate(self, cfg, stage, device, dtype):
        with torch.no_grad():
            value = self.root.head(self.root.generator(torch.ones(1, self.cfg.size))).item()
        return {"head_output": value}, np.zeros((2, 8, 8, 3), np.uint8)

    def describe(self, metrics):
        return f"head output {metrics['head_output']:.3f}"


def _batches(n, batch=4):
    g = torch.Generator().manual_seed(5)
    return [{"video": torch.rand(batch, 4, 3, 8, 8, generator=g)} for _ in range(n)]


def _engines(cfg, family, stage):
    from kpscale.train.engine import build_engine
    return {name: build_engine(family.optimiser(name), cfg, bf16=False, steps=cfg.train.steps)
            for name in family.stage(stage).optimisers}


def _trainable(engines):
    return {n: [p for p in e.module.parameters() if p.requires_grad] for n, e in engines.items()}


def _run(family, engines, batches, first_step):
    """The loop's optimiser steps; returns the learning rate of each (DeepSpeed's warm-up)."""
    from kpscale.train.loop import optimiser_steps
    lrs = []
    for i, batch in enumerate(batches):
        lrs.append(engines["generator"].get_lr()[0])
        optimiser_steps(family, "adversarial", engines, _trainable(engines), batch, first_step + i)
    return lrs


def _reference(cfg, batches, lrs, seed):
    """The same two-optimiser training in plain PyTorch: the critic's gradient from the
    generator's loss is dropped, as Lightning's toggle_optimizer drops it."""
    torch.manual_seed(seed)
    family = ToyFamily(cfg.model)
    toy = family.root
    opt_g = torch.optim.Adam(toy.generator.parameters(), lr=cfg.train.lr, betas=(0.5, 0.999))
    opt_c = torch.optim.Adam(toy.critic.parameters(), lr=cfg.train.lr, betas=(0.5, 0.999))
    for batch, lr in zip(batches, lrs):
        for group in [*opt_g.param_groups, *opt_c.param_groups]:
            group["lr"] = lr
        noise = torch.randn(len(batch["video"]), cfg.model.size)
        out = family.losses["generator"](noise)
        opt_g.zero_grad()
        out["loss"].backward()
        opt_g.step()
        toy.critic.zero_grad()  # what the generator's loss left there
        loss = family.losses["critic"](out["fake"], batch["video"].flatten(1)[:, :cfg.model.size])["loss"]
        opt_c.zero_grad()
        loss.backward()
        opt_c.step()
    return toy


@pytest.fixture
def toy_registered(monkeypatch):
    monkeypatch.setitem(FAMILIES, "toy", ToyFamily)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import tests/
    yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def _config(tmp_path, *overrides):
    return load_train_config(None, ["model={name: toy}", "train.lr_schedule=constant", "train.warmup_steps=1",
                                    "train.grad_clip=0", "train.weight_decay=0", "train.lr=0.01", *overrides])


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_two_optimisers_match_plain_pytorch_and_resume_exactly(stage, tmp_path, monkeypatch, toy_registered):
    """Without the loop's toggle, ZeRO-0 adds the generator loss's critic gradient to the critic's
    step (silently wrong) and ZeRO-1 to 3 fail (docs/family-contract.md)."""
    import deepspeed

    from kpscale.train import checkpoint
    _init_single_process(monkeypatch, 29720 + stage)
    cfg = _config(tmp_path, f"train.zero_stage={stage}", "train.steps=6", "data.batch_size=4")
    batches = _batches(6)
    torch.manual_seed(3)
    straight = ToyFamily(cfg.model)
    straight_engines = _engines(cfg, straight, "adversarial")
    lrs = _run(straight, straight_engines, batches, 0)
    assert lrs[0] == 0 and lrs[-1] == cfg.train.lr
    reference = _reference(cfg, batches, lrs, seed=3)

    torch.manual_seed(3)
    first = ToyFamily(cfg.model)
    engines = _engines(cfg, first, "adversarial")
    _run(first, engines, batches[:3], 0)
    checkpoint.save(engines, tmp_path, {"step": 3, "epoch": 0, "stage": "adversarial"}, rank=0)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["state-critic", "state-generator"]
    torch.manual_seed(99)
    resumed = ToyFamily(cfg.model)
    resumed_engines = _engines(cfg, resumed, "adversarial")
    assert checkpoint.load(resumed_engines, tmp_path, rank=0) == {"step": 3, "epoch": 0, "stage": "adversarial"}
    _run(resumed, resumed_engines, batches[3:], 3)

    for name in ("generator", "critic"):
        for (key, want), a, b in zip(getattr(reference, name).named_parameters(),
                                     getattr(straight.root, name).parameters(), getattr(resumed.root, name).parameters()):
            with deepspeed.zero.GatheredParameters([a, b], enabled=stage == 3):
                torch.testing.assert_close(a.detach(), want.detach(), rtol=1e-5, atol=1e-6, msg=f"{name}.{key}")
                torch.testing.assert_close(b, a, rtol=0, atol=0, msg=f"resumed {name}.{key}")


@pytest.mark.slow
def test_a_toy_family_trains_checkpoints_and_resumes_at_a_stage_boundary_through_the_loop(
        tmp_path, monkeypatch, toy_registered, basketball):
    """Stage 1 alone in one run; the same run then continues with stage 2 from its checkpoint at
    stage 1's end: the generator stays as stage 1 left it (frozen) and derives stage 2's shards,
    the head trains on them, the curves
    run on across both invocations, and each invocation that reached its last step logged the
    model. (That resuming is exact is the test above, per ZeRO stage.)"""
    from kpscale.train.launch import fit

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = [f"data.train={basketball / 'train'}", "data.batch_size=4", "data.num_workers=0",
              "model.observed=2", "model.predicted=2", f"tracking.uri={uri}", "train.cpus_per_worker=1",
              "train.log_every=2", "train.eval_every=3", "train.checkpoint_every=3", "train.zero_stage=2"]
    stages = "train.stages=[{name: adversarial, steps: 3}, {name: head, steps: 3}]"
    ray.init(logging_level="ERROR")  # the session's Ray head (conftest.ray_head)
    try:
        fit(_config(tmp_path, *common, stages, "train.stage=adversarial", "train.steps=3"))
        client = mlflow.MlflowClient(uri)
        (first,) = [r.info.run_id for r in client.search_runs([client.get_experiment_by_name("kpscale").experiment_id])
                    if "mlflow.parentRunId" not in r.data.tags]
        after_stage_1 = torch.load(model_folder(first, uri) / "weights.pt", weights_only=True)
        fit(_config(tmp_path, *common, stages, "train.steps=6"))  # the same run_name: resumes
    finally:
        ray.shutdown()
    runs = client.search_runs([client.get_experiment_by_name("kpscale").experiment_id])
    (run,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert run.data.tags["model"] == "toy"
    # Each stage has a nested run holding its own part of the curves.
    stages = {r.data.tags["kpscale_stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == run.info.run_id}
    assert sorted(stages) == ["adversarial", "head"] and stages["head"].data.params["first_step"] == "4"
    assert [x.step for x in client.get_metric_history(stages["adversarial"].info.run_id, "train/critic/loss")] == [2, 3]
    assert [x.step for x in client.get_metric_history(stages["head"].info.run_id, "head_output")] == [6]
    assert "train/critic/loss" not in stages["head"].data.metrics
    assert [f.path for f in client.list_artifacts(stages["head"].info.run_id, "videos")] == ["videos/step-0000006.gif"]
    history = {m: [x.step for x in client.get_metric_history(run.info.run_id, m)]
               for m in ("train/generator/loss", "train/critic/loss", "train/lr/generator", "train/loss", "head_output")}
    assert history["train/generator/loss"] == history["train/critic/loss"] == history["train/lr/generator"] == [2, 3]
    assert history["train/loss"] == [4, 6] and history["head_output"] == [3, 6]
    # The run's one model, the latest: logged after stage 1, replaced after both (checked below).
    logged = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'")
    assert [m.name for m in logged] == ["model"]
    weights = torch.load(model_folder(run.info.run_id, uri) / "weights.pt", weights_only=True)
    mlflow.set_tracking_uri(uri)
    version = mlflow.register_model(f"runs:/{run.info.run_id}/model", "toy")  # the model registry takes it
    registered = torch.load(model_folder(f"models:/toy/{version.version}", uri) / "weights.pt", weights_only=True)
    assert all(torch.equal(registered[k], weights[k]) for k in weights)
    assert weights.keys() == after_stage_1.keys()
    for key in (k for k in after_stage_1 if k.startswith("generator.")):
        torch.testing.assert_close(weights[key], after_stage_1[key], rtol=0, atol=0, msg=key)
    assert not torch.equal(weights["head.weight"], after_stage_1["head.weight"])
    assert torch.equal(weights["critic.weight"], after_stage_1["critic.weight"])  # no optimiser in stage 2
    # Stage 2 read the shards stage 1's generator derived, written in the run's storage with their provenance.
    derived = tmp_path / "runs" / "struct_vrnn-basketball" / "toy_labels"
    provenance = json.loads((derived / "provenance.json").read_text())
    assert provenance["stage"] == "head" and provenance["step"] == 3 and provenance["source"] == str(basketball / "train")
    rows = read_manifest(derived / "manifest.parquet").to_pylist()
    assert len(rows) == len(read_manifest(basketball / "train" / "manifest.parquet")) and {r["objects"] for r in rows} == {3}


def test_a_resumed_stage_reuses_its_derived_shards_and_other_frozen_weights_rewrite_them(
        tmp_path, toy_registered, basketball):
    """What a resume inside a derived stage meets: the stage's trainable modules drawn afresh
    (differently), its frozen ones loaded from the checkpoint. Only the frozen ones wrote the
    shards, so they are reused untouched; a frozen module with other weights writes them again."""
    from kpscale.train.loop import _derived_data

    cfg = _config(tmp_path, f"data.train={basketball / 'train'}", "model.observed=2", "model.predicted=2",
                  "train.stages=[{name: adversarial, steps: 3}, {name: head, steps: 3}]", "train.steps=6")

    def derive(family):
        frozen = {"generator": family.modules()["generator"]}
        return Path(_derived_data(family, family.stage("head"), frozen, cfg, str(tmp_path / "runs"), 3, 0, 1))

    torch.manual_seed(0)
    first = ToyFamily(cfg.model)
    out = derive(first)
    written = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert {"provenance.json", "manifest.parquet"} < set(written)
    sha = json.loads((out / "provenance.json").read_text())["weights_sha256"]
    torch.manual_seed(1)
    resumed = ToyFamily(cfg.model)
    resumed.root.generator.load_state_dict(first.root.generator.state_dict())
    assert not torch.equal(resumed.root.head.weight, first.root.head.weight)
    assert derive(resumed) == out and {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == written
    other = ToyFamily(cfg.model)  # another generator
    derive(other)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} != written
    assert json.loads((out / "provenance.json").read_text())["weights_sha256"] != sha
