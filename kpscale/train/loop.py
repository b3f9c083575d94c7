"""The loop every Ray Train worker runs: stream this rank's clips, step a DeepSpeed engine,
checkpoint, and (rank 0) log to MLflow."""

from __future__ import annotations

import logging
import os
import resource
import tempfile
import time
from collections import defaultdict

import mlflow
import ray.train
import torch
import torch.distributed as dist

from kpscale import logs
from kpscale.data.stream import ClipLoader
from kpscale.models import build_model
from kpscale.train.config import TrainConfig

log = logging.getLogger("kpscale.train")


def train_loop(config: dict) -> None:
    logs.setup()
    cfg = TrainConfig.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
    # These import DeepSpeed, which picks its accelerator when first imported: only after the line above.
    from kpscale.train import checkpoint
    from kpscale.train.engine import build_engine

    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")
    torch.manual_seed(cfg.train.seed + rank)
    model = build_model(cfg.model)
    engine = build_engine(model, cfg, bf16)
    step, epoch = 0, 0
    restored = ray.train.get_checkpoint()
    if restored is None and cfg.train.init_checkpoint:
        restored = ray.train.Checkpoint(cfg.train.init_checkpoint)
    if restored:
        with restored.as_directory() as folder:
            state = checkpoint.load(engine, folder, rank)
        # Resume at the next epoch: the step counter, optimizer, schedule and RNG continue;
        # the data order starts a fresh (different) shuffle.
        step, epoch = state["step"], state["epoch"] + 1
        log.info("rank %d resumed at step %d%s", rank, step,
                 f" of {cfg.train.steps}: nothing left to train" if step >= cfg.train.steps else "")

    loader = ClipLoader(cfg.data.train, cfg.data, window=cfg.window, rank=rank, world_size=world)
    if rank == 0:
        mlflow.set_tracking_uri(config["tracking_uri"])
        mlflow.start_run(run_id=config["mlflow_run_id"])
    if rank == 0 and step < cfg.train.steps:
        log.info("training %s on %d clips (%d batches per epoch per rank) with %d workers, ZeRO-%d, %s, "
                 "%d torch threads per worker", type(model).__name__, loader.num_samples, len(loader), world,
                 cfg.train.zero_stage, "bf16" if bf16 else "fp32", torch.get_num_threads())
    meter = Meter()
    latest: dict[str, float] = {}  # the last logged loss terms and evaluation, reported to Ray (and Tune)
    while step < cfg.train.steps:
        loader.set_epoch(epoch)
        fetch = time.perf_counter()
        for batch in loader:
            meter.waited += time.perf_counter() - fetch
            video = batch["video"].to(device, non_blocking=True)
            out = engine(video.to(torch.bfloat16) if bf16 else video, step, decode_predictions=False)
            engine.backward(out["loss"])
            engine.step()
            step += 1
            meter.add(len(video), {"loss": out["loss"], **out["terms"]})
            last = step == cfg.train.steps
            if step % cfg.train.log_every == 0 or last:
                latest.update(meter.log(loader, step, rank, engine.get_lr()[0]))
                meter = Meter()
            paused = time.perf_counter()
            evaluated = step % cfg.train.eval_every == 0 or last
            if evaluated:
                latest.update(_evaluate(engine, cfg, device, step, rank))
            saved = step % cfg.train.checkpoint_every == 0 or last
            if last:  # before the last report, on which a sweep may stop the trial
                _log_model(engine, cfg, rank)
            if evaluated or saved:
                _report(engine, checkpoint, latest, step, epoch, rank, save=saved)
            meter.started += time.perf_counter() - paused  # evaluation and checkpoints are not training time
            if step >= cfg.train.steps:
                break
            fetch = time.perf_counter()
        epoch += 1
    if rank == 0:
        mlflow.end_run()


def peak_memory_mb() -> float:
    """Peak memory of this worker: GPU memory allocated on GPU, resident set size on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Meter:
    """Loss terms, throughput and time spent waiting for data since the last log line."""

    def __init__(self):
        self.steps, self.clips, self.waited, self.started = 0, 0, 0.0, time.perf_counter()
        self.sums: dict[str, float] = defaultdict(float)

    def add(self, clips: int, terms: dict[str, torch.Tensor]) -> None:
        self.steps += 1
        self.clips += clips
        for name, value in terms.items():
            self.sums[name] += value.item()

    def log(self, loader: ClipLoader, step: int, rank: int, lr: float) -> dict[str, float]:
        """Collective: throughput and skipped clips are totals over ranks. Returns the metrics
        on rank 0, nothing on the others."""
        seconds = time.perf_counter() - self.started
        totals = torch.tensor([self.clips, loader.skipped["samples"], loader.skipped["shards"]], dtype=torch.float64)
        dist.all_reduce(totals)
        peak = torch.tensor([peak_memory_mb()], dtype=torch.float64)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        if rank != 0:
            return {}
        metrics = {f"train/{k}": v / self.steps for k, v in self.sums.items()}
        metrics.update({"train/clips_per_s": totals[0].item() / seconds,
                        "train/data_wait_fraction": self.waited / seconds,
                        "train/skipped_clips": totals[1].item(), "train/skipped_shards": totals[2].item(),
                        "train/lr": lr, "system/peak_memory_mb": peak.item()})
        mlflow.log_metrics(metrics, step=step)
        log.info("step %d: loss %.4f, %.1f clips/s, %.0f%% of the time waiting for data", step,
                 metrics["train/loss"], metrics["train/clips_per_s"], 100 * metrics["train/data_wait_fraction"])
        return metrics


def _evaluate(engine, cfg: TrainConfig, device: torch.device, step: int, rank: int) -> dict[str, float]:
    """On every rank (a ZeRO-3 forward pass needs them all); rank 0 logs."""
    from kpscale.evaluate.media import save_gif
    from kpscale.evaluate.snapshot import evaluate

    dtype = next(engine.module.parameters()).dtype
    metrics, video = evaluate(engine.module, cfg, device, dtype, fit_clips=cfg.train.eval_clips,
                              test_clips=cfg.train.eval_clips)
    if rank != 0:
        return metrics
    mlflow.log_metrics(metrics, step=step)
    found = (f"; a keypoint on {metrics['objects_found']:.0f} of "
             f"{sum(name.startswith('keypoint_distance/') for name in metrics)} objects" if "objects_found" in metrics else "")
    log.info("step %d: tracking error %.2f px observed, %.2f px predicted (best of %d), no dynamics %.2f px, "
             "null model %.2f px%s", step, metrics["tracking_error_observed"], metrics["tracking_error_predicted"],
             cfg.model.num_samples, metrics["tracking_error_no_dynamics"], metrics["tracking_error_null"], found)
    with tempfile.TemporaryDirectory() as folder:
        mlflow.log_artifact(str(save_gif(video, f"{folder}/step-{step:07d}.gif")), artifact_path="videos")
    return metrics


def _log_model(engine, cfg: TrainConfig, rank: int) -> None:
    """Full fp32 weights and the config as MLflow artifacts `model/`, loadable with
    torch.load(weights_only=True). Collective: under ZeRO-3 the parameters are gathered."""
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=cfg.train.zero_stage == 3):
        if rank == 0:
            state = {k: v.detach().float().cpu().clone() for k, v in engine.module.state_dict().items()}
    if rank != 0:
        return
    with tempfile.TemporaryDirectory() as folder:
        torch.save(state, f"{folder}/weights.pt")
        with open(f"{folder}/config.yaml", "w") as f:
            f.write(cfg.to_yaml())
        mlflow.log_artifacts(folder, artifact_path="model")


def _report(engine, checkpoint, latest: dict[str, float], step: int, epoch: int, rank: int, save: bool) -> None:
    """Report the latest metrics to Ray Train (and through it to Tune), with a checkpoint when
    `save`. Collective: every rank reports, the same number of times."""
    metrics = {**latest, "step": step, "epoch": epoch, "lr": engine.get_lr()[0]}
    if not save:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        checkpoint.save(engine, folder, step, epoch, rank)
        dist.barrier()
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
