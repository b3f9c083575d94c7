"""Data benchmark: mp4 shards vs the official implementation's raw uint8 .npz files, side by side
on the same basketball clips: bytes per clip, encode quality, and clips/s on one CPU core; and the
shard reader decoding vs filling a `data.cache` and then reading its frames from there."""

from __future__ import annotations

import argparse
import itertools
import random
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from kpscale.config import load
from kpscale.data.build import build
from kpscale.data.card import DatasetCard
from kpscale.data.sources import basketball
from kpscale.data.stream import ClipLoader, LoaderConfig
from kpscale.data.video import decode_mp4, encode_mp4, psnr

CARD = Path(__file__).resolve().parents[2] / "datasets" / "basketball.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clips", type=int, default=512, help="clips in the benchmark dataset")
    parser.add_argument("--window", type=int, default=16, help="frames per sampled window (8 observed + 8 predicted)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2, help="passes over the data per reader")
    parser.add_argument("--quality-clips", type=int, default=32, help="clips used for the PSNR comparison")
    parser.add_argument("--workdir", help="where to write the data (default: a temporary folder)")


def _npz_epoch(files: list[Path], window: int, batch_size: int, rng: random.Random) -> int:
    """The official reader's work: load a whole uint8 sequence, cut a random window, make floats."""
    files = files[:]
    rng.shuffle(files)
    clips = 0
    for i in range(0, len(files) - batch_size + 1, batch_size):
        videos, coords = [], []
        for f in files[i:i + batch_size]:
            with np.load(f) as data:
                image, pos = data["image"], data["true_object_pos"]
            start = rng.randrange(len(image) - window + 1)
            videos.append(torch.from_numpy(image[start:start + window]).permute(0, 3, 1, 2).float().div_(255))
            coords.append(torch.from_numpy(pos[start:start + window]))
        batch = torch.stack(videos), torch.stack(coords)
        clips += len(batch[0])
    return clips


def _rates(readers: dict, epochs: int) -> dict[str, float]:
    """clips/s of each reader (a function reading one epoch), timed in turns epoch by epoch so that
    other load on the machine slows them alike."""
    for read in readers.values():
        read()  # warm-up: imports, page cache
    clips, seconds = Counter(), Counter()
    for _ in range(epochs):
        for name, read in readers.items():
            start = time.perf_counter()
            clips[name] += read()
            seconds[name] += time.perf_counter() - start
    return {name: clips[name] / seconds[name] for name in readers}


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        card = load(DatasetCard, CARD, [f"splits={{train: {args.clips}}}"])
        print(f"building {args.clips} basketball clips ({card.clip_length} frames, {card.resolution}x{card.resolution})")
        build(card, work / "shards", progress=True)
        npz_dir, zip_dir = work / "npz", work / "npz_compressed"
        npz_dir.mkdir(exist_ok=True)
        zip_dir.mkdir(exist_ok=True)
        originals = []
        for i in range(args.clips):
            clip = basketball.make(card, None, "train", i)
            image = clip.frames.permute(0, 2, 3, 1).numpy()
            np.savez(npz_dir / f"{i:06d}.npz", image=image, true_object_pos=clip.coords)
            np.savez_compressed(zip_dir / f"{i:06d}.npz", image=image, true_object_pos=clip.coords)
            if i < args.quality_clips:
                originals.append(clip.frames)

        shards = sorted((work / "shards" / "train").glob("*.tar"))
        sizes = {
            "shards (mp4)": sum(p.stat().st_size for p in shards) / args.clips,
            "npz (raw uint8, official)": sum(p.stat().st_size for p in npz_dir.iterdir()) / args.clips,
            "npz compressed": sum(p.stat().st_size for p in zip_dir.iterdir()) / args.clips,
        }
        quality = {}
        for fmt in ("yuv444p", "yuv420p"):
            enc = card.encoding.model_copy(update={"pixel_format": fmt})
            values = [psnr(f, decode_mp4(encode_mp4(f, card.fps, enc))) for f in originals]
            quality[f"{fmt} crf {enc.crf}"] = float(np.mean(values))

        cfg = LoaderConfig(batch_size=args.batch_size, num_workers=0, shuffle_buffer=64)
        loader = ClipLoader(str(work / "shards" / "train"), cfg, window=args.window)
        folders = (work / f"cache-{i}" for i in itertools.count())

        def fill() -> int:  # an epoch into an empty cache: every clip decoded whole and written
            cold = ClipLoader(str(work / "shards" / "train"), cfg.model_copy(update={"cache": str(next(folders))}),
                              window=args.window)
            return sum(len(b["key"]) for b in cold)

        # cache-0, which fill's warm-up epoch fills before this reader's warm-up epoch reads it
        cached = ClipLoader(str(work / "shards" / "train"), cfg.model_copy(update={"cache": str(work / "cache-0")}),
                            window=args.window)
        rng = random.Random(0)
        npz_files = sorted(npz_dir.iterdir())
        zip_files = sorted(zip_dir.iterdir())
        rates = _rates({
            "shards (mp4)": lambda: sum(len(b["key"]) for b in loader),
            "npz (raw uint8, official)": lambda: _npz_epoch(npz_files, args.window, args.batch_size, rng),
            "npz compressed": lambda: _npz_epoch(zip_files, args.window, args.batch_size, rng),
            "data.cache (cold)": fill,
            "data.cache (warm)": lambda: sum(len(b["key"]) for b in cached),
        }, args.epochs)
        sizes["data.cache (cold)"] = sizes["data.cache (warm)"] = \
            sum(p.stat().st_size for p in (work / "cache-0").rglob("*.npy")) / args.clips

    print(f"\nkpscale.bench data: {args.clips} clips of {card.clip_length} frames at {card.resolution}x{card.resolution}, "
          f"windows of {args.window} frames, batches of {args.batch_size}, one CPU core, no reader workers\n")
    print(f"{'format':<28}{'bytes/clip':>12}{'clips/s':>10}{'frames/s':>10}")
    for name in sizes:
        print(f"{name:<28}{sizes[name]:>12,.0f}{rates[name]:>10.0f}{rates[name] * args.window:>10.0f}")
    base = "npz (raw uint8, official)"
    print(f"\nshards are {sizes[base] / sizes['shards (mp4)']:.1f}x smaller than raw npz "
          f"and read at {rates['shards (mp4)'] / rates[base]:.2f}x its clips/s")
    print("encode quality, mean PSNR of decoded vs original frames: "
          + ", ".join(f"{k} {v:.1f} dB" for k, v in quality.items()))
    decoding = rates["shards (mp4)"]
    print(f"the shard reader with a warm data.cache reads {rates['data.cache (warm)'] / decoding:.2f}x the frames/s "
          f"of decoding, in the epoch that fills it {rates['data.cache (cold)'] / decoding:.2f}x, for "
          f"{sizes['data.cache (warm)']:,.0f} cache bytes per clip besides the shards "
          f"(the warm reader's cache hits {cached.cache_stats['hits']}, misses {cached.cache_stats['misses']})")
    return {"bytes_per_clip": sizes, "clips_per_s": rates, "psnr_db": quality, "cache": dict(cached.cache_stats)}
