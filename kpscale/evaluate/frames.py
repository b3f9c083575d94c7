"""Per-time-step frame metrics of predicted against true clips, for curves over the prediction
horizon as in Struct-VRNN (Minderer et al. 2019, Figure 3): PSNR, SSIM and VGG cosine
similarity. PSNR and SSIM come from torchmetrics rather than hand-written code. VGG-16 is built
here because torchvision cannot be imported beside this torch; its module indices follow
torchvision's so that torchvision's ImageNet checkpoint loads unchanged."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from kpscale.evaluate.weights import load_state_dict_strict, resolve_weights

ENV_VAR = "KPSCALE_VGG_WEIGHTS"
CHECKPOINT = "vgg16-397923af.pth"  # torchvision's ImageNet VGG-16
# torchmetrics gives +inf dB for identical frames (the log of a zero error), which turns any mean
# over frames into inf. Clamped here to 100 dB, an error of 1e-10: beyond float32 frame precision.
PSNR_CEILING = 100.0
# torchvision's cfg "D": output channels of 3x3 convs (each followed by a ReLU), "M" a 2x2 max pool.
CFG_D = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _frames(pred: Tensor, true: Tensor) -> tuple[Tensor, Tensor]:
    """Clips [B, T, 3, H, W] -> float32 frames [B*T, 3, H, W]: every metric here is per frame."""
    if pred.ndim != 5 or pred.shape != true.shape:
        raise ValueError(f"need pred and true clips [B, T, 3, H, W] of one shape, "
                         f"got {tuple(pred.shape)} and {tuple(true.shape)}")
    return pred.flatten(0, 1).float(), true.flatten(0, 1).float()


@torch.no_grad()
def psnr_per_step(pred: Tensor, true: Tensor) -> Tensor:
    """PSNR in dB [B, T] of each predicted frame against the true one, frames in [0, 1];
    identical frames give PSNR_CEILING rather than inf."""
    p, t = _frames(pred, true)
    psnr = peak_signal_noise_ratio(p, t, data_range=1.0, reduction="none", dim=(1, 2, 3))
    return psnr.clamp(max=PSNR_CEILING).reshape(pred.shape[:2])


@torch.no_grad()
def ssim_per_step(pred: Tensor, true: Tensor) -> Tensor:
    """SSIM [B, T] of each predicted frame against the true one, frames in [0, 1] and at least
    11x11: torchmetrics' defaults, Wang et al.'s 11x11 Gaussian window of sigma 1.5."""
    p, t = _frames(pred, true)
    return structural_similarity_index_measure(p, t, data_range=1.0, reduction="none").reshape(pred.shape[:2])


class VGG16(nn.Module):
    """The convolutional part of VGG-16 (Simonyan & Zisserman 2015): [N, 3, H, W] in [0, 1] ->
    conv5_3 features [N, 512, H/16, W/16]. `features` holds all of torchvision's layers so its
    indices (and the checkpoint's keys) match; the classifier is left out, as only features are
    compared."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for v in CFG_D:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=True)]
                cin = v
        self.features = nn.Sequential(*layers)
        # Not persistent: they are no part of torchvision's file, so strict loading must not expect them.
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.features[:-1]((x - self.mean) / self.std)  # stop before the last max pool


def load_vgg(path: str | Path | None = None) -> VGG16:
    """The ImageNet VGG-16 features in eval mode, from `path` or else $KPSCALE_VGG_WEIGHTS; raises
    WeightsUnavailable rather than measuring anything with random weights. The file's
    `classifier.*` entries are ignored; every `features.*` key must be there."""
    path = resolve_weights(path, ENV_VAR, "VGG cosine similarity", f"Supply torchvision's ImageNet VGG-16 "
                           f"weights {CHECKPOINT} with --vgg PATH or {ENV_VAR}=PATH.")
    return load_state_dict_strict(VGG16(), path, prefix="features.").eval()


@torch.no_grad()
def vgg_cosine_per_step(vgg: VGG16, pred: Tensor, true: Tensor) -> Tensor:
    """Cosine similarity [B, T] between the flattened VGG-16 features of each predicted and true
    frame: 1 for identical frames. The paper does not say which layer it compares; this uses the
    last conv block's output, conv5_3 after its ReLU and before the last max pool, the deepest
    features that keep a spatial layout. Frames are taken at their own size, at least 16x16."""
    p, t = _frames(pred, true)
    device = next(vgg.parameters()).device
    features = vgg(torch.cat([p, t]).to(device)).flatten(1).double()  # float64: near 1, float32 cosines are coarse
    fp, ft = features.chunk(2)
    return F.cosine_similarity(fp, ft, dim=1).float().reshape(pred.shape[:2]).to(pred.device)
