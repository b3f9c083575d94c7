"""DrNet (Denton & Birodkar 2017): a content encoder and a pose encoder whose codes a decoder
turns back into the frame, a scene discriminator that keeps clip identity out of the pose code,
and an LSTM that predicts future pose codes with the encoders frozen.

Architecture and losses as in the official PyTorch code (edenton/drnet-py; facts in
../shared/reference/official-implementations.md): DCGAN blocks (4x4 convolutions of stride 2,
batch norm, LeakyReLU 0.2) to tanh codes (content 128, pose 10), a mirrored decoder with U-Net
skips from the content encoder and a sigmoid output, an MLP scene discriminator on pose pairs,
and a 2-layer LSTM of 256 over [pose, content]. The paper normalises the codes to unit length;
the official code uses tanh, kept here.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from kpscale.config import Config


class DrNetConfig(Config):
    name: Literal["drnet"] = "drnet"  # the registry key (kpscale.models.MODELS)
    image_size: Literal[64] = 64
    channels: int = Field(3, ge=1)  # image channels: Moving MNIST's digits are coloured (one per channel)
    filters: int = Field(64, ge=1)  # DCGAN width at 32x32; x2 at each halving
    content_size: int = Field(128, ge=1)
    pose_size: int = Field(10, ge=1)
    discriminator_hidden: int = Field(100, ge=1)
    adversarial_weight: float = Field(1e-4, ge=0)  # the scene discriminator's maximum-entropy term
    lstm_size: int = Field(256, ge=1)
    lstm_layers: int = Field(2, ge=1)
    observed: int = Field(5, ge=1)  # Moving MNIST in the paper: 5 observed, 10 predicted
    predicted: int = Field(10, ge=1)


def _down(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 4, 2, 1), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2))


def _up(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(c_in, c_out, 4, 2, 1), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2))


class Encoder(nn.Module):
    """Frames [N, C, 64, 64] -> (code [N, D] in [-1, 1], feature maps at 32, 16, 8 and 4 px)."""

    def __init__(self, channels: int, filters: int, size: int):
        super().__init__()
        widths = [filters, 2 * filters, 4 * filters, 8 * filters]
        self.blocks = nn.ModuleList(_down(c_in, c_out) for c_in, c_out in zip([channels, *widths], widths))
        self.code = nn.Sequential(nn.Conv2d(widths[-1], size, 4, 1, 0), nn.BatchNorm2d(size), nn.Tanh())

    def forward(self, frames: Tensor) -> tuple[Tensor, list[Tensor]]:
        skips, h = [], frames
        for block in self.blocks:
            h = block(h)
            skips.append(h)
        return self.code(h).flatten(1), skips


class Decoder(nn.Module):
    """(content [N, Dc] with the content encoder's feature maps, pose [N, Dp]) -> frames in [0, 1]."""

    def __init__(self, channels: int, filters: int, content_size: int, pose_size: int):
        super().__init__()
        widths = [8 * filters, 4 * filters, 2 * filters, filters]
        self.start = nn.Sequential(nn.ConvTranspose2d(content_size + pose_size, widths[0], 4, 1, 0),
                                   nn.BatchNorm2d(widths[0]), nn.LeakyReLU(0.2))
        # Each block reads the previous block's output beside the content encoder's map of that size.
        self.blocks = nn.ModuleList(_up(2 * c_in, c_out) for c_in, c_out in zip(widths, widths[1:]))
        self.out = nn.Sequential(nn.ConvTranspose2d(2 * widths[-1], channels, 4, 2, 1), nn.Sigmoid())

    def forward(self, content: Tensor, skips: list[Tensor], pose: Tensor) -> Tensor:
        h = self.start(torch.cat([content, pose], 1)[..., None, None])
        for block, skip in zip(self.blocks, reversed(skips[1:])):
            h = block(torch.cat([h, skip], 1))
        return self.out(torch.cat([h, skips[0]], 1))


class SceneDiscriminator(nn.Module):
    """Two pose codes -> the logit that they come from the same clip."""

    def __init__(self, pose_size: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 * pose_size, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 1))

    def forward(self, pose_a: Tensor, pose_b: Tensor) -> Tensor:
        return self.net(torch.cat([pose_a, pose_b], 1))[:, 0]


class PosePredictor(nn.Module):
    """LSTM over [pose_t, content] -> pose_{t+1} (tanh, the pose code's range)."""

    def __init__(self, cfg: DrNetConfig):
        super().__init__()
        self.lstm = nn.LSTM(cfg.pose_size + cfg.content_size, cfg.lstm_size, cfg.lstm_layers, batch_first=True)
        self.out = nn.Linear(cfg.lstm_size, cfg.pose_size)

    def forward(self, poses: Tensor, content: Tensor, state=None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """poses [B, T, Dp], content [B, Dc] -> next poses [B, T, Dp] and the LSTM state."""
        inputs = torch.cat([poses, content[:, None].expand(-1, poses.shape[1], -1)], -1)
        h, state = self.lstm(inputs, state)
        return torch.tanh(self.out(h)), state


class DrNet(nn.Module):
    def __init__(self, cfg: DrNetConfig):
        super().__init__()
        self.cfg = cfg
        self.content_encoder = Encoder(cfg.channels, cfg.filters, cfg.content_size)
        self.pose_encoder = Encoder(cfg.channels, cfg.filters, cfg.pose_size)
        self.decoder = Decoder(cfg.channels, cfg.filters, cfg.content_size, cfg.pose_size)
        self.scene_discriminator = SceneDiscriminator(cfg.pose_size, cfg.discriminator_hidden)
        self.predictor = PosePredictor(cfg)

    @staticmethod
    def four_frames(video: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """[B, T, C, H, W] -> [B, 4, C, H, W]: frames at four random times of the clips (the same
        times for the batch), as the losses below take them."""
        times = torch.randint(video.shape[1], (4,), generator=generator)
        return video[:, times.to(video.device)]

    def disentangle_losses(self, frames: Tensor) -> dict[str, Tensor]:
        """Stage 1, the encoders' and decoder's step. frames [B, 4, C, H, W]: four frames of each
        clip (`four_frames`); content from the first two, pose from the last two. The third is
        reconstructed from the first's content and its own pose."""
        c1, c2, p1, p2 = frames.unbind(1)
        content, skips = self.content_encoder(c1)
        other_content = self.content_encoder(c2)[0].detach()
        pose = self.pose_encoder(p1)[0]
        other_pose = self.pose_encoder(p2)[0].detach()
        reconstruction = F.mse_loss(self.decoder(content, skips, pose), p1)
        similarity = F.mse_loss(content, other_content)
        # Maximum entropy: the discriminator, whatever pair it sees, should not be able to tell.
        logits = self.scene_discriminator(pose, other_pose)
        adversarial = F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, 0.5))
        return {"reconstruction": reconstruction, "similarity": similarity,
                "adversarial": self.cfg.adversarial_weight * adversarial}

    def discriminator_loss(self, frames: Tensor) -> Tensor:
        """Stage 1, the scene discriminator's step: pose pairs of the same clip (target 1) against
        pairs whose second pose comes from another clip of the batch (target 0). frames as above."""
        with torch.no_grad():
            pose = self.pose_encoder(frames[:, 2])[0]
            other = self.pose_encoder(frames[:, 3])[0]
        half = len(pose) // 2
        if half < 2:
            raise ValueError(f"the scene discriminator needs a batch of at least 4 clips, got {len(pose)}")
        # The first half's second poses, rotated by one: every pair there is from two different clips.
        other = torch.cat([other[:half].roll(1, 0), other[half:]])
        target = torch.cat([torch.zeros(half), torch.ones(len(pose) - half)]).to(pose)
        return F.binary_cross_entropy_with_logits(self.scene_discriminator(pose, other), target)

    def prediction_loss(self, frames: Tensor) -> Tensor:
        """Stage 2: the LSTM's one-step-ahead pose error over observed + predicted frames, fed the
        true poses, with the content of the last observed frame; the encoders are not trained."""
        cfg = self.cfg
        window = frames[:, :cfg.observed + cfg.predicted]
        with torch.no_grad():
            poses = self.pose_encoder(window.flatten(0, 1))[0].unflatten(0, window.shape[:2])
            content = self.content_encoder(window[:, cfg.observed - 1])[0]
        predicted, _ = self.predictor(poses[:, :-1], content)
        return F.mse_loss(predicted, poses[:, 1:])

    @torch.no_grad()
    def predict(self, frames: Tensor, future: int) -> Tensor:
        """frames [B, T >= observed, C, H, W] -> the `future` frames after the observed ones,
        decoded from the last observed frame's content and the LSTM's free-running poses."""
        cfg = self.cfg
        observed = frames[:, :cfg.observed]
        poses = self.pose_encoder(observed.flatten(0, 1))[0].unflatten(0, observed.shape[:2])
        content, skips = self.content_encoder(observed[:, -1])
        predicted, state = self.predictor(poses, content)
        pose, out = predicted[:, -1:], []
        for _ in range(future):
            out.append(self.decoder(content, skips, pose[:, 0]))
            pose, state = self.predictor(pose, content, state)
        return torch.stack(out, 1)
