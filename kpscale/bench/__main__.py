"""python -m kpscale.bench {data,train,evaluate,dynamics,swap,gpu}: benchmarks that print side-by-side ratios measured in one run.
Figures and the commands that made them are kept in docs/benchmarks.md."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from kpscale import logs
from kpscale.config import ConfigError, parse_with_overrides
from kpscale.data.stream import DataError

# Only the chosen benchmark's module is imported: `gpu` runs where Ray, MLflow and the data
# builders' packages are not installed (a lent GPU machine).
BENCHES = {
    "data": "shard reader vs raw npz: bytes per clip, PSNR, clips/s on one core",
    "train": "Ray Train + DeepSpeed vs a bare loop, reader vs step, memory per ZeRO stage",
    "evaluate": "kpscale.evaluate clips/s with N samples: in-process, with I3D, over Ray",
    "dynamics": "the VRNN alone on ground-truth bouncing dots vs holding still and constant velocity",
    "swap": "DrNet: digits decoded with another clip's pose, located against both clips' coords",
    "gpu": "the training step on a GPU: fp32/bf16/compile/CUDA graphs by batch, DeepSpeed vs bare, busy fraction, "
           "host syncs, decode and what feeding the fastest case takes",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m kpscale.bench", description=__doc__)
    sub = parser.add_subparsers(dest="bench", required=True)
    chosen = next((a for a in argv if a in BENCHES), None)
    for name, text in BENCHES.items():
        p = sub.add_parser(name, help=text, description=text)
        if name == chosen:
            module = importlib.import_module(f"kpscale.bench.{name}")
            module.add_arguments(p)
            p.set_defaults(measure=module.run)
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
