"""The stochastic dynamics Struct-VRNN and its CNN-VRNN baseline share (Minderer et al. 2019):
a VRNN over one state vector per frame (keypoints, or an unstructured feature vector), trained
with best of many, scheduled sampling and an annealed KL, and the config fields that size and
train it. Each model family's config derives from `VRNNConfig` and adds its representation."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from kpscale.config import Config
from kpscale.models.family import Family, Optimiser, Stage


class VRNNConfig(Config):
    name: str  # the family, first in dumps and logs; each family's config fixes it (a Literal)
    image_size: Literal[64, 128] = 64
    filters: int = Field(32, ge=1)  # encoder width at full resolution; x2 at each of two downsamplings
    layers_per_scale: int = Field(2, ge=1)
    latent_size: int = Field(16, ge=0)  # 0: deterministic dynamics, the paper's Struct-RNN baseline
    rnn_size: int = Field(512, ge=1)
    hidden_size: int = Field(128, ge=1)
    num_samples: int = Field(10, ge=1)  # best of many; 1 is the "no BoM" ablation
    observed: int = Field(8, ge=2)  # Struct-VRNN's separation loss needs a trajectory
    predicted: int = Field(8, ge=0)
    # Scheduled sampling: the chance that the RNN is fed the encoded rather than its own state
    # falls linearly from 1 to these values over `scheduled_sampling_steps`.
    scheduled_sampling_steps: int = Field(8000, ge=0)
    p_true_end_observed: float = Field(0.1, ge=0, le=1)  # only with observed_input "decoded"
    p_true_end_predicted: float = Field(0.5, ge=0, le=1)
    # What the RNN reads on observed steps. "decoded" (the paper's Eq. 4 and the official code):
    # the state decoded from z, so observations reach the RNN only through the posterior (with
    # scheduled sampling of the encoded ones in training). "detected" (kpscale's own, the
    # standard VRNN of Chung et al. 2015): the encoded state (the detected keypoints), in
    # training and at test.
    observed_input: Literal["decoded", "detected"] = "decoded"
    # "absolute" (paper): the decoder gives the state; "delta" (kpscale's own): it gives its
    # change from the state the RNN last read, which a constant motion keeps constant.
    keypoint_output: Literal["absolute", "delta"] = "absolute"
    # The official default beta = 0 leaves the prior net untrained (the KL is its only gradient);
    # the paper tunes beta per dataset. Against the 0.5 * L2 state term (a Gaussian of std 1,
    # half the image), 1 collapses the posterior onto the prior (KL 0), and with observed_input
    # "decoded" the observed steps then never reach the model (docs/benchmarks.md, "The dynamics").
    beta: float = Field(1.0, ge=0)
    kl_anneal_steps: int = Field(1000, ge=0)  # beta ramps linearly from 0 (official)
    reconstruction_weight: float = Field(1.0, ge=0)
    future_weight: float = Field(1.0, ge=0)
    # The paper's DeepMind Control Suite models (Sec. 5.5): the RNN also reads the action taken at
    # each frame (the clips' actions [T, A], A = action_size), so futures roll out under actions.
    action_conditioned: bool = False
    action_size: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _samples_need_a_latent(self) -> VRNNConfig:
        if self.latent_size == 0 and self.num_samples > 1:
            raise ValueError(f"num_samples ({self.num_samples}) must be 1 when latent_size is 0: "
                             "deterministic dynamics draw the same sample every time")
        return self

    @model_validator(mode="after")
    def _actions_have_a_size(self) -> VRNNConfig:
        if self.action_conditioned and self.action_size == 0:
            raise ValueError("action_conditioned needs action_size, the number of values in each of the data's "
                             "actions (the manifest's action_dim, e.g. 6 for cheetah)")
        if self.action_size and not self.action_conditioned:
            raise ValueError(f"action_size is {self.action_size} but action_conditioned is false: set "
                             "action_conditioned=true, or leave action_size out")
        return self

    def check_actions(self, actions: Tensor | None, batch: int, steps: int) -> Tensor | None:
        """The actions the dynamics read over `steps` steps (None when the model takes none), after
        checking them: [B, >= steps - 1, action_size] (the last step's action moves nothing shown)."""
        if not self.action_conditioned:
            return None
        if actions is None:
            raise ValueError("model.action_conditioned: the model rolls forward under actions and none were given "
                             "(the clips have no actions.npy; kpscale.predict takes --actions FILE.npy)")
        if actions.ndim != 3 or actions.shape[0] != batch or actions.shape[2] != self.action_size:
            raise ValueError(f"actions of shape {list(actions.shape)}: model.action_size is {self.action_size}, so "
                             f"expected [{batch}, T, {self.action_size}]")
        if actions.shape[1] < steps - 1:
            raise ValueError(f"{actions.shape[1]} actions for {steps} steps: need at least {steps - 1}")
        return actions

    @property
    def steps(self) -> int:
        return self.observed + self.predicted

    def kl_weight(self, step: int | Tensor) -> float | Tensor:
        return linear_ramp(step, 0.0, self.beta, self.kl_anneal_steps)

    def p_true(self, step: int | Tensor) -> tuple[float | Tensor, float | Tensor]:
        """Teacher-forcing probability on (observed, predicted) steps."""
        n = self.scheduled_sampling_steps
        return (linear_ramp(step, 1.0, self.p_true_end_observed, n),
                linear_ramp(step, 1.0, self.p_true_end_predicted, n))


def linear_ramp(step: int | Tensor, start: float, end: float, steps: int) -> float | Tensor:
    """`start` at step 0, `end` from `steps` on, linear between. `step` may be the training
    loop's counter on the device: a compiled step then reads it as data, one graph for all
    steps, where a Python int would be a graph input that CUDA graphs record anew per value."""
    if steps == 0:
        return end
    done = step / steps
    return start + (end - start) * (done.clamp(max=1) if torch.is_tensor(done) else min(done, 1))


def sequence_l2(pred: Tensor, target: Tensor) -> Tensor:
    """0.5 * squared error summed over each frame, averaged over batch and time ([B, T, ...]);
    the official tf.nn.l2_loss normalisation, which the official loss weights assume."""
    return 0.5 * (pred.float() - target.float()).pow(2).sum() / (pred.shape[0] * pred.shape[1])


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
    """State dynamics: a GRU whose state h gives a prior over the latent z; on observed steps a
    posterior also sees the encoded state. The next state (in [-1, 1], tanh) is decoded from
    (h, z). With latent_size 0 there is no z: a deterministic RNN (the paper's Struct-RNN)."""

    def __init__(self, state_size: int, cfg: VRNNConfig):
        super().__init__()
        self.observed = cfg.observed
        self.observed_input, self.delta = cfg.observed_input, cfg.keypoint_output == "delta"
        self.rnn = nn.GRUCell(state_size + cfg.latent_size + cfg.action_size, cfg.rnn_size)
        stochastic = cfg.latent_size > 0
        self.prior = GaussianHead(cfg.rnn_size, cfg.hidden_size, cfg.latent_size) if stochastic else None
        self.posterior = GaussianHead(cfg.rnn_size + state_size, cfg.hidden_size, cfg.latent_size) if stochastic else None
        self.decoder = nn.Sequential(nn.Linear(cfg.rnn_size + cfg.latent_size, cfg.hidden_size), nn.ReLU(),
                                     nn.Linear(cfg.hidden_size, state_size), nn.Tanh())

    def forward(self, states: Tensor, steps: int, p_true: tuple[float | Tensor, float | Tensor] | None = None,
                num_samples: int = 1, observed: int | None = None,
                actions: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Encoded states [B, T, ...] (keypoints [B, T, K, 3], or vectors [B, T, D]; T >=
        observed; they are the best-of-many and teacher-forcing targets while t < T) ->
        predicted states [B, steps, ...], the KL [B, observed] and the RNN state each step's
        prediction came from [B, steps, rnn_size] (the dynamics' latent state). Observed steps (the
        config's unless given) sample the posterior, later steps the prior. `p_true`: teacher
        forcing's probabilities on (observed, predicted) steps, a coin drawn even at 0 (so that a
        probability on the device is never read on the host); None: none. `actions` [B, >= steps
        - 1, A] (an action-conditioned model's, checked by VRNNConfig.check_actions): the RNN reads
        step t's action with its state, so it moves the prediction of step t + 1."""
        b, known = states.shape[:2]
        observed = self.observed if observed is None else observed
        x = states.flatten(2).to(self.rnn.weight_ih.dtype)  # bf16 when the weights are (DeepSpeed bf16)
        h = x.new_zeros(b, self.rnn.hidden_size)
        last = x.new_zeros(b, x.shape[-1])  # the state the RNN read last
        rows = torch.arange(b, device=x.device)
        acted = None if actions is None else actions.to(x)
        outputs, kls, hidden = [], [], []
        empty = (h[:, :0], h[:, :0])  # the latent of deterministic dynamics: no dimensions, KL 0
        for t in range(steps):
            hidden.append(h)
            prior_mean, prior_std = self.prior(h) if self.prior else empty
            if t < observed:
                mean, std = self.posterior(torch.cat([h, x[:, t]], -1)) if self.posterior else empty
                kls.append(gaussian_kl(mean, std, prior_mean, prior_std))
            else:
                # As official: with no KL here, the state error must not train the prior.
                mean, std = prior_mean.detach(), prior_std.detach()
            noise = torch.randn(num_samples, *mean.shape, device=mean.device, dtype=mean.dtype)
            z = mean + std * noise  # [N, B, L]: the samples ride in the batch, no loop
            samples = self.decoder(torch.cat([h.expand(num_samples, -1, -1), z], -1))  # [N, B, D]
            if self.delta:
                samples = samples + last
            pick = best_of_many(samples.float(), x[:, t].float()) if num_samples > 1 and t < known else 0
            z, pred = z[pick, rows], samples[pick, rows]
            outputs.append(pred)
            if t >= known:
                last = pred
            elif t < observed and self.observed_input == "detected":
                last = x[:, t]
            elif p_true is None:
                last = pred
            else:
                p = p_true[0] if t < observed else p_true[1]
                # One coin per sequence (official: one per batch), for less gradient noise.
                last = torch.where(torch.rand(b, 1, device=x.device) < p, x[:, t], pred)
            if t < steps - 1:
                h = self.rnn(torch.cat([last, z] + ([] if acted is None else [acted[:, t]]), -1), h)
        return (torch.stack(outputs, 1).unflatten(2, states.shape[2:]).float(), torch.stack(kls, 1),
                torch.stack(hidden, 1).float())


class VRNNVideoModel(nn.Module):
    """A video model that encodes each frame to a state, renders frames from states and the
    first frame, and predicts states with the VRNN: what Struct-VRNN (keypoints) and CNN-VRNN
    (a feature vector) share. A family builds its image model, then `self.dynamics =
    VRNN(state_size, cfg)` (last, so that a seed draws the image model's weights first), and
    supplies `encode`, `render` and `representation_terms` (its own losses, weighted by the
    config's `<term>_weight`)."""

    def __init__(self, cfg: VRNNConfig):
        super().__init__()
        self.cfg = cfg

    def encode(self, frames: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Frames [B, T, 3, H, W] in [-0.5, 0.5] -> states [B, T, ...] and what the family's
        losses need besides."""
        raise NotImplementedError

    def render(self, states: Tensor, first_frame: Tensor, first_states: Tensor) -> Tensor:
        """States [B, T, ...], the first frame [B, 3, H, W] and its states [B, ...] -> frames
        [B, T, 3, H, W] in [-0.5, 0.5] (unclamped)."""
        raise NotImplementedError

    def representation_terms(self, states: Tensor, extras: dict[str, Tensor], frames: Tensor,
                             reconstruction: Tensor) -> dict[str, Tensor]:
        return {}

    def keypoints(self, states: Tensor) -> Tensor | None:
        """States [..., D] as keypoints [..., K, 3] (x, y, mu) to draw and export, or None when
        the representation has no keypoints."""
        return None

    def forward(self, video: Tensor, step: int | Tensor, decode_predictions: bool = True, actions: Tensor | None = None) -> dict:
        """video [B, T, 3, H, W] in [0, 1], T = observed + predicted; `step` drives the KL and
        scheduled-sampling schedules; `actions` [B, T, A]: the clip's, which an action-conditioned
        model needs (and any other ignores). In eval mode the dynamics use one sample and no
        teacher forcing (as official), so the state loss measures real predictions.

        Returns loss, terms (unweighted), states and predicted_states [B, T, ...],
        reconstruction and (if decode_predictions) predicted_frames [B, T, 3, H, W] in [0, 1],
        and the family's extras."""
        cfg = self.cfg
        if video.shape[1] != cfg.steps or video.shape[-1] != cfg.image_size:
            raise ValueError(f"expected video [B, {cfg.steps}, 3, {cfg.image_size}, {cfg.image_size}], "
                             f"got {list(video.shape)}")
        frames = video - 0.5
        states, extras = self.encode(frames)
        reconstruction = self.render(states, frames[:, 0], states[:, 0])
        # The image model must not adopt the code of a half-trained dynamics model (paper, fn. 2).
        target = states.detach()
        p_true = cfg.p_true(step) if self.training else None
        num_samples = cfg.num_samples if self.training else 1
        actions = cfg.check_actions(actions, len(video), cfg.steps)
        predicted, kl, _ = self.dynamics(target, cfg.steps, p_true, num_samples, actions=actions)
        terms = {"reconstruction": sequence_l2(reconstruction, frames), "kl": kl.mean(),
                 "future": sequence_l2(predicted, target),
                 **self.representation_terms(states, extras, frames, reconstruction)}
        loss = sum((cfg.kl_weight(step) if name == "kl" else getattr(cfg, f"{name}_weight")) * term
                   for name, term in terms.items())
        out = {"loss": loss, "terms": terms, "states": states, "predicted_states": predicted,
               "reconstruction": (reconstruction + 0.5).clamp(0, 1), **extras}
        if decode_predictions:
            with torch.no_grad():
                frames_hat = self.render(predicted, frames[:, 0], states[:, 0])
            out["predicted_frames"] = (frames_hat + 0.5).clamp(0, 1)
        return out

    @torch.no_grad()
    def represent(self, video: Tensor) -> Tensor:
        """Each frame's state, flat: video [B, T, 3, H, W] in [0, 1] -> [B, T, D]."""
        return self.encode(video - 0.5)[0].flatten(2)

    def condition(self, states: Tensor, offsets: Tensor | None) -> Tensor:
        """The observed states the dynamics roll forward from; `offsets` manipulate them
        where the family supports it (Struct-VRNN's keypoints)."""
        if offsets is not None:
            raise ValueError(f"{type(self).__name__} has no keypoints to move")
        return states

    def _rollout(self, video: Tensor, future: int, num_samples: int, observed: int | None,
                 offsets: Tensor | None, actions: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The first `observed` frames [B, observed, 3, H, W] in [-0.5, 0.5], their encoded states,
        and `num_samples` rollouts per clip of the dynamics over observed + future steps (rows
        clip-major): predicted states [B * S, T, ...] and their RNN states [B * S, T, rnn_size]."""
        observed = observed or self.cfg.observed
        frames = video[:, :observed] - 0.5
        encoded = self.encode(frames)[0]
        actions = self.cfg.check_actions(actions, len(video), observed + future)
        predicted, _, hidden = self.dynamics(
            self.condition(encoded, offsets).repeat_interleave(num_samples, 0), observed + future, observed=observed,
            actions=None if actions is None else actions.repeat_interleave(num_samples, 0))
        return frames, encoded, predicted, hidden

    @torch.no_grad()
    def sample_future(self, video: Tensor, future: int, num_samples: int, observed: int | None = None,
                      offsets: Tensor | None = None, actions: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Condition on the first `observed` frames (the config's unless given) of video
        [B, T, 3, H, W] and draw `num_samples` futures of `future` steps: states, flat,
        [B, S, observed + future, D] and frames [B, S, observed + future, 3, H, W] in [0, 1],
        without teacher forcing or best of many (they need the future), as the official code
        does at test time. `offsets`: see `condition`; `actions` [B, >= observed + future - 1, A]:
        what an action-conditioned model rolls forward under."""
        frames, encoded, predicted, _ = self._rollout(video, future, num_samples, observed, offsets, actions)
        # The renderer keeps the unmanipulated first frame and state as its reference.
        first = frames[:, 0].repeat_interleave(num_samples, 0)
        decoded = self.render(predicted, first, encoded[:, 0].repeat_interleave(num_samples, 0))
        b = video.shape[0]
        return (predicted.flatten(2).unflatten(0, (b, num_samples)),
                (decoded + 0.5).clamp(0, 1).unflatten(0, (b, num_samples)))

    @torch.no_grad()
    def latent_states(self, video: Tensor, future: int, num_samples: int, actions: Tensor | None = None) -> Tensor:
        """The dynamics' latent state (the RNN state each step's prediction comes from) over the
        observed frames of video [B, T, 3, H, W] and `future` steps sampled after them:
        [B, S, observed + future, rnn_size]. What a downstream model (reward prediction) reads."""
        hidden = self._rollout(video, future, num_samples, None, None, actions)[3]
        return hidden.unflatten(0, (video.shape[0], num_samples))


class VRNNFamily(Family):
    """Struct-VRNN and CNN-VRNN train in one stage, with one optimiser over the whole model, the
    image model and the dynamics together (as official). Subclasses name the config and the
    network."""

    network: ClassVar[type[VRNNVideoModel]]
    stages = (Stage("train", ("model",)),)
    metrics = ("tracking_error_observed", "tracking_error_predicted", "train/loss", "train/reconstruction",
               "train/kl", "train/future")

    def __init__(self, cfg: VRNNConfig):
        super().__init__(cfg)
        self.root = self.network(cfg)

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.root}

    def optimiser(self, name: str) -> Optimiser:
        return Optimiser(self.root)

    @classmethod
    def check_data(cls, cfg: VRNNConfig, manifest: dict[str, list], spec: str) -> None:
        if not cfg.action_conditioned:
            return
        sizes = sorted(set(manifest["action_dim"]))
        if sizes != [cfg.action_size]:
            found = "no actions" if sizes == [0] else f"actions of size {' or '.join(map(str, sizes))}"
            raise ValueError(f"model.action_size is {cfg.action_size}, but the clips of {spec} have {found}")

    def loss(self, stage, optimiser, engine, batch, step, outputs) -> dict:
        return engine(batch["video"], step, decode_predictions=False, actions=batch.get("actions"))

    def evaluate(self, cfg, stage, device, dtype):
        from kpscale.evaluate.snapshot import evaluate

        return evaluate(self.root, cfg, device, dtype, fit_clips=cfg.train.eval_clips, test_clips=cfg.train.eval_clips)

    def describe(self, metrics: dict[str, float]) -> str:
        found = (f"; a keypoint on {metrics['objects_found']:.0f} of "
                 f"{sum(name.startswith('keypoint_distance/') for name in metrics)} objects"
                 if "objects_found" in metrics else "")
        return (f"tracking error {metrics['tracking_error_observed']:.2f} px observed, "
                f"{metrics['tracking_error_predicted']:.2f} px predicted (best of {self.cfg.num_samples}), "
                f"no dynamics {metrics['tracking_error_no_dynamics']:.2f} px, "
                f"null model {metrics['tracking_error_null']:.2f} px{found}")
