"""DrNet's evaluation during training, on held-out clips: PSNR of frames decoded from the first
frame's content and each frame's own pose (the representation), and after the dynamics stage
PSNR of the predicted frames against copying the last observed one; the video shows the clip,
its reconstruction and (after the dynamics stage) its prediction."""

from __future__ import annotations

import torch

from kpscale.evaluate.frames import psnr_per_step
from kpscale.evaluate.media import panel
from kpscale.evaluate.snapshot import fixed_batches


@torch.no_grad()
def snapshot(net, cfg, predicts: bool, device: torch.device, dtype: torch.dtype, clips: int):
    """(metrics, video panel); on every rank (a ZeRO-3 forward pass needs them all)."""
    was_training = net.training
    net.eval()
    obs = cfg.model.observed
    sums, count, video = {}, 0, None
    for batch in fixed_batches(cfg.data.test or cfg.data.train, cfg.data, cfg.window, clips):
        clip = batch["video"].to(device, dtype)
        reconstruction = net.swap(clip, clip).float()
        scores = {"psnr_reconstruction": psnr_per_step(reconstruction, clip.float()).mean(1)}
        predicted = reconstruction
        if predicts:
            predicted = net.sample_future(clip, cfg.model.predicted, 1)[1][:, 0].float()
            future = clip[:, obs:].float()
            scores["psnr_predicted"] = psnr_per_step(predicted[:, obs:], future).mean(1)
            scores["psnr_last_frame"] = psnr_per_step(clip[:, obs - 1:obs].float().expand_as(future), future).mean(1)
        for name, values in scores.items():
            sums[name] = sums.get(name, 0.0) + values.sum().item()
        count += len(clip)
        if video is None:
            video = panel(batch["video"][0], reconstruction[0].cpu(), predicted[0].cpu(), obs)
    net.train(was_training)
    return {name: total / count for name, total in sums.items()}, video
