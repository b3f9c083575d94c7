import numpy as np
import torch

from kpscale.evaluate import tracking
from kpscale.evaluate.media import draw_keypoints, keypoint_pixels, panel, save_gif


def test_regression_recovers_a_known_linear_map():
    g = torch.Generator().manual_seed(0)
    keypoints = torch.rand(500, 5, 3, generator=g) * 2 - 1
    true_map = torch.randn(16, 4, generator=g, dtype=torch.float64)  # 5 keypoints x 3 + offset -> 2 objects
    positions = (tracking.features(keypoints) @ true_map).unflatten(-1, (2, 2)).float()
    weights = tracking.fit(keypoints, positions, ridge=0.0)
    torch.testing.assert_close(weights, true_map, rtol=1e-6, atol=1e-6)
    assert tracking.distance(tracking.apply(weights, keypoints), positions).max() < 1e-4


def test_null_error_and_best_of_samples():
    train = torch.tensor([[[0.0, 0.0]], [[2.0, 0.0]]])  # one object, mean at (1, 0)
    test = torch.tensor([[[1.0, 3.0]], [[4.0, 4.0]]])
    assert tracking.null_error(train, test) == (3.0 + 5.0) / 2
    # Identity map from keypoint (x, y) to the position; three samples, the middle one exact.
    weights = torch.zeros(7, 2, dtype=torch.float64)
    weights[0, 0] = weights[1, 1] = 1
    truth = torch.tensor([[[[1.0, 1.0]], [[2.0, 2.0]]]])  # [B=1, T=2, N=1, 2]
    sampled = torch.zeros(1, 3, 2, 2, 3)
    sampled[0, 0, ..., :2] = 5.0
    sampled[0, 1, :, 0, :2] = truth[0, :, 0]
    sampled[0, 2, ..., :2] = 1.5
    errors = tracking.best_of_samples(weights, sampled, truth)
    assert errors.shape == (1,) and errors.item() < 1e-6
    # Best of many is never worse than any single sample.
    singles = [tracking.best_of_samples(weights, sampled[:, i:i + 1], truth).item() for i in range(3)]
    assert errors.item() <= min(singles)


def test_keypoints_are_drawn_where_they_point(tmp_path):
    frames = np.zeros((1, 64, 64, 3), np.uint8)
    keypoints = torch.tensor([[[-1.0, 1.0, 1.0], [1.0, -1.0, 1.0], [0.0, 0.0, 0.0]]])  # corners; mu 0: invisible
    xy = keypoint_pixels(keypoints, heatmap_size=16, image_size=64)
    np.testing.assert_allclose(xy[0, 0], [2.0, 2.0])  # centre of the top-left heatmap cell
    np.testing.assert_allclose(xy[0, 1], [62.0, 62.0])
    drawn = draw_keypoints(frames, keypoints, 16)
    assert drawn[0, 2, 2].max() > 200 and drawn[0, 62, 62].max() > 200
    assert drawn[0, 32, 32].max() == 0
    video = torch.rand(4, 3, 16, 16)
    frames = panel(video, video, keypoints[:, :2].expand(4, -1, -1), video, observed=2, heatmap_size=4, scale=2)
    assert frames.shape == (4, 2 * 20, 2 * 4 * 20, 3)
    assert (frames[0, 0, 0] == [40, 200, 70]).all() and (frames[3, 0, 0] == [230, 45, 45]).all()
    from PIL import Image
    gif = Image.open(save_gif(frames, tmp_path / "x.gif"))
    assert gif.n_frames == 4
