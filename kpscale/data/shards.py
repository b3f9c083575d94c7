"""WebDataset shard format: one sample per clip, written atomically, indexed by a Parquet manifest.

A sample `KEY` is the tar members `KEY.mp4` (H.264), `KEY.json` (dataset, fps, label, shape,
provenance) and, where the source has them, `KEY.coords.npy` [T,N,2] (pixels, x right, y down,
origin at the top-left image corner), `KEY.actions.npy` [T,A] and `KEY.rewards.npy` [T].
Each split is a folder of `shard-NNNNNN.tar` plus `manifest.parquet` with one row per sample.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import webdataset as wds

from kpscale.data.card import Encoding
from kpscale.data.video import encode_mp4

MANIFEST = "manifest.parquet"
SIDECARS = ("coords", "actions", "rewards")
MANIFEST_SCHEMA = pa.schema([
    ("shard", pa.string()), ("key", pa.string()), ("index", pa.int32()),
    ("frames", pa.int32()), ("height", pa.int32()), ("width", pa.int32()),
    ("objects", pa.int32()), ("action_dim", pa.int32()), ("label", pa.string()),
    ("bytes", pa.int64()),
])


@dataclass
class Clip:
    key: str
    frames: torch.Tensor  # uint8 [T, 3, H, W]
    fps: float
    meta: dict = field(default_factory=dict)  # label, provenance
    coords: np.ndarray | None = None
    actions: np.ndarray | None = None
    rewards: np.ndarray | None = None


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


def read_actions(path: str, what: str = "actions") -> np.ndarray:
    """Actions float32 [T, A] from an .npy (a clip's actions.npy, or a user's); ValueError naming
    `what` and the file otherwise."""
    try:
        actions = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{what} {path}: not a readable .npy ({exc})") from None
    if actions.ndim != 2 or not np.issubdtype(actions.dtype, np.number):
        raise ValueError(f"{what} {path}: expected numbers of shape [T, A], got {actions.dtype} {list(actions.shape)}")
    return actions.astype(np.float32)


def encode_sample(clip: Clip, dataset: str, enc: Encoding) -> dict[str, bytes | str]:
    t, c, h, w = clip.frames.shape
    meta = {"dataset": dataset, "fps": clip.fps, "frames": t, "height": h, "width": w, **clip.meta}
    sample: dict[str, bytes | str] = {"__key__": clip.key, "mp4": encode_mp4(clip.frames, clip.fps, enc)}
    for name in SIDECARS:
        value = getattr(clip, name)
        if value is not None:
            sample[f"{name}.npy"] = npy_bytes(value)
            meta[name + "_shape"] = list(value.shape)
    sample["json"] = json.dumps(meta, sort_keys=True).encode()
    return sample


def write_shard(path: Path, clips: Iterator[Clip], dataset: str, enc: Encoding) -> list[dict]:
    """Write clips to `path` through a temporary name, so a killed build never leaves a
    shard that looks complete. Returns the manifest rows."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f, wds.TarWriter(f, encoder=False, mtime=0) as tar:
            for clip in clips:
                tar.write(encode_sample(clip, dataset, enc))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return scan_shard(path)


def iter_tar(stream: IO[bytes]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample, in tar order (the WebDataset convention: members
    sharing the part of the name before the first dot form one sample). A truncated or
    corrupt tar raises tarfile.TarError after the samples it read whole."""
    key, parts = None, {}
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            if not member.isreg():
                continue
            base = member.name.rsplit("/", 1)[-1]
            stem, _, ext = base.partition(".")
            if stem != key:
                if key is not None:
                    yield key, parts
                key, parts = stem, {}
            parts[ext] = tar.extractfile(member).read()
    if key is not None:
        yield key, parts


def manifest_row(shard: str, index: int, key: str, parts: dict[str, bytes]) -> dict:
    meta = json.loads(parts["json"])
    return {
        "shard": shard, "key": key, "index": index, "frames": meta["frames"],
        "height": meta["height"], "width": meta["width"],
        "objects": meta.get("coords_shape", [0, 0])[1], "action_dim": meta.get("actions_shape", [0, 0])[1],
        "label": meta.get("label"), "bytes": sum(len(v) for v in parts.values()),
    }


def scan_shard(path: Path) -> list[dict]:
    """Manifest rows of one shard, read from the shard itself."""
    with open(path, "rb") as f:
        return [manifest_row(path.name, i, key, parts) for i, (key, parts) in enumerate(iter_tar(f))]


def write_manifest(split_dir: Path, rows: list[dict]) -> Path:
    path = split_dir / MANIFEST
    tmp = path.with_name(MANIFEST + ".tmp")
    pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), tmp)
    os.replace(tmp, path)
    return path


def read_manifest(source) -> pa.Table:
    table = pq.read_table(source)
    missing = set(MANIFEST_SCHEMA.names) - set(table.column_names)
    if missing:
        raise ValueError(f"{source}: not a kpscale manifest (missing columns {sorted(missing)})")
    return table
