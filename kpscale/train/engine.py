"""The DeepSpeed config for a training section: ZeRO stage, precision, Adam, LR schedule, clipping."""

from __future__ import annotations

from kpscale.train.config import TrainSection


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
