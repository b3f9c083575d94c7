"""Per-time-step frame metrics of predicted against true clips, for curves over the prediction
horizon as in Struct-VRNN (Minderer et al. 2019, Figure 3): PSNR, SSIM and VGG cosine
similarity. PSNR and SSIM come from torchmetrics rather than hand-written code; VGG-16 is
kpscale.models.vgg's, which loads torchvision's ImageNet checkpoint unchanged."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from kpscale.evaluate.weights import load_state_dict_strict, resolve_weights
from kpscale.models.vgg import VGG

ENV_VAR = "KPSCALE_VGG_WEIGHTS"
CHECKPOINT = "vgg16-397923af.pth"  # torchvision's ImageNet VGG-16
# torchmetrics gives +inf dB for identical frames (the log of a zero error), which turns any mean
# over frames into inf. Clamped here to 100 dB, an error of 1e-10: beyond float32 frame precision.
PSNR_CEILING = 100.0


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


def load_vgg(path: str | Path | None = None) -> VGG:
    """The ImageNet VGG-16 features in eval mode, from `path` or else $KPSCALE_VGG_WEIGHTS; raises
    WeightsUnavailable rather than measuring anything with random weights. The file's
    `classifier.*` entries are ignored; every `features.*` key must be there."""
    path = resolve_weights(path, ENV_VAR, "VGG cosine similarity", f"Supply torchvision's ImageNet VGG-16 "
                           f"weights {CHECKPOINT} with --vgg PATH or {ENV_VAR}=PATH.")
    return load_state_dict_strict(VGG(), path, prefix="features.").eval()


@torch.no_grad()
def vgg_cosine_per_step(vgg: VGG, pred: Tensor, true: Tensor) -> Tensor:
    """Cosine similarity [B, T] between the flattened VGG-16 features of each predicted and true
    frame: 1 for identical frames. The paper does not say which layer it compares; this uses the
    last conv block's output, conv5_3 after its ReLU and before the last max pool, the deepest
    features that keep a spatial layout. Frames are taken at their own size, at least 16x16."""
    p, t = _frames(pred, true)
    device = next(vgg.parameters()).device
    features = vgg(torch.cat([p, t]).to(device)).flatten(1).double()  # float64: near 1, float32 cosines are coarse
    fp, ft = features.chunk(2)
    return F.cosine_similarity(fp, ft, dim=1).float().reshape(pred.shape[:2]).to(pred.device)
