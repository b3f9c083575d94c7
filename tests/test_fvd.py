from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from kpscale.evaluate.fvd import FVD, frechet_distance, fvd, gaussian_stats
from kpscale.evaluate.i3d import ENV_VAR, I3D, load_i3d
from kpscale.evaluate.weights import WeightsUnavailable

CHECKPOINT = "i3d_pretrained_400.pt"


def random_spd(d: int, gen: torch.Generator) -> torch.Tensor:
    a = torch.randn(d, d, generator=gen, dtype=torch.float64)
    return a @ a.T + 0.1 * torch.eye(d, dtype=torch.float64)


def test_frechet_distance_diagonal_closed_form():
    gen = torch.Generator().manual_seed(0)
    m1, m2, a, b = torch.rand(4, 5, generator=gen, dtype=torch.float64) * torch.tensor([[4], [-4], [1], [3]])
    a = a + 0.1
    expected = (m1 - m2).square().sum() + (a.sqrt() - b.sqrt()).square().sum()
    got = frechet_distance(m1, torch.diag(a), m2, torch.diag(b))
    assert got == pytest.approx(expected.item(), rel=1e-9)


def test_frechet_distance_matches_sqrtm():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    gen = torch.Generator().manual_seed(1)
    m1, m2 = torch.randn(6, generator=gen, dtype=torch.float64), torch.randn(6, generator=gen, dtype=torch.float64)
    s1, s2 = random_spd(6, gen), random_spd(6, gen)
    root = scipy_linalg.sqrtm(s1.numpy() @ s2.numpy()).real
    expected = ((m1 - m2).square().sum() + s1.trace() + s2.trace()).item() - 2 * np.trace(root)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_identical_and_singular():
    gen = torch.Generator().manual_seed(2)
    mu, sigma = gaussian_stats(torch.randn(50, 10, generator=gen) * 3)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * sigma.trace().item()
    # Fewer samples than dimensions: rank-deficient covariances, where sqrtm misbehaves.
    few, other = torch.randn(5, 64, generator=gen), torch.randn(6, 64, generator=gen) + 0.5
    assert torch.linalg.matrix_rank(gaussian_stats(few)[1]) < 64
    d = fvd(few, other)
    assert math.isfinite(d) and d > 0
    assert fvd(few, few) < 1e-9 * d


def test_gaussian_stats_unbiased_and_needs_two():
    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(3))
    mean, cov = gaussian_stats(x)
    assert mean.dtype == cov.dtype == torch.float64
    np.testing.assert_allclose(cov.numpy(), np.cov(x.double().numpy().T, ddof=1), rtol=1e-12)
    with pytest.raises(ValueError, match="N >= 2"):
        gaussian_stats(x[:1])


def test_fvd_refused_without_weights(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV_VAR, raising=False)
    with pytest.raises(WeightsUnavailable) as info:
        load_i3d(None)
    assert "FVD" in str(info.value) and ENV_VAR in str(info.value) and CHECKPOINT in str(info.value)
    missing = tmp_path / CHECKPOINT
    with pytest.raises(WeightsUnavailable, match="not found"):
        load_i3d(missing)
    monkeypatch.setenv(ENV_VAR, str(missing))
    with pytest.raises(WeightsUnavailable, match=str(missing)):
        load_i3d(None)


def random_i3d(seed: int) -> I3D:
    """Random I3D with He init: PyTorch's default conv init shrinks activations layer by layer,
    leaving logits that barely differ between clips."""
    torch.manual_seed(seed)
    model = I3D()
    for module in model.modules():
        if isinstance(module, nn.Conv3d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        if isinstance(module, nn.BatchNorm3d):  # non-trivial stats, so loading them is visible
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.8, 1.2)
    return model


EXPECTED_SHAPES = {
    "Conv3d_1a_7x7.conv3d.weight": (64, 3, 7, 7, 7),
    "Conv3d_1a_7x7.bn.running_mean": (64,),
    "Conv3d_2b_1x1.conv3d.weight": (64, 64, 1, 1, 1),
    "Conv3d_2c_3x3.conv3d.weight": (192, 64, 3, 3, 3),
    "Mixed_3b.b0.conv3d.weight": (64, 192, 1, 1, 1),
    "Mixed_3b.b1b.conv3d.weight": (128, 96, 3, 3, 3),
    "Mixed_4e.b2b.bn.running_var": (64,),
    "Mixed_4f.b3b.conv3d.weight": (128, 528, 1, 1, 1),
    "Mixed_5c.b3b.bn.weight": (128,),
    "Mixed_5c.b1b.bn.bias": (384,),
    "logits.conv3d.weight": (400, 1024, 1, 1, 1),
    "logits.conv3d.bias": (400,),
}


def test_loader_layout_and_fvd(tmp_path, monkeypatch):
    saved = random_i3d(0).state_dict()
    path = tmp_path / CHECKPOINT
    torch.save(saved, path)
    monkeypatch.delenv(ENV_VAR, raising=False)
    model = load_i3d(path)
    assert not model.training
    state = model.state_dict()
    for key, shape in EXPECTED_SHAPES.items():
        assert tuple(state[key].shape) == shape, key
    assert not any(k.startswith("logits.bn") or "MaxPool" in k for k in state)
    assert all(torch.equal(state[k], v) for k, v in saved.items())

    # 8 frames at 32x32 are resized to 224x224; 4 clips a set keeps this at a few seconds.
    gen = torch.Generator().manual_seed(4)
    real = torch.rand(4, 8, 3, 32, 32, generator=gen)
    fake = torch.rand(4, 8, 3, 32, 32, generator=gen) ** 2  # darker: a different distribution
    metric = FVD(model, "cpu", batch_size=3)  # 3 + 1: exercises the chunking
    metric.update(real[:2], fake[:2])
    metric.update(real[2:], fake[2:])
    different = metric.compute()
    assert torch.cat(metric.real).shape == (4, 400)
    assert math.isfinite(different) and different > 0
    same = FVD(model, "cpu", batch_size=3)
    same.update(real, real)
    assert 0 <= same.compute() < 1e-3 * different


def test_loader_refuses_renamed_key(tmp_path):
    state = I3D().state_dict()
    state["Mixed_4b.b0.conv3d.kernel"] = state.pop("Mixed_4b.b0.conv3d.weight")
    path = tmp_path / CHECKPOINT
    torch.save(state, path)
    with pytest.raises(RuntimeError) as info:
        load_i3d(path)
    assert not isinstance(info.value, WeightsUnavailable)
    message = str(info.value)
    assert str(path) in message and "Mixed_4b.b0.conv3d.weight" in message and "Mixed_4b.b0.conv3d.kernel" in message
