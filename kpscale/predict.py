"""python -m kpscale.predict --run RUN --video FILE [--future 24] [--samples 5] --out OUT.mp4

Loads a trained model (the `model/` artifacts a training run logs to MLflow, or a folder holding
weights.pt and config.yaml), reads any video, observes its first frames and writes an mp4 with
the input on the left and sampled futures beside it, keypoints drawn on every frame."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from kpscale.config import ConfigError
from kpscale.data.card import Encoding
from kpscale.data.sources.folder import fit
from kpscale.data.video import decode_mp4, encode_mp4
from kpscale.evaluate.media import draw_keypoints
from kpscale.models import build_model
from kpscale.train.config import load_train_config


def load_trained(run: str, tracking_uri: str | None = None) -> tuple[torch.nn.Module, object]:
    """(model in eval mode, its TrainConfig) from a folder or an MLflow run id."""
    folder = Path(run)
    if not folder.is_dir():
        import mlflow

        from kpscale.tracking import tracking_uri as resolve
        try:
            folder = Path(mlflow.artifacts.download_artifacts(run_id=run, artifact_path="model",
                                                              dst_path=tempfile.mkdtemp(),
                                                              tracking_uri=resolve(tracking_uri)))
        except Exception as exc:
            raise ConfigError(f"--run {run!r} is neither a folder nor an MLflow run with a logged model ({exc})") from None
    for name in ("weights.pt", "config.yaml"):
        if not (folder / name).exists():
            raise ConfigError(f"{folder} has no {name}: not a kpscale model")
    cfg = load_train_config(folder / "config.yaml", [])
    model = build_model(cfg.model)
    model.load_state_dict(torch.load(folder / "weights.pt", weights_only=True))
    return model.eval(), cfg


@torch.no_grad()
def predict(model, cfg, video: torch.Tensor, future: int, samples: int) -> np.ndarray:
    """uint8 frames [T, H, (1 + samples) * W, 3]: the input, then each sampled future."""
    frames, _, _ = fit(video, cfg.model.image_size, "crop")
    clip = frames[None].float() / 255
    keypoints, decoded = model.sample_future(clip, future, samples)  # [1, S, T, ...]
    steps = keypoints.shape[2]
    truth = np.zeros((steps, *frames.shape[2:], 3), np.uint8)
    shown = frames[:steps].permute(0, 2, 3, 1).numpy()
    truth[:len(shown)] = shown  # black where the input video has ended
    columns = [truth]
    for s in range(samples):
        rgb = (decoded[0, s].clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
        columns.append(draw_keypoints(rgb, keypoints[0, s], cfg.model.heatmap_size))
    return np.concatenate(columns, axis=2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kpscale.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="MLflow run id of a training run, or a model folder")
    parser.add_argument("--video", required=True, help="any video file ffmpeg reads (mp4, avi, mkv, webm)")
    parser.add_argument("--future", type=int, default=24, help="frames to predict after the observed ones")
    parser.add_argument("--samples", type=int, default=5, help="sampled futures shown side by side")
    parser.add_argument("--out", required=True, help="output mp4")
    parser.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    args = parser.parse_args(argv)
    try:
        model, cfg = load_trained(args.run, args.tracking_uri)
        if not Path(args.video).is_file():
            raise ConfigError(f"--video {args.video}: no such file")
        video = decode_mp4(args.video)
        if len(video) < cfg.model.observed:
            raise ConfigError(f"--video {args.video}: {len(video)} frames, the model observes {cfg.model.observed}")
        frames = predict(model, cfg, video[:cfg.model.observed + args.future], args.future, args.samples)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # yuv420p: the output is for people and players, which rarely play 4:4:4.
    data = encode_mp4(torch.from_numpy(frames).permute(0, 3, 1, 2), 8.0, Encoding(pixel_format="yuv420p", crf=18))
    Path(args.out).write_bytes(data)
    print(f"{args.out}: {cfg.model.observed} observed + {args.future} predicted frames, input and {args.samples} samples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
