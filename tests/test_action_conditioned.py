"""Action-conditioned dynamics (Struct-VRNN and CNN-VRNN on the DeepMind Control Suite) and the
reward prediction from their latent state."""

import subprocess
import sys

import mlflow
import numpy as np
import pytest
import torch

from kpscale.config import ConfigError, load
from kpscale.data.build import build
from kpscale.data.card import DatasetCard
from kpscale.evaluate import reward_prediction
from kpscale.models.cnn_vrnn.model import CNNVRNN, CNNVRNNConfig
from kpscale.models.struct_vrnn.model import StructVRNN, StructVRNNConfig, StructVRNNFamily
from kpscale.predict import predict
from conftest import ROOT, TINY_MODEL, exit_status, train_at_once

TINY = dict(filters=4, rnn_size=16, hidden_size=16, num_samples=3, observed=4, predicted=4, layers_per_scale=1,
            action_conditioned=True, action_size=2)


def struct_vrnn():
    torch.manual_seed(0)
    return StructVRNN(StructVRNNConfig(num_keypoints=4, **TINY)).eval()


@pytest.mark.parametrize("build", [struct_vrnn, lambda: CNNVRNN(CNNVRNNConfig(representation_size=9,
                                                                                map_channels=3, **TINY)).eval()])
def test_changing_the_actions_changes_predicted_states_and_not_detected_ones(build):
    model = build()
    video = torch.rand(2, 8, 3, 64, 64)
    actions = torch.rand(2, 8, 2) * 2 - 1
    other = actions.clone()
    other[:, 5:] = -actions[:, 5:]  # differ from step 5 on: observed steps 0-3 read the same actions

    def roll(a):
        torch.manual_seed(1)
        return model.sample_future(video, 4, 2, actions=a)[0]

    first, second = roll(actions), roll(other)
    assert torch.equal(first, roll(actions))  # the same noise: only the actions differ below
    assert torch.equal(first[:, :, :6], second[:, :, :6])  # step t + 1 is the first the action of step t moves
    assert (first[:, :, 6] - second[:, :, 6]).abs().max() > 1e-4
    detected = model.represent(video)
    assert torch.equal(detected, model.represent(video))  # detection reads frames, never actions
    out_a = model(video, step=0, actions=actions)
    out_b = model(video, step=0, actions=other)
    assert torch.equal(out_a["states"], out_b["states"])
    latent = model.latent_states(video, 4, 2, actions)
    assert latent.shape == (2, 2, 8, 16)


def test_a_mismatched_or_missing_action_is_refused_with_the_sizes():
    model = struct_vrnn()
    video = torch.rand(2, 8, 3, 64, 64)
    with pytest.raises(ValueError, match=r"model.action_size is 2, so expected \[2, T, 2\]"):
        model(video, step=0, actions=torch.zeros(2, 8, 3))
    with pytest.raises(ValueError, match="none were given"):
        model.sample_future(video, 4, 1)
    with pytest.raises(ValueError, match="3 actions for 8 steps: need at least 7"):
        model.sample_future(video, 4, 1, actions=torch.zeros(2, 3, 2))
    with pytest.raises(ValueError, match="action_conditioned needs action_size"):
        StructVRNNConfig(action_conditioned=True)
    with pytest.raises(ValueError, match="action_conditioned is false"):
        StructVRNNConfig(action_size=3)
    # The family checks the data before training (kpscale.train.launch.check_data).
    cfg = model.cfg
    StructVRNNFamily.check_data(cfg, {"action_dim": [2, 2]}, "data/x/train")
    with pytest.raises(ValueError, match=r"model.action_size is 2, but the clips of data/x/train have actions of size 6"):
        StructVRNNFamily.check_data(cfg, {"action_dim": [6, 6]}, "data/x/train")
    with pytest.raises(ValueError, match="have no actions"):
        StructVRNNFamily.check_data(cfg, {"action_dim": [0]}, "data/x/train")


def test_predict_needs_actions_for_an_action_conditioned_model_and_refuses_them_otherwise():
    model = struct_vrnn()
    cfg = type("Cfg", (), {"model": model.cfg})
    video = (torch.rand(8, 3, 64, 64) * 255).to(torch.uint8)
    with pytest.raises(ConfigError, match="--actions: the model is action-conditioned"):
        predict(model, cfg, video, 4, 2)
    frames = predict(model, cfg, video, 4, 2, actions=np.zeros((8, 2), np.float32))
    assert frames.shape == (8, 64, 3 * 64, 3)
    with pytest.raises(ValueError, match=r"expected \[1, T, 2\]"):
        predict(model, cfg, video, 4, 2, actions=np.zeros((8, 5), np.float32))
    plain = StructVRNN(StructVRNNConfig(num_keypoints=4, **{**TINY, "action_conditioned": False,
                                                            "action_size": 0})).eval()
    with pytest.raises(ConfigError, match="takes no actions"):
        predict(plain, type("Cfg", (), {"model": plain.cfg}), video, 4, 2, actions=np.zeros((8, 2), np.float32))


def test_the_reward_model_learns_a_reward_the_latent_state_holds_and_the_null_model_is_the_mean():
    """A reward that is a smooth function of part of the latent state: fitted, the error on new
    clips is a small fraction of the null model's; on a reward independent of the state it is not."""
    gen = torch.Generator().manual_seed(0)
    latent = torch.randn(200, 2, 6, 16, generator=gen)  # [M, S, T, H]
    clean = torch.tanh(latent[:, 0, :, 0]) + 0.5 * latent[:, 0, :, 1] ** 2  # one sample holds the truth
    latent[:, 1] = latent[:, 0]
    model = reward_prediction.fit(latent[:150], clean[:150])
    error, null = reward_prediction.squared_errors(model, latent[150:], clean[150:])
    assert torch.isnan(error[:, 0]).all() and torch.isnan(null[:, 0]).all()
    ratio = error[:, 1:].mean() / null[:, 1:].mean()
    assert ratio < 0.15, ratio
    assert model.reward_mean == pytest.approx(clean[:150].mean().item(), rel=1e-5)
    noise = torch.randn(200, 6, generator=gen)
    model = reward_prediction.fit(latent[:150], noise[:150])
    error, null = reward_prediction.squared_errors(model, latent[150:], noise[150:])
    assert error[:, 1:].mean() / null[:, 1:].mean() > 0.9


DMCS_CARD = ROOT / "datasets" / "dmcs_cartpole_swingup.yaml"
STRUCT_DMCS = ROOT / "kpscale/models/struct_vrnn/configs/dmcs_cpu.yaml"
CNN_DMCS = ROOT / "kpscale/models/cnn_vrnn/configs/dmcs_cpu.yaml"


@pytest.fixture(scope="module")
def cartpole(tmp_path_factory):
    """A tiny build of the real cartpole_swingup task: 12 training and 4 test episodes of 12 frames."""
    out = tmp_path_factory.mktemp("cartpole")
    build(load(DatasetCard, DMCS_CARD, ["workers=1", "splits={train: 12, test: 4}", "clip_length=12",
                                        "clips_per_shard=6"]), out, progress=False)
    return out


def test_training_refuses_data_whose_actions_do_not_fit_the_model_before_ray_starts(cartpole, capsys):
    import ray

    from kpscale.train.__main__ import main
    assert exit_status(main, "--config", str(STRUCT_DMCS), *TINY_MODEL, f"data.train={cartpole / 'train'}",
                       "model.action_size=6") == 2
    err = capsys.readouterr().err
    assert f"model.action_size is 6, but the clips of {cartpole / 'train'} have actions of size 1" in err, err
    assert not ray.is_initialized()


@pytest.mark.slow
def test_both_models_train_on_actions_and_compare_reports_their_reward_prediction(cartpole, tmp_path):
    """Action-conditioned Struct-VRNN and CNN-VRNN, each trained by kpscale.train for 4 steps on
    real dm_control episodes, then kpscale.compare: each run's reward model fitted on its training
    clips' latent states, its error per step normalised to the null model, side by side."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.MlflowClient(uri).create_experiment("kpscale")
    common = [f"data.train={cartpole / 'train'}", f"data.test={cartpole / 'test'}", "data.batch_size=2",
              "data.num_workers=0", "train.steps=4", "train.warmup_steps=1", "train.eval_every=4",
              "train.eval_clips=4", f"train.storage={tmp_path / 'runs'}", f"tracking.uri={uri}"]
    tiny = [o for o in TINY_MODEL if not o.startswith("model.num_keypoints")]
    commands = {"struct": ["--config", str(STRUCT_DMCS), *TINY_MODEL], "cnn": ["--config", str(CNN_DMCS), *tiny]}
    runs = list(train_at_once(commands, common).values())
    result = subprocess.run([sys.executable, "-m", "kpscale.compare", *runs, "--data", str(cartpole / "test"),
                             "--samples", "2", "--fit-clips", "12", "--tracking-uri", uri],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reward prediction error / null model's (mean training reward), per frame" in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.startswith("reward_error_predicted")]
    assert len(rows) == 1 and len(rows[0].split()) == 3, result.stdout  # one value per model
    client = mlflow.MlflowClient(uri)
    parent = client.get_run(result.stdout.strip().rsplit(" ", 1)[-1])
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 2
    for child in children:
        m = child.data.metrics
        assert 0 < m["reward_error_predicted"] < 10 and m["reward_mse_null"] > 0
        assert {a.path for a in client.list_artifacts(child.info.run_id, "evaluation")} >= {
            "evaluation/reward_prediction.png", "evaluation/tracking.png"}
        history = client.get_metric_history(child.info.run_id, "reward_error_by_frame")
        assert [h.step for h in history] == list(range(2, 9))  # frame 1: no frame has reached the RNN yet
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "comparison")} >= {
        "comparison/reward_error.png", "comparison/comparison.txt"}
