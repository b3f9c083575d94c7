"""Keypoint trajectories as one Parquet file, one row per (clip, sample, frame, keypoint), so they
can be analysed outside kpscale (pandas, polars, DuckDB) without torch or the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from torch import Tensor

from kpscale.evaluate.media import keypoint_pixels

SCHEMA = pa.schema([
    ("clip", pa.string()), ("sample", pa.int32()), ("frame", pa.int32()), ("keypoint", pa.int32()),
    ("observed", pa.bool_()), ("x", pa.float32()), ("y", pa.float32()), ("mu", pa.float32()),
    ("x_px", pa.float32()), ("y_px", pa.float32()),
])


def trajectory_table(clip_ids: list[str], keypoints: Tensor, observed: int, image_size: int,
                     heatmap_size: int) -> pa.Table:
    """Keypoints [B, S, T, K, 3] of clips `clip_ids` -> a table in SCHEMA, rows ordered by
    (clip, sample, frame, keypoint). x, y are the model's [-1, 1] with y up; x_px, y_px are image
    pixels (x right, y down, origin at the top-left corner), as `keypoint_pixels` draws them.

    Every sample carries all T frames, the observed ones (frame < observed) included, so each
    (clip, sample) is a complete trajectory. Where the observed frames come from the detector they
    are the same in every sample and are repeated; filter `observed & (sample == 0)` for one copy.
    (`StructVRNN.sample_future` gives the VRNN's posterior samples there, which differ per sample.)"""
    b, s, t, k, _ = keypoints.shape
    if len(clip_ids) != b:
        raise ValueError(f"{len(clip_ids)} clip ids for {b} clips")
    clip, sample, frame, keypoint = np.indices((b, s, t, k), dtype=np.int32).reshape(4, -1)
    x, y, mu = keypoints.detach().float().cpu().numpy().reshape(-1, 3).T
    x_px, y_px = keypoint_pixels(keypoints.detach(), heatmap_size, image_size).reshape(-1, 2).T
    ids = pa.array(clip_ids, pa.string()).take(pa.array(clip))
    columns = (sample, frame, keypoint, frame < observed, x, y, mu, x_px, y_px)
    return pa.Table.from_arrays([ids, *(pa.array(c) for c in columns)], schema=SCHEMA)


def write_trajectories(tables: list[pa.Table], path: str | Path) -> Path:
    """One zstd-compressed Parquet file from the tables evaluation produces, one per batch."""
    pq.write_table(pa.concat_tables(tables), path, compression="zstd")
    return Path(path)


def read_trajectories(path: str | Path) -> pa.Table:
    return pq.read_table(path)
