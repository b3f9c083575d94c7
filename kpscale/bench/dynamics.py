"""Dynamics benchmark: the VRNN alone (kpscale.models.vrnn), fed ground-truth keypoints (x, y, mu=1) of
dots moving at constant velocity and bouncing off the walls of a 64 px box, so that its errors
are the dynamics' own, not the detector's. Each --beta trains a model from the same seed on the
same batches; all are measured on the same held-out windows against holding the last observed
position and constant-velocity extrapolation. Errors are in pixels."""

from __future__ import annotations

import argparse
import math
import time

import torch
from tqdm import tqdm

from kpscale.config import positive
from kpscale.evaluate.tracking_error import distance, no_dynamics
from kpscale.models.vrnn import VRNN, sequence_l2
from kpscale.train.config import load_train_config

SIZE = 64  # box side in pixels; keypoints are in [-1, 1] units, SIZE / 2 px each


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--beta", type=float, nargs="+", default=[1.0, 0.0], help="KL weights, one model each")
    parser.add_argument("--steps", type=positive, default=2000, help="Adam steps per model")
    parser.add_argument("--dots", type=positive, default=3, help="objects, and keypoints")
    parser.add_argument("--batch-size", type=positive, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--windows", type=positive, default=200, help="held-out windows")
    parser.add_argument("--samples", type=positive, default=10, help="sampled futures per window (best of)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", help="training config whose model section sizes the VRNN (default: the package's)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="training config overrides")


def bouncing_dots(n: int, steps: int, dots: int, generator: torch.Generator) -> torch.Tensor:
    """Keypoints [n, steps, dots, 3]: dots of radius 4 px at 1-3 px a step in random directions,
    reflected at the walls; mu = 1."""
    r = 4.0
    pos = torch.rand(n, dots, 2, generator=generator) * (SIZE - 2 * r) + r
    angle = torch.rand(n, dots, generator=generator) * 2 * math.pi
    speed = 1 + 2 * torch.rand(n, dots, generator=generator)
    vel = torch.stack([angle.cos(), angle.sin()], -1) * speed[..., None]
    frames = []
    for _ in range(steps):
        frames.append(pos)
        pos = pos + vel
        low, high = pos < r, pos > SIZE - r
        pos = torch.where(low, 2 * r - pos, torch.where(high, 2 * (SIZE - r) - pos, pos))
        vel = torch.where(low | high, -vel, vel)
    xy = torch.stack(frames, 1) / (SIZE / 2) - 1
    return torch.cat([xy, torch.ones_like(xy[..., :1])], -1)


def pixels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in pixels between keypoints [..., 3] (x, y only)."""
    return distance(a[..., :2], b[..., :2]) * SIZE / 2


@torch.no_grad()
def measure(model: VRNN, test: torch.Tensor, observed: int, samples: int) -> dict:
    """Free-running (as `sample_future`: no teacher forcing beyond what observed_input feeds,
    the posterior on observed steps, the prior after) and teacher-forced (fed the true
    keypoints on every step) errors."""
    model.eval()
    n, steps = test.shape[:2]
    free, kl, _ = model(test.repeat_interleave(samples, 0), steps, observed=observed)
    err = pixels(free.unflatten(0, (n, samples)), test[:, None])  # [n, S, T, K]
    forced = model(test, steps, p_true=(1.0, 1.0), observed=observed)[0]
    forced_err = pixels(forced, test)  # [n, T, K]
    return {
        "best_predicted": err[:, :, observed:].mean(2).min(1).values.mean().item(),  # per object
        "mean_predicted": err[:, :, observed:].mean().item(),
        "observed": err[:, :, :observed].mean().item(),
        "forced_observed": forced_err[:, :observed].mean().item(),
        "forced_predicted": forced_err[:, observed:].mean().item(),
        "kl_per_step": kl.mean(0).tolist(),
        "error_per_step": err.mean((0, 1, 3)).tolist(),
        "mu_predicted": free[..., observed:, :, 2].mean().item(),
    }


def baselines(test: torch.Tensor, observed: int) -> dict:
    future = test.shape[1] - observed
    last, before = test[:, observed - 1:observed], test[:, observed - 2:observed - 1]
    ahead = torch.arange(1, future + 1, dtype=test.dtype)[None, :, None, None]
    return {"hold": pixels(no_dynamics(test[:, :observed], future), test[:, observed:]).mean().item(),
            "constant_velocity": pixels(last + (last - before) * ahead, test[:, observed:]).mean().item()}


def run(args: argparse.Namespace) -> dict:
    train_cfg = load_train_config(args.config, args.overrides)
    base = train_cfg.model
    observed, steps = base.observed, base.steps
    test = bouncing_dots(args.windows, steps, args.dots, torch.Generator().manual_seed(10**6 + args.seed))
    figures = {"baselines": baselines(test, observed), "models": {}}
    for beta in args.beta:
        cfg = base.model_copy(update={"beta": beta})
        torch.manual_seed(args.seed)
        model = VRNN(3 * args.dots, cfg)
        optimizer = torch.optim.Adam(model.parameters(), args.lr)
        batches = torch.Generator().manual_seed(args.seed)
        started = time.perf_counter()
        for step in tqdm(range(args.steps), desc=f"beta {beta:g}", unit="step", leave=False):
            x = bouncing_dots(args.batch_size, steps, args.dots, batches)
            predicted, kl, _ = model(x, steps, cfg.p_true(step), cfg.num_samples)
            loss = sequence_l2(predicted, x) + cfg.kl_weight(step) * kl.mean()
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.train.grad_clip or float("inf"))
            optimizer.step()
        figures["models"][f"beta={beta:g}"] = {**measure(model, test, observed, args.samples),
                                                "train_s": time.perf_counter() - started}
    _print(figures, args.samples)
    return figures


def _print(figures: dict, samples: int) -> None:
    b = figures["baselines"]
    print(f"held-out windows, pixels; hold last position {b['hold']:.2f}, "
          f"constant velocity {b['constant_velocity']:.2f}")
    print(f"{'model':<12} {'best of ' + str(samples):>10} {'mean':>7} {'observed':>9} "
          f"{'forced obs':>11} {'forced pred':>12} {'mu pred':>8}  KL per observed step")
    for name, m in figures["models"].items():
        print(f"{name:<12} {m['best_predicted']:>10.2f} {m['mean_predicted']:>7.2f} {m['observed']:>9.2f} "
              f"{m['forced_observed']:>11.2f} {m['forced_predicted']:>12.2f} {m['mu_predicted']:>8.2f}  "
              + " ".join(f"{v:.1f}" for v in m["kl_per_step"]))
