"""The loop every Ray Train worker runs: stream this rank's clips, step one DeepSpeed engine
per optimiser of the model family's stage, stage after stage, checkpoint, and (rank 0) log to
MLflow. The family (kpscale.models.family) says what each optimiser's loss is; this file says
how it is trained, the same for every family."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import resource
import tempfile
import time

import mlflow
import ray.train
import torch
import torch.distributed as dist
from mlflow.entities import Metric

from kpscale import logs, tracking
from kpscale.data.stream import ClipLoader
from kpscale.train.config import TrainConfig

log = logging.getLogger("kpscale.train")


def train_loop(config: dict) -> None:
    logs.setup()
    cfg, family_class = config["cfg"], config["family"]  # validated by the driver
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
    # These import DeepSpeed, which picks its accelerator when first imported: only after the line above.
    from kpscale.train import checkpoint
    from kpscale.train.engine import build_engine

    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")
    compiled = cfg.train.compile if cfg.train.compile is not None else device.type == "cuda"
    dtype = torch.bfloat16 if bf16 else torch.float32
    torch.manual_seed(cfg.train.seed + rank)
    family = family_class(cfg.model)
    stages, step, epoch = cfg.stages(family_class), 0, 0
    ends = list(itertools.accumulate(s.steps for s in stages))
    restored = ray.train.get_checkpoint()
    if restored is None and cfg.train.init_checkpoint:
        restored = ray.train.Checkpoint(cfg.train.init_checkpoint)
    with contextlib.ExitStack() as opened:
        folder = opened.enter_context(restored.as_directory()) if restored else None
        saved_stage = checkpoint.stage(folder) if folder else None
        first = [s.name for s in stages].index(saved_stage) if saved_stage else 0
        if rank == 0:
            mlflow.set_tracking_uri(config["tracking_uri"])
            mlflow.start_run(run_id=config["mlflow_run_id"])
        meter = Meter()
        latest: dict[str, float] = {}  # the last logged loss terms and evaluation, reported to Ray (and Tune)
        weights = None  # the whole model at the end of a stage, which the next one starts from
        for index in range(first, len(stages)):
            section, stage = stages[index], family.stage(stages[index].name)
            if index > first:  # the previous stage's weights, in fresh modules without its engines' hooks
                with torch.random.fork_rng(devices=[]):
                    family = family_class(cfg.model)
                family.root.load_state_dict(weights)
            elif section.init_from and not folder:
                from kpscale.tracking import model_folder
                source = model_folder(section.init_from, config["tracking_uri"]) / "weights.pt"
                family.root.load_state_dict(torch.load(source, map_location="cpu", weights_only=True))
            modules = family.modules()
            frozen = {name: modules[name] for name in (*stage.frozen, *section.freeze)}
            if folder and index == first:
                family.root.load_state_dict(checkpoint.load_frozen(folder), strict=False)
            for module in frozen.values():
                module.requires_grad_(False).eval().to(device, dtype)
            optimisers = {name: family.optimiser(name) for name in stage.optimisers}
            _check_disjoint(optimisers, cfg.model.name)
            # What no engine holds, frozen or unused, goes into each checkpoint beside the engines' states.
            engine_params = {id(p) for optimiser in optimisers.values() for p in optimiser.module.parameters()}
            kept = {name: module for name, module in modules.items()
                    if not any(id(p) in engine_params for p in module.parameters())}
            source = cfg.data.train
            if stage.derived:
                source = _derived_data(family, stage, frozen, cfg, config["storage"],
                                       ends[index - 1] if index else 0,
                                       rank, world)
            loader = ClipLoader(source, cfg.data.model_copy(update={"frames": stage.frames}), window=cfg.window,
                                rank=rank, world_size=world)
            engines = {name: build_engine(optimiser, cfg, bf16, section.steps) for name, optimiser in optimisers.items()}
            if compiled:
                for engine in engines.values():
                    engine.compile(backend=cfg.train.compile_backend, compile_kwargs={"mode": cfg.train.compile_mode})
            if folder and index == first:
                state = checkpoint.load(engines, folder, rank)
                # Resume at the next epoch: the step counter, optimizers, schedules and RNG continue;
                # the data order starts a fresh (different) shuffle.
                step, epoch = state["step"], state["epoch"] + 1
                log.info("rank %d resumed at step %d%s", rank, step,
                         f" of {cfg.train.steps}: nothing left to train" if step >= cfg.train.steps else "")
                opened.close()  # a downloaded checkpoint's files are no longer needed
            trainable = {name: [p for p in engine.module.parameters() if p.requires_grad]
                         for name, engine in engines.items()}
            weights = None
            child = None  # the stage's nested MLflow run, beside the run's own
            if rank == 0 and cfg.train.stages:
                child = tracking.stage_run(config["mlflow_run_id"], section.name, {
                    "stage": section.name, "first_step": ends[index] - section.steps + 1, "last_step": ends[index],
                    "optimisers": ", ".join(stage.optimisers), "frozen": ", ".join(frozen) or "none",
                    "init_from": section.init_from or ("the previous stage" if index else "none"),
                    "data": source})
            if rank == 0 and step < ends[index]:
                what = cfg.model.name + (f", stage {section.name} (steps {step + 1}-{ends[index]})"
                                         if cfg.train.stages else "")
                if len(engines) > 1:
                    what += f", optimisers {' then '.join(engines)}"
                log.info("training %s on %d clips (%d batches per epoch per rank) with %d workers, ZeRO-%d, %s%s, "
                         "%d torch threads per worker%s", what, loader.num_samples, len(loader), world,
                         cfg.train.zero_stage, "bf16" if bf16 else "fp32",
                         f", compiled ({cfg.train.compile_backend}, {cfg.train.compile_mode}; the first steps compile)"
                         if compiled else "",
                         torch.get_num_threads(), f"; {', '.join(frozen)} frozen" if frozen else "")
            clock = torch.tensor(step, device=device)  # `step` for the families (Family.loss), kept on the device
            while step < ends[index]:
                loader.set_epoch(epoch)
                fetch = time.perf_counter()
                for batch in loader:
                    meter.waited += time.perf_counter() - fetch
                    batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
                    if "video" in batch:
                        batch["video"] = batch["video"].to(dtype)
                    outputs = optimiser_steps(family, stage.name, engines, trainable, batch, clock)
                    step += 1
                    clock += 1
                    meter.add(len(batch["key"]), _terms(outputs))
                    end = step == ends[index]
                    if step % cfg.train.log_every == 0 or end:
                        latest.update(meter.log(loader, step, rank, _lrs(engines), child))
                        meter = Meter()
                    paused = time.perf_counter()
                    evaluated = step % cfg.train.eval_every == 0 or end
                    if evaluated:
                        latest.update(_evaluate(family, stage.name, frozen, cfg, device, dtype, step, rank, child))
                    saved = step % cfg.train.checkpoint_every == 0 or end
                    if end:  # collective; before the last report, on which a sweep may stop the trial
                        weights = _full_weights(family, cfg, rank)
                        if rank == 0 and step == cfg.train.steps:
                            tracking.log_model(weights, cfg)
                    if evaluated or saved:
                        _report(engines, checkpoint, latest, {"step": step, "epoch": epoch, "stage": section.name},
                                kept, rank, save=saved)
                    meter.started += time.perf_counter() - paused  # evaluation and checkpoints are not training time
                    if end:
                        break
                    fetch = time.perf_counter()
                epoch += 1
            if weights is None and index + 1 < len(stages):  # resumed at this stage's end
                weights = _full_weights(family, cfg, rank)
            if child and step >= ends[index]:
                mlflow.MlflowClient().set_terminated(child)
    if rank == 0:
        mlflow.end_run()


def _derived_data(family, stage, frozen: dict, cfg: TrainConfig, storage: str, step: int, rank: int,
                  world: int) -> str:
    """The stage's derived shard set (Stage.derived) in the run's storage, written by the stage's
    frozen modules, or reused when the same modules wrote it. Collective. Only the frozen modules
    are hashed: the trained ones are freshly drawn here, and drawn differently when a run resumes."""
    import hashlib

    from kpscale.data.derived import derive_shards

    digest = hashlib.sha256()
    states = {f"{name}.{k}": v for name, module in frozen.items() for k, v in module.state_dict().items()}
    for name, value in sorted(states.items()):
        digest.update(name.encode())
        digest.update(value.detach().float().cpu().numpy().tobytes())
    provenance = {"name": stage.derived, "model": cfg.model.name, "stage": stage.name, "step": step,
                  "weights_sha256": digest.hexdigest(), "run_name": cfg.train.run_name}
    return derive_shards(cfg.data.train, f"{storage}/{cfg.train.run_name}/{stage.derived}",
                         lambda video: family.derive(stage.derived, video), provenance, rank, world)


def _check_disjoint(optimisers: dict, family: str) -> None:
    """A parameter in two engines would be stepped (and under ZeRO partitioned) twice."""
    owner = {}
    for name, optimiser in optimisers.items():
        for p in optimiser.module.parameters():
            if owner.setdefault(id(p), name) != name:
                raise ValueError(f"{family}: optimisers {owner[id(p)]} and {name} hold the same parameter; a module "
                                 "another optimiser trains must be borrowed (kpscale.models.family.borrow)")


def optimiser_steps(family, stage: str, engines: dict, trainable: dict[str, list], batch: dict, step: torch.Tensor) -> dict:
    """One step of each of the stage's optimisers, in order; returns what each loss returned.
    Only the stepping optimiser's parameters take a gradient from its loss, which may run
    through the others' modules (Lightning's toggle_optimizer)."""
    outputs = {}
    for name, engine in engines.items():
        if len(engines) > 1:
            for other, params in trainable.items():
                for p in params:
                    p.requires_grad_(other == name)
        outputs[name] = family.loss(stage, name, engine, batch, step, outputs)
        engine.backward(outputs[name]["loss"])
        engine.step()
    for params in trainable.values():  # before any save: ZeRO saves a parameter without a gradient as frozen
        for p in params:
            p.requires_grad_(True)
    return outputs


def _terms(outputs: dict[str, dict]) -> dict[str, torch.Tensor]:
    """What an optimiser step logs: train/loss and train/<term> for one optimiser, else
    train/<optimiser>/loss and train/<optimiser>/<term>."""
    named = {name: {"loss": out["loss"], **out["terms"]} for name, out in outputs.items()}
    if len(named) == 1:
        return next(iter(named.values()))
    return {f"{name}/{term}": value for name, terms in named.items() for term, value in terms.items()}


def _lrs(engines: dict) -> dict[str, float]:
    if len(engines) == 1:
        return {"lr": next(iter(engines.values())).get_lr()[0]}
    return {f"lr/{name}": engine.get_lr()[0] for name, engine in engines.items()}


def peak_memory_mb() -> float:
    """Peak memory of this worker: GPU memory allocated on GPU, resident set size on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Meter:
    """Loss terms, throughput and time spent waiting for data since the last log line."""

    def __init__(self):
        self.steps, self.clips, self.waited, self.started = 0, 0, 0.0, time.perf_counter()
        # Summed on the device, read at the log line: a read each step would wait for the GPU there.
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, clips: int, terms: dict[str, torch.Tensor]) -> None:
        self.steps += 1
        self.clips += clips
        for name, value in terms.items():
            # A new tensor, never the step's output itself: a CUDA graph's replay overwrites its outputs.
            self.sums[name] = self.sums.get(name, 0) + value.detach().float()

    def log(self, loader: ClipLoader, step: int, rank: int, lrs: dict[str, float], child: str | None) -> dict[str, float]:
        """Collective: throughput and skipped clips are totals over ranks. Returns the metrics
        on rank 0, nothing on the others. Logged to the run, and to its stage's run `child`."""
        seconds = time.perf_counter() - self.started
        totals = torch.tensor([self.clips, loader.skipped["samples"], loader.skipped["shards"],
                               loader.cache_stats["hits"], loader.cache_stats["misses"]], dtype=torch.float64)
        dist.all_reduce(totals)
        peak = torch.tensor([peak_memory_mb()], dtype=torch.float64)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        if rank != 0:
            return {}
        metrics = {f"train/{k}": v.item() / self.steps for k, v in self.sums.items()}
        metrics.update({"train/clips_per_s": totals[0].item() / seconds,
                        "train/data_wait_fraction": self.waited / seconds,
                        "train/skipped_clips": totals[1].item(), "train/skipped_shards": totals[2].item(),
                        **{f"train/{name}": lr for name, lr in lrs.items()}, "system/peak_memory_mb": peak.item()})
        if totals[3] + totals[4]:  # data.cache: clips read from it and decoded into it so far
            metrics.update({"train/cache_hits": totals[3].item(), "train/cache_misses": totals[4].item()})
        _log_metrics(metrics, step, child)
        losses = ", ".join(f"{v:.4f}" + (f" ({k[len('train/'):-len('/loss')]})" if k != "train/loss" else "")
                           for k, v in metrics.items() if k == "train/loss" or k.endswith("/loss"))
        log.info("step %d: loss %s, %.1f clips/s, %.0f%% of the time waiting for data", step, losses,
                 metrics["train/clips_per_s"], 100 * metrics["train/data_wait_fraction"])
        return metrics


def _log_metrics(metrics: dict[str, float], step: int, child: str | None) -> None:
    mlflow.log_metrics(metrics, step=step)
    if child:
        mlflow.MlflowClient().log_batch(child, metrics=[Metric(k, v, int(time.time() * 1000), step)
                                                        for k, v in metrics.items()])


def _evaluate(family, stage: str, frozen: dict, cfg: TrainConfig, device: torch.device, dtype: torch.dtype,
              step: int, rank: int, child: str | None) -> dict[str, float]:
    """On every rank (a ZeRO-3 forward pass needs them all); rank 0 logs, to the run and to its
    stage's run `child`."""
    from kpscale.evaluate.media import save_gif

    metrics, video = family.evaluate(cfg, stage, device, dtype)
    for module in frozen.values():  # the evaluation hands the model back in training mode
        module.eval()
    if rank != 0:
        return metrics
    _log_metrics(metrics, step, child)
    log.info("step %d: %s", step, family.describe(metrics))
    with tempfile.TemporaryDirectory() as folder:
        files = {str(save_gif(video, f"{folder}/step-{step:07d}.gif")): "videos",
                 **{str(path): f"figures/step-{step:07d}" for path in family.figures(folder)}}
        for path, where in files.items():
            mlflow.log_artifact(path, artifact_path=where)
            if child:
                mlflow.MlflowClient().log_artifact(child, path, artifact_path=where)
    return metrics


def _full_weights(family, cfg: TrainConfig, rank: int) -> dict[str, torch.Tensor]:
    """The family's whole state, fp32 on the CPU, on every rank. Collective: under ZeRO-3 the
    parameters are gathered."""
    import deepspeed

    params = list(family.root.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=cfg.train.zero_stage == 3):
        return {k: v.detach().float().cpu().clone() for k, v in family.root.state_dict().items()}


def _report(engines: dict, checkpoint, latest: dict[str, float], progress: dict, frozen: dict[str, torch.nn.Module],
            rank: int, save: bool) -> None:
    """Report the latest metrics to Ray Train (and through it to Tune), with a checkpoint when
    `save`. Collective: every rank reports, the same number of times."""
    metrics = {**latest, "step": progress["step"], "epoch": progress["epoch"], **_lrs(engines)}
    if not save:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        checkpoint.save(engines, folder, progress, rank, {f"{name}.{k}": v for name, module in frozen.items()
                                                          for k, v in module.state_dict().items()})
        dist.barrier()
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
