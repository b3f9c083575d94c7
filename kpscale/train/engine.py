"""The optimiser side of a training section: the DeepSpeed engine, Adam's parameter groups, and
the DeepSpeed config (ZeRO stage, precision, Adam, LR schedule, clipping)."""

from __future__ import annotations

import logging
import warnings

from torch import nn

from kpscale.models.family import Optimiser
from kpscale.train.config import TrainConfig, TrainSection


def build_engine(optimiser: Optimiser, cfg: TrainConfig, bf16: bool, steps: int):
    """A DeepSpeed engine training `optimiser.module` as `cfg.train` says, its schedule over
    `steps` (the stage's). DeepSpeed must have been imported after DS_ACCELERATOR was set
    (DeepSpeed picks its accelerator on import)."""
    import deepspeed

    skip_shm_comm_op()
    logging.getLogger("DeepSpeed").addFilter(_not_the_schedule_start_warning)
    # ZeRO calls torch's collectives by their old names; torch's rename warning is not the user's to act on.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` "
                            "is deprecated", category=FutureWarning)
    engine, *_ = deepspeed.initialize(
        model=optimiser.module, model_parameters=param_groups(optimiser.module, cfg.train.weight_decay),
        config=deepspeed_config(cfg.train, cfg.data.batch_size, bf16, steps, optimiser.lr or cfg.train.lr,
                                optimiser.betas))
    return engine


def _not_the_schedule_start_warning(record: logging.LogRecord) -> bool:
    """The warm-up schedules' constructors ask themselves for a learning rate before step 0 and
    warn that they have not started: a line per worker about DeepSpeed's own order of calls."""
    return "before it has started" not in record.getMessage()


def skip_shm_comm_op() -> None:
    """Keep DeepSpeed's CPU comm backend from JIT-compiling its shared-memory all-reduce.

    DeepSpeed builds it when its first comm backend starts: ~70 s with a compiler on a user's
    first run, and forever when an interrupted build left its lock file in the torch extensions
    folder (torch's FileBaton waits for the lock without a timeout). Only DeepSpeed's
    tensor-parallel inference calls it (`inference_all_reduce`); training's collectives go
    through torch.distributed, so marking the op incompatible changes no step. Call it before
    `deepspeed.init_distributed` or `deepspeed.initialize`."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:  # only CPU accelerators have one
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def param_groups(model: nn.Module, weight_decay: float) -> list:
    """Conv kernels decay, everything else does not (official: an L2 kernel regulariser on every
    conv). Keras' l2(c) adds c * sum(w^2) to the loss, whose gradient 2cw is what torch Adam's
    coupled `weight_decay` adds: hence 2 * weight_decay."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    kernels = {id(m.weight) for m in model.modules() if isinstance(m, nn.Conv2d)}
    return [{"params": [p for p in trainable if id(p) in kernels], "weight_decay": 2 * weight_decay},
            {"params": [p for p in trainable if id(p) not in kernels], "weight_decay": 0.0}]


def deepspeed_config(train: TrainSection, batch_size: int, bf16: bool, steps: int, lr: float,
                     betas: tuple[float, float]) -> dict:
    warmup = {"warmup_num_steps": train.warmup_steps, "warmup_type": "linear"}
    schedule = {
        "constant": ("WarmupLR", {"warmup_min_lr": 0.0, "warmup_max_lr": lr, **warmup}),
        "linear": ("WarmupDecayLR", {"warmup_min_lr": 0.0, "warmup_max_lr": lr,
                                     "total_num_steps": steps, **warmup}),
        "cosine": ("WarmupCosineLR", {"total_num_steps": steps, "warmup_min_ratio": 0.0,
                                      "cos_min_ratio": 0.1, **warmup}),
    }[train.lr_schedule]
    return {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": train.grad_clip,
        # torch's Adam: DeepSpeed's own would be JIT-compiled on first use (minutes, needs a compiler).
        # adam_w_mode off: DeepSpeed's "Adam" is otherwise torch AdamW, which adds its own
        # decoupled decay (0.01) to every parameter; the decay here is the coupled L2 of the groups.
        "optimizer": {"type": "Adam", "params": {"lr": lr, "betas": list(betas), "torch_adam": True, "adam_w_mode": False}},
        "scheduler": {"type": schedule[0], "params": schedule[1]},
        "zero_optimization": {"stage": train.zero_stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,  # kpscale logs progress itself
    }
