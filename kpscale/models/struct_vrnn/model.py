"""Struct-VRNN (Minderer et al., NeurIPS 2019): keypoints detected in each frame, a VRNN that
models their dynamics, and a decoder that renders frames from keypoints and the first frame.

Where the paper and the official TensorFlow code differ, kpscale follows the code, which is
what produced the published numbers, unless a comment says otherwise:
- the keypoint loss ("future") is one L2 over all observed and predicted steps, not the
  paper's ELBO term on observed steps plus a separate L_future on predicted ones;
- best of many picks a sample on predicted steps too (the paper's Eq. 8 reads that way as well);
- sparsity is an L1 on the raw heatmap means, not on the normalised mu of the paper.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from kpscale.models.keypoints import EPS, ImageDecoder, KeypointDetector, coordinate_grid, keypoints_to_maps
from kpscale.models.vrnn import VRNN, VRNNConfig, VRNNFamily, VRNNVideoModel


class StructVRNNConfig(VRNNConfig):
    name: Literal["struct_vrnn"] = "struct_vrnn"  # the registry key (kpscale.models.FAMILIES)
    num_keypoints: int = Field(64, ge=2)  # official default; the paper used 12 (Basketball), 48 (H3.6M)
    keypoint_sigma: float = Field(1.5, gt=0)  # Gaussian std = sigma / heatmap_size in [-1, 1] units
    separation_weight: float = Field(10.0, ge=0)
    separation_sigma: float = Field(0.1, gt=0)
    sparsity_weight: float = Field(5.0, ge=0)
    # Not in the paper or the official code (0 keeps it off): a keypoint faded below
    # `exploration_presence` in a frame, or duplicating a more present one, is pulled onto an
    # unclaimed moving object the decoder explains badly (exploration_loss).
    exploration_weight: float = Field(0.0, ge=0)
    exploration_presence: float = Field(0.1, gt=0, le=1)

    @property
    def heatmap_size(self) -> int:
        return self.image_size // 4


def separation_loss(keypoints: Tensor, sigma: float) -> Tensor:
    """Penalises keypoints whose trajectories [B, T, K, 3] move alike: 0 when all are far apart
    (after removing each trajectory's temporal mean), 1 when all coincide."""
    xy = keypoints[..., :2].float()
    xy = xy - xy.mean(1, keepdim=True)
    d = (xy[:, :, :, None] - xy[:, :, None, :]).pow(2).sum(-1).mean(1)  # [B, K, K]
    k = keypoints.shape[2]
    return ((-d / (2 * sigma**2)).exp().mean(0).sum() - k) / (k * (k - 1))


def sparsity_loss(heatmaps: Tensor) -> Tensor:
    """L1 on each heatmap's mean [..., K, H, W], averaged over frames and keypoints. The official
    Keras activity regulariser sums this over frames and divides by the batch size (x T / B,
    0.5 at its defaults); a per-frame mean keeps the weight independent of B and T."""
    return heatmaps.mean((-2, -1)).abs().mean()


CANDIDATE_FRACTION = 0.25  # of the frame's best; dim red and green score ~0.4 of it (docs/benchmarks.md)


def log_softplus(x: Tensor) -> Tensor:
    """log(softplus(x)), exact to ~e^-20 where softplus underflows (~x there), with gradient ~1."""
    return torch.where(x < -20, x, nn.functional.softplus(x.clamp_min(-20)).log())


def spare_keypoints(keypoints: Tensor, min_presence: float, radius: float) -> Tensor:
    """[B, T, K] True where a keypoint (x, y, mu) [B, T, K, 3] adds nothing to the frame: faded
    (mu < min_presence), or within `radius` of a keypoint more present than itself (ties go to
    the lower index), as spare keypoints pile onto found objects and take turns there."""
    xy, mu = keypoints[..., :2].float(), keypoints[..., 2].float()
    k = mu.shape[-1]
    close = torch.cdist(xy, xy) < radius  # [B, T, K, K]
    index = torch.arange(k, device=mu.device)
    outranked = (mu[..., None, :] > mu[..., :, None]) | ((mu[..., None, :] == mu[..., :, None])
                                                          & (index[None, :] < index[:, None]))
    return (mu < min_presence) | (close & outranked).any(-1)


def assign(preference: Tensor, candidate: Tensor, spare: Tensor) -> Tensor:
    """Each spare keypoint's target cell [B, T, K, 1]: greedily, the highest preference
    [B, T, K, C] first, among candidate cells [B, T, C], each cell taking at most its share of
    the frame's spare keypoints [B, T, K]. Spread this way, spare keypoints reach every
    candidate, not only the one their maps already rate highest (like the object they came from)."""
    k, c = preference.shape[-2:]
    share = torch.ceil(spare.sum(-1) / candidate.sum(-1).clamp_min(1))[..., None]  # [B, T, 1]
    open_ = preference.masked_fill(~(spare[..., None] & candidate[:, :, None]), -torch.inf)
    taken = torch.zeros_like(candidate, dtype=torch.long)
    target = torch.zeros(*spare.shape[:-1], k + 1, dtype=torch.long, device=spare.device)
    for _ in range(k):
        value, flat = open_.flatten(2).max(-1)  # [B, T]: the best open (keypoint, cell) pair
        live = value > -torch.inf  # no early exit when none is: asking would sync with the GPU each step
        kp, cell = torch.where(live, flat // c, k), flat % c  # slot k takes frames with none left
        target.scatter_(-1, kp[..., None], cell[..., None])
        taken.scatter_add_(-1, cell[..., None], live[..., None].long())
        done = nn.functional.one_hot(kp, k + 1)[..., :k].bool()
        open_ = open_.masked_fill(done[..., None] | (taken >= share)[:, :, None], -torch.inf)
    return target[..., :k, None]


def exploration_loss(logits: Tensor, keypoints: Tensor, frames: Tensor, reconstruction: Tensor,
                     min_presence: float) -> Tensor:
    """Raises each spare keypoint's heatmap on an unclaimed moving object the decoder explains badly.

    Candidates are the local maxima of a per-cell score: how much the pixels move (differ from
    the clip's per-pixel temporal median, the background of a static camera) times how badly the
    decoder draws them, at least CANDIDATE_FRACTION of the frame's best, and not next to a
    keypoint that is not spare (its object is found, however large its residual). Spare
    keypoints (`spare_keypoints`, duplicates within one heatmap cell) are spread over the
    candidates by `assign`, and the loss is -log of each one's share of map mass at its target.

    Why: heatmaps sharpen to one cell within a few hundred steps, after which softplus passes
    ~e^-30 of gradient elsewhere, so a keypoint cannot move to an object it has no mass on; a
    faded keypoint gets no gradient from the decoder at all, and a duplicate only the share its
    twin leaves it. -log softplus has gradient ~1 at any logit, so this re-opens discovery for
    the spare keypoints only, and stops for each as soon as it has an object of its own.

    logits [B, T, K, h, w]; keypoints [B, T, K, 3]; frames, reconstruction [B, T, 3, H, W]."""
    h = logits.shape[-1]
    cell = frames.shape[-1] // h
    logits = logits.float().flatten(-2)  # [B, T, K, h * w]
    with torch.no_grad():
        frames, reconstruction = frames.float(), reconstruction.float()
        # Distances, not squared errors, so that dim objects still make candidates beside bright ones.
        moving = (frames - frames.median(1, keepdim=True).values).norm(dim=2)
        unexplained = (reconstruction - frames).norm(dim=2)
        score = nn.functional.avg_pool2d(moving * unexplained, cell)
        score = score.flatten(2)  # [B, T, h * w]
        spacing = 2 / (h - 1)  # between heatmap cells, in keypoint units
        spare = spare_keypoints(keypoints, min_presence, spacing)
        # A cell next to a keypoint that is not spare has its object: a found fast or small
        # object keeps a large residual, and spare keypoints would go back to it.
        cells = coordinate_grid(h, h, logits.device).flatten(1).T  # [h * w, 2]
        near = torch.cdist(keypoints[..., :2].float(), cells) < 1.5 * spacing  # [B, T, K, h * w]
        score = score.masked_fill((near & ~spare[..., None]).any(2), 0)
        best = score.amax(-1, keepdim=True)
        # One candidate cell per object: the local maxima of the score.
        peak = score == nn.functional.max_pool2d(score.unflatten(-1, (h, h)), 3, 1, 1).flatten(2)
        candidate = peak & (score >= CANDIDATE_FRACTION * best) & (best > 0)
        target = assign(logits, candidate, spare)
        spare = spare & (best > 0)  # a frame with nothing unexplained that moves has no target
    # The keypoint's coordinates are the centre of mass of (heatmap + EPS): the denominator keeps
    # the EPS, the numerator drops it so that the gradient stays ~1 when the map is ~0 there.
    mass = (nn.functional.softplus(logits) + EPS).sum(-1)
    nll = mass.log() - log_softplus(logits.gather(-1, target).squeeze(-1))
    return (nll * spare).mean()


class StructVRNN(VRNNVideoModel):
    """Detector -> keypoints -> image decoder, with the VRNN learning the keypoints' dynamics.
    Its states are keypoints [B, T, K, 3]; `forward` adds heatmaps [B, T, K, H/4, W/4] and
    their logits."""

    def __init__(self, cfg: StructVRNNConfig):
        super().__init__(cfg)
        k, f, lps = cfg.num_keypoints, cfg.filters, cfg.layers_per_scale
        self.detector = KeypointDetector(k, f, lps)
        self.decoder = ImageDecoder(k, f, lps)
        self.dynamics = VRNN(3 * k, cfg)

    def encode(self, frames: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        keypoints, heatmaps, logits = self.detector(frames)
        return keypoints, {"heatmaps": heatmaps, "logits": logits}

    def render(self, keypoints: Tensor, first_frame: Tensor, first_keypoints: Tensor) -> Tensor:
        size, sigma = self.cfg.heatmap_size, self.cfg.keypoint_sigma
        return self.decoder(keypoints_to_maps(keypoints, size, sigma), first_frame,
                            keypoints_to_maps(first_keypoints, size, sigma))

    def representation_terms(self, keypoints: Tensor, extras: dict[str, Tensor], frames: Tensor,
                             reconstruction: Tensor) -> dict[str, Tensor]:
        cfg = self.cfg
        return {"separation": separation_loss(keypoints[:, :cfg.observed], cfg.separation_sigma),
                "sparsity": sparsity_loss(extras["heatmaps"]),
                "exploration": exploration_loss(extras["logits"], keypoints, frames, reconstruction,
                                                cfg.exploration_presence)}

    def keypoints(self, states: Tensor) -> Tensor:
        return states.unflatten(-1, (self.cfg.num_keypoints, 3))

    def condition(self, keypoints: Tensor, offsets: Tensor | None) -> Tensor:
        """`offsets` [K, 2] moves the detected (x, y) of every observed frame before the dynamics
        roll forward: the paper's keypoint manipulation (Sec. 5.4). The decoder keeps the unmoved
        first frame and keypoints as its reference, so it draws a moved object where its keypoint
        now is and fills in where it was."""
        if offsets is None:
            return keypoints
        return torch.cat([keypoints[..., :2] + offsets.to(keypoints), keypoints[..., 2:]], -1)


class StructVRNNFamily(VRNNFamily):
    config = StructVRNNConfig
    metrics = (*VRNNFamily.metrics, "train/separation", "train/sparsity", "train/exploration")
    network = StructVRNN
