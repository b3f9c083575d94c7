"""The articulated actors source: joints on the drawn bodies, actions told apart by their
motion, and a build whose shards read back with labels and joint coordinates."""

import io
import json
import tarfile
import zlib

import numpy as np
import pytest

from kpscale.config import ConfigError, load
from kpscale.data.build import build
from kpscale.data.card import DatasetCard
from kpscale.data.shards import MANIFEST, read_manifest
from kpscale.data.sources import actors
from conftest import ROOT

CARD = ROOT / "datasets" / "actors.yaml"


def _card(*overrides: str) -> DatasetCard:
    return load(DatasetCard, CARD, ["workers=1", *overrides])


@pytest.mark.parametrize("size", [64, 128])
def test_every_joint_lies_on_the_drawn_body(size):
    opts = _card().actors
    white = np.array([255.0, 255.0, 255.0])
    for n, action in enumerate(actors.ACTIONS):
        joints, dims, _ = actors.place(action, opts, 24, size, np.random.default_rng(n))
        frames = actors.draw(joints, dims, dict(shirt=white, trousers=white, skin=white), np.zeros((size, size, 3)))
        assert frames.shape == (24, 3, size, size)
        t, j = np.meshgrid(np.arange(24), np.arange(len(actors.JOINTS)), indexing="ij")
        x = joints[..., 0].astype(int).clip(0, size - 1)
        y = joints[..., 1].astype(int).clip(0, size - 1)
        inside = (joints >= 0).all(-1) & (joints < size).all(-1)
        assert inside.mean() > 0.99, action  # the figure stays in the frame
        on_body = frames[t, 0, y, x] > 100  # far limbs are drawn at 70% of white
        assert on_body[inside].all(), (action, np.argwhere(~on_body & inside)[:5])
        # Limbs of visible width: the figure's pixels over its bones' length, over 1.6 px at 64.
        bones = sum(np.linalg.norm(joints[:, actors.J[a]] - joints[:, actors.J[b]], axis=-1)
                    for a, b, _, _ in actors.BONES)
        assert ((frames[:, 0] > 100).sum((1, 2)) / bones).min() > size / 40, action


def _features(joints: np.ndarray) -> np.ndarray:
    """A clip's motion: joints relative to the pelvis in units of the figure's height, mirrored
    to face right, summarised by their mean, spread and the pelvis's motion."""
    height = np.ptp(joints[0, :, 1])
    rel = (joints - joints[:, [actors.J["pelvis"]]]) / height
    rel[..., 0] *= np.sign(np.mean(rel[:, actors.J["right_shoulder"], 0] - rel[:, actors.J["left_shoulder"], 0]))
    pelvis = joints[:, actors.J["pelvis"]] / height
    return np.concatenate([rel.mean(0).ravel(), rel.std(0).ravel(), np.abs(np.diff(pelvis, axis=0)).mean(0),
                           pelvis.std(0)])


def test_actions_are_told_apart_by_their_motion():
    """Nearest class mean of simple motion features, fitted on 20 clips per action and tested on
    10 others, is right for nearly every clip: the actions move differently, whatever the
    clip's tempo, phase, amplitude, body and facing."""
    opts = _card().actors

    def clips(split: str, count: int):
        for index in range(count * len(actors.ACTIONS)):
            action = actors.ACTIONS[index % len(actors.ACTIONS)]
            rng = np.random.default_rng([0, zlib.crc32(split.encode()), index])
            yield action, _features(actors.place(action, opts, 32, 64, rng)[0])

    train = list(clips("train", 20))
    means = {a: np.mean([f for b, f in train if b == a], 0) for a in actors.ACTIONS}
    scale = np.std([f for _, f in train], 0) + 1e-6
    test = list(clips("test", 10))
    right = [min(means, key=lambda a: np.linalg.norm((f - means[a]) / scale)) == action for action, f in test]
    assert np.mean(right) > 0.9


def test_a_build_reads_back_with_labels_and_joints(tmp_path):
    card = _card("splits={train: 12, test: 6}", "clip_length=8", "clips_per_shard=6")
    build(card, tmp_path, progress=False)
    rows = read_manifest(tmp_path / "train" / MANIFEST).to_pylist()
    assert len(rows) == 12 and {r["objects"] for r in rows} == {15}
    assert sorted(r["label"] for r in rows) == sorted(list(actors.ACTIONS) * 2)  # balanced
    with tarfile.open(tmp_path / "test" / "shard-000000.tar") as tar:
        meta = json.load(tar.extractfile("test-0000001.json"))
        coords = np.load(io.BytesIO(tar.extractfile("test-0000001.coords.npy").read()))
    assert meta["label"] == actors.ACTIONS[1] and meta["joints"][0] == "head" and len(meta["joints"]) == 15
    assert coords.shape == (8, 15, 2) and (coords > 0).all() and (coords < 64).all()


def test_bad_actor_options_are_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"actors.actions.*dance"):
        _card("actors.actions=[walk, dance]")
    with pytest.raises(ConfigError, match=r"actors.height.*0 < min <= max"):
        _card("actors.height=[0.6, 0.4]")
    with pytest.raises(ConfigError, match=r"actors.actions.*two or more distinct"):
        _card("actors.actions=[walk, walk]")
