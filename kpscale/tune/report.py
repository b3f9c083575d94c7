"""What a finished sweep leaves behind: a table of its trials, the best config as a YAML file
that `python -m kpscale.train --config` trains as it is, and on the parent MLflow run the best
metric, the best values, a plot of the metric against each swept key and both files."""

from __future__ import annotations

import csv
import io
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

import fsspec
import mlflow

from kpscale.train.config import TrainConfig
from kpscale.tune.sweep import Sweep

log = logging.getLogger("kpscale.tune")


def summarise(results, tune_trials, sweep: Sweep, base: TrainConfig, parent_run_id: str, uri: str) -> dict[str, Any]:
    """`results`: the Tuner's ResultGrid; `tune_trials`: Tune's trials of the same sweep, which
    name each result's trial (a result's metrics name the trial that reported them, which after a
    PBT copy is the donor)."""
    s = sweep.cfg
    ids = {trial.path: trial.trial_id for trial in tune_trials}
    trials = [_trial_row(result, ids[result.path], sweep, base.train.steps) for result in results]
    failed = [t["trial"] for t in trials if t["status"] == "failed"]
    if failed:
        log.warning("sweep %s: %d of %d trials failed (%s); their errors are in %s", s.name, len(failed), len(trials),
                    ", ".join(failed), sweep.folder)
    scored = [t for t in trials if t["value"] is not None]
    if not scored:
        raise RuntimeError(f"sweep {s.name}: no trial reported {s.metric}; see the trial errors in {sweep.folder}")
    best = (min if s.mode == "min" else max)(scored, key=lambda t: t["value"])
    best_cfg = sweep.trial_config(best["params"])
    best_cfg = best_cfg.model_copy(update={"train": best_cfg.train.model_copy(update={"run_name": f"{s.name}-best"})})
    best_yaml = (f"# Best of sweep {s.name} ({sweep.source}): {s.metric} = {best['value']:.6g} (trial {best['trial']})\n"
                 f"# Train it: python -m kpscale.train --config {sweep.folder}/best.yaml\n" + best_cfg.to_yaml())
    fs, path = fsspec.core.url_to_fs(f"{sweep.folder}/best.yaml")
    fs.pipe_file(path, best_yaml.encode())

    client = mlflow.MlflowClient(uri)
    _close_trial_runs(client, parent_run_id, {t["trial"]: t["status"] for t in trials})
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "best.yaml").write_text(best_yaml)
        Path(folder, "trials.csv").write_text(_csv(trials, list(s.space)))
        _plot(trials, sweep, best).savefig(Path(folder, "metric_vs_params.png"), dpi=110, bbox_inches="tight")
        client.log_artifacts(parent_run_id, folder, artifact_path="sweep")
    client.log_batch(parent_run_id, metrics=[mlflow.entities.Metric(f"best/{s.metric}", best["value"], 0, 0)],
                     params=[mlflow.entities.Param(f"best.{k}", str(v)) for k, v in best["params"].items()])
    for status in ("finished", "stopped early", "failed"):
        client.log_metric(parent_run_id, f"trials_{status.replace(' ', '_')}", sum(t["status"] == status for t in trials))
    client.set_tag(parent_run_id, "best_trial", best["trial"])
    client.set_terminated(parent_run_id, status="FINISHED")
    _print_table(trials, sweep, best)
    return {"best": best, "trials": trials, "best_config": f"{sweep.folder}/best.yaml", "parent_run_id": parent_run_id}


def _trial_row(result, trial: str, sweep: Sweep, steps: int) -> dict[str, Any]:
    metrics = result.metrics or {}
    value = metrics.get(sweep.cfg.metric)
    value = float(value) if value is not None and math.isfinite(value) else None
    step = metrics.get("step", 0)
    status = "failed" if result.error else "finished" if step >= steps else "stopped early"
    return {"trial": trial,
            "params": {k: result.config[k] for k in sweep.cfg.space}, "value": value, "step": step, "status": status}


def _close_trial_runs(client, parent_run_id: str, status: dict[str, str]) -> None:
    """Close each trial's MLflow runs with what Tune knows of the trial: finished (its latest
    run; earlier ones were replaced by PBT), stopped early by the scheduler, or failed."""
    runs = client.search_runs([client.get_run(parent_run_id).info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")
    latest: dict[str, int] = {}
    for run in runs:
        trial = run.data.tags.get("trial_id")
        latest[trial] = max(latest.get(trial, 0), run.info.start_time)
    for run in runs:
        trial = run.data.tags.get("trial_id")
        if status.get(trial) == "stopped early":
            client.set_tag(run.info.run_id, "stopped_early", "true")
        final = {"finished": "FINISHED", "failed": "FAILED"}.get(status.get(trial), "KILLED")
        if final != "KILLED" and run.info.start_time != latest[trial]:
            final = "KILLED"
        client.set_terminated(run.info.run_id, status=final)


def _csv(trials: list[dict[str, Any]], keys: list[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["trial", *keys, "value", "step", "status"])
    for t in trials:
        writer.writerow([t["trial"], *(t["params"][k] for k in keys), t["value"], t["step"], t["status"]])
    return out.getvalue()


def _plot(trials: list[dict[str, Any]], sweep: Sweep, best: dict[str, Any]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(sweep.cfg.space)
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4), squeeze=False, sharey=True)
    for ax, key in zip(axes[0], keys):
        param = sweep.cfg.space[key]
        values = [t["params"][key] for t in trials if t["value"] is not None]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        labels = sorted({str(v) for v in values})
        x_of = (lambda v: v) if numeric else (lambda v: labels.index(str(v)))
        for status, marker in (("finished", "o"), ("stopped early", "x")):
            points = [(x_of(t["params"][key]), t["value"]) for t in trials
                      if t["status"] == status and t["value"] is not None]
            if points:
                ax.scatter(*zip(*points), marker=marker, label=status, alpha=0.8)
        ax.scatter([x_of(best["params"][key])], [best["value"]], marker="*", s=220, c="gold", edgecolors="k",
                   label="best", zorder=3)
        if param.kind == "loguniform":
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel(key)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{sweep.cfg.metric} (last reported)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"sweep {sweep.cfg.name}: {sweep.cfg.metric} ({sweep.cfg.mode}) vs each swept key")
    return fig


def _print_table(trials: list[dict[str, Any]], sweep: Sweep, best: dict[str, Any]) -> None:
    keys = list(sweep.cfg.space)
    print(f"\nsweep {sweep.cfg.name}: {len(trials)} trials, {sweep.cfg.metric} ({sweep.cfg.mode})")
    print("  ".join(f"{h:>14}" for h in ["trial", *keys, "value", "step", "status"]))
    for t in sorted(trials, key=lambda t: (t["value"] is None, t["value"] or 0) if sweep.cfg.mode == "min"
                    else (t["value"] is None, -(t["value"] or 0))):
        cells = [t["trial"], *(_short(t["params"][k]) for k in keys),
                 "-" if t["value"] is None else f"{t['value']:.4g}", t["step"], t["status"]]
        print("  ".join(f"{str(c):>14}" for c in cells) + ("   <- best" if t is best else ""))
    print(f"\nbest config: {sweep.folder}/best.yaml  (python -m kpscale.train --config {sweep.folder}/best.yaml)")


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
