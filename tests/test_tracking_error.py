import numpy as np
import torch

from kpscale.evaluate import tracking_error
from kpscale.evaluate.media import draw_keypoints, keypoint_pixels, panel, save_gif


def test_regression_recovers_a_known_linear_map():
    g = torch.Generator().manual_seed(0)
    keypoints = torch.rand(500, 5, 3, generator=g) * 2 - 1
    true_map = torch.randn(16, 4, generator=g, dtype=torch.float64)  # 5 keypoints x 3 + offset -> 2 objects
    positions = (tracking_error.features(keypoints.flatten(-2)) @ true_map).unflatten(-1, (2, 2)).float()
    weights = tracking_error.fit(keypoints.flatten(-2), positions, ridge=0.0)
    torch.testing.assert_close(weights, true_map, rtol=1e-6, atol=1e-6)
    assert tracking_error.distance(tracking_error.apply(weights, keypoints.flatten(-2)), positions).max() < 1e-4


def test_null_error_and_best_of_samples():
    train = torch.tensor([[[0.0, 0.0]], [[2.0, 0.0]]])  # one object, mean at (1, 0)
    test = torch.tensor([[[1.0, 3.0]], [[4.0, 4.0]]])
    assert tracking_error.null_error(train, test) == (3.0 + 5.0) / 2
    # Identity map from keypoint (x, y) to the position; three samples, the middle one exact.
    weights = torch.zeros(7, 2, dtype=torch.float64)
    weights[0, 0] = weights[1, 1] = 1
    truth = torch.tensor([[[[1.0, 1.0]], [[2.0, 2.0]]]])  # [B=1, T=2, N=1, 2]
    sampled = torch.zeros(1, 3, 2, 2, 3)
    sampled[0, 0, ..., :2] = 5.0
    sampled[0, 1, :, 0, :2] = truth[0, :, 0]
    sampled[0, 2, ..., :2] = 1.5
    sampled = sampled.flatten(-2)  # [B, S, T, 3K]: states
    errors = tracking_error.best_of_samples(weights, sampled, truth)
    assert errors.shape == (1, 2) and errors.max() < 1e-6
    # Best of many is never worse than any single sample.
    singles = [tracking_error.best_of_samples(weights, sampled[:, i:i + 1], truth).mean().item() for i in range(3)]
    assert errors.mean().item() <= min(singles)


def test_regression_recovers_a_map_of_some_keypoints_where_identifiable():
    # Object 0 follows keypoint 0, object 1 keypoint 1; keypoint 3 duplicates keypoint 1 (two keypoints
    # on one object) and keypoint 2 is always visible (mu = 1, collinear with the offset).
    g = torch.Generator().manual_seed(1)
    keypoints = torch.rand(400, 4, 3, generator=g) * 2 - 1
    keypoints[..., 2] = keypoints[..., 2].abs()
    keypoints[:, 2, 2] = 1.0
    keypoints[:, 3] = keypoints[:, 1]
    true_map = torch.zeros(13, 4, dtype=torch.float64)  # rows 3k + (x, y, mu) and the offset (12)
    true_map[0:3, 0:2] = torch.randn(3, 2, generator=g, dtype=torch.float64)
    true_map[3:6, 2:4] = torch.randn(3, 2, generator=g, dtype=torch.float64)
    true_map[12] = torch.randn(4, generator=g, dtype=torch.float64)
    positions = (tracking_error.features(keypoints.flatten(-2)) @ true_map).unflatten(-1, (2, 2)).float()
    weights = tracking_error.fit(keypoints.flatten(-2), positions, ridge=1e-10)  # the ridge picks one of the equal fits
    torch.testing.assert_close(tracking_error.apply(weights, keypoints.flatten(-2)), positions, rtol=0, atol=1e-6)
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # noqa: E731
    close(weights[0:3], true_map[0:3])  # keypoint 0
    close(weights[6:8], true_map[6:8])  # keypoint 2's x, y: unused
    close(weights[3:6] + weights[9:12], true_map[3:6])  # keypoints 1 and 3 only together
    close(weights[8] + weights[12], true_map[12])  # keypoint 2's mu and the offset only together


def test_best_of_samples_is_never_worse_than_one_sample():
    g = torch.Generator().manual_seed(2)
    weights = torch.randn(3 * 3 + 1, 2 * 2, generator=g, dtype=torch.float64)  # 3 keypoints -> 2 objects
    sampled = torch.rand(6, 5, 4, 3, 3, generator=g).flatten(-2)  # [B, S, T, 3K]
    positions = torch.randn(6, 4, 2, 2, generator=g)
    per_clip = tracking_error.best_of_samples(weights, sampled, positions)
    per_object = tracking_error.best_of_samples(weights, sampled, positions, per_object=True)
    first = tracking_error.per_step_errors(weights, sampled[:, 0], positions)
    assert per_clip.shape == per_object.shape == first.shape == (6, 4)
    per_clip, per_object, first = per_clip.mean(1), per_object.mean(1), first.mean(1)
    assert (per_clip <= first + 1e-6).all() and (per_object <= first + 1e-6).all()
    assert (per_object <= per_clip + 1e-6).all() and (per_object < per_clip - 1e-3).any()
    # The per-clip choice keeps the evaluation's old metric: the least mean error over samples.
    old = tracking_error.distance(tracking_error.apply(weights, sampled), positions[:, None]).mean((2, 3)).min(1).values
    torch.testing.assert_close(per_clip, old)


def test_best_of_samples_per_object_picks_a_sample_for_each_object():
    weights = torch.zeros(7, 4, dtype=torch.float64)  # keypoint 0 -> object 0, keypoint 1 -> object 1
    weights[0, 0] = weights[1, 1] = weights[3, 2] = weights[4, 3] = 1
    truth = torch.rand(1, 3, 2, 2, generator=torch.Generator().manual_seed(3))  # [B=1, T=3, N=2, 2]
    sampled = torch.zeros(1, 2, 3, 2, 3)
    sampled[0, :, :, :, :2] = truth[0]
    sampled[0, 0, :, 1, :2] += 1.0  # sample 0 matches object 0 only
    sampled[0, 1, :, 0, :2] += 2.0  # sample 1 matches object 1 only, and is worse overall
    sampled = sampled.flatten(-2)
    assert (tracking_error.best_of_samples(weights, sampled, truth, per_object=True) == 0).all()
    per_clip = tracking_error.best_of_samples(weights, sampled, truth)
    torch.testing.assert_close(per_clip, torch.full((1, 3), 2 ** 0.5 / 2))  # sample 0 for both


def test_nearest_keypoint_distance_ignores_faded_keypoints():
    # 16x16 heatmap, 64x64 image: x = -1 is pixel 2, +1 pixel 62 (cell centres); y = +1 is the top.
    keypoints = torch.tensor([[-1.0, 1.0, 1.0], [1.0, -1.0, 0.5], [-0.9, 1.0, 0.05]])  # [K=3, 3]
    objects = torch.tensor([[2.0, 5.0], [58.0, 62.0], [62.0, 2.0]])  # the third keypoint has faded out
    d = tracking_error.nearest_keypoint_distance(keypoints, objects, heatmap_size=16, image_size=64)
    torch.testing.assert_close(d, torch.tensor([3.0, 4.0, 60.0]))
    faded = keypoints.clone()
    faded[:, 2] = 0
    assert tracking_error.nearest_keypoint_distance(faded, objects, 16, 64).isinf().all()


def test_objects_found_counts_objects_with_a_keypoint_on_them():
    # [B=2, T=1, N=3]: object 0 always within 4 px, object 1 on average 5 px away, object 2 never seen.
    d = torch.tensor([[[1.0, 2.0, float("inf")]], [[3.0, 8.0, float("inf")]]])
    metrics = tracking_error.objects_found(d, image_size=64)
    assert metrics == {"objects_found": 1.0, "keypoint_distance/object_0": 2.0, "keypoint_distance/object_1": 5.0,
                       "keypoint_distance/object_2": 64.0}


def test_no_dynamics_holds_the_last_observed_keypoints():
    observed = torch.rand(2, 3, 4, 3, generator=torch.Generator().manual_seed(4))
    held = tracking_error.no_dynamics(observed, 5)
    assert held.shape == (2, 5, 4, 3)
    assert all(torch.equal(held[:, t], observed[:, -1]) for t in range(5))


def test_null_error_per_step_averages_to_null_error():
    g = torch.Generator().manual_seed(5)
    train, test = torch.randn(10, 3, 2, 2, generator=g), torch.randn(4, 5, 2, 2, generator=g)
    per_step = tracking_error.null_error_per_step(train, test)
    expected = (test - train.reshape(-1, 2, 2).mean(0)).norm(dim=-1).mean(-1)
    torch.testing.assert_close(per_step, expected)
    assert abs(per_step.mean().item() - tracking_error.null_error(train, test)) < 1e-6


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
    frames = panel(video, video, video, observed=2, keypoints=keypoints[:, :2].expand(4, -1, -1), heatmap_size=4, scale=2)
    assert frames.shape == (4, 2 * 20, 2 * 4 * 20, 3)
    assert (frames[0, 0, 0] == [40, 200, 70]).all() and (frames[3, 0, 0] == [230, 45, 45]).all()
    from PIL import Image
    gif = Image.open(save_gif(frames, tmp_path / "x.gif"))
    assert gif.n_frames == 4
