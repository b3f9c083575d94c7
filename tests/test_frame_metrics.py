from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kpscale.evaluate.frames import (CHECKPOINT, ENV_VAR, PSNR_CEILING, load_vgg, psnr_per_step, ssim_per_step,
                                     vgg_cosine_per_step)
from kpscale.models.vgg import VGG, VGG19_LAYERS
from kpscale.evaluate.weights import WeightsUnavailable

CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)  # torchvision's vgg16 `features`


def smooth_clips(b: int, t: int, seed: int, size: int = 32) -> torch.Tensor:
    """Random clips [B, T, 3, size, size] in [0, 1], upsampled from 8x8 so that they have
    structure for SSIM and VGG to see, unlike per-pixel noise."""
    low = torch.rand(b * t, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False).unflatten(0, (b, t))


def noisy(clip: torch.Tensor, std: float, seed: int) -> torch.Tensor:
    """`clip` plus Gaussian noise of `std`, clamped to [0, 1]; one seed gives the same noise, scaled."""
    noise = torch.randn(clip.shape, generator=torch.Generator().manual_seed(seed))
    return (clip + std * noise).clamp(0, 1)


def test_psnr_identical_at_ceiling():
    x = smooth_clips(2, 3, 0)
    got = psnr_per_step(x, x)
    assert got.shape == (2, 3)
    assert torch.all(got == PSNR_CEILING)


def test_psnr_matches_closed_form():
    true = smooth_clips(2, 3, 1)
    pred = noisy(true, 0.1, seed=2)
    mse = (pred.double() - true.double()).square().mean((2, 3, 4))
    expected = 10 * torch.log10(1 / mse)
    got = psnr_per_step(pred, true)
    assert got.shape == (2, 3)
    torch.testing.assert_close(got.double(), expected, atol=1e-3, rtol=0)


def test_ssim_identical_is_one_noisy_below():
    x = smooth_clips(2, 3, 3)
    same = ssim_per_step(x, x)
    assert same.shape == (2, 3)
    assert (same - 1).abs().max() < 1e-5
    assert (ssim_per_step(noisy(x, 0.1, seed=4), x) < 1 - 1e-3).all()


@pytest.mark.parametrize("metric", [psnr_per_step, ssim_per_step])
def test_worse_with_more_noise(metric):
    true = smooth_clips(2, 3, 5)
    scores = [metric(noisy(true, std, seed=6), true) for std in (0.05, 0.1, 0.2)]
    assert all(s.shape == (2, 3) for s in scores)
    assert (scores[0] > scores[1]).all() and (scores[1] > scores[2]).all()


@pytest.mark.parametrize("metric", [psnr_per_step, ssim_per_step])
def test_mismatched_clips_refused(metric):
    x = smooth_clips(2, 3, 7)
    with pytest.raises(ValueError, match="one shape"):
        metric(x, x[:, :2])
    with pytest.raises(ValueError, match="one shape"):
        metric(x[0], x[0])  # a clip without its batch dimension


def test_vgg_refused_without_weights(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV_VAR, raising=False)
    with pytest.raises(WeightsUnavailable) as info:
        load_vgg(None)
    message = str(info.value)
    assert ENV_VAR in message and "--vgg PATH" in message and CHECKPOINT in message
    missing = tmp_path / CHECKPOINT
    with pytest.raises(WeightsUnavailable, match="not found"):
        load_vgg(missing)
    monkeypatch.setenv(ENV_VAR, str(missing))
    with pytest.raises(WeightsUnavailable, match=str(missing)):
        load_vgg(None)


def random_vgg(seed: int) -> VGG:
    """Random VGG-16 with He init: PyTorch's default conv init shrinks activations layer by
    layer until the biases dominate and every frame's features look alike."""
    torch.manual_seed(seed)
    model = VGG()
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return model


def torchvision_like_file(state: dict[str, torch.Tensor], path: Path) -> None:
    """Save `state` with classifier entries beside it, as torchvision's vgg16 file has (small
    stand-ins: the real first classifier layer alone is 400 MB)."""
    classifier = {"classifier.0.weight": torch.randn(16, 32), "classifier.0.bias": torch.randn(16),
                  "classifier.6.weight": torch.randn(10, 16), "classifier.6.bias": torch.randn(10)}
    torch.save({**state, **classifier}, path)


def test_vgg_layout():
    model = VGG()
    state = model.state_dict()
    assert set(state) == {f"features.{i}.{p}" for i in CONV_INDICES for p in ("weight", "bias")}
    assert state["features.0.weight"].shape == (64, 3, 3, 3)
    assert state["features.10.weight"].shape == (256, 128, 3, 3)
    assert state["features.28.weight"].shape == (512, 512, 3, 3)
    assert isinstance(model.features[30], nn.MaxPool2d) and len(model.features) == 31
    # conv5_3 before the last pool: 32x32 frames pooled four times, not five.
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 512, 2, 2)


def test_vgg19_layout_and_its_blocks_for_perceptual_losses():
    model = VGG(VGG19_LAYERS)
    convs = (0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34)  # torchvision's vgg19 `features`
    assert set(model.state_dict()) == {f"features.{i}.{p}" for i in convs for p in ("weight", "bias")}
    x = torch.rand(2, 3, 32, 32)
    blocks = model.blocks(x)  # conv1_2, conv2_2, conv3_4, conv4_4, conv5_4, each after its ReLU
    assert [tuple(b.shape[1:]) for b in blocks] == [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 2, 2)]
    torch.testing.assert_close(blocks[-1], model(x))  # the last block's output is the features' output
    assert model.block_ends == [3, 8, 17, 26, 35]


def test_vgg_loads_features_and_cosine(tmp_path, monkeypatch):
    saved = random_vgg(0).state_dict()
    path = tmp_path / CHECKPOINT
    torchvision_like_file(saved, path)
    monkeypatch.delenv(ENV_VAR, raising=False)
    model = load_vgg(path)
    assert not model.training
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())

    true, other = smooth_clips(2, 2, 8), smooth_clips(2, 2, 9)
    same = vgg_cosine_per_step(model, true, true)
    assert same.shape == (2, 2)
    assert (same - 1).abs().max() < 1e-5
    different = vgg_cosine_per_step(model, other, true)
    assert (different < 1 - 1e-3).all()
    # A slightly noisy prediction is closer to the truth than an unrelated one.
    assert (vgg_cosine_per_step(model, noisy(true, 0.05, seed=10), true) > different).all()


def test_vgg_loader_refuses_missing_feature_key(tmp_path):
    state = VGG().state_dict()
    del state["features.28.bias"]
    path = tmp_path / CHECKPOINT
    torchvision_like_file(state, path)
    with pytest.raises(RuntimeError) as info:
        load_vgg(path)
    assert not isinstance(info.value, WeightsUnavailable)
    assert str(path) in str(info.value) and "features.28.bias" in str(info.value)
