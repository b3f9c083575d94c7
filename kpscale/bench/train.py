"""Training benchmark, side by side in one run on the same model, batch and data:
clips/s of one Ray Train + DeepSpeed worker vs a bare PyTorch loop, the reader's clips/s vs what
a training step consumes, and peak memory per worker under ZeRO 0, 2 and 3 (two workers)."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import mlflow
import torch

from kpscale.bench.data import CARD
from kpscale.bench.gpu import bare_step
from kpscale.config import load, positive
from kpscale.data.build import build
from kpscale.data.card import DatasetCard
from kpscale.data.stream import ClipLoader
from kpscale.train.allocator import keep_freed_memory
from kpscale.train.config import TrainConfig, load_train_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=40, help="timed steps of each throughput run")
    parser.add_argument("--zero-steps", type=int, default=6, help="steps of each ZeRO memory run")
    parser.add_argument("--zero-stages", type=_stages, default=[0, 2, 3], metavar="0,2,3",
                        help="ZeRO stages whose peak memory per worker is measured, two workers each")
    parser.add_argument("--clips", type=positive, default=256,
                        help="training clips of the basketball set the benchmark builds (the reader reads each twice)")
    parser.add_argument("--config", help="training config (default: the package's default)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="training config overrides")


def _stages(text: str) -> list[int]:
    stages = [int(s) for s in text.split(",") if s.strip().isdigit()]
    if len(stages) != len(text.split(",")) or not set(stages) <= {0, 1, 2, 3}:
        raise argparse.ArgumentTypeError(f"expected ZeRO stages 0-3 separated by commas, got {text!r}")
    return stages


def _bare_loop(cfg: TrainConfig, steps: int) -> float:
    """The same model, data, Adam, clipping, threads and allocator settings, without Ray or DeepSpeed."""
    keep_freed_memory()
    torch.set_num_threads(cfg.train.cpus_per_worker)
    train_step = bare_step(cfg, torch.device("cpu"))
    loader = ClipLoader(cfg.data.train, cfg.data, window=cfg.window, rank=0, world_size=1)
    warmup, clips, started, step = 3, 0, 0.0, 0
    while step < steps + warmup:
        for batch in loader:
            if step == warmup:
                started = time.perf_counter()
            train_step(batch["video"])
            clips += len(batch["key"]) if step >= warmup else 0
            step += 1
            if step == steps + warmup:
                break
    return clips / (time.perf_counter() - started)


def _reader(cfg: TrainConfig, clips: int) -> float:
    torch.set_num_threads(1)
    loader = ClipLoader(cfg.data.train, cfg.data.model_copy(update={"num_workers": 0}), window=cfg.window)
    seen, started = 0, time.perf_counter()
    while seen < clips:
        for batch in loader:
            seen += len(batch["key"])
            if seen >= clips:
                break
    return seen / (time.perf_counter() - started)


def _ray_run(cfg: TrainConfig, work: Path, name: str) -> dict[str, list[float]]:
    """A real `kpscale.train` run on the Ray started by `run`; its metric histories from MLflow.
    Each run's workers are new actor processes, so a peak memory is that run's own."""
    from kpscale.train.launch import check_fits_cluster, fit
    uri = f"sqlite:///{work / 'mlflow.db'}"
    cfg = cfg.model_copy(update={
        "train": cfg.train.model_copy(update={"storage": str(work / "runs"), "run_name": name}),
        "tracking": cfg.tracking.model_copy(update={"uri": uri, "experiment": "bench"})})
    check_fits_cluster(cfg)
    fit(cfg)
    client = mlflow.MlflowClient(uri)
    (found,) = client.search_runs([client.get_experiment_by_name("bench").experiment_id],
                                  filter_string=f"attributes.run_name = '{name}'")
    return {key: [m.value for m in client.get_metric_history(found.info.run_id, key)]
            for key in ("train/clips_per_s", "train/data_wait_fraction", "system/peak_memory_mb")}


def run(args: argparse.Namespace) -> dict:
    import ray

    from kpscale.train.launch import start_ray
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        build(load(DatasetCard, CARD, [f"splits={{train: {args.clips}, test: 32}}"]), work / "data", progress=False)
        steps = args.steps
        base = load_train_config(args.config, [
            f"data.train={work / 'data' / 'train'}", f"data.test={work / 'data' / 'test'}",
            f"train.steps={steps + steps // 4}", f"train.log_every={steps // 4}", f"train.eval_every={10**9}",
            "train.eval_clips=8", f"train.checkpoint_every={10**9}", "train.warmup_steps=1", *args.overrides])
        print(f"bare PyTorch loop, {steps} steps ...", flush=True)
        bare = _bare_loop(base, steps)
        print("reader alone ...", flush=True)
        reader = _reader(base, 2 * args.clips)
        # One local Ray for every run; the two measurements above run without it.
        start_ray()
        try:
            print("one Ray Train + DeepSpeed worker ...", flush=True)
            single = _ray_run(base, work, "single")
            memory = {}
            for stage in args.zero_stages:
                print(f"two workers, ZeRO-{stage} ...", flush=True)
                cfg = load_train_config(args.config, [
                    f"data.train={work / 'data' / 'train'}", f"data.test={work / 'data' / 'test'}",
                    f"train.steps={args.zero_steps}", f"train.log_every={args.zero_steps}", "train.eval_clips=8",
                    "train.warmup_steps=1", "train.workers=2", "train.cpus_per_worker=1", f"train.zero_stage={stage}",
                    *args.overrides])
                memory[stage] = _ray_run(cfg, work, f"zero{stage}")["system/peak_memory_mb"][-1]
        finally:
            ray.shutdown()
        ray_rate = sum(single["train/clips_per_s"][1:]) / len(single["train/clips_per_s"][1:])  # first window warms up

    device = "GPU" if torch.cuda.is_available() else f"CPU, {base.train.cpus_per_worker} threads"
    print(f"\nkpscale.bench train: {base.model.name}, batch {base.data.batch_size} x "
          f"{base.window} frames at {base.model.image_size}px, {device}\n")
    print(f"{'bare PyTorch loop':<40}{bare:>8.1f} clips/s")
    print(f"{'Ray Train + DeepSpeed, 1 worker':<40}{ray_rate:>8.1f} clips/s   ratio {ray_rate / bare:.2f}")
    print(f"{'reader alone (1 core, no workers)':<40}{reader:>8.1f} clips/s   {reader / ray_rate:.1f}x what a step consumes")
    wait = single["train/data_wait_fraction"][1:]
    print(f"{'time the trainer waited for data':<40}{100 * sum(wait) / len(wait):>7.1f} %")
    for stage, mb in memory.items():
        print(f"{f'peak memory per worker, ZeRO-{stage}':<40}{mb:>8.0f} MB")
    return {"bare_clips_per_s": bare, "ray_deepspeed_clips_per_s": ray_rate, "ratio": ray_rate / bare,
            "reader_clips_per_s": reader, "peak_memory_mb": memory}
