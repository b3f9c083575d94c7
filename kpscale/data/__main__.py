"""python -m kpscale.data {build,convert,stream}: make shard datasets and stream them."""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from pathlib import Path

from kpscale import logs
from kpscale.config import ConfigError, load, parse_with_overrides
from kpscale.data.build import build
from kpscale.data.card import DatasetCard
from kpscale.data.sources import SourceError
from kpscale.data.stream import ClipLoader, DataError, LoaderConfig

log = logging.getLogger("kpscale.data")


def _summary(summary: dict, out: Path) -> None:
    for split, s in summary["splits"].items():
        per_clip = s["bytes"] / max(s["clips"], 1) / 1024
        print(f"{out / split}: {s['clips']} clips in {s['shards']} shards, {per_clip:.1f} KiB per clip")
    if summary["skipped_inputs"]:
        print(f"skipped {len(summary['skipped_inputs'])} unreadable or short inputs: "
              + ", ".join(summary["skipped_inputs"][:10]))


def cmd_build(args) -> None:
    card = load(DatasetCard, args.card, args.overrides)
    _summary(build(card, args.out, progress=not args.quiet), Path(args.out))


def cmd_convert(args) -> None:
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(args.video_dir).resolve().name) or "videos"
    card = load(DatasetCard, args.card, args.overrides, base={"name": name, "source": "folder"})
    if card.source != "folder":
        raise ConfigError(f"convert reads a folder of videos: source must be 'folder', got {card.source!r}")
    _summary(build(card, args.out, root=args.video_dir, progress=not args.quiet), Path(args.out))


def cmd_stream(args) -> None:
    cfg = load(LoaderConfig, None, args.overrides)
    loader = ClipLoader(args.path, cfg, window=args.window)
    print(f"{args.path}: {loader.num_samples} clips in {len(loader.shards)} shards, {len(loader)} batches per epoch")
    for epoch in range(args.epochs):
        start, clips, batch = time.perf_counter(), 0, None
        for batch in loader:
            clips += len(batch["key"])
        seconds = time.perf_counter() - start
        shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in batch.items() if hasattr(v, "shape"))
        print(f"epoch {epoch}: {clips} clips in {seconds:.1f} s ({clips / seconds:.0f} clips/s); "
              f"last batch: {shapes}; skipped: {dict(loader.skipped) or 'none'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kpscale.data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build", help="generate a dataset described by a card (e.g. datasets/basketball.yaml)")
    p.add_argument("card", help="dataset card (YAML)")
    p.add_argument("--out", required=True, help="output folder: one sub-folder of shards per split")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="card overrides, e.g. splits.train=500")
    p.set_defaults(func=cmd_build)
    p = sub.add_parser("convert", help="turn a folder of videos (mp4, avi, mkv, webm, frame folders) into shards",
                       description="Sidecars beside a video NAME: NAME.npz (coords [T,N,2] in pixels, actions "
                                   "[T,A], rewards [T]) and NAME.json (e.g. {\"label\": \"walking\"}).")
    p.add_argument("video_dir")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--card", help="optional card (YAML) to start from; source must be 'folder'")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="e.g. resolution=128 clip_length=16 folder.fit=resize folder.frame_step=2")
    p.set_defaults(func=cmd_convert)
    p = sub.add_parser("stream", help="stream a split and report clips/s, batch shapes and skipped clips")
    p.add_argument("path", help="shard folder, glob, manifest, brace list or URL")
    p.add_argument("--window", type=int, default=16, help="frames per sampled clip window")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="loader settings, e.g. batch_size=32 num_workers=0")
    p.set_defaults(func=cmd_stream)
    args = parse_with_overrides(parser, argv)
    logs.setup()
    try:
        args.func(args)
    except (ConfigError, DataError, SourceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
