"""Evaluation benchmark: clips/s of `python -m kpscale.evaluate`'s work (N sampled futures per
clip, frame metrics, tracking, trajectories) on the default model, in-process, with the I3D
features FVD needs, and split over Ray tasks, side by side on the same clips. Speed does not
depend on the weights, so the model and the I3D are randomly initialised: no score here means
anything, only the time."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from kpscale.bench.data import CARD
from kpscale.config import load
from kpscale.data.build import build
from kpscale.data.card import DatasetCard
from kpscale.evaluate.__main__ import main as evaluate_main
from kpscale.evaluate.i3d import I3D
from kpscale.models import build_family
from kpscale.train.config import load_train_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clips", type=int, default=64, help="held-out clips evaluated by each variant")
    parser.add_argument("--samples", type=int, default=10, help="sampled futures per clip")
    parser.add_argument("--config", help="training config of the model (default: the package's default)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="training config overrides")


def _timed(argv: list[str]) -> float:
    started = time.perf_counter()
    if evaluate_main(argv) != 0:
        raise RuntimeError(f"kpscale.evaluate {' '.join(argv)} failed")
    return time.perf_counter() - started


def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        build(load(DatasetCard, CARD, [f"splits={{train: 64, test: {args.clips}}}"]), work / "data", progress=False)
        cfg = load_train_config(args.config, [f"data.train={work / 'data' / 'train'}", *args.overrides])
        (work / "model").mkdir()
        torch.save(build_family(cfg.model).root.state_dict(), work / "model" / "weights.pt")
        (work / "model" / "config.yaml").write_text(cfg.to_yaml())
        torch.save(I3D().state_dict(), work / "i3d.pt")
        common = ["--run", str(work / "model"), "--data", str(work / "data" / "test"), "--samples", str(args.samples),
                  "--fit-clips", "64", "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}"]
        torch.set_num_threads(2)
        print("in-process ...", flush=True)
        plain = _timed(common)
        print("in-process with I3D features ...", flush=True)
        with_i3d = _timed([*common, "--i3d", str(work / "i3d.pt")])
        print("two Ray workers ...", flush=True)
        spread = _timed([*common, "--workers", "2"])

    rates = {"in_process": args.clips / plain, "in_process_with_i3d": args.clips / with_i3d,
             "ray_2_workers": args.clips / spread}
    print(f"\nkpscale.bench evaluate: {args.clips} clips of {cfg.window} frames at {cfg.model.image_size}px, "
          f"{args.samples} sampled futures each, CPU (wall time of the whole command, start-up included)\n")
    print(f"{'in-process, 2 threads':<40}{rates['in_process']:>8.2f} clips/s")
    print(f"{'  + I3D features for FVD':<40}{rates['in_process_with_i3d']:>8.2f} clips/s")
    print(f"{'2 Ray workers x 1 CPU':<40}{rates['ray_2_workers']:>8.2f} clips/s   "
          f"{rates['ray_2_workers'] / rates['in_process']:.2f}x in-process")
    return rates
