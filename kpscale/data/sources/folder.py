"""A folder of videos (or folders of frames) with optional sidecars becomes clips.

For a video `walk/p01.avi` (or a frame folder `walk/p01/`), the optional sidecars are
`walk/p01.npz` with `coords` [T,N,2] (pixels, x right, y down, origin at the top-left image
corner), `actions` [T,A] and `rewards` [T], and `walk/p01.json` with metadata such as
`{"label": "walking"}`; a `"split"` key there pins the video to a split, otherwise the split is
drawn from a hash of the path and the card's seed. Frames are centre-cropped to a square and
resized (fit=crop) or stretched (fit=resize), and the coordinates follow the same map.
"""

from __future__ import annotations

import json
import logging
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from kpscale.data.shards import SIDECARS, Clip
from kpscale.data.sources import SourceError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Item:
    """One input video (or frame folder) and what its sidecars say."""

    path: str  # relative to the source root
    frames: int
    fps: float
    meta: dict
    arrays: tuple[str, ...]  # sidecar arrays present


@dataclass(frozen=True)
class ClipSpec:
    item: Item
    start: int


def _is_frame_folder(path: Path, exts: set[str]) -> bool:
    return path.is_dir() and any(p.suffix.lower().lstrip(".") in exts for p in path.iterdir())


def _frame_files(folder: Path, exts: set[str]) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower().lstrip(".") in exts)


def discover(root: Path, card) -> list[Path]:
    video_exts = {e.lower() for e in card.folder.extensions}
    frame_exts = {e.lower() for e in card.folder.frame_extensions}
    found = [p for p in root.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in video_exts]
    found += [p for p in root.rglob("*") if _is_frame_folder(p, frame_exts)]
    return sorted(found)


def _sidecar_arrays(npz: Path, frames: int) -> dict[str, np.ndarray]:
    if not npz.exists():
        return {}
    try:
        with np.load(npz, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as exc:
        raise SourceError(f"{npz}: cannot read ({exc})") from None
    for extra in set(arrays) - set(SIDECARS):
        log.warning("%s: ignoring array %r (kpscale reads %s)", npz, extra, ", ".join(SIDECARS))
        arrays.pop(extra)
    expected = {"coords": "[T, N, 2]", "actions": "[T, A]", "rewards": "[T]"}
    for name, value in arrays.items():
        ndim = {"coords": 3, "actions": 2, "rewards": 1}[name]
        if value.ndim != ndim or value.shape[0] != frames or (name == "coords" and value.shape[2] != 2):
            raise SourceError(f"{npz}: {name} has shape {list(value.shape)}, expected "
                              f"{expected[name]} with T={frames} (the video's frame count)")
        if not np.isfinite(value).all():
            raise SourceError(f"{npz}: {name} holds NaN or infinite values")
    return arrays


def _probe(path: Path, card) -> tuple[int, float]:
    if path.is_dir():
        return len(_frame_files(path, set(card.folder.frame_extensions))), card.fps
    from torchcodec.decoders import VideoDecoder  # where it is used, as in kpscale.data.video

    meta = VideoDecoder(str(path), seek_mode="exact").metadata
    return meta.num_frames, meta.average_fps


def _split_of(rel: str, meta: dict, card, source: Path) -> str:
    fractions = card.folder.split_fractions
    if "split" in meta:
        if meta["split"] not in fractions:
            raise SourceError(f"{source}: split {meta['split']!r} is not one of {sorted(fractions)}")
        return meta["split"]
    u = zlib.crc32(f"{card.seed}:{rel}".encode()) / 2**32
    total = 0.0
    for name, fraction in fractions.items():
        total += fraction
        if u < total:
            return name
    return name


def plan(card, root: Path) -> tuple[dict[str, list[ClipSpec]], list[str]]:
    """Clip specs per split, and the inputs skipped because they could not be decoded."""
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"video folder {root} does not exist")
    span = (card.clip_length - 1) * card.folder.frame_step + 1
    stride = card.folder.stride or card.clip_length * card.folder.frame_step
    specs: dict[str, list[ClipSpec]] = {name: [] for name in card.folder.split_fractions}
    skipped: list[str] = []
    first: tuple[Path, dict] | None = None
    for path in tqdm(discover(root, card), desc="scanning videos", unit="video", leave=False):
        rel = path.relative_to(root).as_posix()
        try:
            frames, fps = _probe(path, card)
        except Exception as exc:
            log.warning("skipping %s: cannot decode (%s)", path, exc)
            skipped.append(rel)
            continue
        stem = path.with_suffix("") if path.is_file() else path
        arrays = _sidecar_arrays(stem.with_name(stem.name + ".npz"), frames)
        meta_file = stem.with_name(stem.name + ".json")
        meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
        shape = {k: v.shape[1:] for k, v in arrays.items()}
        if first is None:
            first = (path, shape)
        elif shape != first[1]:
            raise SourceError(f"{path}: sidecar arrays {shape} differ from {first[0]}'s {first[1]}; "
                              "every video of a dataset needs the same sidecars and shapes")
        if frames < span:
            log.warning("skipping %s: %d frames, a clip needs %d", path, frames, span)
            skipped.append(rel)
            continue
        item = Item(rel, frames, fps, meta, tuple(sorted(arrays)))
        split = _split_of(rel, meta, card, meta_file)
        specs[split] += [ClipSpec(item, s) for s in range(0, frames - span + 1, stride)]
    if first is None:
        raise SourceError(f"no videos or frame folders found under {root} "
                          f"(extensions {card.folder.extensions}, frames {card.folder.frame_extensions})")
    return specs, skipped


def fit(frames: torch.Tensor, size: int, mode: str) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Square `size` frames, and (scale, offset) mapping input pixel coords: out = in * scale - offset."""
    _, _, h, w = frames.shape
    if mode == "crop":
        side = min(h, w)
        y0, x0 = (h - side) // 2, (w - side) // 2
        frames = frames[:, :, y0:y0 + side, x0:x0 + side]
        scale = np.array([size / side, size / side])
        offset = np.array([x0, y0]) * scale
    else:
        scale, offset = np.array([size / w, size / h]), np.zeros(2)
    if frames.shape[-2:] != (size, size):
        resized = F.interpolate(frames.float(), size=(size, size), mode="bilinear", antialias=True,
                                align_corners=False)
        frames = resized.round().clamp(0, 255).to(torch.uint8)
    return frames.contiguous(), scale, offset


def _read_frames(path: Path, card, start: int, stop: int, step: int) -> torch.Tensor:
    if path.is_dir():
        files = _frame_files(path, set(card.folder.frame_extensions))[start:stop:step]
        images = [np.asarray(Image.open(f).convert("RGB")) for f in files]
        if len({im.shape for im in images}) > 1:
            raise SourceError(f"{path}: frames differ in size")
        return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    from torchcodec.decoders import VideoDecoder

    return VideoDecoder(str(path), seek_mode="exact").get_frames_in_range(start, stop, step).data


def _key(rel: str, start: int) -> str:
    # WebDataset keys may not contain dots; the checksum keeps sanitised names unique.
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", rel)[-80:]
    return f"{safe}-{zlib.crc32(rel.encode()):08x}-{start:06d}"


def make(card, root: Path, split: str, spec: ClipSpec) -> Clip:
    item, step = spec.item, card.folder.frame_step
    stop = spec.start + (card.clip_length - 1) * step + 1
    path = Path(root) / item.path
    frames, scale, offset = fit(_read_frames(path, card, spec.start, stop, step), card.resolution, card.folder.fit)
    stem = path.with_suffix("") if path.is_file() else path
    arrays = _sidecar_arrays(stem.with_name(stem.name + ".npz"), item.frames) if item.arrays else {}
    sidecars = {k: v[spec.start:stop:step] for k, v in arrays.items()}
    if "coords" in sidecars:
        sidecars["coords"] = sidecars["coords"] * scale - offset
    meta = {**item.meta, "source": {"path": item.path, "start_frame": spec.start, "frame_step": step,
                                    "fit": card.folder.fit}}
    meta.pop("split", None)
    return Clip(key=_key(item.path, spec.start), frames=frames, fps=item.fps / step, meta=meta, **sidecars)
