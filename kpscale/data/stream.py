"""Stream clips from WebDataset shards into a training process: [B, T, C, H, W] float batches.

Splitting. Each epoch the shards are put in one order, the same on every rank (shuffled with
seed + epoch), which lays all M samples on one line. Rank r takes a contiguous range of that
line and DataLoader worker w a contiguous part of its rank's range; a range may start or end
inside a shard, and the reader skips the samples outside it. So every sample is read exactly
once per epoch. With `even=True` (training) each rank takes exactly floor(M / world) samples,
dropping fewer than `world` samples per epoch (different ones each epoch); every rank's worker
ranges then have the same sizes, hence the same number of batches, `len(loader)`. The loader
yields exactly `len(loader)` batches whatever happens: when corrupt samples leave a rank short,
it reads again from a new shuffle for the missing batches, so a collective step never waits on
a rank that ran out. With `resample=True` shards are drawn at random with replacement instead.

Corrupt data. An unreadable shard (missing, truncated tar) or sample (no mp4, undecodable mp4,
bad npy) is logged with its shard and key, skipped and counted; `loader.skipped` holds the counts.

Frame cache. With `cache` set, each clip's frames are decoded once per node into that folder and
later reads take their window from there (the same windows as decoding, draw for draw); the tar
sample is still read for its sidecars. `loader.cache_stats` counts hits and misses.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import io
import json
import logging
import multiprocessing
import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator, Literal
from urllib.parse import urlparse

import fsspec
import numpy as np
import torch
import webdataset as wds
from braceexpand import braceexpand
from pydantic import Field, field_validator, model_validator
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from kpscale.config import Config
from kpscale.data.shards import MANIFEST, SIDECARS, iter_tar, read_manifest
from kpscale.data.video import decode_mp4, decode_window, window_span

log = logging.getLogger(__name__)


@functools.cache
def reader_context() -> multiprocessing.context.BaseContext:
    """Reader processes come from a forkserver, not a fork of the trainer: a trainer (a Ray
    worker, a test session) runs gRPC and other threads, and a fork copies any lock one of them
    holds at that moment, leaving the reader blocked on it for good (seen in CI)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])  # each reader then starts without importing torch
    return context


class DataError(ValueError):
    """Data that cannot be streamed; the message names the path."""


class LoaderConfig(Config):
    batch_size: int = Field(16, ge=1)
    shuffle: bool = True
    shuffle_buffer: int = Field(256, ge=0)  # samples held to shuffle across shards; 0: none
    num_workers: int = Field(2, ge=0)  # DataLoader processes per rank; 0: read in the trainer
    resample: bool = False  # draw shards with replacement (infinite stream cut into epochs)
    epoch_samples: int | None = Field(None, ge=1)  # with resample: samples per rank per epoch
    even: bool = True  # the same number of batches on every rank (needed by training)
    drop_last: bool = True  # drop each worker's last partial batch
    decode_device: Literal["cpu", "cuda"] = "cpu"  # cuda: NVDEC, needs yuv420p shards
    random_window: bool = True  # False: each clip's frames from window_start on, the same every time (evaluation)
    window_start: int = Field(0, ge=0)  # with random_window False: the first frame of every window
    frames: bool = True  # False: batches of labels and sidecars only, no video decoded (a stage that trains on keypoints)
    seed: int = 0
    # A node-local folder (/dev/shm/kpscale, local NVMe) of decoded clips shared by the node's
    # readers, for nodes where decoding cannot keep up: T*3*H*W bytes per clip. None: decode always.
    cache: str | None = None

    @model_validator(mode="after")
    def _cuda_in_main(self) -> LoaderConfig:
        if self.decode_device == "cuda" and self.num_workers:
            raise ValueError("decode_device=cuda decodes in the training process: set num_workers=0")
        if self.decode_device == "cuda" and self.cache:
            raise ValueError("cache holds frames decoded on the CPU: use it with decode_device=cpu")
        return self


def _is_local(spec: str) -> bool:
    return not spec.startswith("pipe:") and urlparse(spec).scheme in ("", "file")


class DataConfig(LoaderConfig):
    train: str | None = None  # shard folder, glob, manifest, brace list or URL (s3://, gs://, pipe:)
    test: str | None = None
    # With train null: the shipped card (datasets/<card>.yaml) whose data, in data/<card>, is
    # used, built there first when missing.
    card: str = Field("basketball", pattern=r"^[A-Za-z0-9_-]+$")

    @field_validator("train", "test")
    @classmethod
    def _exists(cls, spec: str | None) -> str | None:
        if spec and _is_local(spec) and "{" not in spec:
            path = urlparse(spec).path if spec.startswith("file:") else spec
            if not (Path(path).exists() or glob.glob(path)):
                raise ValueError(f"no shards at {spec!r}: path does not exist")
        return spec


@dataclass(frozen=True)
class ShardRef:
    url: str
    count: int


def open_url(url: str) -> IO[bytes]:
    if url.startswith("pipe:"):
        return wds.gopen(url, "rb")
    if _is_local(url):
        return open(urlparse(url).path if url.startswith("file:") else url, "rb")
    return fsspec.open(url, "rb").open()  # s3://, gs://, ... with the matching fsspec package


def _count(url: str) -> int:
    with open_url(url) as f:
        return sum(1 for _ in iter_tar(f))


def _from_manifest(url: str, fs, path: str) -> list[ShardRef]:
    with fs.open(path, "rb") as f:
        table = read_manifest(f)
    counts = Counter(table.column("shard").to_pylist())
    base = url.rsplit("/", 1)[0] if "/" in url else "."
    return [ShardRef(f"{base}/{name}", n) for name, n in sorted(counts.items())]


def resolve_shards(spec: str) -> list[ShardRef]:
    """Shards and their sample counts for a folder, glob, manifest, brace list or URL.
    Counts come from the split's manifest; without one each shard is read once to count."""
    if spec.startswith("pipe:") or "{" in spec:
        urls = list(braceexpand(spec))
        refs = None
    else:
        fs, path = fsspec.core.url_to_fs(spec)
        local = _is_local(spec)
        name = (lambda p: p) if local else fs.unstrip_protocol
        if path.endswith(".parquet"):
            return _from_manifest(spec, fs, path)
        if fs.isdir(path):
            if fs.exists(f"{path}/{MANIFEST}"):
                return _from_manifest(name(f"{path}/{MANIFEST}"), fs, f"{path}/{MANIFEST}")
            urls = [name(p) for p in sorted(fs.glob(f"{path}/*.tar"))]
        elif glob.has_magic(path):
            urls = [name(p) for p in sorted(fs.glob(path))]
        else:
            urls = [name(path)] if fs.isfile(path) else []
        refs = _manifest_counts(urls, fs)
    if not urls:
        raise DataError(f"no shards found at {spec!r}")
    if refs is None:
        log.warning("no manifest for %s: reading %d shards to count their samples", spec, len(urls))
        refs = [ShardRef(u, _count(u)) for u in urls]
    return refs


def _manifest_counts(urls: list[str], fs) -> list[ShardRef] | None:
    """Counts for shards that all sit in one folder with a manifest listing them."""
    folders = {u.rsplit("/", 1)[0] for u in urls}
    if len(folders) != 1:
        return None
    manifest = f"{folders.pop()}/{MANIFEST}"
    path = fsspec.core.url_to_fs(manifest)[1]
    if not fs.exists(path):
        return None
    listed = {Path(r.url).name: r.count for r in _from_manifest(manifest, fs, path)}
    if not all(Path(u).name in listed for u in urls):
        return None
    return [ShardRef(u, listed[Path(u).name]) for u in urls]


def _part(lo: int, hi: int, parts: int, i: int) -> tuple[int, int]:
    return lo + (hi - lo) * i // parts, lo + (hi - lo) * (i + 1) // parts


def sample_range(total: int, rank: int, world: int, worker: int, workers: int, even: bool) -> tuple[int, int]:
    """The [lo, hi) slice of the epoch's sample line read by (rank, worker)."""
    if even:
        per_rank = total // world
        lo, hi = rank * per_rank, (rank + 1) * per_rank
    else:
        lo, hi = _part(0, total, world, rank)
    return _part(lo, hi, workers, worker)


def shard_order(shards: list[ShardRef], epoch: int, seed: int, shuffle: bool) -> list[ShardRef]:
    if not shuffle:
        return list(shards)
    order = np.random.default_rng([seed, epoch]).permutation(len(shards))
    return [shards[i] for i in order]


def plan_pieces(shards: list[ShardRef], lo: int, hi: int) -> list[tuple[ShardRef, int, int]]:
    """(shard, first, stop) sample-index pieces covering [lo, hi) of the shards laid end to end."""
    pieces, offset = [], 0
    for ref in shards:
        first, stop = max(lo - offset, 0), min(hi - offset, ref.count)
        if first < stop:
            pieces.append((ref, first, stop))
        offset += ref.count
    return pieces


def save_atomically(path: Path, array: np.ndarray) -> None:
    """Write an .npy that concurrent readers see whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class FrameCache:
    """Decoded clips, uint8 [T, C, H, W] .npy files in a folder that every reader on a node shares.
    A file is named by a digest of the clip's mp4 bytes: a changed shard's clips get new files, and
    identical clips share one. Counts hits and misses."""

    def __init__(self, folder: str):
        self.folder = Path(folder)
        self.counts: Counter = Counter()

    def window(self, mp4: bytes, window: int | None, rng, first: int = 0) -> tuple[torch.Tensor, int]:
        """decode_window's frames and start, with the same draw from rng."""
        clip = self._clip(mp4)
        start, window = window_span(len(clip), window, rng, first)
        return torch.from_numpy(np.array(clip[start:start + window])), start

    def _clip(self, mp4: bytes) -> np.ndarray:
        digest = hashlib.blake2b(mp4, digest_size=16).hexdigest()
        path = self.folder / digest[:2] / f"{digest}.npy"
        try:
            clip = np.load(path, mmap_mode="r", allow_pickle=False)
            if clip.dtype != np.uint8 or clip.ndim != 4 or clip.shape[1] != 3:
                raise ValueError(f"it holds {clip.dtype} {list(clip.shape)}, not uint8 [T, 3, H, W]")
            self.counts["hits"] += 1
            return clip
        except FileNotFoundError:
            pass
        except (OSError, ValueError, EOFError) as exc:  # truncated or foreign: decode it again
            log.warning("data.cache: replacing unreadable %s (%s)", path, exc)
        # torchcodec's frames are strided, and np.save writes a strided array ~15x slower
        clip = decode_mp4(mp4).contiguous().numpy()
        try:
            save_atomically(path, clip)
        except OSError as exc:  # e.g. a full /dev/shm: the decoded frames are still good
            log.warning("data.cache: cannot write %s (%s); reading on uncached", path, exc)
        self.counts["misses"] += 1
        return clip


def _decode(key: str, parts: dict[str, bytes], window: int | None, rng, device: str, frames: bool = True,
            first: int = 0, cache: FrameCache | None = None) -> dict:
    """One sample's frames and sidecars over a window: a random one when `rng` is given, else the
    one from frame `first`."""
    sidecars = {name: np.load(io.BytesIO(parts[f"{name}.npy"]), allow_pickle=False)
                for name in SIDECARS if f"{name}.npy" in parts}
    if frames:
        if "mp4" not in parts:
            raise DataError("sample has no mp4")
        video, start = (cache.window(parts["mp4"], window, rng, first) if cache
                        else decode_window(parts["mp4"], window, rng, device, first))
        sample = {"key": key, "start": start, "video": video.float().div_(255)}
        length, what = len(video), "the video"
    else:
        if not sidecars:
            raise DataError(f"sample has no sidecar ({', '.join(SIDECARS)}) to read without its frames")
        steps = min(len(a) for a in sidecars.values())
        length = steps - first if window is None else window
        if steps < first + length or length < 1:
            raise DataError(f"sample has {steps} steps, the window needs {first + length}")
        start = int(rng.integers(steps - length + 1)) if rng is not None else first
        sample, what = {"key": key, "start": start}, "the window"
    for name, array in sidecars.items():
        if array.shape[0] < start + length:
            raise DataError(f"{name}.npy has {array.shape[0]} steps, {what} more")
        sample[name] = torch.from_numpy(np.asarray(array[start:start + length], np.float32))
    meta = json.loads(parts["json"]) if "json" in parts else {}
    sample["label"] = str(meta.get("label", ""))
    return sample


def collate(samples: list[dict]) -> dict:
    batch = {"key": [s["key"] for s in samples], "label": [s["label"] for s in samples],
             "start": torch.tensor([s["start"] for s in samples])}
    for name in ("video", *SIDECARS):
        if all(name in s for s in samples):
            batch[name] = torch.stack([s[name] for s in samples])
    return batch


class ClipStream(IterableDataset):
    """One rank's share of an epoch, split again across DataLoader workers; yields batches."""

    def __init__(self, shards: list[ShardRef], cfg: LoaderConfig, window: int | None,
                 rank: int, world: int, epoch: int, attempt: int = 0):
        self.shards, self.cfg, self.window = shards, cfg, window
        self.rank, self.world, self.epoch, self.attempt = rank, world, epoch, attempt

    def _raw(self, rng, worker: int, workers: int) -> Iterator[tuple[str, str, dict]]:
        if self.cfg.resample:
            while True:
                ref = self.shards[rng.integers(len(self.shards))]
                yield from self._read(ref, 0, ref.count)
        order = shard_order(self.shards, self.epoch, self.cfg.seed, self.cfg.shuffle)
        lo, hi = sample_range(sum(r.count for r in order), self.rank, self.world, worker, workers, self.cfg.even)
        for ref, first, stop in plan_pieces(order, lo, hi):
            yield from self._read(ref, first, stop)

    def _read(self, ref: ShardRef, first: int, stop: int) -> Iterator[tuple[str, str, dict]]:
        try:
            with open_url(ref.url) as f:
                for i, (key, parts) in enumerate(iter_tar(f)):
                    if i >= stop:
                        return
                    if i >= first:
                        yield ref.url, key, parts
        except Exception as exc:  # missing, truncated, unreachable: whatever the storage raises
            log.warning("skipping the rest of shard %s: %s: %s", ref.url, type(exc).__name__, exc)
            self.skipped["shards"] += 1

    def _shuffled(self, raw, rng) -> Iterator[tuple[str, str, dict]]:
        size = self.cfg.shuffle_buffer if self.cfg.shuffle else 0
        buffer = []
        for item in raw:
            buffer.append(item)
            if len(buffer) > size:
                yield buffer.pop(rng.integers(len(buffer)))
        while buffer:
            yield buffer.pop(rng.integers(len(buffer)))

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rng = np.random.default_rng([self.cfg.seed, self.epoch, self.attempt, self.rank, worker])
        self.skipped = Counter()
        self.cache = FrameCache(self.cfg.cache) if self.cfg.cache and self.cfg.frames else None
        batch = []
        for url, key, parts in self._shuffled(self._raw(rng, worker, workers), rng):
            try:
                batch.append(_decode(key, parts, self.window, rng if self.cfg.random_window else None,
                                     self.cfg.decode_device, self.cfg.frames, self.cfg.window_start, self.cache))
            except Exception as exc:
                log.warning("skipping sample %s in shard %s: %s", key, url, exc)
                self.skipped["samples"] += 1
                continue
            if len(batch) == self.cfg.batch_size:
                yield {**collate(batch), **self._counts()}
                batch = []
        if batch and not self.cfg.drop_last:
            yield {**collate(batch), **self._counts()}
        counts = self._counts()
        if any(counts.values()):  # counts after the last batch still reach the loader
            yield counts

    def _counts(self) -> dict:
        """Skips and cache hits/misses since the last call, which the loader adds up."""
        counts = {"skipped": dict(self.skipped), "cache": dict(self.cache.counts) if self.cache else {}}
        self.skipped.clear()
        if self.cache:
            self.cache.counts.clear()
        return counts


class ClipLoader:
    """Batches of one rank, exactly `len(self)` per epoch. Each `iter()` is one epoch and moves
    to the next; `set_epoch` positions it (e.g. when a run resumes)."""

    def __init__(self, source: str | list[ShardRef], cfg: LoaderConfig, window: int | None = None,
                 rank: int | None = None, world_size: int | None = None):
        if cfg.decode_device == "cuda" and not torch.cuda.is_available():
            raise DataError("data.decode_device=cuda, but this process sees no CUDA device: "
                            "use data.decode_device=cpu")
        if cfg.cache:
            try:
                Path(cfg.cache).mkdir(parents=True, exist_ok=True)
                tempfile.TemporaryFile(dir=cfg.cache).close()
            except OSError as exc:
                raise DataError(f"data.cache={cfg.cache}: cannot write to this folder ({exc})") from None
        self.shards = resolve_shards(source) if isinstance(source, str) else list(source)
        self.source = source if isinstance(source, str) else f"{len(self.shards)} shards"
        self.cfg, self.window = cfg, window
        self.rank = int(os.environ.get("RANK", 0)) if rank is None else rank
        self.world = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is outside world size {self.world}")
        self.num_samples = sum(r.count for r in self.shards)
        self.epoch = 0
        self.skipped: Counter = Counter()
        self.cache_stats: Counter = Counter()  # data.cache hits and misses
        self.num_batches = self._batches()
        if self.num_batches == 0:
            raise DataError(f"{self.source}: {self.num_samples} clips give rank {self.rank} of {self.world} "
                            f"no batch of {cfg.batch_size} with {max(cfg.num_workers, 1)} reader workers")

    def _batches(self) -> int:
        workers, b = max(self.cfg.num_workers, 1), self.cfg.batch_size
        if self.cfg.resample:
            per_rank = self.cfg.epoch_samples or self.num_samples // self.world
            return per_rank // b if self.cfg.drop_last else -(-per_rank // b)
        sizes = [hi - lo for lo, hi in (sample_range(self.num_samples, self.rank, self.world, w, workers,
                                                     self.cfg.even) for w in range(workers))]
        return sum(n // b if self.cfg.drop_last else -(-n // b) for n in sizes)

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        produced, attempt = 0, 0
        while produced < self.num_batches:
            stream = ClipStream(self.shards, self.cfg, self.window, self.rank, self.world, epoch, attempt)
            loader = DataLoader(stream, batch_size=None, num_workers=self.cfg.num_workers,
                                multiprocessing_context=reader_context() if self.cfg.num_workers else None,
                                pin_memory=torch.cuda.is_available() and self.cfg.decode_device == "cpu")
            got = 0
            for batch in loader:
                self.skipped.update(batch.pop("skipped"))
                self.cache_stats.update(batch.pop("cache"))
                if "key" not in batch:  # only counts
                    continue
                got += 1
                produced += 1
                yield batch
                if produced == self.num_batches:
                    break
            if produced < self.num_batches:
                if got == 0:
                    raise DataError(f"{self.source}: no readable clips for rank {self.rank} "
                                    f"(skipped so far: {dict(self.skipped)})")
                if not self.cfg.even:  # no collective to keep in step: a short epoch is honest
                    log.warning("rank %d: epoch ends %d batches short after skipped clips",
                                self.rank, self.num_batches - produced)
                    return
                log.warning("rank %d: %d batches short after skipped clips; reading on from a new shuffle",
                            self.rank, self.num_batches - produced)
                attempt += 1
