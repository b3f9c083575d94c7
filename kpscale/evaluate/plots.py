"""PNG plots for the MLflow UI: metrics per time step, where a person would rather look than read."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _mark_observed(ax, observed: int) -> None:
    ax.axvspan(0.5, observed + 0.5, color="tab:green", alpha=0.08, label="observed frames")


def _save(fig, path: str | Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def diversity_plot(metrics: dict[str, tuple[np.ndarray, np.ndarray]], first_step: int, path: str | Path) -> Path:
    """The paper's Figure 3 view: per predicted step, the sampled future closest to the truth and
    the one furthest from it, for each frame metric {name: (closest [T], furthest [T])}."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for ax, (name, (closest, furthest)) in zip(axes[0], metrics.items()):
        steps = np.arange(first_step, first_step + len(closest))
        ax.plot(steps, closest, "o-", label="closest sample")
        ax.plot(steps, furthest, "s--", label="furthest sample")
        ax.fill_between(steps, furthest, closest, alpha=0.15)
        ax.set(xlabel="frame", title=name)
        ax.grid(alpha=0.3)
    axes[0, 0].legend()
    return _save(fig, path)


def per_frame_plot(curves: dict[str, np.ndarray], observed: int, ylabel: str, title: str, path: str | Path,
                   reference: tuple[str, float] | None = None) -> Path:
    """A metric per frame {label: [T] (NaN where a curve has no value)}, with the observed
    frames shaded and an optional horizontal reference line (label, value)."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    _mark_observed(ax, observed)
    for label, values in curves.items():
        ax.plot(np.arange(1, len(values) + 1), values, "o-", ms=3, label=label)
    if reference:
        ax.axhline(reference[1], color="k", ls="--", lw=1, label=reference[0])
    ax.set(xlabel="frame", ylabel=ylabel, title=title)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def comparison_plot(curves: dict[str, tuple[np.ndarray, np.ndarray]], lines: dict[str, tuple[np.ndarray, np.ndarray]],
                    first_frame: int, observed: int, title: str, path: str | Path) -> Path:
    """Models' curves {label: (mean [T], 95% half-width [T])} as lines with bands, reference
    lines (same form) dashed; NaN where a curve has no value."""
    fig, ax = plt.subplots(figsize=(6.8, 4.0))
    if first_frame == 1:
        _mark_observed(ax, observed)
    for style, group in (("o-", curves), ("--", lines)):
        for label, (mean, half) in group.items():
            steps = np.arange(first_frame, first_frame + len(mean))
            (line,) = ax.plot(steps, mean, style, ms=3, label=label)
            ax.fill_between(steps, mean - half, mean + half, color=line.get_color(), alpha=0.15)
    ax.set(xlabel="frame", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)

