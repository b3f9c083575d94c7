"""python -m kpscale.data convert: videos of several containers and frame folders become shards,
with coordinates transformed exactly like the frames."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from kpscale.config import ConfigError, load
from kpscale.data.build import build
from kpscale.data.card import DatasetCard
from kpscale.data.shards import read_manifest
from kpscale.data.sources import SourceError
from kpscale.data.stream import ClipLoader, LoaderConfig
from conftest import ROOT


def blob_video(frames: int, height: int, width: int, seed: int):
    """A bright Gaussian dot wandering over a dark frame, and its centre in pixel coordinates."""
    rng = np.random.default_rng(seed)
    centre = np.array([width / 2, height / 2]) + np.cumsum(rng.normal(scale=1.5, size=(frames, 2)), 0)
    centre = np.clip(centre, 12, [width - 12, height - 12])
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    d2 = (xs[None] - centre[:, 0, None, None]) ** 2 + (ys[None] - centre[:, 1, None, None]) ** 2
    video = (230 * np.exp(-d2 / (2 * 2.5**2)) + 10).astype(np.uint8)
    return np.repeat(video[..., None], 3, axis=-1), centre[:, None, :].astype(np.float32)


def ffmpeg_write(path, video, codec: list[str]):
    t, h, w, _ = video.shape
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}",
                    "-r", "10", "-i", "-", *codec, str(path)], input=video.tobytes(), check=True)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    (root / "walk").mkdir()
    (root / "run").mkdir()
    specs = {"walk/a.mp4": (20, 64, 96, ["-c:v", "libx264", "-pix_fmt", "yuv444p", "-crf", "4"]),
             "run/b.avi": (20, 80, 64, ["-c:v", "mpeg4", "-q:v", "1"]),
             "run/c.webm": (16, 64, 64, ["-c:v", "libvpx-vp9", "-lossless", "1"])}
    truth = {}
    for i, (rel, (t, h, w, codec)) in enumerate(specs.items()):
        video, coords = blob_video(t, h, w, i)
        ffmpeg_write(root / rel, video, codec)
        stem = (root / rel).with_suffix("")
        np.savez(f"{stem}.npz", coords=coords, actions=np.arange(t * 2, dtype=np.float32).reshape(t, 2))
        truth[rel] = coords
    (root / "walk" / "a.json").write_text(json.dumps({"label": "walking", "split": "test"}))
    (root / "run" / "b.json").write_text(json.dumps({"label": "running"}))
    # A folder of frames, with its sidecars beside it.
    video, coords = blob_video(12, 72, 64, 7)
    (root / "walk" / "d").mkdir()
    for j, frame in enumerate(video):
        Image.fromarray(frame).save(root / "walk" / "d" / f"{j:04d}.png")
    np.savez(root / "walk" / "d.npz", coords=coords, actions=np.zeros((12, 2), np.float32))
    truth["walk/d"] = coords
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(300))
    return root, truth


def _centroid(frame: np.ndarray, near: np.ndarray) -> np.ndarray:
    gray = frame.mean(0) - 10
    size = frame.shape[-1]
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    weight = np.clip(gray, 0, None) * (np.hypot(xs - near[0], ys - near[1]) < 8)
    return np.array([(xs * weight).sum(), (ys * weight).sum()]) / weight.sum()


@pytest.mark.parametrize("fit", ["crop", "resize"])
def test_convert_keeps_coordinates_on_the_objects(videos, tmp_path, fit):
    root, _ = videos
    card = load(DatasetCard, None, ["resolution=32", "clip_length=8", f"folder.fit={fit}", "workers=1"],
                base={"name": "blobs", "source": "folder"})
    summary = build(card, tmp_path / "out", root=root, progress=False)
    assert summary["skipped_inputs"] == ["broken.mp4"]
    # a: 20 frames -> 2 clips (pinned to test); b: 2; c: 2; d: 12 frames -> 1.
    assert summary["splits"]["test"]["clips"] + summary["splits"]["train"]["clips"] == 7
    assert summary["splits"]["test"]["clips"] >= 2
    rows = [r for split in ("train", "test") for r in read_manifest(tmp_path / "out" / split / "manifest.parquet").to_pylist()]
    assert {(r["frames"], r["height"], r["width"], r["objects"], r["action_dim"]) for r in rows} == {(8, 32, 32, 1, 2)}
    labels = {r["key"].split("-")[0]: r["label"] for r in rows}
    assert labels["walk_a_mp4"] == "walking" and labels["run_b_avi"] == "running" and labels["run_c_webm"] is None
    checked = 0
    for split in ("train", "test"):
        cfg = LoaderConfig(batch_size=1, num_workers=0, shuffle=False, even=False, drop_last=False)
        for batch in ClipLoader(str(tmp_path / "out" / split), cfg):
            video, coords = batch["video"][0].numpy() * 255, batch["coords"][0].numpy()
            for t in range(len(video)):
                error = np.abs(_centroid(video[t], coords[t, 0]) - coords[t, 0]).max()
                assert error < 0.5, f"{batch['key'][0]} frame {t}: {error:.2f} px"
                checked += 1
    assert checked == 7 * 8


def test_clips_follow_stride_and_frame_step(videos, tmp_path):
    root, truth = videos
    card = load(DatasetCard, None, ["resolution=32", "clip_length=4", "folder.frame_step=2", "folder.stride=5",
                                    "folder.split_fractions={train: 1.0}", "workers=1", "folder.fit=resize"],
                base={"name": "blobs", "source": "folder"})
    with pytest.raises(SourceError, match="split 'test'"):  # a.json pins a split this card lacks
        build(card, tmp_path / "out", root=root, progress=False)
    (tmp_path / "v").mkdir()
    for name in ("a.mp4", "a.npz"):
        (tmp_path / "v" / name).write_bytes((root / "walk" / name).read_bytes())
    summary = build(card, tmp_path / "out2", root=tmp_path / "v", progress=False)
    assert summary["splits"]["train"]["clips"] == 3  # span 7 over 20 frames: starts 0, 5, 10
    # The same card over another input folder is not mistaken for the dataset already there.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "z.mp4").write_bytes((root / "run" / "c.webm").read_bytes())
    with pytest.raises(ConfigError, match="source_dir"):
        build(card, tmp_path / "out2", root=tmp_path / "other", progress=False)
    cfg = LoaderConfig(batch_size=3, num_workers=0, shuffle=False)
    batch = next(iter(ClipLoader(str(tmp_path / "out2" / "train"), cfg)))
    expected = truth["walk/a.mp4"][[0, 2, 4, 6]] * np.array([32 / 96, 32 / 64], np.float32)
    np.testing.assert_allclose(batch["coords"][0].numpy(), expected, atol=1e-4)
    assert batch["actions"][1, :, 0].tolist() == [10.0, 14.0, 18.0, 22.0]  # frames 5, 7, 9, 11


def test_bad_sidecars_are_named(tmp_path):
    video, _ = blob_video(10, 32, 32, 0)
    ffmpeg_write(tmp_path / "x.mp4", video, ["-c:v", "libx264"])
    np.savez(tmp_path / "x.npz", coords=np.zeros((9, 1, 2), np.float32))
    card = load(DatasetCard, None, ["resolution=32", "clip_length=4"], base={"name": "x", "source": "folder"})
    with pytest.raises(SourceError, match=r"x\.npz: coords has shape \[9, 1, 2\].*T=10"):
        build(card, tmp_path / "out", root=tmp_path, progress=False)
    with pytest.raises(SourceError, match="does not exist"):
        build(card, tmp_path / "out", root=tmp_path / "nope", progress=False)


def test_convert_cli(videos, tmp_path):
    root, _ = videos
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "kpscale.data", "convert", str(root), "--out", str(out),
                          "resolution=32", "clip_length=8", "--quiet"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "skipped 1 unreadable or short inputs: broken.mp4" in run.stdout
    assert (out / "card.yaml").exists() and "source: folder" in (out / "card.yaml").read_text()
    bad = subprocess.run([sys.executable, "-m", "kpscale.data", "convert", str(root), "--out", str(tmp_path / "o2"),
                          "folder.fit=squash"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "folder.fit" in bad.stderr and "squash" in bad.stderr
