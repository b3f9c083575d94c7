"""The action-recognition judge: trained on a few real actors clips it recognises held-out ones,
it is cached once per training setup, it refuses labels outside its classes, and its confusion
matrix counts and plots what it recognised."""

import logging
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from kpscale.config import load
from kpscale.data.build import build
from kpscale.data.card import DatasetCard
from kpscale.data.stream import DataConfig
from kpscale.evaluate import action_recognition as ar
from kpscale.evaluate.snapshot import fixed_batches

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("wave", "squat", "walk")  # three clearly different motions: arms only, up and down, across
WINDOW = 8
SIGMA = 3.0  # the blur a judge must see through
# Enough for a clear margin over chance on 48 training clips, in ~15 s on two cores.
TRAIN = dict(steps=100, batch_size=8, lr=1e-2, width=8, progress=False)


@pytest.fixture(scope="module")
def actors(tmp_path_factory) -> Path:
    """Train 48 and test 24 actors clips of 12 frames, balanced over CLASSES."""
    card = load(DatasetCard, ROOT / "datasets" / "actors.yaml",
                ["workers=1", "splits={train: 48, test: 24}", "clip_length=12", "clips_per_shard=24",
                 f"actors.actions=[{', '.join(CLASSES)}]"])
    out = tmp_path_factory.mktemp("actors")
    build(card, out, progress=False)
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("classifiers")


@pytest.fixture(scope="module")
def classifier(actors, cache) -> ar.ActionClassifier:
    return ar.load_or_train(str(actors / "train"), CLASSES, WINDOW, cache_dir=cache, **TRAIN)


def test_held_out_real_clips_are_recognised_well_above_chance(classifier, actors):
    matrix, accuracy = ar.evaluate_real(classifier, str(actors / "test"), WINDOW)
    assert matrix.sum() == 24 and matrix.sum(1).tolist() == [8, 8, 8]
    assert accuracy >= 0.75, matrix  # chance is 1/3: 18 of 24 right by chance has p < 0.001
    assert (ar.accuracy_per_class(matrix) >= 0.5).all(), matrix  # no class ignored


def test_blurred_held_out_clips_are_still_recognised(classifier, actors):
    """The judge reads the action, not the sharpness: held-out clips blurred by SIGMA px, softer
    than most generated frames, are recognised as well as above."""
    clips, labels = [], []
    for batch in fixed_batches(str(actors / "test"), DataConfig(batch_size=24), WINDOW, None):
        clips.append(batch["video"])
        labels += batch["label"]
    clips = torch.cat(clips)
    blurred = ar.blur(clips, torch.full((len(clips),), SIGMA))
    assert (blurred - clips).abs().mean() > 0.005  # the limbs' edges did soften
    target = torch.tensor([CLASSES.index(label) for label in labels])
    matrix = ar.confusion_matrix(ar.predict(classifier, blurred), target, len(CLASSES))
    assert ar.accuracy(matrix) >= 0.75, matrix
    assert (ar.accuracy_per_class(matrix) >= 0.5).all(), matrix


def test_blur_spreads_each_clip_by_its_own_deviation():
    frames = torch.zeros(3, 2, 3, 33, 33)
    frames[:, :, :, 16, 16] = 1.0  # a point in the middle of every frame
    out = ar.blur(frames, torch.tensor([0.0, 1.0, 2.5]))
    torch.testing.assert_close(out[0], frames[0])  # deviation 0: unchanged
    torch.testing.assert_close(out.sum((-1, -2)), frames.sum((-1, -2)))  # no light lost or made
    offsets = (torch.arange(33.0) - 16).square()
    for clip, sigma in ((1, 1.0), (2, 2.5)):  # the spread along each axis is the deviation asked for
        for axis in (-1, -2):
            variance = (out[clip, 0, 0].sum(axis) * offsets).sum()
            assert variance.sqrt().item() == pytest.approx(sigma, rel=0.02)
    flat = torch.full((1, 2, 3, 16, 16), 0.3)
    torch.testing.assert_close(ar.blur(flat, torch.tensor([3.0])), flat)  # borders replicated, no dark rim


def test_a_second_call_loads_the_cached_classifier(classifier, actors, cache, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger=ar.__name__)
    monkeypatch.setattr(ar, "_LOADED", set())  # as in a fresh process
    spec = str(actors / "train")
    path = ar.cache_path(spec, CLASSES, WINDOW, cache_dir=cache, **TRAIN)
    assert [p.name for p in cache.iterdir()] == [path.name]  # no temp file left behind
    mtime = path.stat().st_mtime_ns
    loaded = ar.load_or_train(spec, CLASSES, WINDOW, cache_dir=cache, **{**TRAIN, "progress": True})
    assert path.stat().st_mtime_ns == mtime and "loaded from the cache" in caplog.text
    ar.load_or_train(spec, CLASSES, WINDOW, cache_dir=cache, **TRAIN)  # said once a process, not per evaluation
    assert caplog.text.count("loaded from the cache") == 1
    assert loaded.classes == CLASSES and not loaded.training
    clips = torch.rand(3, WINDOW, 3, 64, 64)
    assert torch.equal(loaded(clips), classifier.eval()(clips))
    saved = torch.load(path, weights_only=True)
    assert saved["classes"] == list(CLASSES) and saved["window"] == WINDOW and path.name[-19:-3] == saved["key"][:16]
    # Whatever changes the classifier changes the file; the default passed explicitly does not.
    others = {ar.cache_path(spec, CLASSES[::-1], WINDOW, cache_dir=cache, **TRAIN),
              ar.cache_path(spec, CLASSES, WINDOW + 1, cache_dir=cache, **TRAIN),
              ar.cache_path(spec, CLASSES, WINDOW, cache_dir=cache, **{**TRAIN, "seed": 1}),
              ar.cache_path(str(actors / "test"), CLASSES, WINDOW, cache_dir=cache, **TRAIN)}
    assert len(others) == 4 and path not in others
    assert ar.cache_path(spec, CLASSES, WINDOW, cache_dir=cache, seed=0, **TRAIN) == path


def test_the_default_cache_folder_follows_kpscale_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("KPSCALE_CACHE", str(tmp_path))
    assert ar.default_cache_dir() == tmp_path / "action_classifiers"
    monkeypatch.delenv("KPSCALE_CACHE")
    assert ar.default_cache_dir() == Path.home() / ".cache" / "kpscale" / "action_classifiers"


def test_training_is_deterministic_given_the_seed(actors):
    spec = str(actors / "train" / "*.tar")  # a glob: no manifest, shards named instead
    runs = [ar.train_classifier(spec, CLASSES, WINDOW, steps=2, batch_size=4, width=4, seed=seed, progress=False)
            for seed in (3, 3, 4)]
    first, again, other = (r.state_dict() for r in runs)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


@pytest.mark.parametrize("split", ["train", "train/*.tar"])  # the manifest checked first; else each batch
def test_a_label_outside_the_classes_is_refused_naming_it(actors, split):
    spec = str(actors / split)
    with pytest.raises(ValueError, match=r"labels \['walk'\] are not among the classes \['wave', 'squat'\]") as e:
        ar.train_classifier(spec, ("wave", "squat"), WINDOW, steps=3, batch_size=8, width=4, progress=False)
    assert spec in str(e.value)


def test_confusion_matrix_counts_requested_against_recognised():
    target = torch.tensor([0, 0, 0, 1, 1, 2])
    predicted = torch.tensor([0, 0, 2, 1, 0, 2])
    matrix = ar.confusion_matrix(predicted, target, 4)
    assert matrix.dtype == torch.int64
    assert matrix.tolist() == [[2, 0, 1, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    per_class = ar.accuracy_per_class(matrix)
    assert per_class[:3].tolist() == pytest.approx([2 / 3, 1 / 2, 1]) and math.isnan(per_class[3])
    assert ar.accuracy(matrix) == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        ar.confusion_matrix(torch.tensor([4]), torch.tensor([0]), 4)


@pytest.mark.parametrize("size", [64, 128])
def test_the_classifier_takes_any_length_and_both_sizes(size):
    classifier = ar.ActionClassifier(CLASSES, width=4)
    assert ar.predict(classifier, torch.rand(5, 2, 3, size, size), batch_size=2).shape == (5,)
    assert classifier(torch.rand(2, 17, 3, size, size)).shape == (2, 3)
    with pytest.raises(ValueError, match=r"T>=2"):
        classifier(torch.rand(2, 1, 3, size, size))


def test_confusion_plot_writes_a_png(tmp_path):
    matrix = torch.tensor([[5, 1, 0], [0, 6, 0], [2, 0, 4]])
    path = ar.confusion_plot(matrix, CLASSES, tmp_path / "confusion.png", "actors: real test clips")
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) > 200
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is not None and len(colours) > 10  # drawn, not blank


def _motions(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Keypoint sequences [3n, 12, 4, 2] of three motions with random phase, amplitude, place and
    facing: keypoints swinging left-right, bobbing up-down, or drifting one way; class indices."""
    t = torch.arange(12.0)[None, :, None]
    phase, amplitude = torch.rand(3 * n, 1, 4, generator=generator) * 6.28, 0.1 + 0.1 * torch.rand(3 * n, 1, 1, generator=generator)
    labels = torch.arange(3).repeat(n)
    wave = amplitude * torch.sin(0.8 * t + phase)
    dx = torch.where(labels[:, None, None] == 0, wave, torch.where(labels[:, None, None] == 2, 0.03 * t, 0 * t))
    dy = torch.where(labels[:, None, None] == 1, wave, 0 * t)
    facing = torch.where(torch.rand(3 * n, 1, 1, generator=generator) < 0.5, -1.0, 1.0)
    start = torch.rand(3 * n, 1, 4, 2, generator=generator) * 1.2 - 0.6
    return start + torch.stack([facing * dx, dy], -1), labels


def test_a_keypoint_classifier_recognises_held_out_motions_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    train, train_labels = _motions(30, g)
    test, test_labels = _motions(30, g)
    classes = ("swing", "bob", "drift")
    classifier = ar.train_keypoint_classifier(train, train_labels, classes, steps=100)
    matrix = ar.confusion_matrix(ar.predict(classifier, test), test_labels, 3)
    assert ar.accuracy(matrix) >= 0.9, matrix  # chance 1/3
    again = ar.train_keypoint_classifier(train, train_labels, classes, steps=100)
    assert all(torch.equal(a, b) for a, b in zip(classifier.state_dict().values(), again.state_dict().values()))
    # The motion, not the place: the same sequences moved elsewhere are recognised the same.
    torch.testing.assert_close(classifier(test + 0.3), classifier(test))
