"""python -m kpscale.train [--config FILE] [key=value ...]

Trains a model with Ray Train workers running DeepSpeed. With no --config it trains the default
Struct-VRNN on the basketball data, building that data first if it is missing. With no Ray
address it starts a local Ray; with RAY_ADDRESS, or inside `ray job submit`, it joins the
cluster. Starting the same run (train.run_name) again resumes from its latest checkpoint.

Shipped configs (model.name picks the family):
  kpscale/models/struct_vrnn/configs/basketball_cpu.yaml      Struct-VRNN, CPU-sized (the default)
  kpscale/models/struct_vrnn/configs/basketball_cpu_rnn.yaml  Struct-RNN baseline (deterministic)
  kpscale/models/struct_vrnn/configs/paper_basketball.yaml    the paper's settings, K=12 (GPU-sized)
  kpscale/models/struct_vrnn/configs/paper_human36m.yaml      the paper's settings, K=48 (GPU-sized)
  kpscale/models/struct_vrnn/configs/dmcs_cpu.yaml            Struct-VRNN, action-conditioned, DMCS cartpole swing-up
  kpscale/models/cnn_vrnn/configs/basketball_cpu.yaml         CNN-VRNN baseline (no keypoints)
  kpscale/models/cnn_vrnn/configs/dmcs_cpu.yaml               CNN-VRNN baseline, action-conditioned, DMCS cartpole
  kpscale/models/drnet/configs/moving_mnist_cpu.yaml          DrNet on Moving MNIST, CPU-sized, both stages
  kpscale/models/drnet/configs/paper_moving_mnist.yaml        DrNet, the official settings (GPU-sized)
  kpscale/models/drnet/configs/kth.yaml                       DrNet on a converted video folder (data/kth)
  kpscale/models/class_conditional/configs/actors_cpu.yaml   Kim et al. on the articulated actors, CPU-sized, both stages
  kpscale/models/class_conditional/configs/paper_penn_action.yaml  Kim et al., the paper's settings (GPU-sized)
"""

from __future__ import annotations

import argparse
import sys

from kpscale import logs
from kpscale.config import ConfigError, parse_with_overrides
from kpscale.data.stream import DataError
from kpscale.train.config import load_train_config
from kpscale.train.launch import run, with_default_data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kpscale.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="training config (YAML); default: kpscale/models/struct_vrnn/configs/basketball_cpu.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="e.g. data.train=PATH train.steps=200 train.workers=2 train.zero_stage=2 "
                             "model.num_keypoints=12")
    args = parse_with_overrides(parser, argv)
    logs.setup()
    try:
        cfg = with_default_data(load_train_config(args.config, args.overrides))  # before any Ray resources
        run(cfg)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
