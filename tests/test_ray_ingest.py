"""Clips arrive in real Ray Train workers, each rank reading its own part of the data."""

import json

import pytest
import ray
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from conftest import ROOT


def _loop(config):
    import torch

    from kpscale.data.stream import ClipLoader, LoaderConfig

    ctx = ray.train.get_context()
    loader = ClipLoader(config["data"], LoaderConfig(batch_size=4, num_workers=1), window=6,
                        rank=ctx.get_world_rank(), world_size=ctx.get_world_size())
    keys, shapes = [], set()
    for batch in loader:
        keys += batch["key"]
        shapes.add(tuple(batch["video"].shape))
        # A collective per step, as training does.
        torch.distributed.all_reduce(torch.ones(1))
    with open(f"{config['out']}/rank{ctx.get_world_rank()}.json", "w") as f:
        json.dump({"keys": keys, "shapes": sorted(shapes), "batches": len(loader)}, f)
    ray.train.report({"batches": len(keys) // 4})


@pytest.mark.slow
def test_clips_reach_ray_train_workers(basketball, tmp_path):
    # Workers import this test module by name to find `_loop`.
    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}})
    try:
        trainer = TorchTrainer(
            _loop, train_loop_config={"data": str(basketball / "train"), "out": str(tmp_path)},
            scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(storage_path=str(tmp_path / "ray"), name="ingest"))
        result = trainer.fit()
    finally:
        ray.shutdown()
    assert result.error is None
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["shapes"] == ranks[1]["shapes"] == [[4, 6, 3, 64, 64]]
    assert len(ranks[0]["keys"]) == len(ranks[1]["keys"]) == 24  # 25 clips each, 6 whole batches
    assert not set(ranks[0]["keys"]) & set(ranks[1]["keys"])
