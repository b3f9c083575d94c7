"""One trial of a sweep: a Ray Tune function that fits a TorchTrainer for its sampled config and
passes every Ray Train report (metrics and the checkpoint's location) on to Tune.

Tune gets a small checkpoint per Train checkpoint: a pointer {trial, run, path, step}. When a
sweep is restored, a trial's pointer names its own Train run, which resumes by name. When PBT
makes a trial continue from another trial's checkpoint, the pointer names the other trial: the
trial then starts a new Train run (and MLflow run) initialised from that checkpoint.
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
from pathlib import Path
from typing import Any

import ray
from ray.train import UserCallback

from kpscale.tune.sweep import Sweep

log = logging.getLogger("kpscale.tune")
POINTER = "train_checkpoint.json"
LAST_STEP = "reached_train_steps"  # in every report: the sweep stops a trial on it


class ForwardReports(UserCallback):
    """Runs in the Train controller: rank 0's metrics and the checkpoint path, into a queue the
    trial reads."""

    def __init__(self, reports):
        self.reports = reports

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        self.reports.put((metrics[0], _uri(checkpoint) if checkpoint else None))


def _uri(checkpoint) -> str:
    kind = checkpoint.filesystem.type_name  # "local", "s3", "gcs", ...
    return checkpoint.path if kind == "local" else f"{kind}://{checkpoint.path}"


def run_trial(params: dict[str, Any], sweep: Sweep, parent_run_id: str) -> None:
    from ray.util.queue import Empty, Queue

    from kpscale.train.launch import fit

    trial = ray.tune.get_context().get_trial_id()
    run_name, init_checkpoint = _train_run(trial)
    cfg = sweep.trial_config(params)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={
        "run_name": run_name, "storage": f"{sweep.folder}/train", "init_checkpoint": init_checkpoint})})
    reports = Queue(actor_options={"num_cpus": 0})
    outcome: dict[str, Any] = {}

    def train() -> None:
        try:
            fit(cfg, parent_run_id=parent_run_id, callbacks=[ForwardReports(reports)],
                tags={"sweep": sweep.cfg.name, "trial_id": trial, **{f"sweep.{k}": str(v) for k, v in params.items()}})
        except BaseException as exc:  # re-raised in the trial's thread, where Tune sees it
            outcome["error"] = exc

    worker = threading.Thread(target=train, name=f"fit-{run_name}", daemon=True)
    worker.start()
    while worker.is_alive() or not reports.empty():
        try:
            metrics, path = reports.get(timeout=1.0)
        except Empty:
            continue
        if sweep.cfg.metric not in metrics:
            # Tune refuses a result without its metric: the loss terms come at the first log line,
            # the evaluation's at the first evaluation, a later stage's (DrNet's psnr_predicted) in that stage.
            continue
        last = metrics["step"] >= cfg.train.steps
        if last:
            # Tune stops the trial at this report, killing its actor and the Train controller the
            # actor owns. Killed while it shuts down, the controller leaves its workers' placement
            # group holding their CPUs, and the next trial waits for them forever (Tune with Train
            # V2, ray-project/ray#54305): let fit() end first.
            worker.join()
        _report({**metrics, LAST_STEP: last}, trial, run_name, path)
    if "error" in outcome:
        raise outcome["error"]


def _train_run(trial: str) -> tuple[str, str | None]:
    """The Train run this trial (re)starts, and the checkpoint a new run starts from."""
    checkpoint = ray.tune.get_checkpoint()
    if checkpoint is None:
        return trial, None
    with checkpoint.as_directory() as folder:
        pointer = json.loads((Path(folder) / POINTER).read_text())
    if pointer["trial"] == trial:
        return pointer["run"], None  # restored sweep: the run resumes from its own latest checkpoint
    log.info("trial %s continues from trial %s at step %d (%s)", trial, pointer["trial"], pointer["step"],
             pointer["path"])
    return f"{trial}-from-{pointer['trial']}-{pointer['step']}", pointer["path"]


def _report(metrics: dict[str, Any], trial: str, run_name: str, path: str | None) -> None:
    if path is None:
        ray.tune.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        pointer = {"trial": trial, "run": run_name, "path": path, "step": metrics["step"]}
        (Path(folder) / POINTER).write_text(json.dumps(pointer))
        ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(folder))

