"""Reward prediction (Minderer et al. 2019, Sec. 5.5 and Fig. 9): a separate model per task maps
the dynamics' latent state to the reward, and its error on held-out clips, per step, is divided by
that of the null model, which predicts the mean training reward at every step. Below 1, the
latent state tells more about the reward than its mean does.

The latent state of step t is the RNN state that step's prediction comes from
(`VRNNVideoModel.latent_states`): it has seen the frames and actions before t, and the reward is
that of frame t (kpscale.data.sources.dmcs). On predicted steps it comes from the model's own
rollout under the clip's actions, so the error measures what the dynamics carry forward. Each
clip's prediction is the mean over its sampled rollouts (the expected reward, which minimises
the squared error). The paper's supplement (S2.3), which describes its reward model, is not in
kpscale's copy of the paper: the model here is kpscale's choice, an MLP of two hidden layers on
the standardised latent state, fitted to the training clips' rollouts (observed and predicted
steps) with early stopping on a tenth of those clips.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor, nn

HIDDEN = 128
FIT_STEPS = 3000
CHECK_EVERY = 100
BATCH_ROWS = 1024


class RewardModel(nn.Module):
    """Latent states [..., H] -> rewards [...]; `reward_mean` is the null model's prediction."""

    def __init__(self, mean: Tensor, std: Tensor, reward_mean: float):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.reward_mean = reward_mean
        size = len(mean)
        self.net = nn.Sequential(nn.Linear(size, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                                 nn.Linear(HIDDEN, 1))

    def forward(self, latent: Tensor) -> Tensor:
        return self.net((latent.float() - self.mean) / self.std).squeeze(-1) + self.reward_mean


@torch.no_grad()
def rollouts(model, batches: Iterable[dict], future: int, samples: int, device: torch.device,
             actions_of: Callable[[dict], dict]) -> tuple[Tensor, Tensor]:
    """Latent states [M, S, T, H] of `samples` rollouts of each clip (observed frames, then
    `future` steps under the actions `actions_of(batch)` gives as keywords) and the clips'
    rewards [M, T]."""
    latent, rewards = [], []
    for batch in batches:
        if "rewards" not in batch:
            raise ValueError("reward prediction needs the clips' rewards (rewards.npy); these clips have none")
        video = batch["video"].to(device)
        latent.append(model.latent_states(video, future, samples, **actions_of(batch)).float().cpu())
        rewards.append(batch["rewards"][:, :latent[-1].shape[2]].float())
    return torch.cat(latent), torch.cat(rewards)


def fit(latent: Tensor, rewards: Tensor, seed: int = 0) -> RewardModel:
    """The reward model from training clips' latent states [M, S, T, H] and rewards [M, T]; step
    0 is left out (no frame has reached the RNN yet)."""
    if len(latent) < 10:
        raise ValueError(f"reward prediction needs at least 10 training clips to fit its model, got {len(latent)}")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(latent), generator=generator)
    held = order[: max(1, len(latent) // 10)]
    kept = order[len(held):]

    def table(clips: Tensor) -> tuple[Tensor, Tensor]:
        x = latent[clips, :, 1:]  # [m, S, T - 1, H]
        y = rewards[clips, None, 1:].expand(x.shape[:3])
        return x.flatten(0, 2), y.flatten()

    x, y = table(kept)
    x_val, y_val = table(held)
    with torch.random.fork_rng():  # the same initial weights for every model compared
        torch.manual_seed(seed)
        reward_model = RewardModel(x.mean(0), x.std(0) + 1e-6, rewards.mean().item())
    optimiser = torch.optim.Adam(reward_model.parameters(), lr=1e-3, weight_decay=1e-5)
    best, best_state = float("inf"), None
    for step in range(FIT_STEPS):
        rows = torch.randint(len(x), (min(BATCH_ROWS, len(x)),), generator=generator)
        loss = (reward_model(x[rows]) - y[rows]).pow(2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if (step + 1) % CHECK_EVERY == 0:
            with torch.no_grad():
                error = (reward_model(x_val) - y_val).pow(2).mean().item()
            if error < best:
                best, best_state = error, {k: v.clone() for k, v in reward_model.state_dict().items()}
    reward_model.load_state_dict(best_state)
    return reward_model.eval()


@torch.no_grad()
def squared_errors(reward_model: RewardModel, latent: Tensor, rewards: Tensor) -> tuple[Tensor, Tensor]:
    """Per clip and step [B, T]: the squared error of the mean prediction over a clip's sampled
    rollouts (latent [B, S, T, H]), and the null model's; NaN at step 0."""
    predicted = reward_model(latent.to(reward_model.mean.device)).mean(1).cpu()
    error = (predicted - rewards).pow(2)
    null = (reward_model.reward_mean - rewards).pow(2)
    error[:, 0] = null[:, 0] = float("nan")
    return error, null
