"""Class-conditional keypoint video generation (Kim et al., NeurIPS 2019): a keypoint detector
and a keypoint-guided image translator learnt together on frame pairs (stage 1), then a
conditional VAE over keypoint sequences, conditioned on the first frame's keypoints and the
action class, learnt on the detector's keypoints of the training videos (stage 2).

Networks as the paper and the official TensorFlow code describe them (facts in
../shared/reference/official-implementations.md): the detector is an encoder-decoder with skips
to full resolution, a 1x1 convolution to K maps and a spatial softmax whose expected
coordinates are the keypoints (eq. 1); the translator reads image features at a quarter of the
image size beside Gaussian maps of the reference and the target keypoints (eq. 2) and draws an
image s and a background mask m, blended as m * reference + (1 - m) * s (eqs. 3-4); the motion
generator's encoder and decoder are 2-layer LSTMs, its decoder's coordinates tanh; both
discriminators (a patch discriminator on images, an LSTM on keypoint sequences) are the
adversaries of their stage. Widths default to what trains on a CPU; the paper's are in the
paper config.

Coordinates as elsewhere in kpscale (kpscale.models.keypoints): x in [-1, 1] left to right,
y in [1, -1] top to bottom. Frames in [0, 1].
"""

from __future__ import annotations

import os
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from kpscale.config import Config
from kpscale.models.keypoints import Upsample2x, axis_grids, keypoints_to_maps

VGG19_ENV = "KPSCALE_VGG19_WEIGHTS"


class ClassConditionalConfig(Config):
    name: Literal["class_conditional"] = "class_conditional"  # the registry key (kpscale.models.FAMILIES)
    image_size: Literal[64, 128] = 64  # the paper: 128
    num_keypoints: int = Field(16, ge=1)  # the paper: 40 on Penn Action
    filters: int = Field(32, ge=4)  # the detector's and translator's width at full resolution; x2 per halving
    # The detector's keypoint maps: None, the image size (official). Smaller maps (image_size / 4 or
    # / 2) are kpscale's CPU option: their softmax concentrates in far fewer steps, at a fraction of the cost.
    keypoint_map_size: int | None = None
    map_sigma: float = Field(1.5, gt=0)  # the Gaussian maps' deviation, in pixels of the quarter-size feature grid
    # The action classes, as the clips' labels name them; the generator's one-hot follows this order.
    classes: tuple[str, ...] = ("walk", "run", "wave", "jump", "squat", "kick")
    pair_gap: tuple[int, int] = (8, 11)  # stage 1 pairs a frame with one this many frames later (official)
    reconstruction: Literal["l1_ssim", "vgg19"] = "l1_ssim"  # vgg19: the paper's perceptual loss (weights by path)
    vgg19_weights: str | None = None  # torchvision's vgg19 state dict for reconstruction=vgg19; None: $KPSCALE_VGG19_WEIGHTS
    # lambda_1: the reconstruction's weight beside the adversarial term (the paper: 1, with its VGG-19 loss)
    reconstruction_weight: float = Field(10.0, gt=0)
    # kpscale's, not the paper's (0 turns it off): Struct-VRNN's separation loss on each frame
    # pair's keypoints, which penalises keypoints that move alike, so they spread over the limbs.
    separation_weight: float = Field(0.0, ge=0)
    separation_sigma: float = Field(0.1, gt=0)
    # kpscale's, not the paper's (0 turns it off): an L1 term weighted by where the pair's two
    # frames differ, so a thin limb's move costs as much as the frame it sits in; without it,
    # copying the reference frame is a cheap minimum of the reconstruction on small figures.
    motion_weight: float = Field(0.0, ge=0)
    lstm_size: int = Field(256, ge=1)  # the paper: 1024
    latent_size: int = Field(64, ge=1)  # z (official 64)
    generated: int = Field(16, ge=1)  # keypoint steps the generator draws after the first frame (official 32)
    kl_weight: float = Field(1.0, ge=0)  # the KL term's weight (the paper: 1)
    l1_weight: float = Field(1000.0, ge=0)  # lambda_2 (official)
    sequence_adversarial_weight: float = Field(2.0, ge=0)  # lambda_3 (the paper)
    adam_beta1: float = Field(0.5, ge=0, lt=1)  # official: Adam(0.5, 0.999) for every network

    @model_validator(mode="after")
    def _consistent(self):
        if len(set(self.classes)) != len(self.classes) or len(self.classes) < 2:
            raise ValueError(f"classes {list(self.classes)} must be at least two different names")
        if not 1 <= self.pair_gap[0] <= self.pair_gap[1]:
            raise ValueError(f"pair_gap {list(self.pair_gap)} must be [low, high] with 1 <= low <= high")
        if self.heatmap_size not in (self.image_size // 8, self.image_size // 4, self.image_size // 2, self.image_size):
            raise ValueError(f"keypoint_map_size {self.keypoint_map_size} must be image_size ({self.image_size}) "
                             "divided by 1, 2, 4 or 8")
        if self.pair_gap[1] > self.generated:
            raise ValueError(f"pair_gap {list(self.pair_gap)} reaches beyond the {self.generated + 1} frames a "
                             f"training window holds (1 + generated): lower it or raise generated")
        if self.reconstruction == "vgg19" and not (self.vgg19_weights or os.environ.get(VGG19_ENV)):
            raise ValueError(f"reconstruction=vgg19 needs model.vgg19_weights or ${VGG19_ENV}: the path of "
                             "torchvision's VGG-19 state dict (nothing is downloaded; l1_ssim needs no weights)")
        return self

    # A training window is the first frame and the frames generated after it; stage 1 pairs frames within it.
    @property
    def observed(self) -> int:
        return 1

    @property
    def predicted(self) -> int:
        return self.generated

    @property
    def heatmap_size(self) -> int:
        """The grid whose cell centres the keypoints' [-1, 1] spans."""
        return self.keypoint_map_size or self.image_size

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def class_index(self, labels: list[str]) -> Tensor:
        """Clip labels -> class indices [B]; a label not in `classes` is refused, naming them."""
        unknown = sorted(set(labels) - set(self.classes))
        if unknown:
            raise ValueError(f"unknown action label(s) {unknown}; model.classes are {list(self.classes)}")
        return torch.tensor([self.classes.index(label) for label in labels])


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2))


def _up(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(Upsample2x("nearest"), _conv(c_in, c_out))


def soft_argmax(logits: Tensor) -> Tensor:
    """Maps [..., K, H, W] -> the expected (x, y) [..., K, 2] under each map's spatial softmax (eq. 1)."""
    h, w = logits.shape[-2:]
    xs, ys = axis_grids(h, w, logits.device)
    probs = logits.float().flatten(-2).softmax(-1).unflatten(-1, (h, w))
    return torch.stack([(probs.sum(-2) * xs).sum(-1), (probs.sum(-1) * ys).sum(-1)], -1)


def gaussian_maps(keypoints: Tensor, size: int, sigma: float) -> Tensor:
    """Keypoints [..., K, 2] -> Gaussian maps [..., K, size, size] (eq. 2, peak 1)."""
    present = torch.ones_like(keypoints[..., :1])
    return keypoints_to_maps(torch.cat([keypoints, present], -1), size, sigma)


class Detector(nn.Module):
    """Frames [N, 3, S, S] -> keypoints [N, K, 2]: an encoder to S/8 and a decoder back to the
    maps' size (S, official) with the encoder's maps as skips, then K maps whose softmax's
    expectation is each keypoint."""

    def __init__(self, cfg: ClassConditionalConfig):
        super().__init__()
        f = cfg.filters
        widths = [f, 2 * f, 4 * f, 8 * f]
        self.stem = _conv(3, widths[0])
        self.down = nn.ModuleList(_conv(a, b, stride=2) for a, b in zip(widths, widths[1:]))
        # Each step up halves the width and joins the encoder's map of its size, up to the maps' size.
        steps = (cfg.heatmap_size // (cfg.image_size // 8)).bit_length() - 1
        self.up = nn.ModuleList([_up(8 * f, 4 * f), _up(8 * f, 2 * f), _up(4 * f, f)][:steps])
        self.heads = nn.Conv2d([8 * f, 8 * f, 4 * f, 2 * f][steps], cfg.num_keypoints, 1)

    def forward(self, frames: Tensor) -> Tensor:
        skips = [self.stem(frames)]
        for block in self.down:
            skips.append(block(skips[-1]))
        h = skips.pop()
        for block in self.up:
            h = torch.cat([block(h), skips.pop()], 1)  # the skips above the maps' size stay unused
        return soft_argmax(self.heads(h))


class Translator(nn.Module):
    """(reference frame [N, 3, S, S], its keypoints, target keypoints [N, K, 2]) -> (the frame
    translated to the target keypoints, the drawn image s, the background mask m), each [N, *, S, S].

    Where the mask is 1 the output is the reference frame's pixel: the translator draws only
    what moved (eqs. 3-4)."""

    def __init__(self, cfg: ClassConditionalConfig):
        super().__init__()
        f, k = cfg.filters, cfg.num_keypoints
        self.map_size, self.sigma = cfg.image_size // 4, cfg.map_sigma
        self.encode = nn.Sequential(_conv(3, f), _conv(f, 2 * f, stride=2), _conv(2 * f, 4 * f, stride=2))
        self.mix = nn.Sequential(_conv(4 * f + 2 * k, 4 * f), _conv(4 * f, 4 * f))
        self.decode = nn.Sequential(_up(4 * f, 2 * f), _up(2 * f, f), nn.Conv2d(f, 4, 3, 1, 1))

    def forward(self, reference: Tensor, reference_keypoints: Tensor, target_keypoints: Tensor):
        maps = [gaussian_maps(k, self.map_size, self.sigma).to(reference.dtype)
                for k in (reference_keypoints, target_keypoints)]
        out = self.decode(self.mix(torch.cat([self.encode(reference), *maps], 1)))
        drawn, mask = out[:, :3].sigmoid(), out[:, 3:].sigmoid()
        return mask * reference + (1 - mask) * drawn, drawn, mask


class PatchDiscriminator(nn.Module):
    """Frames [N, 3, S, S] -> real/fake logits of patches [N, 1, S/8, S/8]."""

    def __init__(self, cfg: ClassConditionalConfig):
        super().__init__()
        f = cfg.filters
        self.net = nn.Sequential(nn.Conv2d(3, f, 4, 2, 1), nn.LeakyReLU(0.2), _conv(f, 2 * f, stride=2),
                                 _conv(2 * f, 4 * f, stride=2), nn.Conv2d(4 * f, 1, 3, 1, 1))

    def forward(self, frames: Tensor) -> Tensor:
        return self.net(frames)


class MotionGenerator(nn.Module):
    """The conditional VAE over keypoint sequences. The condition is the first frame's keypoints
    [B, K, 2] and the action class [B]; `encode` reads the sequence after the first frame
    [B, T, K, 2] into q(z | sequence, condition); `decode` draws T steps from z and the condition."""

    def __init__(self, cfg: ClassConditionalConfig):
        super().__init__()
        self.cfg = cfg
        coords, condition = 2 * cfg.num_keypoints, 2 * cfg.num_keypoints + cfg.num_classes
        self.encoder = nn.LSTM(coords + condition, cfg.lstm_size, num_layers=2, batch_first=True)
        self.posterior = nn.Linear(cfg.lstm_size, 2 * cfg.latent_size)
        self.decoder = nn.LSTM(cfg.latent_size + condition, cfg.lstm_size, num_layers=2, batch_first=True)
        self.coordinates = nn.Linear(cfg.lstm_size, coords)

    def condition(self, first: Tensor, label: Tensor) -> Tensor:
        return torch.cat([first.flatten(1), F.one_hot(label, self.cfg.num_classes).to(first.dtype)], 1)

    def encode(self, sequence: Tensor, first: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, log-variance) of q(z), each [B, latent]."""
        condition = self.condition(first, label)[:, None].expand(-1, sequence.shape[1], -1)
        out, _ = self.encoder(torch.cat([sequence.flatten(2), condition], 2))
        return self.posterior(out[:, -1]).chunk(2, -1)

    def decode(self, z: Tensor, first: Tensor, label: Tensor, steps: int) -> Tensor:
        """[B, steps, K, 2] in [-1, 1]."""
        inputs = torch.cat([z, self.condition(first, label)], 1)[:, None].expand(-1, steps, -1)
        out, _ = self.decoder(inputs)
        return self.coordinates(out).tanh().unflatten(-1, (self.cfg.num_keypoints, 2))

    def forward(self, sequence: Tensor, first: Tensor, label: Tensor) -> dict[str, Tensor]:
        mean, log_var = self.encode(sequence, first, label)
        z = mean + torch.randn_like(mean) * (0.5 * log_var).exp()
        kl = 0.5 * (mean.pow(2) + log_var.exp() - 1 - log_var).sum(-1).mean()
        return {"reconstruction": self.decode(z, first, label, sequence.shape[1]), "kl": kl}

    def sample(self, first: Tensor, label: Tensor, steps: int, generator: torch.Generator | None = None) -> Tensor:
        """Keypoint sequences [B, steps, K, 2] from the prior: a new motion per z ~ N(0, I)."""
        z = torch.randn(len(first), self.cfg.latent_size, generator=generator).to(first)
        return self.decode(z, first, label, steps)


class SequenceDiscriminator(nn.Module):
    """Keypoint sequences [B, T, K, 2] -> real/fake logits [B], from an LSTM's last state."""

    def __init__(self, cfg: ClassConditionalConfig):
        super().__init__()
        self.lstm = nn.LSTM(2 * cfg.num_keypoints, cfg.lstm_size, batch_first=True)
        self.logit = nn.Linear(cfg.lstm_size, 1)

    def forward(self, sequence: Tensor) -> Tensor:
        out, _ = self.lstm(sequence.flatten(2))
        return self.logit(out[:, -1]).squeeze(-1)


class ClassConditional(nn.Module):
    """The family's modules, and generation: a first frame and a class -> a video."""

    def __init__(self, cfg: ClassConditionalConfig):
        super().__init__()
        self.cfg = cfg
        self.detector = Detector(cfg)
        self.translator = Translator(cfg)
        self.image_discriminator = PatchDiscriminator(cfg)
        self.motion_generator = MotionGenerator(cfg)
        self.sequence_discriminator = SequenceDiscriminator(cfg)

    def keypoints(self, states: Tensor) -> Tensor:
        """Keypoint states [..., K * 2] -> [..., K, 3], every keypoint present (kpscale.predict draws them)."""
        xy = states.unflatten(-1, (self.cfg.num_keypoints, 2))
        return torch.cat([xy, torch.ones_like(xy[..., :1])], -1)

    @torch.no_grad()
    def sample_future(self, video: Tensor, future: int, num_samples: int, observed: int | None = None,
                      offsets: Tensor | None = None, label: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The predictor interface of kpscale.predict: each clip's first frame [B, T >= 1, 3, S, S]
        animated as class `label` [B], `num_samples` times (a z each): (keypoint states
        [B, N, 1 + future, K * 2], frames [B, N, 1 + future, 3, S, S])."""
        if label is None:
            raise ValueError(f"a class-conditional model needs the action to generate, one of {list(self.cfg.classes)}")
        if observed not in (None, 1) or offsets is not None:
            raise ValueError("a class-conditional model starts from one frame (observed 1) and moves no keypoints")
        first = video[:, 0].repeat_interleave(num_samples, 0)
        frames, keypoints = self.generate(first, label.repeat_interleave(num_samples, 0), future)
        return keypoints.flatten(-2).unflatten(0, (len(video), num_samples)), frames.unflatten(0, (len(video), num_samples))

    @torch.no_grad()
    def generate(self, first_frame: Tensor, label: Tensor, steps: int | None = None,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """First frames [B, 3, S, S] and classes [B] -> (frames [B, 1 + steps, 3, S, S] starting
        with the first, keypoints [B, 1 + steps, K, 2])."""
        steps = steps or self.cfg.generated
        first = self.detector(first_frame)
        keypoints = torch.cat([first[:, None], self.motion_generator.sample(first, label, steps, generator)], 1)
        frames = [self.translator(first_frame, first, keypoints[:, t])[0] for t in range(1, steps + 1)]
        return torch.stack([first_frame, *frames], 1), keypoints
