"""Pixels <-> keypoints: the keypoint detector, the image decoder and the maps between them,
and the convolutional pieces they are built from (which CNN-VRNN shares).

Coordinates follow the official Struct-VRNN code: x in [-1, 1] from left to right, y in
[1, -1] from top to bottom (positive is up), so a keypoint (x, y) reads like a plot, not like
an array index. Each keypoint is (x, y, mu), mu in [0, 1] its presence. Frames are in
[-0.5, 0.5] here; `StructVRNN` converts from the loader's [0, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EPS = 1e-6


def axis_grids(height: int, width: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """Pixel-centre coordinates along x ([W], -1 -> 1) and y ([H], 1 -> -1)."""
    return torch.linspace(-1, 1, width, device=device), torch.linspace(1, -1, height, device=device)


def coordinate_grid(height: int, width: int, device: torch.device | None = None) -> Tensor:
    """(x, y) of every pixel centre [2, H, W], in keypoint coordinates."""
    xs, ys = axis_grids(height, width, device)
    return torch.stack(torch.broadcast_tensors(xs[None, :], ys[:, None]))


def add_coord_channels(images: Tensor) -> Tensor:
    """[N, C, H, W] -> [N, C + 2, H, W]; lets convolutions produce position-dependent output."""
    n, _, h, w = images.shape
    coords = coordinate_grid(h, w, images.device).to(images.dtype)
    return torch.cat([images, coords.expand(n, -1, -1, -1)], 1)


def heatmaps_to_keypoints(heatmaps: Tensor) -> Tensor:
    """Non-negative heatmaps [..., K, H, W] -> keypoints [..., K, 3] of (x, y, mu).

    (x, y) is the centre of mass of each axis' marginal; mu is the map's mean intensity divided
    by the largest mean over the K maps, which removes a scale degeneracy between detector and
    decoder and keeps mu in [0, 1] for the dynamics (as official)."""
    h, w = heatmaps.shape[-2:]
    xs, ys = axis_grids(h, w, heatmaps.device)
    maps = heatmaps + EPS  # an all-zero map then has its keypoint at the centre, not NaN
    px, py = maps.sum(-2), maps.sum(-1)
    x = (px * xs).sum(-1) / px.sum(-1)
    y = (py * ys).sum(-1) / py.sum(-1)
    means = heatmaps.mean((-2, -1))
    mu = means / (means.amax(-1, keepdim=True) + EPS)
    return torch.stack([x, y, mu], -1)


def keypoints_to_maps(keypoints: Tensor, size: int, sigma: float) -> Tensor:
    """Keypoints [..., K, 3] -> separable Gaussian maps [..., K, size, size] scaled by mu.

    As in the official code the standard deviation is sigma / size in [-1, 1] units, so the
    default sigma 1.5 is about 0.7 grid spacings (the official code calls it pixels)."""
    xs, ys = axis_grids(size, size, keypoints.device)
    x, y, mu = keypoints.float().unbind(-1)
    inv = -0.5 * (size / sigma) ** 2
    gx = torch.exp(inv * (xs - x[..., None]) ** 2)  # [..., K, W]
    gy = torch.exp(inv * (ys - y[..., None]) ** 2)  # [..., K, H]
    return gy[..., :, None] * gx[..., None, :] * mu[..., None, None]


def channels_last(x: Tensor) -> Tensor:
    """NHWC activations: a 1.5x faster training step on CPU here, and what tensor cores want.
    Done on activations, not weights, because DeepSpeed re-lays weights out in flat buffers."""
    return x.contiguous(memory_format=torch.channels_last)


def conv(cin: int, cout: int, kernel: int = 3, stride: int = 1, act: bool = True) -> nn.Module:
    """Conv with He-uniform init (official) and leaky ReLU slope 0.2 (TensorFlow's default)."""
    layer = nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2)
    nn.init.kaiming_uniform_(layer.weight, nonlinearity="relu")
    nn.init.zeros_(layer.bias)
    return nn.Sequential(layer, nn.LeakyReLU(0.2)) if act else layer


class Upsample2x(nn.Module):
    """2x upsampling, bilinear with align_corners (the official decoder's) or nearest, over batch
    chunks whose outputs stay under `max_elements`: CUDA's channels-last bilinear kernel refuses
    an output of 2^31 elements or more (a batch of 512 clips of 16 frames at 64 px is [8192, 64,
    64, 64])."""

    def __init__(self, mode: str = "bilinear", max_elements: int = 2**31 - 1):
        super().__init__()
        self.mode, self.max_elements = mode, max_elements

    def forward(self, x: Tensor) -> Tensor:
        chunk = max(1, self.max_elements // (4 * x[0].numel()))
        corners = {"align_corners": True} if self.mode == "bilinear" else {}
        parts = [F.interpolate(part, scale_factor=2, mode=self.mode, **corners) for part in x.split(chunk)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


class ImageEncoder(nn.Sequential):
    """[N, cin, H, W] -> [N, 4 * filters, H/4, W/4]: each scale has one conv (stride 2 after
    the first scale) plus `layers_per_scale` more."""

    def __init__(self, cin: int, filters: int, layers_per_scale: int):
        layers = []
        for scale in range(3):
            cout = filters * 2**scale
            layers.append(conv(cin, cout, stride=1 if scale == 0 else 2))
            layers += [conv(cout, cout) for _ in range(layers_per_scale)]
            cin = cout
        super().__init__(*layers)
        self.out_channels = cin


class KeypointDetector(nn.Module):
    """Frames [B, T, 3, H, W] -> keypoints [B, T, K, 3], heatmaps [B, T, K, H/4, W/4] and the
    heatmaps' logits (before the softplus)."""

    def __init__(self, num_keypoints: int, filters: int, layers_per_scale: int):
        super().__init__()
        self.encoder = ImageEncoder(3 + 2, filters, layers_per_scale)
        self.to_heatmaps = conv(self.encoder.out_channels, num_keypoints, kernel=1, act=False)

    def forward(self, frames: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, t = frames.shape[:2]
        features = self.encoder(channels_last(add_coord_channels(frames.flatten(0, 1))))
        logits = self.to_heatmaps(features).float().unflatten(0, (b, t))  # float32 sums under bf16
        # Softplus, not a spatial softmax (official): a map can fade out, which gives mu meaning.
        heatmaps = F.softplus(logits)
        return heatmaps_to_keypoints(heatmaps), heatmaps, logits


class ImageDecoder(nn.Module):
    """Maps at a quarter of the image size [B, T, C, H/4, W/4] (one Gaussian per keypoint for
    Struct-VRNN, a learned projection of a feature vector for CNN-VRNN) plus the first frame and
    its maps -> frames [B, T, 3, H, W].

    The decoder sees the current maps, appearance features of the first frame, the first
    frame's maps (to inpaint what objects covered there) and coordinate channels; it predicts
    the change from the first frame."""

    def __init__(self, map_channels: int, filters: int, layers_per_scale: int):
        super().__init__()
        self.appearance = ImageEncoder(3, filters, layers_per_scale)
        width = self.appearance.out_channels
        layers = [conv(2 * map_channels + width + 2, width, kernel=1)]
        for _ in range(2):
            layers.append(Upsample2x())
            layers.append(conv(width, width // 2))
            layers += [conv(width // 2, width // 2) for _ in range(layers_per_scale - 1)]
            width //= 2
        layers.append(conv(width, 3, kernel=1, act=False))
        self.net = nn.Sequential(*layers)

    def forward(self, maps: Tensor, first_frame: Tensor, first_maps: Tensor) -> Tensor:
        b, t = maps.shape[:2]
        features = self.appearance(channels_last(first_frame))  # [B, C, h, w]
        maps, first_maps = maps.to(features.dtype), first_maps.to(features.dtype)
        context = torch.cat([features, first_maps], 1)[:, None].expand(-1, t, -1, -1, -1)
        x = torch.cat([maps, context], 2).flatten(0, 1)
        out = self.net(channels_last(add_coord_channels(x))).unflatten(0, (b, t))
        return out + first_frame[:, None]
