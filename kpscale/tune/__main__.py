"""python -m kpscale.tune --sweep FILE [key=value ...]

Runs a Ray Tune sweep: each trial is a Ray Train run of `python -m kpscale.train` with values
drawn from the sweep file's search space, logged as a child of one parent MLflow run. ASHA (the
default) stops poor trials early; PBT and FIFO are available. At the end the parent run holds
the best metric and values, a plot of the metric against each swept key, and the best config,
also written to STORAGE/NAME/best.yaml for `python -m kpscale.train --config`.

Overrides: `model.*`, `data.*`, `train.*`, `tracking.*` set the base training config (e.g.
data.train=PATH train.steps=400); other keys set the sweep file (e.g. num_samples=8
scheduler.grace_period=100). Running the same sweep (name) again restores it: finished trials
are kept and unfinished ones resume from their checkpoints. With no Ray address it starts a
local Ray; with RAY_ADDRESS, or inside `ray job submit`, it joins that cluster.
"""

from __future__ import annotations

import argparse
import sys

from kpscale import logs
from kpscale.config import ConfigError, parse_with_overrides
from kpscale.data.stream import DataError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kpscale.tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", required=True, help="sweep file (YAML), e.g. tuning/basketball.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="e.g. num_samples=8 scheduler.type=pbt train.steps=400 data.train=PATH")
    args = parse_with_overrides(parser, argv)
    logs.setup()
    from kpscale.tune.runner import SweepInterrupted, run_sweep
    from kpscale.tune.sweep import load_sweep

    try:
        sweep = load_sweep(args.sweep, args.overrides)  # the whole sweep is checked before Ray starts
        run_sweep(sweep)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except SweepInterrupted as exc:
        print(str(exc), file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
