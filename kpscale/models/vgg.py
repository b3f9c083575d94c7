"""VGG's convolutional part (Simonyan & Zisserman 2015), for what compares images by ImageNet
features: the VGG-16 cosine metric (kpscale.evaluate.frames) and VGG-19 perceptual losses. Built
here because torchvision cannot be imported beside this torch; module indices follow
torchvision's `features`, so torchvision's ImageNet checkpoints load unchanged."""

from __future__ import annotations

import torch
from torch import Tensor, nn

# torchvision's configurations: output channels of 3x3 convs (each followed by a ReLU), "M" a 2x2 max pool.
VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
VGG19_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
                512, 512, 512, 512, "M")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VGG(nn.Module):
    """[N, 3, H, W] in [0, 1] -> the last conv block's features [N, 512, H/16, W/16] (after its
    ReLU, before the last max pool); `blocks` gives each block's last ReLU output (conv1_2,
    conv2_2, conv3_3 or conv3_4, ...). `features` holds all of torchvision's layers, so its
    indices and a checkpoint's keys match; the classifier is left out."""

    def __init__(self, layers: tuple = VGG16_LAYERS):
        super().__init__()
        modules: list[nn.Module] = []
        cin = 3
        for v in layers:
            if v == "M":
                modules.append(nn.MaxPool2d(2, 2))
            else:
                modules += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=True)]
                cin = v
        self.features = nn.Sequential(*modules)
        self.block_ends = [i - 1 for i, m in enumerate(modules) if isinstance(m, nn.MaxPool2d)]  # each pool's ReLU
        # Not persistent: they are no part of torchvision's file, so strict loading must not expect them.
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.features[:-1]((x - self.mean) / self.std)  # stop before the last max pool

    def blocks(self, x: Tensor) -> list[Tensor]:
        """The ReLU output ending each of the five blocks."""
        out, h = [], (x - self.mean) / self.std
        for i, layer in enumerate(self.features[:self.block_ends[-1] + 1]):
            h = layer(h)
            if i in self.block_ends:
                out.append(h)
        return out
