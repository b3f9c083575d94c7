"""Action recognition of generated videos: the headline metric of Kim et al. 2019.

A class-conditional generator is asked for a clip of one action; a classifier trained on REAL
clips then says which action it sees. The confusion matrix (requested class x recognised class)
and its accuracy measure how well the generated motion carries the requested action.

The classifier is a small convolutional network over frame differences, trained on random
windows of real training clips (random horizontal flips: actors face either way; random blur:
generated frames are softer than real ones, and a judge trained on sharp frames alone calls a
blurred squat a kick). It judges
frames only, never a model's internal state, so it is independent of the generator it judges
and the same judge serves every model. It takes clips of any length, but is surest on the
window length it was trained on. `load_or_train` trains it once per training data, classes,
window and settings, and caches it on disk.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import tempfile
from pathlib import Path

import fsspec
import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from kpscale.data.shards import MANIFEST, read_manifest
from kpscale.data.stream import ClipLoader, DataConfig, LoaderConfig, resolve_shards
from kpscale.evaluate.snapshot import fixed_batches

matplotlib.use("Agg")  # files only: no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402

log = logging.getLogger(__name__)
_LOADED: set[Path] = set()  # cache files whose loading has been said: an evaluation every 1000 steps needn't repeat it

VERSION = 2  # part of the cache key: bump when the network or its training changes
SIZE = 64  # frames are judged at this resolution


class ActionClassifier(nn.Module):
    """Logits [B, C] of clips [B, T, 3, H, W] in [0, 1] (T >= 2, square frames, resized to 64 px).

    Each step sees its difference to the previous frame and to the clip's mean frame: the static
    background drops out of both, so the network sees the moving figure and its motion, not the
    clip's colours (random per clip, which it would otherwise learn to tell clips apart by).
    Per-frame 2D convolutions bring 64 px down to 8, 3D convolutions combine neighbouring steps,
    and global pooling over time and space makes the logits independent of the clip's length."""

    def __init__(self, classes: tuple[str, ...], width: int = 8):
        super().__init__()
        if len(classes) < 2 or len(set(classes)) != len(classes):
            raise ValueError(f"classes must be two or more distinct names, got {classes}")
        self.classes, self.width = tuple(classes), width

        def block(conv, channels_in, channels_out, stride, dilation=1):
            norm = nn.BatchNorm2d if conv is nn.Conv2d else nn.BatchNorm3d
            padding = 1 if conv is nn.Conv2d else (dilation, 1, 1)
            dilation = 1 if conv is nn.Conv2d else (dilation, 1, 1)
            return nn.Sequential(conv(channels_in, channels_out, 3, stride, padding, dilation, bias=False),
                                 norm(channels_out), nn.ReLU(inplace=True))

        self.frames = nn.Sequential(block(nn.Conv2d, 6, width, 2), block(nn.Conv2d, width, 2 * width, 2),
                                    block(nn.Conv2d, 2 * width, 4 * width, 2))
        self.frames.to(memory_format=torch.channels_last)  # several times faster on CPU
        # Temporal dilation 2 widens the window a step sees to about half a walking cycle.
        self.steps = nn.Sequential(block(nn.Conv3d, 4 * width, 4 * width, (1, 2, 2)),
                                   block(nn.Conv3d, 4 * width, 4 * width, 1, dilation=2))
        self.head = nn.Linear(4 * width, len(classes))

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        b, t, c, h, w = frames.shape
        if t < 2 or c != 3 or h != w:
            raise ValueError(f"expected clips [B, T>=2, 3, H, H], got {list(frames.shape)}")
        if h != SIZE:
            frames = F.interpolate(frames.flatten(0, 1), size=(SIZE, SIZE), mode="area").unflatten(0, (b, t))
        x = torch.cat([frames[:, 1:] - frames[:, :-1], (frames - frames.mean(1, keepdim=True))[:, 1:]], dim=2)
        x = self.frames(x.flatten(0, 1).contiguous(memory_format=torch.channels_last))
        x = x.unflatten(0, (b, t - 1)).transpose(1, 2)  # [B, C, T-1, 8, 8]
        return self.head(self.steps(x).mean((2, 3, 4)))


def _check_labels(labels, classes: tuple[str, ...], spec: str) -> None:
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise ValueError(f"{spec}: labels {unknown} are not among the classes {list(classes)}")


def _manifest(spec: str) -> tuple[object, str] | None:
    """(filesystem, path) of the manifest `spec` names or whose folder it is; None for a glob,
    brace list, pipe or a folder without one."""
    if spec.startswith("pipe:") or "{" in spec:
        return None
    fs, path = fsspec.core.url_to_fs(spec)
    if path.endswith(".parquet"):
        return fs, path
    if fs.isdir(path) and fs.exists(f"{path}/{MANIFEST}"):
        return fs, f"{path}/{MANIFEST}"
    return None


def blur(frames: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Clips [B, T, C, H, W] each blurred by a Gaussian of its own deviation `sigma` [B] in
    pixels (0: unchanged), borders replicated."""
    b, t, c, h, w = frames.shape
    radius = max(1, int(3 * sigma.max().item() + 0.999))
    offsets = torch.arange(-radius, radius + 1, dtype=frames.dtype)
    kernels = torch.exp(-offsets.square() / (2 * sigma.to(frames.dtype).clamp_min(1e-3)[:, None].square()))
    kernels = (kernels / kernels.sum(1, keepdim=True)).repeat_interleave(t * c, 0)  # a kernel per channel
    x = frames.reshape(1, b * t * c, h, w)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), kernels[:, None, None, :], groups=b * t * c)
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), kernels[:, None, :, None], groups=b * t * c)
    return x.reshape(b, t, c, h, w)


@torch.enable_grad()  # also when called from an evaluation under no_grad
def train_classifier(spec: str, classes: tuple[str, ...], window: int, steps: int = 200, batch_size: int = 32,
                     lr: float = 4e-3, seed: int = 0, width: int = 8, max_blur: float = 3.0,
                     progress: bool = True) -> ActionClassifier:
    """A classifier trained on `steps` batches of random `window`-frame windows of the real clips
    of `spec` (a shard folder, glob, manifest, ... as ClipLoader takes), on the CPU. Each clip is
    blurred by a Gaussian of a random deviation up to `max_blur` pixels at 64 px: a judge of
    generated videos must read the action, not the sharpness, which a generator pays for
    separately (FVD). The same seed gives the same classifier."""
    classes = tuple(classes)
    manifest = _manifest(spec)
    if manifest is not None:  # refuse a wrong class list before any training
        fs, path = manifest
        with fs.open(path, "rb") as f:
            _check_labels(read_manifest(f).column("label").to_pylist(), classes, spec)
    with torch.random.fork_rng(devices=[]):  # seeded initial weights, the caller's global RNG untouched
        torch.manual_seed(seed)
        classifier = ActionClassifier(classes, width)
    augment = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
    # One resampled epoch of exactly `steps` batches; the reader decodes on the second core.
    cfg = LoaderConfig(batch_size=batch_size, resample=True, epoch_samples=steps * batch_size, num_workers=1,
                       seed=seed)
    index = {name: i for i, name in enumerate(classes)}
    classifier.train()
    with tqdm(total=steps, desc="training the action classifier", unit="step", disable=not progress) as bar:
        for batch in ClipLoader(spec, cfg, window=window, rank=0, world_size=1):
            _check_labels(batch["label"], classes, spec)
            video = batch["video"]
            flip = torch.rand(len(video), generator=augment) < 0.5
            video[flip] = video[flip].flip(-1)
            if max_blur:
                sigma = torch.rand(len(video), generator=augment) * max_blur * video.shape[-1] / SIZE
                video = blur(video, sigma)
            target = torch.tensor([index[label] for label in batch["label"]])
            loss = F.cross_entropy(classifier(video), target, label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return classifier.eval()


class KeypointActionClassifier(nn.Module):
    """Logits [B, C] of keypoint sequences [B, T >= 2, K, 2]: each step's keypoints relative to
    the first step's and their change from the previous step, through two temporal convolutions
    pooled over time. kpscale's diagnostic beside the judge of frames: it reads a model's own
    keypoints, so it is trained for each detector (`train_keypoint_classifier`, seconds), and it
    tells whether generated motion carries its class before any frame is drawn."""

    def __init__(self, classes: tuple[str, ...], num_keypoints: int, width: int = 64):
        super().__init__()
        self.classes = tuple(classes)
        self.net = nn.Sequential(nn.Conv1d(4 * num_keypoints, width, 3, padding=1), nn.ReLU(),
                                 nn.Conv1d(width, width, 3, padding=2, dilation=2), nn.ReLU())
        self.head = nn.Linear(width, len(classes))

    def forward(self, sequences: torch.Tensor) -> torch.Tensor:
        sequences = sequences.float()  # bf16 keypoints would lose the small steps' differences
        relative = sequences - sequences[:, :1]
        change = torch.cat([torch.zeros_like(sequences[:, :1]), sequences.diff(dim=1)], 1)
        x = torch.cat([relative, change], -1).flatten(2).transpose(1, 2)  # [B, 4K, T]
        return self.head(self.net(x).mean(-1))


@torch.enable_grad()  # also when called from an evaluation under no_grad
def train_keypoint_classifier(sequences: torch.Tensor, labels: torch.Tensor, classes: tuple[str, ...],
                              steps: int = 300, lr: float = 3e-3, seed: int = 0) -> KeypointActionClassifier:
    """A KeypointActionClassifier fitted on keypoint sequences [N, T, K, 2] of real clips and their
    class indices [N], full batch, each step mirroring a random half left to right (actors face
    either way). The same seed gives the same classifier."""
    with torch.random.fork_rng(devices=[sequences.device] if sequences.is_cuda else []):
        torch.manual_seed(seed)
        classifier = KeypointActionClassifier(classes, sequences.shape[2]).to(sequences.device)
        optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=1e-4)
        sequences, labels = sequences.detach().float(), labels.to(sequences.device)
        mirror = torch.tensor([-1.0, 1.0], device=sequences.device)
        for _ in range(steps):
            flip = (torch.rand(len(sequences), device=sequences.device) < 0.5)[:, None, None, None]
            loss = F.cross_entropy(classifier(torch.where(flip, sequences * mirror, sequences)), labels,
                                   label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return classifier.eval()


@torch.no_grad()
def predict(classifier: nn.Module, frames: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Recognised class indices [B] of clips [B, T, 3, H, W] in [0, 1] (or of keypoint sequences
    [B, T, K, 2] for a KeypointActionClassifier), in eval mode, `batch_size` clips at a time."""
    was_training = classifier.training
    classifier.eval()
    device = next(classifier.parameters()).device
    out = torch.cat([classifier(chunk.to(device)).argmax(1).cpu() for chunk in frames.split(batch_size)])
    classifier.train(was_training)
    return out


def confusion_matrix(predicted: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts [C, C] int64: row = requested (true) class, column = recognised class."""
    predicted, target = predicted.long().flatten(), target.long().flatten()
    if predicted.shape != target.shape:
        raise ValueError(f"{len(predicted)} predictions for {len(target)} targets")
    for name, values in (("predicted", predicted), ("target", target)):
        if len(values) and not 0 <= values.min() <= values.max() < num_classes:
            raise ValueError(f"{name} class indices must lie in [0, {num_classes}), got {values.unique().tolist()}")
    return torch.bincount(target * num_classes + predicted, minlength=num_classes ** 2).view(num_classes, num_classes)


def accuracy_per_class(matrix: torch.Tensor) -> torch.Tensor:
    """Fraction [C] of each requested class's clips recognised as that class; NaN for a class
    with no clips (no evidence either way, which 0 would misstate)."""
    matrix = matrix.double()
    return matrix.diagonal() / matrix.sum(1)


def accuracy(matrix: torch.Tensor) -> float:
    """Fraction of all clips recognised as their requested class (NaN when there are none)."""
    total = matrix.sum().item()
    return matrix.diagonal().sum().item() / total if total else float("nan")


def confusion_plot(matrix: torch.Tensor, classes, path: str | Path, title: str) -> Path:
    """The matrix as a PNG: cells shaded by the fraction of their row, counts written in them."""
    counts = matrix.cpu().numpy()
    rows = counts.sum(1, keepdims=True)
    shares = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    size = 1.6 + 0.6 * len(classes)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for (i, j), n in np.ndenumerate(counts):
        ax.text(j, i, str(n), ha="center", va="center", fontsize=9,
                color="white" if shares[i, j] > 0.5 else "black")
    ticks = np.arange(len(classes))
    ax.set_xticks(ticks, classes, rotation=45, ha="right")
    ax.set_yticks(ticks, classes)
    ax.set(xlabel="recognised class", ylabel="requested class", title=f"{title}\naccuracy {accuracy(matrix):.1%}")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of requested clips")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _fingerprint(spec: str) -> bytes:
    """What identifies the training clips: the manifest's bytes, else the shards' names and sizes."""
    manifest = _manifest(spec)
    if manifest is not None:
        fs, path = manifest
        with fs.open(path, "rb") as f:
            return f.read()

    def size(url: str) -> int | None:
        if url.startswith("pipe:"):
            return None
        fs, path = fsspec.core.url_to_fs(url)
        return fs.size(path)

    return json.dumps(sorted((Path(r.url).name, size(r.url)) for r in resolve_shards(spec))).encode()


def default_cache_dir() -> Path:
    root = os.environ.get("KPSCALE_CACHE")
    return Path(root) / "action_classifiers" if root else Path.home() / ".cache" / "kpscale" / "action_classifiers"


def _plan(spec: str, classes, window: int, cache_dir: str | Path | None,
          train_kwargs: dict) -> tuple[inspect.BoundArguments, str, Path]:
    """The training call, its cache key and the file it is cached in."""
    call = inspect.signature(train_classifier).bind(spec, tuple(classes), window, **train_kwargs)
    call.apply_defaults()  # a default passed explicitly or left out is the same classifier
    settings = {k: v for k, v in call.arguments.items() if k not in ("spec", "progress")}
    digest = hashlib.sha256(_fingerprint(spec))
    digest.update(json.dumps({**settings, "version": VERSION}, sort_keys=True).encode())
    key = digest.hexdigest()
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return call, key, folder / f"action-classifier-{key[:16]}.pt"


def cache_path(spec: str, classes, window: int, cache_dir: str | Path | None = None, **train_kwargs) -> Path:
    """The file `load_or_train` with these arguments reads or writes."""
    return _plan(spec, classes, window, cache_dir, train_kwargs)[2]


def load_or_train(spec: str, classes, window: int, cache_dir: str | Path | None = None,
                  **train_kwargs) -> ActionClassifier:
    """The classifier `train_classifier(spec, classes, window, **train_kwargs)` gives, trained once
    and then loaded from `cache_dir` (default: $KPSCALE_CACHE/action_classifiers, else
    ~/.cache/kpscale/action_classifiers). The cache key covers the training clips, the classes,
    the window, every training setting (defaults included) and VERSION."""
    call, key, path = _plan(spec, classes, window, cache_dir, train_kwargs)
    if path.exists():
        if path not in _LOADED:
            _LOADED.add(path)
            log.info("action classifier loaded from the cache: %s", path)
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved["key"] != key:
            raise RuntimeError(f"{path}: holds a classifier of key {saved['key']}, expected {key}")
        classifier = ActionClassifier(tuple(saved["classes"]), saved["width"])
        classifier.load_state_dict(saved["state_dict"])
        return classifier.eval()
    log.info("training the action classifier on %s, to cache at %s", spec, path)
    classifier = train_classifier(*call.args, **call.kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save({"state_dict": classifier.state_dict(), "classes": list(classifier.classes), "window": window,
                    "width": classifier.width, "key": key}, tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return classifier


@torch.no_grad()
def evaluate_real(classifier: ActionClassifier, spec: str, window: int,
                  limit: int | None = None) -> tuple[torch.Tensor, float]:
    """(confusion matrix, accuracy) of the classifier on the first `window` frames of the first
    `limit` real clips of `spec` (all when None), in a fixed order."""
    index = {name: i for i, name in enumerate(classifier.classes)}
    predicted, target = [], []
    for batch in fixed_batches(spec, DataConfig(batch_size=64), window, limit):
        _check_labels(batch["label"], classifier.classes, spec)
        predicted.append(predict(classifier, batch["video"]))
        target.append(torch.tensor([index[label] for label in batch["label"]]))
    matrix = confusion_matrix(torch.cat(predicted), torch.cat(target), len(classifier.classes))
    return matrix, accuracy(matrix)
