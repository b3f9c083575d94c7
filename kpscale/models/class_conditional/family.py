"""Kim et al.'s training. Stage `translation`: the detector and translator (`main`) reconstruct a
frame 8-11 frames after a reference frame of the same clip from the reference and both frames'
keypoints, and try to fool the patch discriminator; the discriminator then learns on that output.
Stage `motion`: the cVAE (`generator`) learns the detector's keypoints of the training clips
(pseudo-label shards derived at the stage's start), then the sequence discriminator learns on its
reconstructions. `main` and `generator` step first so their discriminators learn on the outputs
they just made, with no second forward pass. Each loss is a module its engine wraps; networks
another optimiser trains are borrowed, not owned."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kpscale.models.class_conditional.model import VGG19_ENV, ClassConditional, ClassConditionalConfig
from kpscale.models.family import Family, Optimiser, Stage, borrow
from kpscale.models.struct_vrnn.model import separation_loss
from kpscale.models.vgg import VGG, VGG19_LAYERS

VGG19_FILE = "vgg19-dcbb9e9d.pth"  # torchvision's ImageNet VGG-19


def frame_pairs(video: Tensor, gap: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Clips [B, T, 3, H, W] -> (reference, target) frames [B, 3, H, W]: per clip a random
    reference frame and the frame `gap` frames after it, the gap drawn in [low, high]."""
    b, t = video.shape[:2]
    gaps = torch.randint(gap[0], min(gap[1], t - 1) + 1, (b,))
    starts = (torch.rand(b) * (t - gaps)).long()
    rows = torch.arange(b)
    return video[rows, starts], video[rows, starts + gaps]


def keypoints_to_pixels(keypoints: Tensor, map_size: int, image_size: int) -> Tensor:
    """Keypoints in [-1, 1] (y up) over the centres of a map's cells -> image pixel coordinates
    (x right, y down), as kpscale.evaluate.media.keypoint_pixels."""
    flipped = torch.stack([keypoints[..., 0], -keypoints[..., 1]], -1)
    return ((flipped + 1) / 2 * (map_size - 1) + 0.5) * (image_size / map_size)


def keypoints_from_pixels(coords: Tensor, map_size: int, image_size: int) -> Tensor:
    """The inverse of keypoints_to_pixels."""
    xy = (coords * (map_size / image_size) - 0.5) / (map_size - 1) * 2 - 1
    return torch.stack([xy[..., 0], -xy[..., 1]], -1)


def _real_or_fake(logits: Tensor, real: bool) -> Tensor:
    """The non-saturating GAN loss: -log D(x) for real (or a generator fooling D), -log(1 - D(x)) for fake."""
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, float(real)))


def load_vgg19(path: str) -> VGG:
    from kpscale.evaluate.weights import load_state_dict_strict, resolve_weights

    path = resolve_weights(path, VGG19_ENV, "the VGG-19 perceptual loss",
                           f"Supply torchvision's ImageNet VGG-19 weights {VGG19_FILE} as model.vgg19_weights, or "
                           "train with model.reconstruction=l1_ssim, which needs none.")
    return load_state_dict_strict(VGG(VGG19_LAYERS), path, prefix="features.").eval().requires_grad_(False)


def motion_l1(output: Tensor, target: Tensor, reference: Tensor) -> Tensor:
    """L1 between output and target, each pixel weighted by how much the target differs there from
    the reference (weights of mean 1 per frame): kpscale's term for the pixels that moved."""
    difference = (target - reference).abs().float().mean(1, keepdim=True)
    weights = difference / difference.mean((2, 3), keepdim=True).clamp_min(1e-6)
    return (weights * (output.float() - target.float()).abs()).mean()


class Reconstruction(nn.Module):
    """The translation's reconstruction loss: the paper's VGG-19 perceptual loss (mean L1 of the
    five blocks' last ReLU outputs, conv1_2 .. conv5_4), or with no weights pixel L1 + (1 - SSIM),
    kpscale's default, which needs no download."""

    def __init__(self, cfg: ClassConditionalConfig):
        super().__init__()
        self.vgg = load_vgg19(cfg.vgg19_weights) if cfg.reconstruction == "vgg19" else None

    def forward(self, output: Tensor, target: Tensor) -> Tensor:
        output, target = output.float(), target.float()
        if self.vgg is None:
            from torchmetrics.functional.image import structural_similarity_index_measure

            ssim = structural_similarity_index_measure(output, target, data_range=1.0)
            return F.l1_loss(output, target) + 1 - ssim
        self.vgg.to(output.device)
        features = self.vgg.blocks(torch.cat([output, target]))
        return torch.stack([F.l1_loss(*f.chunk(2)) for f in features]).mean()


class TranslationLoss(nn.Module):
    """The detector's and translator's optimiser: the target frame rendered from the reference
    frame at the target's keypoints, its reconstruction loss, and fooling the patch discriminator."""

    def __init__(self, net: ClassConditional):
        super().__init__()
        self.cfg = net.cfg
        self.detector, self.translator = net.detector, net.translator
        borrow(self, "image_discriminator", net.image_discriminator)
        # Frozen, and no part of the model's weights: borrowed so no engine takes its parameters.
        borrow(self, "reconstruction", Reconstruction(net.cfg))

    def forward(self, reference: Tensor, target: Tensor) -> dict:
        reference_keypoints, target_keypoints = self.detector(torch.cat([reference, target])).chunk(2)
        translated, _, mask = self.translator(reference, reference_keypoints, target_keypoints)
        terms = {"reconstruction": self.reconstruction(translated, target),
                 "adversarial": _real_or_fake(self.image_discriminator(translated), True)}
        loss = self.cfg.reconstruction_weight * terms["reconstruction"] + terms["adversarial"]
        if self.cfg.motion_weight:
            terms["motion"] = motion_l1(translated, target, reference)
            loss = loss + self.cfg.motion_weight * terms["motion"]
        if self.cfg.separation_weight:
            pair = torch.stack([reference_keypoints, target_keypoints], 1)
            terms["separation"] = separation_loss(pair, self.cfg.separation_sigma)
            loss = loss + self.cfg.separation_weight * terms["separation"]
        return {"loss": loss, "terms": {**terms, "mask": mask.detach().float().mean()}, "translated": translated}


class ImageDiscriminatorLoss(nn.Module):
    """The patch discriminator's optimiser: target frames real, translated frames fake."""

    def __init__(self, net: ClassConditional):
        super().__init__()
        self.image_discriminator = net.image_discriminator

    def forward(self, real: Tensor, fake: Tensor) -> dict:
        real_logits, fake_logits = self.image_discriminator(torch.cat([real, fake.detach()])).chunk(2)
        loss = _real_or_fake(real_logits, True) + _real_or_fake(fake_logits, False)
        accuracy = torch.cat([real_logits > 0, fake_logits < 0]).float().mean()
        return {"loss": loss, "terms": {"bce": loss, "accuracy": accuracy}}


class MotionLoss(nn.Module):
    """The cVAE's optimiser (eq. 5): KL + lambda_2 L1 of the reconstructed keypoint sequence +
    lambda_3 fooling the sequence discriminator."""

    def __init__(self, net: ClassConditional):
        super().__init__()
        self.cfg = net.cfg
        self.motion_generator = net.motion_generator
        borrow(self, "sequence_discriminator", net.sequence_discriminator)

    def forward(self, keypoints: Tensor, label: Tensor) -> dict:
        first, future = keypoints[:, 0], keypoints[:, 1:]
        out = self.motion_generator(future, first, label)
        terms = {"kl": out["kl"], "l1": (out["reconstruction"] - future).abs().mean(),
                 "adversarial": _real_or_fake(self.sequence_discriminator(out["reconstruction"]), True)}
        cfg = self.cfg
        loss = cfg.kl_weight * terms["kl"] + cfg.l1_weight * terms["l1"] + cfg.sequence_adversarial_weight * \
            terms["adversarial"]
        return {"loss": loss, "terms": terms, "reconstruction": out["reconstruction"]}


class SequenceDiscriminatorLoss(nn.Module):
    """The sequence discriminator's optimiser: pseudo-label sequences real, the cVAE's fake."""

    def __init__(self, net: ClassConditional):
        super().__init__()
        self.sequence_discriminator = net.sequence_discriminator

    def forward(self, real: Tensor, fake: Tensor) -> dict:
        real_logits = self.sequence_discriminator(real)
        fake_logits = self.sequence_discriminator(fake.detach())
        loss = _real_or_fake(real_logits, True) + _real_or_fake(fake_logits, False)
        accuracy = torch.cat([real_logits > 0, fake_logits < 0]).float().mean()
        return {"loss": loss, "terms": {"bce": loss, "accuracy": accuracy}}


class ClassConditionalFamily(Family):
    config = ClassConditionalConfig
    stages = (Stage("translation", ("main", "image_discriminator")),
              Stage("motion", ("generator", "sequence_discriminator"),
                    frozen=("detector", "translator", "image_discriminator"), derived="pseudo_labels",
                    frames=False))
    metrics = ("tracking_error", "psnr_translation", "recognition_accuracy", "train/main/loss",
               "train/main/reconstruction", "train/generator/loss", "train/generator/l1", "train/generator/kl")

    def __init__(self, cfg: ClassConditionalConfig):
        super().__init__(cfg)
        self.root = ClassConditional(cfg)
        self.losses = {"main": TranslationLoss(self.root), "image_discriminator": ImageDiscriminatorLoss(self.root),
                       "generator": MotionLoss(self.root),
                       "sequence_discriminator": SequenceDiscriminatorLoss(self.root)}
        self.evaluated = {}  # the last evaluation's figures (confusion matrix, diversity), from the motion stage on

    def optimiser(self, name: str) -> Optimiser:
        return Optimiser(self.losses[name], betas=(self.cfg.adam_beta1, 0.999))

    def loss(self, stage, optimiser, engine, batch, step, outputs) -> dict:
        if optimiser == "main":
            reference, target = frame_pairs(batch["video"], self.cfg.pair_gap)
            return {**engine(reference, target), "target": target}
        if optimiser == "image_discriminator":
            return engine(outputs["main"]["target"], outputs["main"]["translated"])
        if optimiser == "generator":
            keypoints = self.pseudo_labels(batch)
            label = self.cfg.class_index(batch["label"]).to(keypoints.device)
            return {**engine(keypoints, label), "future": keypoints[:, 1:]}
        return engine(outputs["generator"]["future"], outputs["generator"]["reconstruction"])

    def pseudo_labels(self, batch: dict) -> Tensor:
        """The batch's detected keypoints [B, T, K, 2] in [-1, 1], from the pseudo-label shards' coords."""
        coords = batch.get("coords")
        k = self.cfg.num_keypoints
        if coords is None or coords.shape[-2] != k:
            found = "none" if coords is None else f"{coords.shape[-2]} per frame"
            raise ValueError(f"the motion stage trains on pseudo-label shards with {k} keypoints per frame as "
                             f"coords; these clips have {found}")
        return keypoints_from_pixels(coords.float(), self.cfg.heatmap_size, self.cfg.image_size)

    @torch.no_grad()
    def derive(self, name: str, video: Tensor) -> dict[str, np.ndarray]:
        """Pseudo-labels: the detector's keypoints of every frame of a clip [T, 3, H, W], as coords (pixels)."""
        detector = self.root.detector
        was_training = detector.training
        detector.eval()
        parameter = next(detector.parameters())
        keypoints = detector(video.to(parameter.device, parameter.dtype)).float().cpu()
        detector.train(was_training)
        return {"coords": keypoints_to_pixels(keypoints, self.cfg.heatmap_size, self.cfg.image_size).numpy()}

    def evaluate(self, cfg, stage, device, dtype):
        from kpscale.models.class_conditional.evaluation import snapshot

        metrics, video, self.evaluated = snapshot(self.root, cfg, stage == "motion", device, dtype,
                                                  cfg.train.eval_clips)
        return metrics, video

    def figures(self, folder: str) -> list[Path]:
        if not self.evaluated:
            return []
        from PIL import Image

        from kpscale.evaluate.action_recognition import confusion_plot

        diversity = Path(folder) / "diversity.png"
        Image.fromarray(self.evaluated["diversity"]).save(diversity)
        return [confusion_plot(self.evaluated["confusion"], self.cfg.classes,
                               Path(folder) / "recognition_confusion.png",
                               "generated videos: requested vs recognised class"), diversity]

    def describe(self, metrics: dict[str, float]) -> str:
        text = (f"keypoints track the joints to {metrics['tracking_error']:.2f} px (null model "
                f"{metrics['tracking_error_null']:.2f} px); translation PSNR {metrics['psnr_translation']:.2f} dB")
        if "recognition_accuracy" in metrics:
            weakest = min(self.cfg.classes, key=lambda name: metrics[f"recognition_accuracy/{name}"])
            text += (f"; generated videos recognised as their class {100 * metrics['recognition_accuracy']:.1f}% "
                     f"(the weakest class, {weakest}, {100 * metrics[f'recognition_accuracy/{weakest}']:.1f}%; "
                     f"real test clips {100 * metrics['recognition_accuracy_real']:.1f}%, chance "
                     f"{100 / self.cfg.num_classes:.1f}%); their keypoint motion alone "
                     f"{100 * metrics['recognition_accuracy_keypoints']:.1f}% (real clips' detected keypoints "
                     f"{100 * metrics['recognition_accuracy_keypoints_real']:.1f}%); the translator's drawing "
                     f"of real clips' motion {100 * metrics['recognition_accuracy_drawn']:.1f}%")
        return text
