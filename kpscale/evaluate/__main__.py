"""python -m kpscale.evaluate --run RUN_ID_OR_MODEL_FOLDER --data SHARDS [options]

Samples N futures for each held-out clip and scores them: FVD (with I3D weights), PSNR and SSIM
per predicted step (of the closest and furthest sample of each clip, chosen by VGG cosine
similarity, or PSNR without VGG weights), VGG cosine similarity (with VGG weights), and
the tracking error (a linear regression from the model's states: keypoints, or CNN-VRNN's
feature vector) on observed and predicted frames (best of N) against the null model and "no
dynamics", and, where the clips have rewards, the reward prediction error per step from the
dynamics' latent state, normalised to the null model's (kpscale.evaluate.reward_prediction). An
action-conditioned model rolls forward under each clip's actions, or those of --actions FILE.npy.
Results go to MLflow as a run nested under the training run (or a new run when --run
is a folder): metrics, per-frame curves, PNG plots, a keypoint model's trajectories as Parquet
and the summary table printed at the end. With --workers N > 1 the clips are split over
N Ray tasks (a local Ray, or the cluster in RAY_ADDRESS).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from kpscale import logs
from kpscale.config import ConfigError, validate
from kpscale.data.stream import DataError, resolve_shards
from kpscale.evaluate.evaluator import (EvaluateConfig, PartResult, evaluate_part, rollout_actions,
                                        selection_criterion, summarise)
from kpscale.evaluate.weights import WeightsUnavailable

log = logging.getLogger("kpscale.evaluate")


FVD_MIN_CLIPS = 400  # I3D logits have 400 dimensions: fewer real clips leave their covariance singular
DEFAULTS = EvaluateConfig.model_fields  # one place for defaults: unset flags leave them to the config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kpscale.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="MLflow run id of a training run, or a model folder")
    add_evaluation_options(parser)
    return parser


def add_evaluation_options(parser: argparse.ArgumentParser) -> None:
    """The options of an evaluation (EvaluateConfig's fields but the run), shared with kpscale.compare."""
    parser.add_argument("--data", required=True, help="held-out shards (folder, glob, manifest or URL)")
    parser.add_argument("--fit-data", help="training shards for the tracking regression (default: the run's data.train)")
    parser.add_argument("--samples", type=int, help=f"sampled futures per clip (default {DEFAULTS['samples'].default})")
    parser.add_argument("--future", type=int, help="predicted steps, beyond training's if larger; the clips "
                        "need observed + future frames (default: the model's model.predicted)")
    parser.add_argument("--start", type=int, help="the frame of each clip the observed frames start at, in the "
                        f"held-out and the fitted clips alike (default {DEFAULTS['start'].default}: the first)")
    parser.add_argument("--clips", type=int, help="evaluate at most this many held-out clips (default: all)")
    parser.add_argument("--fit-clips", type=int, help=f"training clips to fit the regression (default {DEFAULTS['fit_clips'].default})")
    parser.add_argument("--batch-size", type=int, help=f"clips per forward pass (default {DEFAULTS['batch_size'].default})")
    parser.add_argument("--workers", type=int, help=f"Ray tasks to split the clips over (default {DEFAULTS['workers'].default})")
    parser.add_argument("--cpus-per-worker", type=int, help=f"CPUs per Ray task (default {DEFAULTS['cpus_per_worker'].default})")
    parser.add_argument("--seed", type=int, help=f"sampling seed (default {DEFAULTS['seed'].default})")
    parser.add_argument("--actions", help="an .npy of actions [T, A] to roll every clip forward under, in place of "
                        "its own (an action-conditioned model; T >= observed + future - 1)")
    parser.add_argument("--per-clip", action="store_true",
                        help="pick the best sample per clip, not per object (the paper's Human3.6M rule)")
    parser.add_argument("--i3d", help="i3d_pretrained_400.pt for FVD (default $KPSCALE_I3D_WEIGHTS; none: no FVD)")
    parser.add_argument("--vgg", help="torchvision vgg16 weights for VGG cosine (default $KPSCALE_VGG_WEIGHTS)")
    parser.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")


def _optional(load, path: str | None):
    """A metric network, or None with a warning that says how to supply it."""
    try:
        return load(path), None
    except WeightsUnavailable as exc:
        log.warning("%s", exc)
        return None, str(exc)


def _fit(model, cfg, ecfg: EvaluateConfig):
    """The tracking regression, or (None, None, reason) when it cannot be fitted."""
    from kpscale.evaluate.snapshot import fit_regression

    spec = ecfg.fit_data or cfg.data.train
    try:
        weights, positions = fit_regression(model, spec, cfg, ecfg.fit_clips, torch.device("cpu"), torch.float32)
        return weights, positions, None
    except (DataError, ValueError, FileNotFoundError) as exc:
        reason = f"tracking error unavailable: {exc} (give --fit-data with training shards that have coords)"
        log.warning("%s", reason)
        return None, None, reason


def _fit_reward(model, cfg, ecfg: EvaluateConfig):
    """The reward model fitted on the training clips' rollouts; (None, None) when the data has no
    rewards or the model no latent dynamics state, (None, reason) when it cannot be fitted."""
    from kpscale.evaluate import reward_prediction
    from kpscale.evaluate.snapshot import fixed_batches

    if not hasattr(model, "latent_states"):  # no dynamics state to read the reward from
        return None, None
    spec = ecfg.fit_data or cfg.data.train
    future = ecfg.future or cfg.model.predicted
    try:
        first = next(fixed_batches(spec, cfg.data.model_copy(update={"batch_size": 1}), None, 1))
        if "rewards" not in first:
            return None, None  # a dataset without rewards: nothing to say
        batches = fixed_batches(spec, cfg.data.model_copy(update={"batch_size": ecfg.batch_size}),
                                cfg.model.observed + future, ecfg.fit_clips)
        log.info("fitting the reward model on the latent states of %d training clips' rollouts", ecfg.fit_clips)
        given = ecfg.given_actions()
        latent, rewards = reward_prediction.rollouts(model, batches, future, ecfg.samples, torch.device("cpu"),
                                                     lambda batch: rollout_actions(cfg, batch, given))
        return reward_prediction.fit(latent, rewards, ecfg.seed), None
    except (DataError, ValueError, FileNotFoundError) as exc:
        reason = f"reward prediction unavailable: {exc}"
        log.warning("%s", reason)
        return None, reason


def _remote_part(state: dict, cfg_dict: dict, ecfg_dict: dict, weights, positions, reward_model,
                 use_i3d: bool, use_vgg: bool, rank: int, world: int) -> PartResult:
    """One Ray task: rebuild the model and metric networks there, evaluate its part."""
    from kpscale.evaluate.fvd import FVD
    from kpscale.evaluate.frames import load_vgg
    from kpscale.evaluate.i3d import load_i3d
    from kpscale.models import build_family
    from kpscale.train.config import TrainConfig

    cfg, ecfg = TrainConfig.model_validate(cfg_dict), EvaluateConfig.model_validate(ecfg_dict)
    family = build_family(cfg.model)
    family.root.load_state_dict(state)
    model = family.predictor()
    i3d = FVD(load_i3d(ecfg.i3d), "cpu") if use_i3d else None
    vgg = load_vgg(ecfg.vgg) if use_vgg else None
    return evaluate_part(model.eval(), cfg, ecfg, weights, positions, reward_model, i3d, vgg, rank, world)


def _run_parts(model, cfg, ecfg: EvaluateConfig, weights, positions, reward_model, i3d, vgg,
               total: int) -> list[PartResult]:
    if ecfg.workers == 1:
        with tqdm(total=total, unit="clip", desc="evaluating") as bar:
            return [evaluate_part(model, cfg, ecfg, weights, positions, reward_model, i3d, vgg, 0, 1, bar)]
    import ray

    from kpscale.train.launch import start_ray
    start_ray()
    # More parts than tasks (a finer progress bar, stragglers even out), but none without a clip.
    parts = min(4 * ecfg.workers, total)
    task = ray.remote(num_cpus=ecfg.cpus_per_worker)(_remote_part)
    shared = [ray.put(x) for x in (model.state_dict(), cfg.model_dump(mode="json"), ecfg.model_dump(mode="json"))]
    pending = [task.remote(*shared, weights, positions, reward_model, i3d is not None, vgg is not None, rank, parts)
               for rank in range(parts)]
    results = []
    with tqdm(total=parts, unit="part", desc=f"evaluating on {ecfg.workers} Ray workers") as bar:
        while pending:
            done, pending = ray.wait(pending)
            results += ray.get(done)
            bar.update(len(done))
    return results


def first_frame(curve: str, observed: int) -> int:
    """The frame a per-frame curve starts at: tracking and reward curves span the whole clip,
    frame metrics the predicted frames."""
    return 1 if curve.startswith(("tracking", "reward")) else observed + 1


def log_evaluation(ecfg: EvaluateConfig, result: Evaluation, parent_run_id: str | None = None) -> str:
    """Everything to MLflow: a run nested under `parent_run_id`, else under the training run when
    --run is a run id."""
    cfg, metrics, curves, parts, notes, table = (result.cfg, result.metrics, result.curves, result.parts,
                                                 result.notes, result.table)
    import mlflow

    from kpscale.evaluate.media import save_gif
    from kpscale.evaluate.plots import diversity_plot, per_frame_plot
    from kpscale.evaluate.trajectories import write_trajectories
    from kpscale.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri(ecfg.tracking_uri))
    if parent_run_id is None and not Path(ecfg.run).is_dir():
        parent_run_id = ecfg.run
    parent = mlflow.get_run(parent_run_id) if parent_run_id else None
    experiment = parent.info.experiment_id if parent else mlflow.set_experiment(cfg.tracking.experiment).experiment_id
    with mlflow.start_run(experiment_id=experiment, run_name="evaluate",
                          parent_run_id=parent.info.run_id if parent else None,
                          tags={"kind": "evaluation", "model": ecfg.run}, nested=True) as run:
        mlflow.log_params({k: v for k, v in ecfg.flat().items() if v is not None})
        mlflow.log_metrics(metrics)
        obs = cfg.model.observed
        by_frame: dict[int, dict[str, float]] = {}  # per-frame curves, the frame number as MLflow's step
        for name, curve in curves.items():
            first = first_frame(name, obs)
            for i, value in enumerate(curve):
                if math.isfinite(value):
                    by_frame.setdefault(first + i, {})[f"{name}_by_frame"] = float(value)
        for frame, values in sorted(by_frame.items()):
            mlflow.log_metrics(values, step=frame)
        with tempfile.TemporaryDirectory() as folder:
            out = Path(folder)
            titles = {"psnr": "PSNR (dB)", "ssim": "SSIM", "vgg_cosine": "VGG cosine similarity"}
            frame_metrics = {title: (curves[f"{name}_closest"], curves[f"{name}_furthest"])
                             for name, title in titles.items() if f"{name}_closest" in curves}
            diversity_plot(frame_metrics, obs + 1, out / "diversity.png")
            if "tracking_null" in curves:
                labels = {"tracking_observed": "observed frames",
                          "tracking_predicted": f"predicted, best of {ecfg.samples}",
                          "tracking_no_dynamics": "no dynamics (last observed held)",
                          "tracking_null": "null model (mean positions)"}
                per_frame_plot({label: curves[name] for name, label in labels.items()}, obs, "tracking error (px)",
                               "keypoints -> object positions (linear regression)", out / "tracking.png")
            if "reward_error" in curves:
                per_frame_plot({cfg.model.name: curves["reward_error"]}, obs, "reward error / null model's",
                               "reward from the dynamics' latent state", out / "reward_prediction.png",
                               reference=("null model (mean training reward)", 1.0))
            if any(p.tables for p in parts):  # keypoint models
                write_trajectories([t for p in parts for t in p.tables], out / "trajectories.parquet")
            (out / "summary.txt").write_text(table + "".join(f"\n{n}" for n in notes) + "\n")
            for name, image in result.figures.items():
                Image.fromarray(image).save(out / f"{name}.png")
            save_gif(result.video, out / "video.gif")
            mlflow.log_artifacts(folder, artifact_path="evaluation")
        return run.info.run_id


def summary_table(metrics: dict[str, float], samples: int, criterion: str | None) -> str:
    rows = [("clips evaluated", f"{metrics['clips']:.0f}")]
    if criterion:
        rows.append(("closest/furthest: a sample per clip by", criterion))
    labels = {"fvd": "FVD (lower is better)",
              "psnr_closest": f"PSNR dB, closest of {samples}", "psnr_furthest": "PSNR dB, furthest",
              "ssim_closest": f"SSIM, closest of {samples}", "ssim_furthest": "SSIM, furthest",
              "vgg_cosine_closest": f"VGG cosine, closest of {samples}", "vgg_cosine_furthest": "VGG cosine, furthest",
              "tracking_error_observed": "tracking error px, observed frames",
              "tracking_error_predicted": f"tracking error px, predicted (best of {samples})",
              "tracking_error_no_dynamics": "tracking error px, no dynamics",
              "tracking_error_below_no_dynamics": "  predicted below no dynamics, px",
              "tracking_error_null": "tracking error px, null model",
              "objects_found": "objects with a keypoint on them",
              "reward_error_predicted": "reward error / null model's, predicted",
              "reward_error_observed": "reward error / null model's, observed",
              "reward_mse_predicted": "reward squared error, predicted",
              "reward_mse_null": "reward squared error, null model"}
    rows += [(label, f"{metrics[key]:.4g}") for key, label in labels.items() if key in metrics]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {value:>10}" for name, value in rows)


def _check_length(ecfg: EvaluateConfig, cfg) -> None:
    """Refuse a window longer than the first held-out clip, rather than skip every clip."""
    from kpscale.evaluate.snapshot import fixed_batches
    needed = ecfg.start + cfg.model.observed + (ecfg.future or cfg.model.predicted)
    loader = cfg.data.model_copy(update={"batch_size": 1, "window_start": 0})
    frames = next(fixed_batches(ecfg.data, loader, None, 1))["video"].shape[1]
    if frames < needed:
        flag = f"--future {ecfg.future}" if ecfg.future else f"model.predicted {cfg.model.predicted}"
        flag += f" from --start {ecfg.start}" if ecfg.start else ""
        skipped = f"{ecfg.start} skipped + " if ecfg.start else ""
        raise ConfigError(f"{flag}: the clips of {ecfg.data} have {frames} frames, {skipped}{cfg.model.observed} "
                          f"observed + {needed - ecfg.start - cfg.model.observed} predicted need {needed}")


@dataclass
class Evaluation:
    """One model's evaluation: its training config, the merged metrics and curves, the parts
    (for the trajectories) and notes on what was unavailable."""
    cfg: object
    metrics: dict[str, float]
    curves: dict[str, np.ndarray]
    parts: list[PartResult]
    notes: list[str]
    table: str
    figures: dict[str, np.ndarray]  # images the model draws of itself (DrNet: its swap grid)
    video: np.ndarray  # the first held-out clip | a sampled future, frames [T, H, W, 3]


def held_out_clips(ecfg: EvaluateConfig) -> int:
    """How many held-out clips will be evaluated; DataError when the shards cannot be read."""
    total = sum(r.count for r in resolve_shards(ecfg.data))
    return min(total, ecfg.clips or total)


def prepare(ecfg: EvaluateConfig):
    """The model and its training config, or ConfigError/DataError before any work is done."""
    from kpscale.predict import load_trained

    model, cfg = load_trained(ecfg.run, ecfg.tracking_uri)
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"window_start": ecfg.start})})
    if not hasattr(model, "represent"):  # generates from a class, predicts no observed clip's future
        raise ConfigError(f"{ecfg.run}: a {cfg.model.name} model is evaluated during its training (its MLflow run's "
                          "metrics, videos and figures); kpscale.evaluate scores models that predict observed clips")
    _check_length(ecfg, cfg)
    _check_actions(ecfg, cfg)
    return model, cfg


def _check_actions(ecfg: EvaluateConfig, cfg) -> None:
    """Refuse --actions a model cannot roll forward under, before any work is done."""
    try:
        given = ecfg.given_actions()
        if given is None:
            return
        if not getattr(cfg.model, "action_conditioned", False):
            raise ValueError(f"--actions: a {cfg.model.name} model with model.action_conditioned false takes no actions")
        try:
            cfg.model.check_actions(given, 1, cfg.model.observed + (ecfg.future or cfg.model.predicted))
        except ValueError as exc:
            raise ValueError(f"--actions {ecfg.actions}: {exc}") from None
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def metric_networks(ecfg: EvaluateConfig) -> tuple[object, object, list[str]]:
    """I3D for FVD and VGG for cosine similarity, each None (with a note why) without weights."""
    from kpscale.evaluate.fvd import FVD
    from kpscale.evaluate.frames import load_vgg
    from kpscale.evaluate.i3d import load_i3d

    i3d, i3d_note = _optional(lambda p: FVD(load_i3d(p), "cpu"), ecfg.i3d)
    vgg, vgg_note = _optional(load_vgg, ecfg.vgg)
    return i3d, vgg, [n for n in (i3d_note, vgg_note) if n]


def evaluate_model(model, cfg, ecfg: EvaluateConfig, total: int, i3d, vgg, notes: list[str]) -> Evaluation:
    """Evaluate `total` held-out clips (`held_out_clips`)."""
    notes = list(notes)
    weights, positions, note = _fit(model, cfg, ecfg)
    reward_model, reward_note = _fit_reward(model, cfg, ecfg)
    notes += [n for n in (note, reward_note) if n]
    if ecfg.actions:
        notes.append(f"every clip rolled forward under the actions of {ecfg.actions}, not its own: errors "
                     "against the clips' frames and rewards measure that counterfactual")
    log.info("evaluating %s on %d clips of %s: %d sampled futures each", ecfg.run, total, ecfg.data, ecfg.samples)
    parts = _run_parts(model, cfg, ecfg, weights, positions, reward_model, i3d, vgg, total)
    metrics, curves = summarise(parts, cfg.model.observed, cfg.model.image_size)
    if "fvd" in metrics and metrics["clips"] < FVD_MIN_CLIPS:
        notes.append(f"FVD from {metrics['clips']:.0f} clips: below {FVD_MIN_CLIPS} the covariance of its "
                     f"{FVD_MIN_CLIPS}-dimensional I3D features is poorly estimated; compare FVDs of equal clip counts")
    table = summary_table(metrics, ecfg.samples, selection_criterion({n: None for p in parts for n in p.arrays}))
    return Evaluation(cfg, metrics, curves, parts, notes, table, *_showcase(model, cfg, ecfg))


@torch.no_grad()
def _showcase(model, cfg, ecfg: EvaluateConfig) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """From the first held-out clips: what a model draws of itself (its optional `figures`), and
    the video of the first clip beside a future sampled over the training horizon."""
    from kpscale.evaluate.media import panel
    from kpscale.evaluate.snapshot import fixed_batches

    batches = list(fixed_batches(ecfg.data, cfg.data, cfg.window, 6))
    clips = torch.cat([batch["video"] for batch in batches])
    figures = {name: image.numpy() for name, image in model.figures(clips).items()} if hasattr(model, "figures") else {}
    torch.manual_seed(ecfg.seed)
    first = {name: value[:1] for name, value in batches[0].items() if name in ("video", "actions")}
    _, frames = model.sample_future(clips[:1], cfg.model.predicted, 1,
                                    **rollout_actions(cfg, first, ecfg.given_actions()))
    return figures, panel(clips[0], None, frames[0, 0], cfg.model.observed)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logs.setup()
    try:
        given = {k: v for k, v in vars(args).items() if v is not None and k != "per_clip"}
        ecfg = validate(EvaluateConfig, given | {"per_object": not args.per_clip}, "command line")
        total = held_out_clips(ecfg)
        model, cfg = prepare(ecfg)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    i3d, vgg, notes = metric_networks(ecfg)
    result = evaluate_model(model, cfg, ecfg, total, i3d, vgg, notes)
    run_id = log_evaluation(ecfg, result)
    print(f"\n{result.table}\n" + "".join(f"\nnote: {n}" for n in result.notes) + f"\n\nMLflow run {run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
