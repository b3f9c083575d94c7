import io
import os
import re
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch

from kpscale.data.shards import iter_tar, read_manifest
from kpscale.data.stream import (ClipLoader, DataError, LoaderConfig, ShardRef, plan_pieces,
                                 resolve_shards, sample_range, shard_order)
from conftest import ROOT


def keys_of(loader) -> list[str]:
    return [k for batch in loader for k in batch["key"]]


def all_keys(root: Path, split="train") -> list[str]:
    return read_manifest(root / split / "manifest.parquet").column("key").to_pylist()


@pytest.mark.parametrize("counts", [[16, 16, 16, 2], [1], [5, 0, 7, 3, 11], [100]])
@pytest.mark.parametrize("world, workers", [(1, 1), (2, 3), (3, 2), (4, 1)])
@pytest.mark.parametrize("even", [False, True])
def test_plan_reads_each_sample_at_most_once(counts, world, workers, even):
    shards = [ShardRef(f"s{i}", n) for i, n in enumerate(counts)]
    total = sum(counts)
    for epoch in range(2):
        order = shard_order(shards, epoch, seed=3, shuffle=True)
        seen, per_rank = Counter(), []
        for rank in range(world):
            n = 0
            for worker in range(workers):
                lo, hi = sample_range(total, rank, world, worker, workers, even)
                for ref, first, stop in plan_pieces(order, lo, hi):
                    seen.update((ref.url, i) for i in range(first, stop))
                    n += stop - first
            per_rank.append(n)
        assert max(seen.values(), default=1) == 1
        if even:
            assert per_rank == [total // world] * world
        else:
            assert len(seen) == total  # every sample, exactly once


def test_loader_shapes_and_sidecars(basketball):
    loader = ClipLoader(str(basketball / "train"), LoaderConfig(batch_size=4, num_workers=0), window=8)
    batch = next(iter(loader))
    assert batch["video"].shape == (4, 8, 3, 64, 64) and batch["video"].dtype == torch.float32
    assert 0 <= batch["video"].min() and batch["video"].max() <= 1
    assert batch["coords"].shape == (4, 8, 6, 2) and batch["label"] == ["basketball"] * 4
    assert ((0 <= batch["start"]) & (batch["start"] <= 20 - 8)).all()


def test_window_crops_the_sidecars_with_the_frames(basketball):
    full = ClipLoader(str(basketball / "test"), LoaderConfig(batch_size=10, num_workers=0, shuffle=False))
    part = ClipLoader(str(basketball / "test"), LoaderConfig(batch_size=10, num_workers=0, shuffle=False), window=5)
    a, b = next(iter(full)), next(iter(part))
    assert a["key"] == b["key"]
    for i, s in enumerate(b["start"].tolist()):
        torch.testing.assert_close(b["coords"][i], a["coords"][i, s:s + 5])
        torch.testing.assert_close(b["video"][i], a["video"][i, s:s + 5])


@pytest.mark.parametrize("frames", [True, False])
def test_a_fixed_window_starts_where_it_is_told(basketball, frames):
    """Evaluation's windows (random_window False) start at window_start in every clip, with the
    frames and without them (a stage that reads only sidecars); one that does not fit is skipped."""
    fixed = dict(batch_size=10, num_workers=0, shuffle=False, random_window=False)
    full = next(iter(ClipLoader(str(basketball / "test"), LoaderConfig(**fixed))))
    part = next(iter(ClipLoader(str(basketball / "test"), LoaderConfig(**fixed, window_start=12, frames=frames),
                                window=5)))
    assert part["key"] == full["key"] and part["start"].tolist() == [12] * 10
    torch.testing.assert_close(part["coords"], full["coords"][:, 12:17])
    if frames:
        torch.testing.assert_close(part["video"], full["video"][:, 12:17])
    late = ClipLoader(str(basketball / "test"), LoaderConfig(**fixed, window_start=18, frames=frames), window=5)
    with pytest.raises(DataError, match="no readable clips"):  # 20-frame clips: frames 18-22 do not exist
        next(iter(late))


def test_ranks_and_workers_cover_every_sample_exactly_once(basketball):
    cfg = LoaderConfig(batch_size=3, num_workers=2, even=False, drop_last=False, shuffle_buffer=8)
    keys = [k for rank in range(3) for k in keys_of(ClipLoader(str(basketball / "train"), cfg, 4, rank, 3))]
    assert sorted(keys) == sorted(all_keys(basketball)) and len(keys) == 50


def test_epochs_reshuffle_across_ranks(basketball):
    cfg = LoaderConfig(batch_size=5, num_workers=0, even=True)
    loader = ClipLoader(str(basketball / "train"), cfg, 4, rank=0, world_size=2)
    first, second = set(keys_of(loader)), set(keys_of(loader))
    assert loader.epoch == 2 and len(first) == len(second) == 25 and first != second


def test_uneven_shards_give_every_rank_the_same_batch_count(basketball):
    cfg = LoaderConfig(batch_size=4, num_workers=2, even=True)
    loaders = [ClipLoader(str(basketball / "train"), cfg, 4, rank, 3) for rank in range(3)]
    assert {len(ld) for ld in loaders} == {len(loaders[0])}
    counts = [sum(1 for _ in ld) for ld in loaders]
    assert counts == [len(loaders[0])] * 3  # 50 clips / 3 ranks = 16 each = 2 workers x 8 = 2 x 2 batches


DIST_STEP = """
import os, sys, datetime, torch, torch.distributed as dist
from kpscale.data.stream import ClipLoader, LoaderConfig
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
loader = ClipLoader(sys.argv[1], LoaderConfig(batch_size=3, num_workers=2), window=4)
steps = 0
for epoch in range(2):
    for batch in loader:
        total = torch.tensor(float(batch["video"].shape[0]))
        dist.all_reduce(total)  # a collective step: hangs if one rank runs out early
        steps += 1
print("steps", steps, flush=True)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_collective_steps_do_not_hang_on_uneven_shards(basketball, tmp_path):
    # Shards of 16, 16, 16 and 2 clips over 3 ranks: a shard-per-rank split would leave one
    # rank with 18 clips and the others with 16.
    env = {**os.environ, "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533",
           "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", DIST_STEP, str(basketball / "train")],
                              env={**env, "RANK": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(3)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [e[-2000:] for _, e in outs]
    steps = {out.strip().splitlines()[-1] for out, _ in outs}
    assert steps == {"steps 8"}  # 16 clips per rank, 2 workers x 8 clips, 2 batches of 3 each, 2 epochs


def _rewrite_tar(path: Path, edit) -> None:
    with open(path, "rb") as f:
        samples = list(iter_tar(f))
    with tarfile.open(path, "w") as tar:
        for key, parts in samples:
            for ext, data in edit(key, dict(parts)).items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_corrupt_shards_and_clips_are_skipped_and_counted(basketball_copy, caplog):
    train = basketball_copy / "train"
    good = set(all_keys(basketball_copy))
    # A truncated shard: the clips read whole before the cut still arrive.
    shard0 = train / "shard-000000.tar"
    with open(shard0, "rb") as f:
        keys0 = [k for k, _ in iter_tar(f)]
    data = shard0.read_bytes()
    shard0.write_bytes(data[: len(data) // 2])
    with open(shard0, "rb") as f:
        survivors = []
        try:
            for k, _ in iter_tar(f):
                survivors.append(k)
        except tarfile.TarError:
            pass
    good -= set(keys0[len(survivors) - 1:])  # the last one read may be cut too
    # An undecodable mp4 and a bad npy in another shard.
    _rewrite_tar(train / "shard-000001.tar", lambda key, parts: {
        **parts, **({"mp4": b"\x00\x00\x00\x18ftypisom" + os.urandom(500)} if key == "train-0000020" else {}),
        **({"coords.npy": b"not an npy"} if key == "train-0000021" else {})})
    good -= {"train-0000020", "train-0000021"}
    # A shard listed in the manifest but gone from the folder.
    (train / "shard-000002.tar").unlink()
    good -= {f"train-{i:07d}" for i in range(32, 48)}

    cfg = LoaderConfig(batch_size=1, num_workers=0, even=False, drop_last=False)
    loader = ClipLoader(str(train), cfg, window=4)
    keys = keys_of(loader)
    assert good <= set(keys) and len(keys) == len(set(keys))  # every good clip arrives, once
    assert not set(keys) & {"train-0000020", "train-0000021"}
    assert loader.skipped == {"samples": 2, "shards": 2}
    # The same through two reader processes: their counts reach the trainer's loader.
    parallel = ClipLoader(str(train), cfg.model_copy(update={"num_workers": 2}), window=4)
    assert good <= set(keys_of(parallel)) and parallel.skipped["samples"] == 2
    assert "train-0000020" in caplog.text and "shard-000001.tar" in caplog.text


def test_batch_count_holds_when_clips_are_skipped(basketball_copy):
    train = basketball_copy / "train"
    bad = {f"train-{i:07d}" for i in range(0, 12)}
    _rewrite_tar(train / "shard-000000.tar",
                 lambda key, parts: {**parts, **({"mp4": b"garbage"} if key in bad else {})})
    for rank in range(2):
        loader = ClipLoader(str(train), LoaderConfig(batch_size=4, num_workers=0, shuffle=False), 4, rank, 2)
        assert sum(1 for _ in loader) == len(loader) == 6


def test_resampled_stream_gives_fixed_epochs(basketball):
    cfg = LoaderConfig(batch_size=4, num_workers=2, resample=True, epoch_samples=40)
    loader = ClipLoader(str(basketball / "train"), cfg, 4)
    assert len(loader) == 10 and sum(1 for _ in loader) == 10


def test_sources_folder_glob_manifest_pipe_and_fsspec(basketball):
    train = basketball / "train"
    expected = [(f"shard-{i:06d}.tar", n) for i, n in enumerate([16, 16, 16, 2])]
    names = lambda refs: [(Path(r.url).name, r.count) for r in refs]
    assert names(resolve_shards(str(train))) == expected
    assert names(resolve_shards(str(train / "shard-*.tar"))) == expected
    assert names(resolve_shards(str(train / "manifest.parquet"))) == expected
    assert names(resolve_shards(f"file://{train}/shard-*.tar")) == expected
    pipe = f"pipe:cat {train}/shard-{{000000..000003}}.tar"  # counted by reading
    assert [r.count for r in resolve_shards(pipe)] == [16, 16, 16, 2]
    cfg = LoaderConfig(batch_size=5, num_workers=0, even=False, drop_last=False)
    assert sorted(keys_of(ClipLoader(pipe, cfg, 4))) == sorted(all_keys(basketball))
    # An object store through fsspec (its in-memory filesystem stands in for s3:// or gs://).
    fs = fsspec.filesystem("memory")
    for p in train.iterdir():
        fs.pipe(f"/bucket/train/{p.name}", p.read_bytes())
    refs = resolve_shards("memory://bucket/train")
    assert names(refs) == expected and refs[0].url.startswith("memory://")
    assert sorted(keys_of(ClipLoader("memory://bucket/train", cfg, 4))) == sorted(all_keys(basketball))


def test_clear_errors(basketball, tmp_path):
    with pytest.raises(DataError, match="no shards found"):
        resolve_shards(str(tmp_path / "nothing-*.tar"))
    with pytest.raises(DataError, match="no batch of 64"):
        ClipLoader(str(basketball / "test"), LoaderConfig(batch_size=64), 4)
    with pytest.raises(ValueError, match="outside world size"):
        ClipLoader(str(basketball / "test"), LoaderConfig(batch_size=1), 4, rank=2, world_size=2)


def assert_same_bytes(expected: list[dict], got: list[dict]) -> None:
    assert len(got) == len(expected) > 0
    for a, b in zip(expected, got):
        assert a["key"] == b["key"] and a["start"].tolist() == b["start"].tolist()
        for name in ("video", "coords"):
            assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape
            assert a[name].numpy().tobytes() == b[name].contiguous().numpy().tobytes(), name


@pytest.mark.parametrize("window, how", [(8, {}), (None, {"random_window": False, "window_start": 3})])
def test_cached_frames_give_the_same_batches_byte_for_byte(basketball, tmp_path, window, how):
    """Random windows (the same draws as decoding) and fixed ones, from a cold and then a warm cache."""
    cfg = LoaderConfig(batch_size=5, num_workers=0, **how)
    plain = ClipLoader(str(basketball / "train"), cfg, window)
    cached = ClipLoader(str(basketball / "train"), cfg.model_copy(update={"cache": str(tmp_path / "cache")}), window)
    for epoch, stats in enumerate([{"misses": 50}, {"misses": 50, "hits": 50}]):
        assert_same_bytes(list(plain), list(cached))
        assert cached.cache_stats == stats, epoch
    assert plain.cache_stats == {}


def test_every_reader_on_a_node_shares_the_cache(basketball, tmp_path):
    """Two reader processes: the first epoch decodes each clip once, the second decodes none."""
    cache = tmp_path / "cache"
    loader = ClipLoader(str(basketball / "train"), LoaderConfig(batch_size=5, num_workers=2, cache=str(cache)), 4)
    assert len(keys_of(loader)) == 50 and loader.cache_stats == {"misses": 50}
    assert len(keys_of(loader)) == 50 and loader.cache_stats == {"misses": 50, "hits": 50}
    files = sorted(p.relative_to(cache) for p in cache.rglob("*") if p.is_file())
    assert len(files) == 50 and all(p.suffix == ".npy" and p.parent.name == p.name[:2] for p in files)


def test_a_damaged_cache_file_is_decoded_again(basketball, tmp_path, caplog):
    cfg = LoaderConfig(batch_size=5, num_workers=0, cache=str(tmp_path / "cache"))
    expected = list(ClipLoader(str(basketball / "test"), cfg.model_copy(update={"cache": None}), 8))
    cached = ClipLoader(str(basketball / "test"), cfg, 8)
    assert_same_bytes(expected, list(cached))
    truncated, foreign = sorted((tmp_path / "cache").rglob("*.npy"))[:2]
    whole = truncated.read_bytes()
    truncated.write_bytes(whole[: len(whole) // 2])
    np.save(foreign, np.zeros((20, 64, 64, 3), np.uint8))  # a valid .npy, but not frames [T, 3, H, W]
    caplog.clear()
    cached.set_epoch(0)
    assert_same_bytes(expected, list(cached))
    assert cached.cache_stats == {"misses": 12, "hits": 8}
    assert caplog.text.count(str(truncated)) == 1 and caplog.text.count(str(foreign)) == 1
    assert truncated.read_bytes() == whole and np.load(foreign).shape == (20, 3, 64, 64)


def test_a_full_cache_folder_reads_on_uncached(basketball, tmp_path, caplog):
    cache = tmp_path / "cache"
    cache.mkdir()
    for i in range(256):  # every clip's subfolder name taken by a file: no clip can be written
        (cache / f"{i:02x}").touch()
    cfg = LoaderConfig(batch_size=5, num_workers=0, shuffle=False)
    cached = ClipLoader(str(basketball / "test"), cfg.model_copy(update={"cache": str(cache)}), 8)
    assert_same_bytes(list(ClipLoader(str(basketball / "test"), cfg, 8)), list(cached))
    assert cached.cache_stats == {"misses": 10} and cached.skipped == {}
    assert caplog.text.count("data.cache: cannot write") == 10 and not list(cache.rglob("*.npy"))


def test_cache_and_gpu_decoding_refusals(basketball, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.touch()
    with pytest.raises(DataError, match=re.escape(f"data.cache={blocker}/cache: cannot write")):
        ClipLoader(str(basketball / "test"), LoaderConfig(batch_size=5, cache=str(blocker / "cache")), 8)
    with pytest.raises(ValueError, match="use it with decode_device=cpu"):
        LoaderConfig(decode_device="cuda", num_workers=0, cache=str(tmp_path))
    if not torch.cuda.is_available():
        with pytest.raises(DataError, match="data.decode_device=cuda, but this process sees no CUDA device: "
                                            "use data.decode_device=cpu"):
            ClipLoader(str(basketball / "test"), LoaderConfig(batch_size=5, num_workers=0, decode_device="cuda"), 8)
