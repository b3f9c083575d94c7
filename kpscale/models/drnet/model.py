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
from pydantic import Field
from torch import Tensor, nn

from kpscale.config import Config


class DrNetConfig(Config):
    name: Literal["drnet"] = "drnet"  # the registry key (kpscale.models.FAMILIES)
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
    adam_beta1: float = Field(0.5, ge=0, lt=1)  # official, for every network (lr: train.lr, official 2e-3)
    num_samples: Literal[1] = 1  # deterministic: one future per clip


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
    """The family's root: its five networks, and what evaluation and prediction call."""

    def __init__(self, cfg: DrNetConfig):
        super().__init__()
        self.cfg = cfg
        self.content_encoder = Encoder(cfg.channels, cfg.filters, cfg.content_size)
        self.pose_encoder = Encoder(cfg.channels, cfg.filters, cfg.pose_size)
        self.decoder = Decoder(cfg.channels, cfg.filters, cfg.content_size, cfg.pose_size)
        self.scene_discriminator = SceneDiscriminator(cfg.pose_size, cfg.discriminator_hidden)
        self.predictor = PosePredictor(cfg)

    def poses(self, video: Tensor) -> Tensor:
        """video [B, T, C, H, W] -> pose codes [B, T, Dp]."""
        return self.pose_encoder(video.flatten(0, 1))[0].unflatten(0, video.shape[:2])

    def decode_each(self, content: Tensor, skips: list[Tensor], poses: Tensor) -> Tensor:
        """Content codes [B, Dc] with their skips, poses [B * T, Dp] (T per content, in order)
        -> frames [B * T, C, H, W]."""
        t = len(poses) // len(content)
        return self.decoder(content.repeat_interleave(t, 0), [s.repeat_interleave(t, 0) for s in skips], poses)

    @torch.no_grad()
    def represent(self, video: Tensor) -> Tensor:
        """Each frame's pose code [B, T, Dp]: the state the tracking regression reads."""
        return self.poses(video)

    def keypoints(self, states: Tensor) -> None:
        return None

    @torch.no_grad()
    def swap(self, content_video: Tensor, pose_video: Tensor) -> Tensor:
        """Frames [B, T, C, H, W] with the content of each clip's first frame in `content_video`
        and the pose of every frame of the same clip in `pose_video`."""
        content, skips = self.content_encoder(content_video[:, 0])
        poses = self.poses(pose_video).flatten(0, 1)
        frames = self.decode_each(content, skips, poses)
        return frames.unflatten(0, pose_video.shape[:2])

    @torch.no_grad()
    def figures(self, video: Tensor) -> dict[str, Tensor]:
        """The swap grid of up to 6 clips, uint8 [H, W, 3]: the top row the pose frames (each
        clip's last observed frame), the left column the content frames (each clip's first);
        cell (i, j) decoded from clip i's content and clip j's pose."""
        clips = video[:6]
        n, t = len(clips), self.cfg.observed - 1
        content, skips = self.content_encoder(clips[:, 0])
        pose = self.pose_encoder(clips[:, t])[0]
        grid = self.decode_each(content, skips, pose.repeat(n, 1)).unflatten(0, (n, n))
        blank = torch.ones_like(clips[:1, 0])
        rows = [torch.cat([blank, clips[:, t]])] + [torch.cat([clips[i:i + 1, 0], grid[i]]) for i in range(n)]
        tiles = torch.stack(rows)  # [n + 1, n + 1, C, H, W]
        tiles = torch.nn.functional.pad(tiles.expand(-1, -1, 3, -1, -1) if tiles.shape[2] == 1 else tiles[:, :, :3],
                                        (1, 1, 1, 1), value=1.0)
        image = tiles.permute(0, 3, 1, 4, 2).flatten(0, 1).flatten(1, 2)  # [rows * H, cols * W, C]
        return {"swap_grid": (image.clamp(0, 1) * 255).round().to(torch.uint8)}

    @torch.no_grad()
    def sample_future(self, video: Tensor, future: int, num_samples: int, observed: int | None = None,
                      offsets: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Pose codes [B, S, observed + future, Dp] and frames [B, S, observed + future, C, H, W]:
        the observed frames' poses, then the LSTM's free-running ones from the first `observed`
        frames, all decoded with the content of the last observed frame. DrNet is deterministic:
        the S samples are the same."""
        if offsets is not None:
            raise ValueError("DrNet has no keypoints to move")
        observed = observed or self.cfg.observed
        seen = video[:, :observed]
        poses = self.poses(seen)
        content, skips = self.content_encoder(seen[:, -1])
        predicted, state = self.predictor(poses, content)
        pose, future_poses = predicted[:, -1:], []
        for _ in range(future):
            future_poses.append(pose)
            pose, state = self.predictor(pose, content, state)
        states = torch.cat([poses, *future_poses], 1)
        frames = self.decode_each(content, skips, states.flatten(0, 1)).unflatten(0, states.shape[:2])
        return (states[:, None].expand(-1, num_samples, -1, -1),
                frames[:, None].expand(-1, num_samples, -1, -1, -1, -1))
