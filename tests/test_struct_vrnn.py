import math

import numpy as np
import pytest
import torch

from kpscale.config import ConfigError, validate
from kpscale.models import FAMILIES, build_family
from kpscale.models.keypoints import (ImageDecoder, KeypointDetector, Upsample2x, add_coord_channels,
                                      heatmaps_to_keypoints, keypoints_to_maps)
from kpscale.models.struct_vrnn.model import (StructVRNN, StructVRNNConfig, assign, exploration_loss,
                                              separation_loss, spare_keypoints, sparsity_loss)
from kpscale.models.vrnn import VRNN, best_of_many, gaussian_kl, linear_ramp

TINY = dict(filters=8, num_keypoints=4, rnn_size=32, hidden_size=32, num_samples=5, observed=4, predicted=4)


def tiny(**overrides) -> StructVRNNConfig:
    return StructVRNNConfig(**{**TINY, **overrides})


@pytest.mark.parametrize("size", [64, 128])
def test_shapes(size):
    torch.manual_seed(0)
    cfg = tiny(image_size=size)
    b, t, k, h = 2, cfg.steps, cfg.num_keypoints, cfg.heatmap_size
    video = torch.rand(b, t, 3, size, size)

    keypoints, heatmaps, logits = KeypointDetector(k, cfg.filters, cfg.layers_per_scale)(video)
    assert keypoints.shape == (b, t, k, 3) and heatmaps.shape == logits.shape == (b, t, k, h, h)
    assert torch.allclose(heatmaps, torch.nn.functional.softplus(logits))
    assert keypoints[..., :2].abs().max() <= 1 and 0 <= keypoints[..., 2].min() <= keypoints[..., 2].max() <= 1
    decoder = ImageDecoder(k, cfg.filters, cfg.layers_per_scale)
    maps = keypoints_to_maps(keypoints, h, cfg.keypoint_sigma)
    frames = decoder(maps, video[:, 0], maps[:, 0])
    assert frames.shape == video.shape
    predicted, kl, hidden = VRNN(3 * cfg.num_keypoints, cfg)(keypoints, t, num_samples=cfg.num_samples)
    assert predicted.shape == (b, t, k, 3) and kl.shape == (b, cfg.observed) and hidden.shape == (b, t, cfg.rnn_size)

    out = StructVRNN(cfg)(video, step=0)
    assert out["loss"].shape == () and torch.isfinite(out["loss"])
    assert set(out["terms"]) == {"reconstruction", "separation", "sparsity", "kl", "future", "exploration"}
    for key in ("states", "predicted_states"):
        assert out[key].shape == (b, t, k, 3)
    assert out["heatmaps"].shape == (b, t, k, h, h)
    for key in ("reconstruction", "predicted_frames"):
        assert out[key].shape == video.shape and 0 <= out[key].min() and out[key].max() <= 1


def test_sample_future_shapes():
    cfg = tiny()
    model = StructVRNN(cfg).eval()
    states, frames = model.sample_future(torch.rand(2, cfg.observed, 3, 64, 64), future=6, num_samples=3)
    keypoints = model.keypoints(states)
    assert keypoints.shape == (2, 3, cfg.observed + 6, cfg.num_keypoints, 3)
    assert frames.shape == (2, 3, cfg.observed + 6, 3, 64, 64)
    assert not torch.equal(keypoints[:, 0, -1], keypoints[:, 1, -1])  # the samples differ


@pytest.mark.parametrize("mode, corners", [("bilinear", {"align_corners": True}), ("nearest", {})])
def test_chunked_upsampling_equals_one_call_values_gradients_and_layout(mode, corners):
    """The decoders' upsampling, cut into batch chunks to keep each output under the element limit
    (here 3 items a chunk, with a remainder), gives what one call gives."""
    x = torch.randn(7, 6, 5, 5).contiguous(memory_format=torch.channels_last)
    one, chunked = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected = torch.nn.functional.interpolate(one, scale_factor=2, mode=mode, **corners)
    got = Upsample2x(mode, max_elements=3 * 6 * 10 * 10)(chunked)  # outputs of 600 elements an item
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert got.is_contiguous(memory_format=torch.channels_last)  # what the next conv reads fastest
    weights = torch.randn_like(expected)
    (expected * weights).sum().backward()
    (got * weights).sum().backward()
    torch.testing.assert_close(chunked.grad, one.grad, rtol=0, atol=0)


def test_coordinate_channels_follow_the_convention():
    coords = add_coord_channels(torch.zeros(1, 3, 4, 5))[0, 3:]
    assert coords[0, 0, 0] == -1 and coords[0, 0, -1] == 1  # x: left -> right
    assert coords[1, 0, 0] == 1 and coords[1, -1, 0] == -1  # y: top is positive


def test_spatial_expectation_finds_a_peak():
    maps = torch.zeros(1, 2, 16, 16)
    maps[0, 0, 3, 12] = 100.0  # row 3, column 12
    maps[0, 1, 10, 2] = 50.0
    kp = heatmaps_to_keypoints(maps)[0]
    torch.testing.assert_close(kp[0], torch.tensor([-1 + 2 * 12 / 15, 1 - 2 * 3 / 15, 1.0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(kp[1], torch.tensor([-1 + 2 * 2 / 15, 1 - 2 * 10 / 15, 0.5]), atol=1e-4, rtol=0)


def test_gaussian_maps_peak_at_the_keypoint_and_round_trip():
    kp = torch.tensor([[[-1 + 2 * 5 / 15, 1 - 2 * 9 / 15, 0.7], [0.3, -0.2, 1.0]]])
    maps = keypoints_to_maps(kp, 16, sigma=1.5)
    assert maps.shape == (1, 2, 16, 16)
    assert maps[0, 0].argmax() == 9 * 16 + 5 and math.isclose(maps[0, 0].max(), 0.7, rel_tol=1e-5)
    torch.testing.assert_close(heatmaps_to_keypoints(maps)[..., :2], kp[..., :2], atol=1e-3, rtol=0)


def test_separation_loss_by_hand():
    # Keypoint 0 moves 0.2 along x in two steps, keypoint 1 stands still: centred, they are
    # 0.1 apart at both steps, so d = 0.01 and each off-diagonal term is exp(-0.01 / 0.02).
    kp = torch.zeros(1, 2, 2, 3)
    kp[0, 1, 0, 0] = 0.2
    assert math.isclose(separation_loss(kp, sigma=0.1), math.exp(-0.5), rel_tol=1e-5)
    # Identical motion (a constant offset) is fully penalised.
    kp[0, :, 1, 0] = kp[0, :, 0, 0] + 0.5
    assert math.isclose(separation_loss(kp, sigma=0.1), 1.0, rel_tol=1e-6)


def test_separation_loss_matches_a_loop():
    rng = np.random.default_rng(0)
    kp = rng.uniform(-1, 1, (2, 3, 4, 3))
    b, _, k, sigma = *kp.shape[:3], 0.3
    total = 0.0
    for i in range(k):
        for j in range(k):
            for n in range(b):
                ci = kp[n, :, i, :2] - kp[n, :, i, :2].mean(0)
                cj = kp[n, :, j, :2] - kp[n, :, j, :2].mean(0)
                total += np.exp(-((ci - cj) ** 2).sum(-1).mean() / (2 * sigma**2)) / b
    expected = (total - k) / (k * (k - 1))
    assert math.isclose(separation_loss(torch.tensor(kp, dtype=torch.float32), sigma), expected, rel_tol=1e-5)


def test_sparsity_loss_by_hand():
    maps = torch.zeros(1, 2, 2, 2, 2)  # [B, T, K, H, W]
    maps[0, 0, 0] = 1.0  # mean 1
    maps[0, 0, 1, 0, 0] = 4.0  # mean 1
    maps[0, 1, 1, 0] = 2.0  # mean 1; maps[0, 1, 0] stays 0
    assert math.isclose(sparsity_loss(maps), 0.75)


def test_exploration_loss_pulls_faded_keypoints_onto_unexplained_moving_objects():
    # One clip of 3 frames, 16x16 pixels in 4x4 heatmap cells of 4x4. The decoder draws frame 0
    # every time. Dot A moves along the bottom row of cells: unexplained in cell (3, 1) in frame 1
    # and (3, 2) in frame 2 -- and missing from where it was in frame 0, but the temporal median
    # there is background, so that is no target. Dot B appears in cell (0, 3) in frame 2, dot C in
    # cell (0, 0) in frame 1, next to keypoint 0, which is present: C is taken.
    frames = torch.zeros(1, 3, 3, 16, 16)
    for t, row, col in [(0, 13, 1), (1, 13, 5), (2, 13, 10), (2, 2, 14), (1, 2, 2)]:
        frames[0, t, :, row, col] = 0.5
    reconstruction = frames[:, :1].expand(-1, 3, -1, -1, -1)
    logits = torch.full((1, 3, 2, 4, 4), -60.0)  # two keypoints, both maps one-hot on cell (0, 0)
    logits[..., 0, 0] = 20.0
    logits[0, 2, 1, 0, 3] = -40.0  # keypoint 1 rates B's cell above A's
    logits.requires_grad_(True)
    keypoints = torch.tensor([[-1.0, 1.0, 1.0], [0.3, -0.3, 0.05]]).expand(1, 3, 2, 3)  # keypoint 1 is faded
    loss = exploration_loss(logits, keypoints, frames, reconstruction, min_presence=0.1)

    # Frame 0 is fully explained: no target. Keypoint 1 goes to A in frame 1 (C is taken, though
    # its map rates C's cell highest) and to B in frame 2: -log of its map's share of mass (+EPS
    # per cell) there, ~e^-60 and e^-40 of ~20; mean over 3 frames x 2 keypoints.
    mass = math.log(20 + 16e-6)
    assert loss.item() == pytest.approx((mass + 60 + mass + 40) / 6)
    loss.backward()
    grad = logits.grad[0]
    assert grad[:, 0].abs().max() == 0 and grad[0].abs().max() == 0  # present keypoint, explained frame
    # The target's logit is pushed with gradient ~1 although the softplus map has ~e^-60 there.
    assert grad[1, 1, 3, 1].item() == pytest.approx(-1 / 6) and grad[2, 1, 0, 3].item() == pytest.approx(-1 / 6)
    assert abs(grad[2, 1, 3, 2].item()) < 1e-9  # the candidate it rates lower is left alone
    for t in (1, 2):  # its old peak gives way
        assert grad[t, 1, 0, 0].item() == pytest.approx(1 / 6 / 20, rel=1e-3)


def test_assign_spreads_spare_keypoints_over_the_candidates():
    preference = torch.tensor([[5.0, 4.0, 9.0], [6.0, 1.0, 9.0], [3.0, 2.0, 9.0], [9.0, 9.0, 9.0]])
    candidate = torch.tensor([True, True, False])  # cell 2 is no candidate, however much it is liked
    spare = torch.tensor([True, True, True, False])  # keypoint 3 is not spare
    # 3 spare keypoints over 2 cells: at most 2 a cell. Keypoints 1 then 0 like cell 0 best and
    # fill it; keypoint 2 likes it too but gets cell 1.
    target = assign(preference[None, None], candidate[None, None], spare[None, None])
    assert target.shape == (1, 1, 4, 1) and target.flatten()[:3].tolist() == [0, 0, 1]
    one_cell = assign(preference[None, None], torch.tensor([[[False, True, False]]]), spare[None, None])
    assert one_cell.flatten()[:3].tolist() == [1, 1, 1]


def test_spare_keypoints_are_faded_or_outranked_duplicates():
    keypoints = torch.tensor([[0.0, 0.0, 0.5],    # shares a spot with 1, which is more present
                              [0.05, 0.0, 1.0],
                              [0.5, 0.5, 0.05],   # faded
                              [-0.5, 0.5, 0.3],   # alone
                              [-0.5, 0.55, 0.3]])  # a tie with 3: the lower index keeps the spot
    assert spare_keypoints(keypoints, min_presence=0.1, radius=0.1).tolist() == [True, False, True, False, True]
    assert spare_keypoints(keypoints, min_presence=0.1, radius=0.01).tolist() == [False, False, True, False, False]


def test_gaussian_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mq, mp = torch.randn(3, 16), torch.randn(3, 16)
    sq, sp = torch.rand(3, 16) + 0.1, torch.rand(3, 16) + 0.1
    dist = torch.distributions
    expected = dist.kl_divergence(dist.Normal(mq, sq), dist.Normal(mp, sp)).sum(-1)
    torch.testing.assert_close(gaussian_kl(mq, sq, mp, sp), expected)


def test_best_of_many_picks_the_closest_sample():
    target = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    offsets = torch.tensor([[0.5, 0.05], [0.1, 0.2], [0.3, -0.4]])  # [N, B]
    samples = target + offsets[..., None]
    samples[1, 0, 0] = -0.1  # a sign flip does not matter to a squared error
    assert best_of_many(samples, target).tolist() == [1, 0]


def test_predictions_do_not_peek_at_future_keypoints():
    """Without teacher forcing and best of many (eval), predicted steps depend on the
    observed keypoints only; with best of many, training uses the future targets."""
    cfg = tiny()
    dynamics = VRNN(3 * cfg.num_keypoints, cfg)
    kp = torch.rand(2, cfg.steps, cfg.num_keypoints, 3)
    changed = kp.clone()
    changed[:, cfg.observed:] = torch.rand_like(changed[:, cfg.observed:])

    def run(x: torch.Tensor, num_samples: int) -> torch.Tensor:
        torch.manual_seed(1)
        return dynamics(x, cfg.steps, num_samples=num_samples)[0]

    torch.testing.assert_close(run(kp, 1), run(changed, 1))
    assert not torch.allclose(run(kp, 10)[:, cfg.observed:], run(changed, 10)[:, cfg.observed:])


def test_observed_input_detected_feeds_the_detected_keypoints_at_test_too():
    """"detected": the RNN reads the detected keypoints on observed steps with or without
    teacher forcing; "decoded" (the paper): without it, it reads its own decoded keypoints."""
    kp = torch.rand(2, 8, 4, 3) * 2 - 1

    def run(observed_input: str, p_true: tuple[float, float]) -> torch.Tensor:
        torch.manual_seed(0)
        dynamics = VRNN(12, tiny(observed_input=observed_input)).eval()
        torch.manual_seed(1)
        return dynamics(kp, 8, p_true=p_true)[0]

    torch.testing.assert_close(run("detected", (0.0, 0.0)), run("detected", (1.0, 0.0)))
    assert not torch.allclose(run("decoded", (0.0, 0.0)), run("decoded", (1.0, 0.0)))


def test_delta_output_adds_the_change_to_the_keypoints_last_read():
    """With a decoder that outputs no change, "delta" repeats the keypoints the RNN last read:
    the detected ones on observed steps (0 before the first), then the last observed, held."""
    cfg = tiny(observed_input="detected", keypoint_output="delta")
    dynamics = VRNN(3 * cfg.num_keypoints, cfg)
    nn = torch.nn
    nn.init.zeros_(dynamics.decoder[-2].weight), nn.init.zeros_(dynamics.decoder[-2].bias)
    kp = torch.rand(2, cfg.steps, cfg.num_keypoints, 3)
    predicted = dynamics(kp, cfg.steps, num_samples=3)[0]
    assert (predicted[:, 0] == 0).all()
    torch.testing.assert_close(predicted[:, 1:cfg.observed + 1], kp[:, :cfg.observed])
    torch.testing.assert_close(predicted[:, cfg.observed:], kp[:, cfg.observed - 1:cfg.observed].expand_as(predicted[:, cfg.observed:]))


def test_latent_size_0_is_the_deterministic_struct_rnn():
    cfg = tiny(latent_size=0, num_samples=1)
    dynamics = VRNN(3 * cfg.num_keypoints, cfg)
    assert dynamics.prior is None and dynamics.posterior is None
    kp = torch.rand(2, cfg.steps, cfg.num_keypoints, 3)
    torch.manual_seed(0)
    first, kl, _ = dynamics(kp, cfg.steps, p_true=(0.5, 0.5))
    torch.manual_seed(1)
    second = dynamics(kp, cfg.steps, p_true=(0.0, 0.0))[0]
    assert (kl == 0).all() and kl.shape == (2, cfg.observed)
    torch.testing.assert_close(dynamics.eval()(kp, cfg.steps)[0], second)  # no noise anywhere
    assert not torch.allclose(first, second)  # teacher forcing still feeds the detected keypoints
    with pytest.raises(ConfigError, match="num_samples"):
        validate(StructVRNNConfig, {"latent_size": 0})


def test_gradients_reach_every_parameter_and_dynamics_stay_out_of_the_image_model():
    torch.manual_seed(0)
    cfg = tiny()
    model = StructVRNN(cfg)
    video = torch.rand(2, cfg.steps, 3, 64, 64)
    step = 10_000  # every loss weight is on

    model(video, step, decode_predictions=False)["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name

    model.zero_grad(set_to_none=True)
    terms = model(video, step, decode_predictions=False)["terms"]
    (terms["kl"] + terms["future"]).backward()
    for name, p in [*model.detector.named_parameters(), *model.decoder.named_parameters()]:
        assert p.grad is None, name
    assert all(p.grad is not None for p in model.dynamics.parameters())


@pytest.mark.parametrize("mode", ["autocast", "bf16 weights"])  # bf16 weights: DeepSpeed's bf16 mode
def test_bf16_runs(mode):
    model = StructVRNN(tiny())
    video = torch.rand(1, 8, 3, 64, 64)
    if mode == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(video, step=2000)
    else:
        out = model.to(torch.bfloat16)(video.to(torch.bfloat16), step=2000)
    out["loss"].backward()
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_schedules():
    cfg = tiny(beta=0.4)
    assert [cfg.kl_weight(s) for s in (0, 500, 1000, 5000)] == pytest.approx([0.0, 0.2, 0.4, 0.4])
    assert cfg.p_true(0) == (1.0, 1.0)
    assert cfg.p_true(4000) == pytest.approx((0.55, 0.75))
    assert cfg.p_true(8000) == pytest.approx((0.1, 0.5)) == cfg.p_true(50_000)
    assert linear_ramp(0, 0.0, 2.0, 0) == 2.0  # no ramp: the end value from the start
    for step in (0, 500, 4000, 50_000):  # the training loop's step, a counter on the device
        counter = torch.tensor(step)
        assert cfg.kl_weight(counter).item() == pytest.approx(cfg.kl_weight(step))
        assert [p.item() for p in cfg.p_true(counter)] == pytest.approx(cfg.p_true(step))


@pytest.mark.parametrize("override, word", [
    ({"image_size": 96}, "image_size"),
    ({"num_keypoints": 1}, "num_keypoints"),
    ({"p_true_end_observed": 1.5}, "p_true_end_observed"),
    ({"exploration_weight": -1.0}, "exploration_weight"),
    ({"num_keypionts": 12}, "unknown key"),
])
def test_config_rejects_bad_values(override, word):
    with pytest.raises(ConfigError, match=word):
        validate(StructVRNNConfig, override)


def test_registry_builds_the_model_its_config_names():
    assert set(FAMILIES) == {"struct_vrnn", "cnn_vrnn", "drnet", "class_conditional"}
    model = build_family(validate(StructVRNNConfig, {**TINY, "image_size": 128})).root
    assert isinstance(model, StructVRNN) and model.cfg.image_size == 128
    with pytest.raises(ConfigError, match="name"):
        validate(StructVRNNConfig, {"name": "svg"})
    with pytest.raises(KeyError, match="struct_vrnn"):
        build_family(validate(StructVRNNConfig, TINY).model_copy(update={"name": "svg"}))
    with pytest.raises(ValueError, match="expected video"):
        model(torch.rand(1, 8, 3, 64, 64), step=0)


def moving_dot(batch: int, steps: int) -> torch.Tensor:
    """Bright dots crossing a dark frame in opposite directions: [B, T, 3, 64, 64] in [0, 1]."""
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    cx = torch.linspace(16, 48, steps).repeat(batch, 1)
    cx[1::2] = cx[1::2].flip(-1)
    cy = torch.linspace(20, 44, batch)[:, None].expand(-1, steps)
    dot = torch.exp(-((xx - cx[..., None, None]) ** 2 + (yy - cy[..., None, None]) ** 2) / (2 * 3.0**2))
    return (0.1 + 0.8 * dot)[:, :, None].expand(-1, -1, 3, -1, -1).contiguous()


def test_training_reduces_the_reconstruction_loss():
    """60 steps fit the background and beat copying the first frame; learning to track the
    dot takes a few hundred steps here, too slow for a unit test."""
    torch.manual_seed(0)
    cfg = tiny(observed=2, predicted=2, num_samples=4)
    model = StructVRNN(cfg)
    video = moving_dot(2, cfg.steps)
    copy_first = 0.5 * (video - video[:, :1]).pow(2).sum() / (2 * cfg.steps)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    losses = []
    for _ in range(60):
        out = model(video, step=10_000, decode_predictions=False)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["terms"]["reconstruction"].item())
    assert losses[-1] < losses[0] / 10 and losses[-1] < 0.8 * copy_first


# The official code's settings (../shared/reference/official-implementations.md, "Struct-VRNN")
# with the paper's K per dataset; what a paper config must reproduce.
OFFICIAL = {
    "model.image_size": 64, "model.filters": 32, "model.layers_per_scale": 2, "model.keypoint_sigma": 1.5,
    "model.rnn_size": 512, "model.hidden_size": 128, "model.latent_size": 16, "model.num_samples": 10,
    "model.observed": 8, "model.predicted": 8, "model.scheduled_sampling_steps": 8000,
    "model.p_true_end_observed": 0.1, "model.p_true_end_predicted": 0.5, "model.beta": 0.0,
    "model.kl_anneal_steps": 1000, "model.separation_weight": 10.0, "model.separation_sigma": 0.1,
    "model.sparsity_weight": 5.0, "model.reconstruction_weight": 1.0, "model.future_weight": 1.0,
    "model.observed_input": "decoded", "model.keypoint_output": "absolute", "model.exploration_weight": 0.0,
    "data.batch_size": 32, "train.lr": 1e-3, "train.lr_schedule": "constant", "train.grad_clip": 10.0,
    "train.weight_decay": 1e-4, "train.steps": 10_000,
}


@pytest.mark.parametrize("name, keypoints", [("paper_basketball", 12), ("paper_human36m", 48)])
def test_paper_configs_hold_the_official_settings(name, keypoints):
    from kpscale.train.config import DEFAULT, load_train_config
    path = DEFAULT.with_name(f"{name}.yaml")
    flat = load_train_config(path, ["data.train=null", "data.test=null"]).flat()
    wrong = {key: (flat[key], value) for key, value in {**OFFICIAL, "model.num_keypoints": keypoints}.items()
             if flat[key] != value}
    assert not wrong, f"{path.name}: (config, official) {wrong}"
    assert flat["model.name"] == "struct_vrnn"


def test_the_human36m_paper_config_names_its_missing_shards(tmp_path, monkeypatch):
    from kpscale.train.config import DEFAULT, load_train_config
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="data/human36m/train"):
        load_train_config(DEFAULT.with_name("paper_human36m.yaml"), [])
