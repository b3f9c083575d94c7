"""python -m kpscale.predict --run RUN --video FILE [--observed 8] [--future 24] [--samples 5] [--move K:DX,DY] --out OUT.mp4
python -m kpscale.predict --run RUN --video FILE --actions ACTIONS.npy --out OUT.mp4
python -m kpscale.predict --run RUN --image FRAME.png --label wave [--future 16] --out OUT.mp4

Loads a trained model (the `model/` artifacts a training run logs to MLflow, or a folder holding
weights.pt and config.yaml), reads any video, observes its first frames and writes an mp4 with
the input on the left and sampled futures beside it, keypoints drawn on every frame (for a
model with keypoints). An action-conditioned model (model.action_conditioned) rolls forward under
the actions of --actions, an .npy [T, A] (a clip's actions.npy, or any others: a counterfactual).
A class-conditional model (Kim et al.) animates one frame (--image, or a video's first frame) as
the action --label names."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from kpscale.config import ConfigError, positive
from kpscale.data.card import Encoding
from kpscale.data.shards import read_actions
from kpscale.data.sources.folder import fit
from kpscale.data.video import decode_mp4, encode_mp4
from kpscale.evaluate.media import draw_keypoints, pixel_offsets, to_rgb
from kpscale.models import build_family
from kpscale.train.config import load_train_config


def load_trained(run: str, tracking_uri: str | None = None) -> tuple[torch.nn.Module, object]:
    """(the family's predictor in eval mode, its TrainConfig) from a model folder or an MLflow run id."""
    from kpscale.tracking import model_folder

    try:
        folder = model_folder(run, tracking_uri)
    except ConfigError as exc:
        raise ConfigError(f"--run {exc}") from None
    cfg = load_train_config(folder / "config.yaml", [])
    family = build_family(cfg.model)
    family.root.load_state_dict(torch.load(folder / "weights.pt", weights_only=True))
    return family.predictor().eval(), cfg


def _frames(model, cfg, decoded: torch.Tensor, states: torch.Tensor) -> list[np.ndarray]:
    """Sampled futures [S, T, 3, H, W], one column each, with their keypoints drawn (from
    states [S, T, D]) where the model has keypoints."""
    keypoints = model.keypoints(states)
    if keypoints is None:
        return [to_rgb(frames) for frames in decoded]
    return [draw_keypoints(to_rgb(frames), points, cfg.model.heatmap_size) for frames, points in zip(decoded, keypoints)]


@torch.no_grad()
def predict(model, cfg, video: torch.Tensor, future: int, samples: int, observed: int | None = None,
            moves: dict[int, tuple[float, float]] | None = None, seed: int = 0, label: str | None = None,
            actions: np.ndarray | None = None) -> np.ndarray:
    """uint8 frames [T, H, (1 + samples) * W, 3]: the input, then each sampled future. With `moves`
    ({keypoint: (dx, dy) pixels}) the observed keypoints are shifted (paper Sec. 5.4) and the
    manipulated futures follow the original ones, drawn with the same noise, so the two differ
    only by the manipulation: [T, H, (1 + 2 * samples) * W, 3]. `label`: the action a
    class-conditional model generates (one of its model.classes); `actions` [T, A]: what an
    action-conditioned model rolls forward under."""
    classes = getattr(cfg.model, "classes", None)
    if classes and label is None:
        raise ConfigError(f"--label: a {cfg.model.name} model generates the action it is given, one of {list(classes)}")
    if label is not None and not classes:
        raise ConfigError(f"--label: a {cfg.model.name} model takes no action class")
    condition = {"label": cfg.model.class_index([label])} if classes else {}
    conditioned = getattr(cfg.model, "action_conditioned", False)
    if conditioned and actions is None:
        raise ConfigError(f"--actions: the model is action-conditioned (model.action_size {cfg.model.action_size}): "
                          "give the actions to roll forward under, an .npy [T, A] such as a clip's actions.npy")
    if actions is not None and not conditioned:
        raise ConfigError(f"--actions: a {cfg.model.name} model with model.action_conditioned false takes no actions")
    if conditioned:
        condition["actions"] = torch.from_numpy(np.asarray(actions, np.float32))[None]
    frames, _, _ = fit(video, cfg.model.image_size, "crop")
    clip = frames[None].float() / 255
    torch.manual_seed(seed)
    states, decoded = model.sample_future(clip, future, samples, observed, **condition)  # [1, S, T, ...]
    steps = states.shape[2]
    truth = np.zeros((steps, *frames.shape[2:], 3), np.uint8)
    shown = frames[:steps].permute(0, 2, 3, 1).numpy()
    truth[:len(shown)] = shown  # black where the input video has ended
    columns = [truth, *_frames(model, cfg, decoded[0], states[0])]
    if moves:
        if model.keypoints(states) is None:
            raise ConfigError(f"--move: a {cfg.model.name} model has no keypoints to move")
        offsets = pixel_offsets(moves, cfg.model.num_keypoints, cfg.model.heatmap_size, cfg.model.image_size)
        torch.manual_seed(seed)
        states, decoded = model.sample_future(clip, future, samples, observed, offsets, **condition)
        columns += _frames(model, cfg, decoded[0], states[0])
    return np.concatenate(columns, axis=2)


def _read_image(path: str) -> torch.Tensor:
    """An image file -> uint8 [1, 3, H, W]."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise ConfigError(f"--image {path}: not an image PIL reads ({exc})") from None
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None]


def parse_move(text: str) -> tuple[int, tuple[float, float]]:
    """'K:DX,DY' -> (K, (DX, DY))."""
    try:
        k, offset = text.split(":")
        dx, dy = offset.split(",")
        return int(k), (float(dx), float(dy))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--move {text!r}: expected K:DX,DY, e.g. 3:10,-5") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kpscale.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="MLflow run id of a training run, or a model folder")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--video", help="any video file ffmpeg reads (mp4, avi, mkv, webm)")
    source.add_argument("--image", help="one frame (png, jpg) to start from")
    parser.add_argument("--label", help="the action a class-conditional model generates (one of its model.classes)")
    parser.add_argument("--observed", type=positive, help="frames to observe (default: the model's model.observed)")
    parser.add_argument("--future", type=positive, default=24, help="frames to predict after the observed ones")
    parser.add_argument("--samples", type=positive, default=5, help="sampled futures shown side by side")
    parser.add_argument("--move", type=parse_move, action="append", default=[], metavar="K:DX,DY",
                        help="counterfactual: shift keypoint K by (DX, DY) pixels (x right, y down) in every observed "
                             "frame, and show the manipulated futures beside the original ones (repeatable)")
    parser.add_argument("--actions", metavar="FILE.npy",
                        help="actions [T, A] an action-conditioned model rolls forward under (T >= observed + future - 1)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--out", required=True, help="output mp4")
    parser.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    args = parser.parse_args(argv)
    try:
        model, cfg = load_trained(args.run, args.tracking_uri)
        flag, path = ("--video", args.video) if args.video else ("--image", args.image)
        if not Path(path).is_file():
            raise ConfigError(f"{flag} {path}: no such file")
        video = decode_mp4(path) if args.video else _read_image(path)
        observed = args.observed or cfg.model.observed
        if len(video) < observed:
            raise ConfigError(f"{flag} {path}: {len(video)} frames, --observed is {observed}")
        actions = read_actions(args.actions, "--actions") if args.actions else None
        frames = predict(model, cfg, video[:observed + args.future], args.future, args.samples, observed,
                         dict(args.move), args.seed, args.label, actions)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # yuv420p: the output is for people and players, which rarely play 4:4:4.
    data = encode_mp4(torch.from_numpy(frames).permute(0, 3, 1, 2), 8.0, Encoding(pixel_format="yuv420p", crf=18))
    Path(args.out).write_bytes(data)
    shown = f"input, {args.samples} samples" + (f" and the same {args.samples} with keypoints moved" if args.move else "")
    print(f"{args.out}: {observed} observed + {args.future} predicted frames; {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
