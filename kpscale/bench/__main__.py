"""python -m kpscale.bench {data,train,evaluate,dynamics,swap}: benchmarks that print side-by-side ratios measured in one run.
Figures and the commands that made them are kept in docs/benchmarks.md."""

from __future__ import annotations

import argparse
import json
import sys

from kpscale import logs
from kpscale.bench import data, dynamics, evaluate, swap, train
from kpscale.config import ConfigError, parse_with_overrides
from kpscale.data.stream import DataError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kpscale.bench", description=__doc__)
    sub = parser.add_subparsers(dest="bench", required=True)
    p = sub.add_parser("data", help="shard reader vs raw npz: bytes per clip, PSNR, clips/s on one core")
    data.add_arguments(p)
    p.set_defaults(measure=data.run)
    p = sub.add_parser("train", help="Ray Train + DeepSpeed vs a bare loop, reader vs step, memory per ZeRO stage")
    train.add_arguments(p)
    p.set_defaults(measure=train.run)
    p = sub.add_parser("evaluate", help="kpscale.evaluate clips/s with N samples: in-process, with I3D, over Ray")
    evaluate.add_arguments(p)
    p.set_defaults(measure=evaluate.run)
    p = sub.add_parser("dynamics", help="the VRNN alone on ground-truth bouncing dots vs holding still and constant velocity")
    dynamics.add_arguments(p)
    p.set_defaults(measure=dynamics.run)
    p = sub.add_parser("swap", help="DrNet: digits decoded with another clip's pose, located against both clips' coords")
    swap.add_arguments(p)
    p.set_defaults(measure=swap.run)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parse_with_overrides(parser, argv)
    logs.setup()
    try:
        figures = args.measure(args)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
