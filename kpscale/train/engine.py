"""The optimiser side of a training section: Adam's parameter groups, and the DeepSpeed config
(ZeRO stage, precision, Adam, LR schedule, clipping)."""

from __future__ import annotations

from torch import nn

from kpscale.train.config import TrainSection


def param_groups(model: nn.Module, weight_decay: float) -> list:
    """Conv kernels decay, everything else does not (official: an L2 kernel regulariser on every
    conv). Keras' l2(c) adds c * sum(w^2) to the loss, whose gradient 2cw is what torch Adam's
    coupled `weight_decay` adds: hence 2 * weight_decay."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if weight_decay == 0:
        # The plain parameter list, as before weight decay existed: its checkpoints resume and its
        # steps are bit-identical. A one-dict group changed DeepSpeed's arithmetic (loss 86.9431
        # vs 86.9423 at step 25), and that alone moved the default run from 8.09 px with 3
        # objects found to 10.79 px with 2 (docs/benchmarks.md).
        return trainable
    kernels = {id(m.weight) for m in model.modules() if isinstance(m, nn.Conv2d)}
    return [{"params": [p for p in trainable if id(p) in kernels], "weight_decay": 2 * weight_decay},
            {"params": [p for p in trainable if id(p) not in kernels], "weight_decay": 0.0}]


def deepspeed_config(train: TrainSection, batch_size: int, bf16: bool) -> dict:
    warmup = {"warmup_num_steps": train.warmup_steps, "warmup_type": "linear"}
    schedule = {
        "constant": ("WarmupLR", {"warmup_min_lr": 0.0, "warmup_max_lr": train.lr, **warmup}),
        "linear": ("WarmupDecayLR", {"warmup_min_lr": 0.0, "warmup_max_lr": train.lr,
                                     "total_num_steps": train.steps, **warmup}),
        "cosine": ("WarmupCosineLR", {"total_num_steps": train.steps, "warmup_min_ratio": 0.0,
                                      "cos_min_ratio": 0.1, **warmup}),
    }[train.lr_schedule]
    return {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": train.grad_clip,
        # torch's Adam: DeepSpeed's own would be JIT-compiled on first use (minutes, needs a compiler).
        "optimizer": {"type": "Adam", "params": {"lr": train.lr, "torch_adam": True}},
        "scheduler": {"type": schedule[0], "params": schedule[1]},
        "zero_optimization": {"stage": train.zero_stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,  # kpscale logs progress itself
    }
