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
from pydantic import Field, model_validator
from torch import Tensor, nn

from kpscale.config import Config
from kpscale.models.keypoints import EPS, ImageDecoder, KeypointDetector, coordinate_grid


class StructVRNNConfig(Config):
    name: Literal["struct_vrnn"] = "struct_vrnn"  # the registry key (kpscale.models.MODELS)
    image_size: Literal[64, 128] = 64
    num_keypoints: int = Field(64, ge=2)  # official default; the paper used 12 (Basketball), 48 (H3.6M)
    filters: int = Field(32, ge=1)  # encoder width at full resolution; x2 at each of two downsamplings
    layers_per_scale: int = Field(2, ge=1)
    keypoint_sigma: float = Field(1.5, gt=0)  # Gaussian std = sigma / heatmap_size in [-1, 1] units
    latent_size: int = Field(16, ge=0)  # 0: deterministic dynamics, the paper's Struct-RNN baseline
    rnn_size: int = Field(512, ge=1)
    hidden_size: int = Field(128, ge=1)
    num_samples: int = Field(10, ge=1)  # best of many; 1 is the "no BoM" ablation
    observed: int = Field(8, ge=2)  # the separation loss needs a trajectory
    predicted: int = Field(8, ge=0)
    # Scheduled sampling: the chance that the RNN is fed the detected rather than its own
    # keypoints falls linearly from 1 to these values over `scheduled_sampling_steps`.
    scheduled_sampling_steps: int = Field(8000, ge=0)
    p_true_end_observed: float = Field(0.1, ge=0, le=1)  # only with observed_input "decoded"
    p_true_end_predicted: float = Field(0.5, ge=0, le=1)
    # What the RNN reads on observed steps. "decoded" (the paper's Eq. 4 and the official code):
    # the keypoints decoded from z, so observations reach the state only through the posterior
    # (with scheduled sampling of the detected ones in training). "detected" (kpscale's own, the
    # standard VRNN of Chung et al. 2015): the detected keypoints, in training and at test.
    observed_input: Literal["decoded", "detected"] = "decoded"
    # "absolute" (paper): the decoder gives keypoints; "delta" (kpscale's own): it gives their
    # change from the keypoints the RNN last read, which a constant motion keeps constant.
    keypoint_output: Literal["absolute", "delta"] = "absolute"
    # The official default beta = 0 leaves the prior net untrained (the KL is its only gradient);
    # the paper tunes beta per dataset. Against the 0.5 * L2 keypoint term (a Gaussian of std 1,
    # half the image), 1 collapses the posterior onto the prior (KL 0), and with observed_input
    # "decoded" the observed steps then never reach the model (docs/benchmarks.md, "The dynamics").
    beta: float = Field(1.0, ge=0)
    kl_anneal_steps: int = Field(1000, ge=0)  # beta ramps linearly from 0 (official)
    reconstruction_weight: float = Field(1.0, ge=0)
    separation_weight: float = Field(10.0, ge=0)
    separation_sigma: float = Field(0.1, gt=0)
    sparsity_weight: float = Field(5.0, ge=0)
    future_weight: float = Field(1.0, ge=0)
    # Not in the paper or the official code (0 keeps it off): a keypoint faded below
    # `exploration_presence` in a frame, or duplicating a more present one, is pulled onto an
    # unclaimed moving object the decoder explains badly (exploration_loss).
    exploration_weight: float = Field(0.0, ge=0)
    exploration_presence: float = Field(0.1, gt=0, le=1)

    @model_validator(mode="after")
    def _samples_need_a_latent(self) -> StructVRNNConfig:
        if self.latent_size == 0 and self.num_samples > 1:
            raise ValueError(f"num_samples ({self.num_samples}) must be 1 when latent_size is 0: "
                             "deterministic dynamics draw the same sample every time")
        return self

    @property
    def heatmap_size(self) -> int:
        return self.image_size // 4

    @property
    def steps(self) -> int:
        return self.observed + self.predicted

    def kl_weight(self, step: int) -> float:
        return linear_ramp(step, 0.0, self.beta, self.kl_anneal_steps)

    def p_true(self, step: int) -> tuple[float, float]:
        """Teacher-forcing probability on (observed, predicted) steps."""
        n = self.scheduled_sampling_steps
        return (linear_ramp(step, 1.0, self.p_true_end_observed, n),
                linear_ramp(step, 1.0, self.p_true_end_predicted, n))


def linear_ramp(step: int, start: float, end: float, steps: int) -> float:
    """`start` at step 0, `end` from `steps` on, linear between."""
    return end if step >= steps else start + (end - start) * step / steps


def sequence_l2(pred: Tensor, target: Tensor) -> Tensor:
    """0.5 * squared error summed over each frame, averaged over batch and time ([B, T, ...]);
    the official tf.nn.l2_loss normalisation, which the official loss weights assume."""
    return 0.5 * (pred.float() - target.float()).pow(2).sum() / (pred.shape[0] * pred.shape[1])


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
        live = value > -torch.inf
        if not live.any():
            break
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


def gaussian_kl(mean_q: Tensor, std_q: Tensor, mean_p: Tensor, std_p: Tensor) -> Tensor:
    """KL(q || p) of diagonal Gaussians, summed over the last dimension (in float32)."""
    mean_q, std_q, mean_p, std_p = (v.float() for v in (mean_q, std_q, mean_p, std_p))
    ratio = (std_q / std_p).pow(2)
    return 0.5 * (ratio + ((mean_q - mean_p) / std_p).pow(2) - 1 - ratio.log()).sum(-1)


def best_of_many(samples: Tensor, target: Tensor) -> Tensor:
    """Index [B] of the sample [N, B, D] with the least mean squared error to target [B, D]."""
    return (samples - target).pow(2).mean(-1).argmin(0)


class GaussianHead(nn.Module):
    """Input -> ReLU hidden layer -> (mean, std) of a diagonal Gaussian."""

    def __init__(self, cin: int, hidden: int, latent: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(cin, hidden), nn.ReLU(), nn.Linear(hidden, 2 * latent))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean, raw = self.net(x).chunk(2, -1)
        return mean, nn.functional.softplus(raw) + 1e-4


class VRNN(nn.Module):
    """Keypoint dynamics: a GRU whose state h gives a prior over the latent z; on observed steps
    a posterior also sees the detected keypoints. Keypoints are decoded from (h, z). With
    latent_size 0 there is no z: a deterministic RNN (the paper's Struct-RNN)."""

    def __init__(self, cfg: StructVRNNConfig):
        super().__init__()
        kp = 3 * cfg.num_keypoints
        self.observed = cfg.observed
        self.observed_input, self.delta = cfg.observed_input, cfg.keypoint_output == "delta"
        self.rnn = nn.GRUCell(kp + cfg.latent_size, cfg.rnn_size)
        stochastic = cfg.latent_size > 0
        self.prior = GaussianHead(cfg.rnn_size, cfg.hidden_size, cfg.latent_size) if stochastic else None
        self.posterior = GaussianHead(cfg.rnn_size + kp, cfg.hidden_size, cfg.latent_size) if stochastic else None
        self.decoder = nn.Sequential(nn.Linear(cfg.rnn_size + cfg.latent_size, cfg.hidden_size), nn.ReLU(),
                                     nn.Linear(cfg.hidden_size, kp), nn.Tanh())

    def forward(self, keypoints: Tensor, steps: int, p_true: tuple[float, float] = (0.0, 0.0),
                num_samples: int = 1, observed: int | None = None) -> tuple[Tensor, Tensor]:
        """Detected keypoints [B, T, K, 3] (T >= observed; they are the best-of-many and
        teacher-forcing targets while t < T) -> predicted keypoints [B, steps, K, 3] and the KL
        [B, observed]. Observed steps (the config's unless given) sample the posterior, later
        steps the prior."""
        b, known, k, _ = keypoints.shape
        observed = self.observed if observed is None else observed
        x = keypoints.flatten(2).to(self.rnn.weight_ih.dtype)  # bf16 when the weights are (DeepSpeed bf16)
        h = x.new_zeros(b, self.rnn.hidden_size)
        last = x.new_zeros(b, x.shape[-1])  # the keypoints the RNN read last
        rows = torch.arange(b, device=x.device)
        outputs, kls = [], []
        empty = (h[:, :0], h[:, :0])  # the latent of deterministic dynamics: no dimensions, KL 0
        for t in range(steps):
            prior_mean, prior_std = self.prior(h) if self.prior else empty
            if t < observed:
                mean, std = self.posterior(torch.cat([h, x[:, t]], -1)) if self.posterior else empty
                kls.append(gaussian_kl(mean, std, prior_mean, prior_std))
            else:
                # As official: with no KL here, the keypoint error must not train the prior.
                mean, std = prior_mean.detach(), prior_std.detach()
            noise = torch.randn(num_samples, *mean.shape, device=mean.device, dtype=mean.dtype)
            z = mean + std * noise  # [N, B, L]: the samples ride in the batch, no loop
            samples = self.decoder(torch.cat([h.expand(num_samples, -1, -1), z], -1))  # [N, B, 3K]
            if self.delta:
                samples = samples + last
            pick = best_of_many(samples.float(), x[:, t].float()) if num_samples > 1 and t < known else 0
            z, pred = z[pick, rows], samples[pick, rows]
            outputs.append(pred)
            if t >= known:
                last = pred
            elif t < observed and self.observed_input == "detected":
                last = x[:, t]
            else:
                p = p_true[0] if t < observed else p_true[1]
                # One coin per sequence (official: one per batch), for less gradient noise.
                last = torch.where(torch.rand(b, 1, device=x.device) < p, x[:, t], pred) if p > 0 else pred
            h = self.rnn(torch.cat([last, z], -1), h)
        return torch.stack(outputs, 1).unflatten(2, (k, 3)).float(), torch.stack(kls, 1)


class StructVRNN(nn.Module):
    """Detector -> keypoints -> image decoder, with the VRNN learning the keypoints' dynamics."""

    def __init__(self, cfg: StructVRNNConfig):
        super().__init__()
        self.cfg = cfg
        k, f, lps = cfg.num_keypoints, cfg.filters, cfg.layers_per_scale
        self.detector = KeypointDetector(k, f, lps)
        self.decoder = ImageDecoder(k, f, lps, cfg.keypoint_sigma)
        self.dynamics = VRNN(cfg)

    def forward(self, video: Tensor, step: int, decode_predictions: bool = True) -> dict:
        """video [B, T, 3, H, W] in [0, 1], T = observed + predicted; `step` drives the KL and
        scheduled-sampling schedules. In eval mode the dynamics use one sample and no teacher
        forcing (as official), so the keypoint loss measures real predictions.

        Returns loss, terms (unweighted), keypoints and predicted_keypoints [B, T, K, 3],
        heatmaps [B, T, K, H/4, W/4], reconstruction and (if decode_predictions)
        predicted_frames [B, T, 3, H, W] in [0, 1]."""
        cfg = self.cfg
        if video.shape[1] != cfg.steps or video.shape[-1] != cfg.image_size:
            raise ValueError(f"expected video [B, {cfg.steps}, 3, {cfg.image_size}, {cfg.image_size}], "
                             f"got {list(video.shape)}")
        frames = video - 0.5
        keypoints, heatmaps, logits = self.detector(frames)
        reconstruction = self.decoder(keypoints, frames[:, 0], keypoints[:, 0])
        # The image model must not adopt the code of a half-trained dynamics model (paper, fn. 2).
        target = keypoints.detach()
        p_true = cfg.p_true(step) if self.training else (0.0, 0.0)
        num_samples = cfg.num_samples if self.training else 1
        predicted, kl = self.dynamics(target, cfg.steps, p_true, num_samples)
        terms = {
            "reconstruction": sequence_l2(reconstruction, frames),
            "separation": separation_loss(keypoints[:, :cfg.observed], cfg.separation_sigma),
            "sparsity": sparsity_loss(heatmaps),
            "kl": kl.mean(),
            "future": sequence_l2(predicted, target),
            "exploration": exploration_loss(logits, keypoints, frames, reconstruction,
                                            cfg.exploration_presence),
        }
        loss = (cfg.reconstruction_weight * terms["reconstruction"] + cfg.separation_weight * terms["separation"]
                + cfg.sparsity_weight * terms["sparsity"] + cfg.kl_weight(step) * terms["kl"]
                + cfg.future_weight * terms["future"] + cfg.exploration_weight * terms["exploration"])
        out = {"loss": loss, "terms": terms, "keypoints": keypoints, "heatmaps": heatmaps,
               "reconstruction": (reconstruction + 0.5).clamp(0, 1), "predicted_keypoints": predicted}
        if decode_predictions:
            with torch.no_grad():
                frames_hat = self.decoder(predicted, frames[:, 0], keypoints[:, 0])
            out["predicted_frames"] = (frames_hat + 0.5).clamp(0, 1)
        return out

    @torch.no_grad()
    def sample_future(self, video: Tensor, future: int, num_samples: int, observed: int | None = None,
                      offsets: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Condition on the first `observed` frames (the config's unless given) of video
        [B, T, 3, H, W] and draw `num_samples` futures of `future` steps: keypoints
        [B, S, observed + future, K, 3] and frames [B, S, observed + future, 3, H, W] in [0, 1],
        without teacher forcing or best of many (they need the future), as the official code
        does at test time.

        `offsets` [K, 2] moves the detected (x, y) of every observed frame before the dynamics
        roll forward: the paper's keypoint manipulation (Sec. 5.4). The decoder keeps the unmoved
        first frame and keypoints as its reference, so it draws a moved object where its keypoint
        now is and fills in where it was."""
        cfg = self.cfg
        observed = observed or cfg.observed
        frames = video[:, :observed] - 0.5
        detected = self.detector(frames)[0]
        conditioned = detected if offsets is None else torch.cat(
            [detected[..., :2] + offsets.to(detected), detected[..., 2:]], -1)
        predicted = self.dynamics(conditioned.repeat_interleave(num_samples, 0), observed + future,
                                  observed=observed)[0]
        first = frames[:, 0].repeat_interleave(num_samples, 0)
        decoded = self.decoder(predicted, first, detected[:, 0].repeat_interleave(num_samples, 0))
        b = video.shape[0]
        return predicted.unflatten(0, (b, num_samples)), (decoded + 0.5).clamp(0, 1).unflatten(0, (b, num_samples))
