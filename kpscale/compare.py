"""python -m kpscale.compare RUN [RUN ...] --data SHARDS [evaluate options] [--label RUN=NAME]
python -m kpscale.compare --sweep SWEEP_RUN_ID --data SHARDS [...]

Evaluates every run on the same held-out clips with the same samples (as `kpscale.evaluate`)
and compares them as the paper's Figures 4-6 do: runs whose configs differ only in the seed
form one model (labelled by the config keys that tell the models apart, or by --label), and
each metric is reported as the mean over its runs with a 95% interval (Student's t). Prints one
table of the headline metrics and one per-frame table per curve (predicted tracking error, best
of N, beside each model's no-dynamics line and the null model; PSNR/SSIM/VGG cosine of the
closest and furthest sample), plots each, and logs it all to an MLflow run "compare" whose
children are the runs' evaluations. `--sweep` takes the finished trials of a sweep (the sweep's
MLflow run; tuning/baselines.yaml runs the paper's models x seeds grid).
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

from kpscale import logs
from kpscale.config import ConfigError, validate
from kpscale.data.stream import DataError
from kpscale.evaluate.__main__ import (Evaluation, add_evaluation_options, evaluate_model, first_frame,
                                       held_out_clips, log_evaluation, metric_networks, prepare)
from kpscale.evaluate.evaluator import EvaluateConfig

log = logging.getLogger("kpscale.compare")

# Keys that differ between runs of one model: they do not make another model.
NOT_THE_MODEL = re.compile(r"^(train\.(seed|run_name|storage|init_checkpoint)|tracking\..*|data\.(train|test))$")
# Student's t at 0.975 for 1-30 degrees of freedom; 1.96 beyond.
T_975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]
HEADLINE = ["tracking_error_predicted", "tracking_error_no_dynamics", "tracking_error_below_no_dynamics",
            "tracking_error_observed",
            "tracking_error_null", "objects_found", "psnr_closest", "psnr_furthest", "ssim_closest", "ssim_furthest",
            "vgg_cosine_closest", "vgg_cosine_furthest", "fvd", "reward_error_predicted", "reward_error_observed",
            "reward_mse_predicted", "reward_mse_null"]


def interval(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and half-width of the 95% interval over axis 0 (0 for a single run: no spread known)."""
    n = len(values)
    mean = values.mean(0)
    if n < 2:
        return mean, np.zeros_like(mean)
    t = T_975[n - 2] if n - 1 <= len(T_975) else 1.96
    return mean, t * values.std(0, ddof=1) / math.sqrt(n)


def model_labels(configs: dict[str, dict]) -> dict[str, str]:
    """Run -> label: the config keys (flattened, dotted) whose values tell the models apart,
    among the keys every run has (a family's own keys are told by `model.name`)."""
    keys = sorted(set.intersection(*(set(c) for c in configs.values())))
    differ = [k for k in keys if not NOT_THE_MODEL.match(k) and len({repr(c.get(k)) for c in configs.values()}) > 1]
    return {run: " ".join(f"{k.rsplit('.', 1)[-1]}={c.get(k)}" for k in differ) or "all runs"
            for run, c in configs.items()}


def group(results: dict[str, Evaluation], labels: dict[str, str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for run in results:
        groups.setdefault(labels[run], []).append(run)
    return groups


def aggregate(results: dict[str, Evaluation], groups: dict[str, list[str]]) -> dict[str, dict]:
    """Per model: {"runs", "metrics": {name: (mean, half)}, "curves": {name: (mean [T], half [T])}}."""
    out = {}
    for label, runs in groups.items():
        metrics = {name: tuple(float(v) for v in interval(np.array([results[r].metrics[name] for r in runs])))
                   for name in results[runs[0]].metrics if all(name in results[r].metrics for r in runs)}
        curves = {name: interval(np.stack([results[r].curves[name] for r in runs]))
                  for name in results[runs[0]].curves if all(name in results[r].curves for r in runs)}
        out[label] = {"runs": runs, "metrics": metrics, "curves": curves}
    return out


def _cell(mean: float, half: float) -> str:
    return f"{mean:.4g} ± {half:.2g}" if half else f"{mean:.4g}"


def headline_table(models: dict[str, dict]) -> str:
    names = [n for n in HEADLINE if any(n in m["metrics"] for m in models.values())]
    header = ["metric", *(f"{label} ({len(m['runs'])} run{'s' * (len(m['runs']) > 1)})" for label, m in models.items())]
    rows = [[n, *(_cell(*m["metrics"][n]) if n in m["metrics"] else "-" for m in models.values())] for n in names]
    return _format([header, *rows])


def curve_table(models: dict[str, dict], name: str, start: int) -> str:
    """Per frame, each model's mean ± interval of curve `name` (frames where it has a value)."""
    length = max(len(m["curves"][name][0]) for m in models.values() if name in m["curves"])
    header = ["frame", *models]
    rows = []
    for i in range(length):
        cells = [_cell(m["curves"][name][0][i], m["curves"][name][1][i])
                 if name in m["curves"] and np.isfinite(m["curves"][name][0][i]) else "-" for m in models.values()]
        if any(c != "-" for c in cells):
            rows.append([str(start + i), *cells])
    return _format([header, *rows])


def _format(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kpscale.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", metavar="RUN", help="MLflow run ids of training runs, or model folders")
    parser.add_argument("--sweep", metavar="RUN_ID", help="also every finished trial of this sweep (its MLflow run id)")
    parser.add_argument("--label", action="append", default=[], metavar="RUN=NAME",
                        help="name the model of RUN (runs of one name are pooled); default: from the configs")
    add_evaluation_options(parser)
    return parser


def _labels_given(specs: list[str], runs: list[str]) -> dict[str, str]:
    given = {}
    for spec in specs:
        run, sep, name = spec.partition("=")
        if not sep or not name or run not in runs:
            raise ConfigError(f"--label {spec!r}: expected RUN=NAME with RUN one of the runs compared")
        given[run] = name
    return given


def sweep_trials(sweep_run_id: str, uri: str | None) -> list[str]:
    """The training runs of a sweep's finished trials, oldest first."""
    import mlflow

    from kpscale.tracking import tracking_uri

    client = mlflow.MlflowClient(tracking_uri(uri))
    try:
        sweep = client.get_run(sweep_run_id)
    except mlflow.exceptions.MlflowException:
        raise ConfigError(f"--sweep {sweep_run_id}: no such MLflow run in {tracking_uri(uri)}") from None
    trials = client.search_runs([sweep.info.experiment_id], f"tags.mlflow.parentRunId = '{sweep_run_id}' and "
                                "attributes.status = 'FINISHED'", order_by=["attributes.start_time ASC"])
    runs = [t.info.run_id for t in trials if t.data.tags.get("kind") != "evaluation"]
    if not runs:
        raise ConfigError(f"--sweep {sweep_run_id}: the run has no finished trials")
    return runs


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logs.setup()
    common = {k: v for k, v in vars(args).items() if v is not None and k not in ("runs", "label", "per_clip", "sweep")}
    try:
        if args.sweep:
            args.runs += sweep_trials(args.sweep, args.tracking_uri)
        if not args.runs:
            raise ConfigError("give the runs to compare: RUN ... and/or --sweep SWEEP_RUN_ID")
        if len(set(args.runs)) != len(args.runs):
            raise ConfigError("a RUN is given twice")
        given = _labels_given(args.label, args.runs)
        ecfgs = {run: validate(EvaluateConfig, common | {"run": run, "per_object": not args.per_clip}, "command line")
                 for run in args.runs}
        total = held_out_clips(next(iter(ecfgs.values())))  # the same clips for every run
        loaded = {run: prepare(ecfg) for run, ecfg in ecfgs.items()}  # every run loads before any is evaluated
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    labels = {**model_labels({run: cfg.flat() for run, (_, cfg) in loaded.items()}), **given}
    any_ecfg = next(iter(ecfgs.values()))
    i3d, vgg, notes = metric_networks(any_ecfg)
    results = {}
    for i, (run, (model, cfg)) in enumerate(loaded.items(), 1):
        log.info("run %d of %d: %s (%s)", i, len(loaded), run, labels[run])
        results[run] = evaluate_model(model, cfg, ecfgs[run], total, i3d, vgg, notes)
    models = aggregate(results, group(results, labels))
    notes = [n for r in results.values() for n in r.notes]
    observed = next(iter(results.values())).cfg.model.observed
    report = _report(models, observed)
    run_id = _log(ecfgs, results, labels, models, report, notes)
    print(f"\n{report}\n" + "".join(f"\nnote: {n}" for n in dict.fromkeys(notes)) + f"\n\nMLflow run {run_id}")
    return 0


CURVES = {"tracking_predicted": "tracking error px, predicted (best of the samples)",
          "tracking_no_dynamics": "tracking error px, no dynamics (last observed state held)",
          "tracking_below_no_dynamics": "tracking error px below no dynamics (no dynamics - predicted; paired per run)",
          "psnr_closest": "PSNR dB, closest sample", "psnr_furthest": "PSNR dB, furthest sample",
          "ssim_closest": "SSIM, closest sample", "ssim_furthest": "SSIM, furthest sample",
          "vgg_cosine_closest": "VGG cosine, closest sample", "vgg_cosine_furthest": "VGG cosine, furthest sample",
          "reward_error": "reward prediction error / null model's (mean training reward)"}


def _report(models: dict[str, dict], observed: int) -> str:
    parts = ["mean ± 95% interval over each model's runs", headline_table(models)]
    for name, title in CURVES.items():
        if any(name in m["curves"] for m in models.values()):
            parts += [f"{title}, per frame", curve_table(models, name, first_frame(name, observed))]
    return "\n\n".join(parts)


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\- /]", "-", label)


def _log(ecfgs: dict, results: dict[str, Evaluation], labels: dict[str, str], models: dict[str, dict], report: str,
         notes: list[str]) -> str:
    import mlflow

    from kpscale.evaluate.plots import comparison_plot
    from kpscale.tracking import tracking_uri

    first = next(iter(results.values()))
    mlflow.set_tracking_uri(tracking_uri(next(iter(ecfgs.values())).tracking_uri))
    experiment = mlflow.set_experiment(first.cfg.tracking.experiment).experiment_id
    with mlflow.start_run(experiment_id=experiment, run_name="compare", tags={"kind": "comparison"}) as parent:
        mlflow.log_params({"runs": " ".join(results), **{f"label/{i}": f"{labels[r]}: {r}"
                                                        for i, r in enumerate(results)}})
        for label, m in models.items():
            mlflow.log_metrics({f"{_slug(label)}/{name}_mean": v[0] for name, v in m["metrics"].items()})
            mlflow.log_metrics({f"{_slug(label)}/{name}_ci95": v[1] for name, v in m["metrics"].items()})
        for run, result in results.items():
            log_evaluation(ecfgs[run], result, parent_run_id=parent.info.run_id)
        with tempfile.TemporaryDirectory() as folder:
            out = Path(folder)
            observed = first.cfg.model.observed
            for name, title in CURVES.items():
                curves = {label: m["curves"][name] for label, m in models.items() if name in m["curves"]}
                if curves:
                    lines = {}
                    if name == "tracking_predicted":  # the paper's reference lines, dashed
                        lines = {f"{label}, no dynamics": m["curves"]["tracking_no_dynamics"]
                                 for label, m in models.items() if "tracking_no_dynamics" in m["curves"]}
                        lines["null model"] = next(m["curves"]["tracking_null"] for m in models.values())
                    if name == "reward_error":
                        ones = np.ones_like(next(iter(curves.values()))[0])
                        lines["null model"] = (ones, np.zeros_like(ones))
                    comparison_plot(curves, lines, first_frame(name, observed), observed, title, out / f"{name}.png")
            (out / "comparison.txt").write_text(report + "".join(f"\nnote: {n}" for n in dict.fromkeys(notes)) + "\n")
            mlflow.log_artifacts(folder, artifact_path="comparison")
        return parent.info.run_id


if __name__ == "__main__":
    sys.exit(main())
