"""DrNet's networks and losses (kpscale/models/drnet): shapes and ranges as the official code's,
which parameters each of its three losses trains, and a scene discriminator that learns to tell
same-clip pose pairs from mixed ones."""

import math

import pytest
import torch

from kpscale.models.drnet.model import DrNet, DrNetConfig

SMALL = DrNetConfig(filters=8, content_size=16, pose_size=4, discriminator_hidden=16, lstm_size=16, lstm_layers=2)


def _clips(batch=6, frames=15, seed=0):
    return torch.rand(batch, frames, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {name for name, module in model.named_children()
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


def test_each_loss_trains_only_its_own_networks():
    torch.manual_seed(0)
    model = DrNet(SMALL)
    frames = DrNet.four_frames(_clips(), torch.Generator().manual_seed(1))
    assert frames.shape == (6, 4, 3, 64, 64)
    terms = model.disentangle_losses(frames)
    assert set(terms) == {"reconstruction", "similarity", "adversarial"} and all(t.isfinite() for t in terms.values())
    # The generator's step reaches the discriminator's parameters only through its input; the
    # training step must not apply those gradients (the discriminator has its own optimiser).
    assert _grads(model, sum(terms.values())) == {"content_encoder", "pose_encoder", "decoder", "scene_discriminator"}
    assert _grads(model, model.discriminator_loss(frames)) == {"scene_discriminator"}
    assert _grads(model, model.prediction_loss(_clips())) == {"predictor"}


def test_adversarial_term_is_weighted_maximum_entropy():
    torch.manual_seed(0)
    model = DrNet(SMALL.model_copy(update={"adversarial_weight": 1.0}))
    torch.nn.init.zeros_(model.scene_discriminator.net[-1].weight)
    torch.nn.init.zeros_(model.scene_discriminator.net[-1].bias)
    frames = DrNet.four_frames(_clips())
    # A discriminator that cannot tell (logit 0) is what the pose encoder aims at: BCE against 0.5 is log 2.
    assert model.disentangle_losses(frames)["adversarial"].item() == pytest.approx(math.log(2), abs=1e-6)
    off = DrNet(SMALL.model_copy(update={"adversarial_weight": 0.0}))
    assert off.disentangle_losses(frames)["adversarial"].item() == 0


def test_the_scene_discriminator_learns_which_pairs_share_a_clip():
    """Clips of different brightness give the (untrained) pose encoder clip-specific codes: the
    discriminator learns to tell same-clip pairs from mixed ones, its loss well under log 2."""
    torch.manual_seed(0)
    model = DrNet(SMALL)
    optimiser = torch.optim.Adam(model.scene_discriminator.parameters(), lr=2e-3)
    losses = []
    for step in range(300):
        levels = torch.rand(8, 1, 1, 1, 1, generator=torch.Generator().manual_seed(step))
        video = levels * torch.ones(8, 6, 3, 64, 64) + 0.02 * torch.rand(8, 6, 3, 64, 64)
        loss = model.discriminator_loss(DrNet.four_frames(video))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert sum(losses[:50]) / 50 > 0.65 and sum(losses[-50:]) / 50 < 0.5  # chance: log 2 = 0.69
    with pytest.raises(ValueError, match="at least 4 clips"):
        model.discriminator_loss(DrNet.four_frames(_clips(batch=3)))


def test_predict_decodes_future_frames_from_free_running_poses():
    torch.manual_seed(0)
    model = DrNet(SMALL).eval()
    clips = _clips(batch=2)
    future = model.predict(clips, future=12)
    assert future.shape == (2, 12, 3, 64, 64) and 0 <= future.min() and future.max() <= 1
    assert torch.equal(future, model.predict(clips, future=12))  # no sampling: the same every time
    # Only the observed frames matter.
    later = clips.clone()
    later[:, SMALL.observed:] = 0
    assert torch.equal(future, model.predict(later, future=12))
