"""CNN-VRNN, the unstructured baseline of Struct-VRNN (Minderer et al. 2019, Sec. 5.1): the same
stochastic dynamics over a feature vector that a CNN encodes from each frame, in place of
keypoints, and frames decoded from that vector.

The paper gives the vector 3K elements ("at least as large as that of the Struct-VRNN
representation") and nothing else of the architecture, and the official code does not include
it. kpscale builds it from Struct-VRNN's own pieces so that only the bottleneck differs: the
keypoint detector's convolutions, then a linear layer to the vector instead of heatmaps; the
image decoder, fed a learned linear map of the vector instead of Gaussian keypoint maps."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from kpscale.models.keypoints import ImageDecoder, ImageEncoder, add_coord_channels, channels_last
from kpscale.models.vrnn import VRNN, VRNNConfig, VRNNFamily, VRNNVideoModel


class CNNVRNNConfig(VRNNConfig):
    name: Literal["cnn_vrnn"] = "cnn_vrnn"  # the registry key (kpscale.models.FAMILIES)
    representation_size: int = Field(36, ge=1)  # the paper: 3K, K = 12 on Basketball
    map_channels: int = Field(12, ge=1)  # decoder input maps made from the vector (Struct-VRNN: one per keypoint)

    @property
    def feature_size(self) -> int:
        return self.image_size // 4


class FeatureEncoder(nn.Module):
    """Frames [B, T, 3, H, W] -> feature vectors [B, T, D] in [-1, 1] (tanh, the range of the
    VRNN's output)."""

    def __init__(self, cfg: CNNVRNNConfig):
        super().__init__()
        self.convs = ImageEncoder(3 + 2, cfg.filters, cfg.layers_per_scale)
        self.project = nn.Linear(self.convs.out_channels * cfg.feature_size**2, cfg.representation_size)

    def forward(self, frames: Tensor) -> Tensor:
        b, t = frames.shape[:2]
        features = self.convs(channels_last(add_coord_channels(frames.flatten(0, 1))))
        return torch.tanh(self.project(features.flatten(1))).float().unflatten(0, (b, t))


class CNNVRNN(VRNNVideoModel):
    """Feature encoder -> vector -> image decoder, with the VRNN learning the vectors' dynamics.
    Its states are vectors [B, T, D]; no keypoints, so no separation or sparsity loss."""

    def __init__(self, cfg: CNNVRNNConfig):
        super().__init__(cfg)
        self.encoder = FeatureEncoder(cfg)
        self.to_maps = nn.Linear(cfg.representation_size, cfg.map_channels * cfg.feature_size**2)
        self.decoder = ImageDecoder(cfg.map_channels, cfg.filters, cfg.layers_per_scale)
        self.dynamics = VRNN(cfg.representation_size, cfg)

    def encode(self, frames: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return self.encoder(frames), {}

    def _maps(self, states: Tensor) -> Tensor:
        size = self.cfg.feature_size
        return self.to_maps(states.to(self.to_maps.weight.dtype)).unflatten(-1, (self.cfg.map_channels, size, size))

    def render(self, states: Tensor, first_frame: Tensor, first_states: Tensor) -> Tensor:
        return self.decoder(self._maps(states), first_frame, self._maps(first_states))


class CNNVRNNFamily(VRNNFamily):
    config = CNNVRNNConfig
    network = CNNVRNN
