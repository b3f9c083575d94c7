"""DrNet's training: stage `representation` steps the scene discriminator, then the encoders
and decoder against it (the order of the official train_drnet.py); stage `dynamics` trains the
LSTM on the frozen encoders' codes. Each optimiser's loss is a module its engine wraps; the
networks another optimiser trains are borrowed, not owned."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kpscale.models.drnet.model import DrNet, DrNetConfig
from kpscale.models.family import Family, Optimiser, Stage, borrow


def four_frames(video: Tensor) -> Tensor:
    """[B, T, C, H, W] -> [B, 4, C, H, W]: frames at four random times of the clips (the same
    times for the batch): content from the first two, pose from the last two."""
    times = torch.randint(video.shape[1], (4,))
    return video[:, times.to(video.device)]


class DisentangleLoss(nn.Module):
    """The encoders' and decoder's optimiser. The third frame is reconstructed from the first's
    content and its own pose; the content of two frames of a clip should agree; and the scene
    discriminator, whatever pose pair it sees, should not tell (maximum entropy)."""

    def __init__(self, net: DrNet):
        super().__init__()
        self.cfg = net.cfg
        self.content_encoder, self.pose_encoder, self.decoder = net.content_encoder, net.pose_encoder, net.decoder
        borrow(self, "scene_discriminator", net.scene_discriminator)

    def forward(self, frames: Tensor) -> dict:
        c1, c2, p1, p2 = frames.unbind(1)
        content, skips = self.content_encoder(c1)
        other_content = self.content_encoder(c2)[0].detach()
        pose = self.pose_encoder(p1)[0]
        other_pose = self.pose_encoder(p2)[0].detach()
        logits = self.scene_discriminator(pose, other_pose)
        terms = {"reconstruction": F.mse_loss(self.decoder(content, skips, pose), p1),
                 "similarity": F.mse_loss(content, other_content),
                 "adversarial": F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, 0.5))}
        loss = terms["reconstruction"] + terms["similarity"] + self.cfg.adversarial_weight * terms["adversarial"]
        return {"loss": loss, "terms": terms}


class SceneDiscriminatorLoss(nn.Module):
    """The scene discriminator's optimiser: pose pairs of one clip (target 1) against pairs whose
    second pose comes from another clip of the batch (target 0)."""

    def __init__(self, net: DrNet):
        super().__init__()
        self.scene_discriminator = net.scene_discriminator
        borrow(self, "pose_encoder", net.pose_encoder)

    def forward(self, frames: Tensor) -> dict:
        with torch.no_grad():
            pose = self.pose_encoder(frames[:, 2])[0]
            other = self.pose_encoder(frames[:, 3])[0]
        half = len(pose) // 2
        if half < 2:
            raise ValueError(f"the scene discriminator needs a batch of at least 4 clips, got {len(pose)}")
        # The first half's second poses, rotated by one: every pair there is from two different clips.
        other = torch.cat([other[:half].roll(1, 0), other[half:]])
        target = torch.cat([torch.zeros(half), torch.ones(len(pose) - half)]).to(pose)
        logits = self.scene_discriminator(pose, other)
        loss = F.binary_cross_entropy_with_logits(logits, target)
        accuracy = ((logits > 0) == (target > 0.5)).float().mean()
        return {"loss": loss, "terms": {"bce": loss, "accuracy": accuracy}}


class PredictionLoss(nn.Module):
    """The LSTM's optimiser: one-step-ahead pose error over observed + predicted frames, fed the
    true poses, with the content of the last observed frame (official train_lstm)."""

    def __init__(self, net: DrNet):
        super().__init__()
        self.cfg = net.cfg
        self.predictor = net.predictor
        borrow(self, "net", net)

    def forward(self, video: Tensor) -> dict:
        cfg = self.cfg
        window = video[:, :cfg.observed + cfg.predicted]
        with torch.no_grad():
            poses = self.net.poses(window)
            content = self.net.content_encoder(window[:, cfg.observed - 1])[0]
        predicted, _ = self.predictor(poses[:, :-1], content)
        loss = F.mse_loss(predicted, poses[:, 1:])
        return {"loss": loss, "terms": {"pose": loss}}


class DrNetFamily(Family):
    config = DrNetConfig
    stages = (Stage("representation", ("scene_discriminator", "main")),
              Stage("dynamics", ("predictor",), frozen=("content_encoder", "pose_encoder", "decoder")))
    metrics = ("psnr_reconstruction", "psnr_predicted", "train/main/loss", "train/main/reconstruction",
               "train/main/similarity", "train/main/adversarial", "train/scene_discriminator/loss", "train/loss")

    def __init__(self, cfg: DrNetConfig):
        super().__init__(cfg)
        self.root = DrNet(cfg)
        self.losses = {"main": DisentangleLoss(self.root), "scene_discriminator": SceneDiscriminatorLoss(self.root),
                       "predictor": PredictionLoss(self.root)}

    def optimiser(self, name: str) -> Optimiser:
        return Optimiser(self.losses[name], betas=(self.cfg.adam_beta1, 0.999))

    def loss(self, stage, optimiser, engine, batch, step, outputs) -> dict:
        video = batch["video"]
        if stage == "representation":
            # One draw of frame times per step, shared by both optimisers.
            earlier = [out["frames"] for out in outputs.values()]
            frames = earlier[0] if earlier else four_frames(video)
            return {**engine(frames), "frames": frames}
        return engine(video)

    def evaluate(self, cfg, stage, device, dtype):
        from kpscale.models.drnet.evaluation import snapshot

        return snapshot(self.root, cfg, stage == "dynamics", device, dtype, cfg.train.eval_clips)

    def describe(self, metrics: dict[str, float]) -> str:
        text = f"PSNR {metrics['psnr_reconstruction']:.2f} dB reconstructing from the first frame's content"
        if "psnr_predicted" in metrics:
            text += (f", {metrics['psnr_predicted']:.2f} dB predicted (copying the last observed frame: "
                     f"{metrics['psnr_last_frame']:.2f} dB)")
        return text
