import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from kpscale.config import ConfigError, load
from kpscale.data.build import build
from kpscale.data.card import DatasetCard
from kpscale.data.shards import iter_tar, read_manifest, scan_shard
from kpscale.data.video import decode_mp4
from conftest import CARD, ROOT, build_basketball


def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.tar"))}


def test_layout_manifest_and_samples(basketball):
    assert sorted(p.name for p in (basketball / "train").glob("*.tar")) == [
        "shard-000000.tar", "shard-000001.tar", "shard-000002.tar", "shard-000003.tar"]
    table = read_manifest(basketball / "train" / "manifest.parquet")
    rows = table.to_pylist()
    assert len(rows) == 50 and [r["index"] for r in rows[:3]] == [0, 1, 2]
    assert {(r["frames"], r["height"], r["width"], r["objects"]) for r in rows} == {(20, 64, 64, 6)}
    assert read_manifest(basketball / "test" / "manifest.parquet").num_rows == 10
    with open(basketball / "train" / "shard-000003.tar", "rb") as f:
        samples = list(iter_tar(f))
    assert [key for key, _ in samples] == ["train-0000048", "train-0000049"]
    key, parts = samples[0]
    assert set(parts) == {"mp4", "json", "coords.npy"}
    meta = json.loads(parts["json"])
    assert meta["dataset"] == "basketball" and meta["fps"] == 10 and meta["label"] == "basketball"
    assert meta["source"] == {"generator": "kpscale.basketball", "seed": 0, "split": "train", "index": 48}
    assert meta["coords_shape"] == [20, 6, 2]


@pytest.mark.slow
def test_build_is_deterministic_across_process_counts(basketball, tmp_path):
    again = tmp_path / "again"
    card = load(DatasetCard, CARD, ["splits.train=50", "splits.test=10", "clips_per_shard=16",
                                    "clip_length=20", "workers=2"])
    build(card, again, progress=False)
    assert _digests(again) == _digests(basketball)


def test_workers_0_under_ray_job_submit_builds_one_shard_per_cpu_of_the_cluster(basketball, tmp_path, monkeypatch,
                                                                                caplog):
    """With RAY_ADDRESS set (the session's head, as under `ray job submit`), workers=0 sizes the
    build by the cluster's CPUs, not by the cores of the machine that submitted it (one here)."""
    import logging

    import ray
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    card = load(DatasetCard, CARD, ["splits.train=50", "splits.test=10", "clips_per_shard=16",
                                    "clip_length=20", "workers=0"])
    with caplog.at_level(logging.INFO, "kpscale.data"):
        build(card, tmp_path / "out", progress=False)
    ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    cpus = int(ray.cluster_resources()["CPU"])
    ray.shutdown()
    assert f"the cluster has {cpus} CPUs: {min(cpus, 5)} Ray tasks at a time" in caplog.text, caplog.text
    assert _digests(tmp_path / "out") == _digests(basketball)


def test_other_card_in_same_folder_is_refused(basketball):
    card = load(DatasetCard, CARD, ["splits.train=50", "splits.test=10", "clips_per_shard=16", "clip_length=24"])
    with pytest.raises(ConfigError, match="clip_length"):
        build(card, basketball, progress=False)


@pytest.mark.slow
def test_interrupted_build_leaves_no_shard_that_looks_whole(tmp_path):
    out = tmp_path / "ds"
    overrides = ["splits.train=60", "splits.test=0", "clips_per_shard=10", "clip_length=16", "workers=2"]
    cmd = [sys.executable, "-m", "kpscale.data", "build", str(CARD), "--out", str(out), "--quiet", *overrides]
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((out / "train").glob("*.tar")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the build and its worker processes, mid-shard
    proc.wait()
    shards = sorted((out / "train").glob("*.tar"))
    assert 1 <= len(shards) < 6, "the build should have been stopped part way"
    assert not (out / "train" / "manifest.parquet").exists()
    for shard in shards:
        assert len(scan_shard(shard)) == 10, f"{shard.name} looks whole but is not"
    # Running the same command again completes the dataset, identical to an uninterrupted build.
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert not [p for p in (out / "train").iterdir() if ".tmp" in p.name]
    clean = build_basketball(tmp_path / "clean", *overrides)
    assert _digests(out) == _digests(clean)
    assert read_manifest(out / "train" / "manifest.parquet").num_rows == 60


def test_coordinates_match_rendered_dots(basketball):
    """Stored coords are the pixel positions of the dots: the red player's centroid agrees."""
    with open(basketball / "test" / "shard-000000.tar", "rb") as f:
        _, parts = next(iter_tar(f))
    frames = decode_mp4(parts["mp4"]).numpy().astype(float)
    coords = np.load(io.BytesIO(parts["coords.npy"]))
    # Player 0 is red (230, 45, 45) on a court (92, 68, 48): redness is its coverage of a pixel.
    weight = np.clip((frames[:, 0] - frames[:, 1:].max(1) - 24) / 161, 0, 1)
    ys, xs = np.mgrid[0:64, 0:64] + 0.5
    checked = 0
    for t in range(len(frames)):
        others = np.linalg.norm(coords[t, 1:] - coords[t, 0], axis=1)
        if others.min() < 9:  # another dot may overlap
            continue
        near = weight[t] * (np.hypot(xs - coords[t, 0, 0], ys - coords[t, 0, 1]) < 5)
        centroid = np.array([(xs * near).sum(), (ys * near).sum()]) / near.sum()
        assert np.abs(centroid - coords[t, 0]).max() < 0.3, f"frame {t}"
        checked += 1
    assert checked >= 5
