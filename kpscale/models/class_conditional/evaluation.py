"""Kim et al.'s evaluation during training, on held-out clips.

Stage 1 (the detector and translator): the tracking error of the keypoints against the clips'
joints, the metric of Struct-VRNN (a linear map from keypoints to joints fitted on training
clips, its error in pixels on test clips beside the null model's), and the PSNR of each frame
translated from the clip's first frame at that frame's keypoints. Stage 2 (the motion generator)
adds the paper's headline metric: each test clip's first frame is animated once per action class,
and a classifier trained on real training clips (kpscale.evaluate.action_recognition) says which
action it sees; its accuracy on real test clips is the ceiling to read it against. Beside it,
kpscale's two diagnostics, each per class, so a failure of the drawing and one of the motion read
apart: the same judge on the test clips' own motion as the translator draws it from their first
frame at their detected keypoints (the drawing alone), and a classifier of keypoint sequences
fitted on the detector's keypoints of training clips on the generated keypoint sequences (the
motion alone; ceiling: the test clips' detected keypoints). Diversity:
the mean pairwise distance in pixels between keypoint sequences drawn with different z, and a
figure of them. FVD per class (generated clips of a class against the real test clips of that
class), where I3D weights are given: with about a hundred clips per class it compares runs
evaluated on the same clips, not papers.
"""

from __future__ import annotations

import itertools
import logging

import numpy as np
import torch

from kpscale.evaluate import action_recognition, tracking_error
from kpscale.evaluate.frames import psnr_per_step
from kpscale.evaluate.media import panel, to_rgb
from kpscale.evaluate.snapshot import fixed_batches
from kpscale.models.class_conditional.family import keypoints_to_pixels

log = logging.getLogger(__name__)
_SAID: set[str] = set()  # warnings given once per process

# The judge's training settings beyond action_recognition.train_classifier's defaults: none, so
# every run on the same data shares one cached judge.
JUDGE: dict = {}
SHOWN = 4  # generated clips per class in the logged video
DIVERSITY_SAMPLES = 3  # z per first frame for the diversity metric and figure
DIVERSITY_FIGURE_CLIPS = 4  # first frames in the diversity figure
DIVERSITY_FIGURE_STEPS = 5  # frames shown per generated clip, evenly from the first to the last


def _with_presence(keypoints: torch.Tensor) -> torch.Tensor:
    """[..., K, 2] -> [..., K, 3]: every keypoint present, for the drawing helpers."""
    return torch.cat([keypoints, torch.ones_like(keypoints[..., :1])], -1)


def _keypoint_states(net, video: torch.Tensor) -> torch.Tensor:
    """Clips [B, T, 3, S, S] -> keypoints [B, T, K, 2]."""
    return net.detector(video.flatten(0, 1)).float().unflatten(0, video.shape[:2])


def _grid(videos: torch.Tensor, gap: int = 2) -> np.ndarray:
    """Clips [R, C, T, 3, H, W] -> frames [T, R * (H + gap), C * (W + gap), 3] uint8, a row per class."""
    r, c, t, _, h, w = videos.shape
    out = np.full((t, r * (h + gap), c * (w + gap), 3), 255, np.uint8)
    for i, j in itertools.product(range(r), range(c)):
        out[:, i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = to_rgb(videos[i, j])
    return out


@torch.no_grad()
def snapshot(net, cfg, motion: bool, device: torch.device, dtype: torch.dtype, clips: int):
    """(metrics, video, figures: from the motion stage on the confusion matrix [C, C] and the
    diversity grid); on every rank (a ZeRO-3 forward pass needs them all)."""
    was_training = net.training
    net.eval()
    mcfg, test = cfg.model, cfg.data.test or cfg.data.train
    train, joints, train_labels = [], [], []  # the training clips' keypoints [B, T, K, 2], joints, labels
    for batch in fixed_batches(cfg.data.train, cfg.data, cfg.window, clips):
        train.append(_keypoint_states(net, batch["video"].to(device, dtype)))
        joints.append(batch["coords"].flatten(0, 1).to(device))
        train_labels += batch["label"]
    weights = tracking_error.fit(torch.cat(train).flatten(2).flatten(0, 1), torch.cat(joints))
    errors, positions, psnr, video, firsts, labels, tests, drawn, real_features = [], [], [], None, [], [], [], [], []
    # No progress bar in a training worker: its carriage returns become lines of the job's log.
    judge = action_recognition.load_or_train(cfg.data.train, mcfg.classes, cfg.window, progress=False,
                                             **JUDGE).to(device) if motion else None
    i3d = _i3d(cfg, device) if motion else None
    for batch in fixed_batches(test, cfg.data, cfg.window, clips):
        labels += batch["label"]
        clip = batch["video"].to(device, dtype)
        keypoints = _keypoint_states(net, clip)
        tests.append(keypoints)
        coords = batch["coords"].to(device)
        errors.append(tracking_error.per_step_errors(weights, keypoints.flatten(2), coords).mean(1))
        positions.append(coords)
        first = clip[:, :1].expand_as(clip).flatten(0, 1)
        translated = net.translator(first, keypoints[:, :1].expand_as(keypoints).flatten(0, 1),
                                    keypoints.flatten(0, 1))[0].unflatten(0, clip.shape[:2]).float()
        psnr.append(psnr_per_step(translated[:, 1:], clip[:, 1:].float()).mean(1))
        firsts.append(clip[:, 0])
        if motion:  # the real motion as the translator draws it, from the first frame, judged batch by batch
            drawn.append(action_recognition.predict(judge, torch.cat([clip[:, :1].float(), translated[:, 1:]], 1)))
        if i3d is not None:  # the real side of the FVD per class
            real_features.append(i3d.features(batch["video"]))
        if video is None:  # the clip, its keypoints, and each frame translated from the first
            video = panel(batch["video"][0], None, translated[0].cpu(), 1, _with_presence(keypoints[0].cpu()),
                          mcfg.heatmap_size)
    metrics = {"tracking_error": torch.cat(errors).mean().item(),
               "tracking_error_null": tracking_error.null_error(torch.cat(joints).cpu(), torch.cat(positions).cpu()),
               "psnr_translation": torch.cat(psnr).mean().item()}
    figures = {}
    if motion:
        shown, motions, matrix, fake, real = _recognition(net, judge, i3d, cfg, torch.cat(firsts), device)
        diversity, figures["diversity"] = _diversity(net, torch.cat(firsts)[:16], mcfg)
        figures["confusion"] = matrix
        metrics.update({**_accuracies("recognition_accuracy", matrix, mcfg.classes),
                        "recognition_accuracy_real": real, "diversity_px": diversity})
        # kpscale's diagnostics, each per class: the test clips' own motion as the translator draws
        # it (the drawing's part), and the generated keypoints judged before any frame is drawn
        # (the motion's part).
        test_labels = mcfg.class_index(labels)
        drawn_matrix = action_recognition.confusion_matrix(torch.cat(drawn), test_labels, mcfg.num_classes)
        metrics.update(_accuracies("recognition_accuracy_drawn", drawn_matrix, mcfg.classes))
        metrics.update(_keypoint_recognition(mcfg, (torch.cat(train), mcfg.class_index(train_labels)),
                                             (torch.cat(tests), test_labels), motions))
        video = _grid(shown.cpu())
        if i3d is not None:  # FVD per class: the generated clips of a class against its real test clips
            metrics.update(fvd_per_class(torch.cat(real_features), test_labels, fake, mcfg.classes))
    net.train(was_training)
    return metrics, video, figures


def _accuracies(name: str, matrix: torch.Tensor, classes) -> dict[str, float]:
    """NAME, the accuracy of a confusion matrix, and NAME/CLASS, each class's: the paper's claim is
    about each action, and one class the judge defaults to can carry the mean."""
    per_class = action_recognition.accuracy_per_class(matrix).tolist()
    return {name: action_recognition.accuracy(matrix), **{f"{name}/{c}": v for c, v in zip(classes, per_class)}}


def _recognition(net, judge, i3d, cfg, firsts: torch.Tensor, device: torch.device):
    """Every first frame [N, 3, S, S] animated as every class, judged batch by batch so that no more
    than a batch of clips is held: (the first SHOWN clips of each class [C, SHOWN, T, 3, S, S], the
    keypoints [C, N, T, K, 2], the judge's confusion matrix, the clips' I3D features [C, N, D] or
    None without `i3d`, the judge's accuracy on real test clips)."""
    mcfg = cfg.model
    generator = torch.Generator().manual_seed(0)  # the same z at every evaluation
    shown, motions, recognised, features = [], [], [], []
    for c in range(mcfg.num_classes):
        kept, keypoints, judged, feats = [], [], [], []
        for chunk in firsts.split(cfg.data.batch_size):
            clips, motion = net.generate(chunk, torch.full((len(chunk),), c, device=device), generator=generator)
            clips = clips.float()
            kept.append(clips[:SHOWN - sum(map(len, kept))])
            keypoints.append(motion)
            judged.append(action_recognition.predict(judge, clips))
            if i3d is not None:
                feats.append(i3d.features(clips))
        shown.append(torch.cat(kept))
        motions.append(torch.cat(keypoints))
        recognised.append(torch.cat(judged))
        if i3d is not None:
            features.append(torch.cat(feats))
    requested = torch.arange(mcfg.num_classes).repeat_interleave(len(firsts))
    matrix = action_recognition.confusion_matrix(torch.cat(recognised).cpu(), requested, mcfg.num_classes)
    _, real = action_recognition.evaluate_real(judge, cfg.data.test or cfg.data.train, cfg.window,
                                               limit=cfg.train.eval_clips)
    return (torch.stack(shown), torch.stack(motions), matrix,
            torch.stack(features) if i3d is not None else None, real)


def _keypoint_recognition(mcfg, train: tuple, test: tuple, motions: torch.Tensor) -> dict[str, float]:
    """kpscale's diagnostic of the motion stage alone: a classifier of keypoint sequences, fitted on
    the detector's keypoints of the training clips (`train`: sequences, class indices), judges the
    generated keypoint sequences [C, N, T, K, 2] before any frame is drawn; its accuracy on the
    test clips' detected keypoints (`test`) is the ceiling."""
    device = motions.device
    # The classifier casts its inputs to float32 itself.
    judge = action_recognition.train_keypoint_classifier(train[0], train[1].to(device), mcfg.classes)
    real = action_recognition.confusion_matrix(action_recognition.predict(judge, test[0]), test[1], mcfg.num_classes)
    requested = torch.arange(mcfg.num_classes).repeat_interleave(motions.shape[1])
    generated = action_recognition.confusion_matrix(action_recognition.predict(judge, motions.flatten(0, 1)),
                                                    requested, mcfg.num_classes)
    return {**_accuracies("recognition_accuracy_keypoints", generated, mcfg.classes),
            "recognition_accuracy_keypoints_real": action_recognition.accuracy(real)}


def _i3d(cfg, device):
    """The FVD's I3D network, or None without its weights (said once a process)."""
    from kpscale.evaluate.fvd import FVD
    from kpscale.evaluate.i3d import load_i3d
    from kpscale.evaluate.weights import WeightsUnavailable

    try:
        return FVD(load_i3d(cfg.train.i3d), device)
    except WeightsUnavailable as exc:
        if str(exc) not in _SAID:
            _SAID.add(str(exc))
            log.warning("%s During training: train.i3d=PATH.", exc)
        return None


def fvd_per_class(real: torch.Tensor, labels: torch.Tensor, generated: torch.Tensor, classes) -> dict[str, float]:
    """fvd/CLASS: the Frechet distance between the I3D features of the generated clips of each
    class [C, N, D] and those of the real clips of that class ([M, D], `labels` [M]); fvd: their
    mean. A class with fewer than two real clips has no Gaussian to compare with, and no FVD."""
    from kpscale.evaluate.fvd import fvd

    out = {f"fvd/{name}": fvd(real[labels == c], generated[c])
           for c, name in enumerate(classes) if (labels == c).sum() > 1}
    if out:
        out["fvd"] = sum(out.values()) / len(out)
    return out


def _diversity(net, firsts: torch.Tensor, mcfg) -> tuple[float, np.ndarray]:
    """The mean pairwise distance in pixels, over keypoints and steps, between the keypoint
    sequences of DIVERSITY_SAMPLES draws of z for the same first frame and class; and the figure:
    for each of the first DIVERSITY_FIGURE_CLIPS first frames a row per z, frames left to right."""
    generator = torch.Generator().manual_seed(1)
    first = net.detector(firsts)
    label = torch.arange(len(firsts), device=firsts.device) % mcfg.num_classes
    draws = torch.stack([net.motion_generator.sample(first, label, mcfg.generated, generator)
                         for _ in range(DIVERSITY_SAMPLES)])
    pixels = keypoints_to_pixels(draws.float(), mcfg.heatmap_size, mcfg.image_size)
    pairs = [(pixels[i] - pixels[j]).norm(dim=-1).mean() for i, j in itertools.combinations(range(len(pixels)), 2)]
    n = min(DIVERSITY_FIGURE_CLIPS, len(firsts))
    steps = torch.linspace(0, mcfg.generated - 1, DIVERSITY_FIGURE_STEPS).round().long()
    rows = [torch.stack([net.translator(firsts[i:i + 1], first[i:i + 1], draws[z, i:i + 1, t])[0][0].float()
                         for t in steps.tolist()]) for i in range(n) for z in range(DIVERSITY_SAMPLES)]
    figure = _grid(torch.cat([firsts[:n].float().repeat_interleave(DIVERSITY_SAMPLES, 0)[:, None],
                              torch.stack(rows)], 1)[:, :, None].cpu())[0]
    return torch.stack(pairs).mean().item(), figure
