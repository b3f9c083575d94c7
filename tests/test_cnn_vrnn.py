import pytest
import torch

from kpscale.config import ConfigError
from kpscale.models import build_family
from kpscale.models.cnn_vrnn.model import CNNVRNN, CNNVRNNConfig
from kpscale.models.struct_vrnn.model import StructVRNNConfig
from kpscale.train.config import DEFAULT, load_train_config
from conftest import ROOT

CONFIG = ROOT / "kpscale/models/cnn_vrnn/configs/basketball_cpu.yaml"
TINY = dict(filters=4, rnn_size=16, hidden_size=16, num_samples=3, observed=4, predicted=4, layers_per_scale=1,
            representation_size=9, map_channels=3)


def test_shapes_terms_and_no_keypoints():
    torch.manual_seed(0)
    cfg = CNNVRNNConfig(**TINY)
    model = CNNVRNN(cfg)
    video = torch.rand(2, cfg.steps, 3, 64, 64)
    out = model(video, step=0)
    assert set(out["terms"]) == {"reconstruction", "kl", "future"}  # no keypoint losses
    assert out["states"].shape == out["predicted_states"].shape == (2, cfg.steps, 9)
    assert out["states"].abs().max() <= 1  # tanh: the range of the VRNN's output
    assert out["reconstruction"].shape == out["predicted_frames"].shape == video.shape
    assert model.represent(video).shape == (2, cfg.steps, 9) and model.keypoints(out["states"]) is None
    states, frames = model.eval().sample_future(video[:, :4], future=5, num_samples=3)
    assert states.shape == (2, 3, 9, 9) and frames.shape == (2, 3, 9, 3, 64, 64)
    assert not torch.equal(states[:, 0, -1], states[:, 1, -1])  # the samples differ
    with pytest.raises(ValueError, match="no keypoints to move"):
        model.sample_future(video[:, :4], 5, 3, offsets=torch.zeros(4, 2))


def test_the_dynamics_stay_out_of_the_image_model_and_frames_depend_on_the_vector():
    torch.manual_seed(0)
    cfg = CNNVRNNConfig(**TINY)
    model = CNNVRNN(cfg)
    video = torch.rand(2, cfg.steps, 3, 64, 64)
    model(video, 10_000, decode_predictions=False)["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    model.zero_grad(set_to_none=True)
    terms = model(video, 10_000, decode_predictions=False)["terms"]
    (terms["kl"] + terms["future"]).backward()
    assert all(p.grad is None for m in (model.encoder, model.to_maps, model.decoder) for p in m.parameters())
    with torch.no_grad():  # the decoded frame changes with the vector, not with the first frame alone
        first, states = video[:, 0] - 0.5, model.represent(video)
        a = model.render(states[:, :1], first, states[:, 0])
        b = model.render(-states[:, :1], first, states[:, 0])
    assert (a - b).abs().mean() > 1e-4


def test_the_shipped_config_is_the_struct_vrnn_default_but_for_the_representation():
    cnn, struct = load_train_config(CONFIG, []), load_train_config(DEFAULT, [])
    assert isinstance(cnn.model, CNNVRNNConfig) and build_family(cnn.model).root.__class__ is CNNVRNN
    assert cnn.model.representation_size == 3 * struct.model.num_keypoints  # the paper: 3K elements
    shared = set(CNNVRNNConfig.model_fields) & set(StructVRNNConfig.model_fields) - {"name"}
    assert {k: getattr(cnn.model, k) for k in shared} == {k: getattr(struct.model, k) for k in shared}
    assert cnn.data == struct.data  # inherited through `extends`
    assert cnn.train.model_copy(update={"run_name": "x"}) == struct.train.model_copy(update={"run_name": "x"})
    assert cnn.train.run_name == "cnn_vrnn-basketball"


def test_a_key_of_another_family_is_refused_naming_it():
    with pytest.raises(ConfigError, match=r"model\.num_keypoints: unknown key"):
        load_train_config(CONFIG, ["model.num_keypoints=12"])
    with pytest.raises(ConfigError, match=r"model\.representation_size: unknown key"):
        load_train_config(DEFAULT, ["model.representation_size=36"])
    with pytest.raises(ConfigError, match="model.name must be one of struct_vrnn, cnn_vrnn, drnet"):
        load_train_config(CONFIG, ["model.name=svg"])
