"""Derived shard sets: the clips of a shard set with sidecars a trained model computes (Kim et
al.'s pseudo-labels: the detector's keypoints as coords), so a later training stage streams them
like any shards. Each sample keeps its mp4 bytes and label; its json records where it came from.

Written collectively: rank r derives the source shards r, r + world, ...; rank 0 then writes the
manifest and last `provenance.json`, whose presence says the set is complete. A set whose
provenance matches is reused (a resumed run), one that does not is written again.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import fsspec
import numpy as np
import torch
import torch.distributed as dist
import webdataset as wds

from kpscale.data.shards import MANIFEST, SIDECARS, iter_tar, manifest_row, npy_bytes, shard_name, write_manifest
from kpscale.data.stream import open_url, resolve_shards
from kpscale.data.video import decode_window

log = logging.getLogger(__name__)
PROVENANCE = "provenance.json"


def _derive_shard(url: str, out_fs, out_path: str, sidecars_of: Callable, provenance: dict) -> list[dict]:
    """One source shard -> one derived shard at `out_path` (through a temporary name); its manifest rows."""
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        local = os.path.join(folder, "shard.tar")
        with open(local, "wb") as f, wds.TarWriter(f, encoder=False, mtime=0) as tar, open_url(url) as source:
            for index, (key, parts) in enumerate(iter_tar(source)):
                if "mp4" not in parts:
                    raise ValueError(f"{url}: sample {key} has no mp4 to derive {provenance['name']} from")
                video, _ = decode_window(parts["mp4"], None, None)
                derived = sidecars_of(video.float().div_(255))
                unknown = sorted(set(derived) - set(SIDECARS))
                if unknown:
                    raise ValueError(f"derived sidecars {unknown} are not shard sidecars ({', '.join(SIDECARS)})")
                meta = json.loads(parts["json"]) if "json" in parts else {}
                meta.update({f"{name}_shape": list(array.shape) for name, array in derived.items()},
                            derived_from=f"{url}#{key}", derived=provenance["name"])
                sample = {k: v for k, v in parts.items() if k.removesuffix(".npy") not in derived}
                sample.update({f"{name}.npy": npy_bytes(array) for name, array in derived.items()},
                              json=json.dumps(meta, sort_keys=True).encode())
                tar.write({"__key__": key, **sample})
                rows.append(manifest_row(out_path.rsplit("/", 1)[-1], index, key, sample))
        out_fs.put_file(local, out_path + ".tmp")
        out_fs.mv(out_path + ".tmp", out_path)
    return rows


def derive_shards(source: str, out: str, sidecars_of: Callable[[torch.Tensor], dict[str, np.ndarray]],
                  provenance: dict, rank: int = 0, world: int = 1) -> str:
    """Write (or reuse) the derived set of `source`'s shards at `out`; returns `out`. Collective
    when `world` > 1 (every rank must call it). `provenance` (JSON; `name` required) identifies
    what derived it: the model's weights, its step, the source."""
    out = out.rstrip("/")
    fs, root = fsspec.core.url_to_fs(out)
    provenance = {**provenance, "source": source}
    path = f"{root}/{PROVENANCE}"
    existing = json.loads(fs.cat_file(path)) if fs.exists(path) else None
    if existing == provenance:
        log.info("%s: reusing the %s derived for this model at %s", provenance["name"], provenance["name"], out)
        return out
    if existing is not None and rank == 0:
        log.info("%s at %s were derived by another model or from other data: writing them again",
                 provenance["name"], out)
    collective = world > 1 and dist.is_available() and dist.is_initialized()
    if collective:
        dist.barrier()  # every rank has read the old provenance before rank 0 may replace it
    fs.makedirs(root, exist_ok=True)
    refs = resolve_shards(source)
    started, rows = time.perf_counter(), []
    mine = list(range(rank, len(refs), world))
    for done, i in enumerate(mine, 1):
        rows += _derive_shard(refs[i].url, fs, f"{root}/{shard_name(i)}", sidecars_of, provenance)
        if rank == 0:
            log.info("%s: shard %d of %d on rank 0 derived (%d shards on %d ranks, %.0f s)", provenance["name"],
                     done, len(mine), len(refs), world, time.perf_counter() - started)
    if collective:
        gathered = [None] * world
        dist.all_gather_object(gathered, rows)
        rows = [row for part in gathered for row in part]
    if rank == 0:
        rows.sort(key=lambda r: (r["shard"], r["index"]))
        with tempfile.TemporaryDirectory() as folder:
            fs.put_file(str(write_manifest(Path(folder), rows)), f"{root}/{MANIFEST}")
        fs.pipe_file(path, json.dumps(provenance, indent=1, sort_keys=True).encode())
        log.info("%s: %d clips in %d shards at %s (%.0f s)", provenance["name"], len(rows), len(refs), out,
                 time.perf_counter() - started)
    if collective:
        dist.barrier()
    return out
