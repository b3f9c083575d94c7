import numpy as np
import pyarrow as pa
import pytest
import torch

from kpscale.evaluate.media import keypoint_pixels
from kpscale.evaluate.trajectories import SCHEMA, read_trajectories, trajectory_table, write_trajectories


def test_trajectories_round_trip_through_parquet(tmp_path):
    g = torch.Generator().manual_seed(0)
    b, s, t, k, observed = 2, 3, 5, 4, 2
    batches = [torch.rand(b, s, t, k, 3, generator=g) * 2 - 1 for _ in range(2)]  # two evaluation batches
    ids = [["a", "b"], ["c", "d"]]
    tables = [trajectory_table(i, kp, observed, image_size=64, heatmap_size=16) for i, kp in zip(ids, batches)]
    table = read_trajectories(write_trajectories(tables, tmp_path / "trajectories.parquet"))
    assert table.schema == SCHEMA and table.num_rows == 2 * b * s * t * k
    assert table.equals(pa.concat_tables(tables))

    keypoints = torch.cat(batches)
    shape = keypoints.shape[:-1]

    def column(name: str) -> np.ndarray:
        return table[name].to_numpy().reshape(shape)

    assert (column("clip") == np.array(["a", "b", "c", "d"])[:, None, None, None]).all()
    assert (column("sample") == np.arange(s)[:, None, None]).all()
    assert (column("frame") == np.arange(t)[:, None]).all()
    assert (column("keypoint") == np.arange(k)).all()
    assert (column("observed") == (np.arange(t) < observed)[:, None]).all()
    assert column("observed").sum() == 2 * b * s * observed * k
    for i, name in enumerate(["x", "y", "mu"]):
        np.testing.assert_array_equal(column(name), keypoints[..., i].numpy())
    pixels = keypoint_pixels(keypoints, heatmap_size=16, image_size=64)
    np.testing.assert_array_equal(column("x_px"), pixels[..., 0])
    np.testing.assert_array_equal(column("y_px"), pixels[..., 1])


def test_trajectory_table_needs_an_id_per_clip():
    with pytest.raises(ValueError, match="2 clip ids for 3 clips"):
        trajectory_table(["a", "b"], torch.zeros(3, 1, 2, 1, 3), observed=1, image_size=64, heatmap_size=16)
