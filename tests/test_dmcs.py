"""The DeepMind Control Suite source: real dm_control episodes, their sidecars and the card's checks."""

import hashlib
import io
import json

import numpy as np
import pytest

from kpscale.config import ConfigError, load
from kpscale.data.build import build
from kpscale.data.card import DatasetCard
from kpscale.data.shards import iter_tar
from kpscale.data.sources import dmcs
from kpscale.data.stream import ClipLoader, LoaderConfig
from conftest import ROOT

# Walker: seven bodies spread over the frame, so a coordinate with x and y swapped, or y flipped,
# lands off its body.
CARD = ROOT / "datasets" / "dmcs_walker_walk.yaml"
TINY = ["splits={train: 3, test: 2}", "clip_length=8", "clips_per_shard=2"]


@pytest.fixture(scope="module")
def walker(tmp_path_factory):
    """Built as 3 shards by 2 Ray tasks (the session's Ray head, through RAY_ADDRESS)."""
    out = tmp_path_factory.mktemp("walker")
    build(load(DatasetCard, CARD, [*TINY, "workers=2"]), out, progress=False)
    return out


def _samples(folder):
    for shard in sorted(folder.glob("*.tar")):
        with open(shard, "rb") as f:
            yield from iter_tar(f)


def _replay(meta: dict, actions: np.ndarray, size: int, camera: int):
    """A fresh environment loaded with the clip's seed and stepped with its stored actions: per
    frame (reward the env returns or, for frame 0, the task's, segmentation [H, W, 2]); the
    physics' body ids."""
    env = dmcs._load(meta["source"]["domain"], meta["source"]["task"], meta["source"]["env_seed"])
    try:
        env.reset()
        physics, out, reward = env.physics, [], env.task.get_reward(env.physics)
        for action in actions:
            out.append((reward, physics.render(height=size, width=size, camera_id=camera, segmentation=True)))
            for _ in range(meta["action_repeat"]):
                reward = env.step(action).reward
        return out, physics.model.geom_bodyid.copy()
    finally:
        env.physics.free()


@pytest.mark.slow
def test_sidecars_read_back_and_match_a_replay(walker):
    cfg = LoaderConfig(batch_size=3, num_workers=0, shuffle=False, random_window=False, even=False, drop_last=False)
    batch = next(iter(ClipLoader(str(walker / "train"), cfg)))
    assert batch["video"].shape == (3, 8, 3, 64, 64)
    assert batch["actions"].shape == (3, 8, 6) and batch["rewards"].shape == (3, 8)
    assert batch["coords"].shape == (3, 8, 7, 2)
    assert batch["label"] == ["walker_walk"] * 3
    assert batch["actions"].abs().max() <= 1 and batch["actions"].std() > 0.3  # walker's spec: [-1, 1]

    on_body = swapped = flipped = checked = 0
    for key, parts in _samples(walker / "train"):
        meta = json.loads(parts["json"])
        assert meta["bodies"] == ["torso", "right_thigh", "right_leg", "right_foot", "left_thigh", "left_leg",
                                  "left_foot"]
        actions, rewards, coords = (np.load(io.BytesIO(parts[f"{n}.npy"]))
                                    for n in ("actions", "rewards", "coords"))
        replay, body_of_geom = _replay(meta, actions, 64, meta["camera"])
        np.testing.assert_allclose(rewards, [r for r, _ in replay], rtol=1e-6, err_msg=key)
        for (_, seg), xy in zip(replay, coords):
            for body, (x, y) in enumerate(xy, start=1):
                for (px, py), count in (((x, y), "on"), ((y, x), "swap"), ((x, 64 - y), "flip")):
                    geom, kind = seg[int(py), int(px)] if 0 <= px < 64 and 0 <= py < 64 else (-1, -1)
                    hit = kind == 5 and body_of_geom[geom] == body  # 5: mjOBJ_GEOM
                    on_body += hit and count == "on"
                    swapped += hit and count == "swap"
                    flipped += hit and count == "flip"
                checked += 1
    # A centre of mass may sit behind another body (a far-side limb): most, not all, land on their body.
    assert on_body >= 0.85 * checked, (on_body, checked)
    assert swapped < 0.4 * checked and flipped < 0.4 * checked, (swapped, flipped, checked)


@pytest.mark.slow
def test_build_is_the_same_in_process(walker, tmp_path):
    build(load(DatasetCard, CARD, [*TINY, "workers=1"]), tmp_path, progress=False)
    for split in ("train", "test"):
        ours = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (walker / split).glob("*.tar")}
        again = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / split).glob("*.tar")}
        assert ours == again and len(ours) == {"train": 2, "test": 1}[split]


@pytest.mark.parametrize("overrides, field, words", [
    (["dmcs.task=fly"], "dmcs.domain, dmcs.task", "no task 'fly' in domain 'walker'.*walker_walk"),
    (["dmcs.domain=submarine"], "dmcs.domain, dmcs.task", "no task 'walk' in domain 'submarine'"),
    (["clip_length=600"], "clip_length, dmcs.action_repeat", "1200 steps, beyond walker_walk's episode of 1000"),
    (["dmcs.camera=2"], "dmcs.camera", "cameras 0 to 1"),
    (["dmcs.action_repeat=0"], "dmcs.action_repeat", "greater than or equal to 1"),
])
def test_bad_cards_are_refused_naming_the_field(overrides, field, words):
    with pytest.raises(ConfigError, match=f"(?s){field}.*{words}"):
        load(DatasetCard, CARD, overrides)


def test_shipped_cards_fit_their_episodes():
    for name in ("cartpole_swingup", "acrobot_swingup", "cheetah_run", "walker_walk"):
        card = load(DatasetCard, ROOT / "datasets" / f"dmcs_{name}.yaml")
        assert f"{card.dmcs.domain}_{card.dmcs.task}" == name == card.name.removeprefix("dmcs_")
