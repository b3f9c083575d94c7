import subprocess
import sys

import numpy as np
import pytest
import torch

from kpscale.data.card import BasketballOptions, Encoding
from kpscale.data.sources.basketball import make_clip
from kpscale.data.video import decode_mp4, encode_mp4
from kpscale.evaluate.media import keypoint_pixels, pixel_offsets
from kpscale.models import build_family
from kpscale.predict import main, predict
from kpscale.train.config import load_train_config
from conftest import ROOT, TINY_MODEL, exit_status


def test_predict_reads_a_video_and_writes_a_playable_one(tmp_path):
    cfg = load_train_config(None, TINY_MODEL)
    model = build_family(cfg.model).root
    (tmp_path / "model").mkdir()
    torch.save(model.state_dict(), tmp_path / "model" / "weights.pt")
    (tmp_path / "model" / "config.yaml").write_text(cfg.to_yaml())
    frames, _ = make_clip(BasketballOptions(), 10, 96, np.random.default_rng(0))  # 96 px: predict resizes
    (tmp_path / "in.mp4").write_bytes(encode_mp4(frames, 10, Encoding()))
    out = tmp_path / "out.mp4"
    result = subprocess.run([sys.executable, "-m", "kpscale.predict", "--run", str(tmp_path / "model"),
                             "--video", str(tmp_path / "in.mp4"), "--future", "8", "--samples", "3",
                             "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    video = decode_mp4(str(out))
    assert video.shape == (12, 3, 64, 4 * 64)  # 4 observed + 8 predicted; input + 3 samples
    assert video[-1, :, :, :64].float().mean() < 5  # the 10-frame input has ended: black


def test_predict_names_a_bad_run(tmp_path, capsys):
    assert exit_status(main, "--run", str(tmp_path), "--video", "x.mp4", "--out", str(tmp_path / "o.mp4")) == 2
    assert "weights.pt" in capsys.readouterr().err


def test_pixel_offsets_move_a_drawn_keypoint_by_exactly_those_pixels():
    keypoints = torch.tensor([[0.1, -0.3, 1.0], [0.5, 0.5, 1.0]])
    offsets = pixel_offsets({1: (6.0, -4.0)}, 2, heatmap_size=16, image_size=64)
    moved = keypoints.clone()
    moved[:, :2] += offsets
    before, after = keypoint_pixels(keypoints, 16, 64), keypoint_pixels(moved, 16, 64)
    np.testing.assert_allclose(after - before, [[0, 0], [6, -4]], atol=1e-5)  # x right, y down
    with pytest.raises(ValueError, match="keypoint 2"):
        pixel_offsets({2: (1.0, 1.0)}, 2, 16, 64)


def test_moving_a_keypoint_moves_what_the_decoder_draws():
    """The decoder's change when keypoint 0 moves from A to B is where it went and where it left,
    nothing elsewhere: the manipulation moves the object drawn for that keypoint."""
    cfg = load_train_config(None, TINY_MODEL)
    model = build_family(cfg.model).root.eval()
    torch.manual_seed(0)
    first = torch.rand(1, 3, 64, 64) - 0.5
    keypoints = torch.zeros(1, 1, cfg.model.num_keypoints, 3)
    keypoints[0, 0, 0] = torch.tensor([-0.5, 0.5, 1.0])  # A: top-left quadrant (y is up)
    offsets = pixel_offsets({0: (32.0, 32.0)}, cfg.model.num_keypoints, cfg.model.heatmap_size, 64)
    moved = keypoints.clone()
    moved[..., :2] += offsets  # B: 32 px right and 32 px down
    with torch.no_grad():
        change = model.render(moved, first, keypoints[:, 0]) - model.render(keypoints, first, keypoints[:, 0])
    change = change.abs().sum(2)[0, 0]  # [H, W]
    (ax, ay), (bx, by) = (keypoint_pixels(k[0, 0, :1], cfg.model.heatmap_size, 64)[0] for k in (keypoints, moved))
    ys, xs = torch.meshgrid(torch.arange(64) + 0.5, torch.arange(64) + 0.5, indexing="ij")
    near_b = (xs - bx).hypot(ys - by) < 20  # 3 sigma of the Gaussian map plus the receptive field
    near_a = (xs - ax).hypot(ys - ay) < 20
    assert change[near_b].sum() > 0.1
    assert change[~(near_a | near_b)].sum() < 1e-3 * change[near_b].sum()


def test_predict_with_a_moved_keypoint_shows_original_and_manipulated_futures(tmp_path, capsys):
    cfg = load_train_config(None, TINY_MODEL)
    model = build_family(cfg.model).root.eval()
    frames, _ = make_clip(BasketballOptions(), 12, 64, np.random.default_rng(1))
    plain = predict(model, cfg, frames, future=4, samples=2, observed=6)
    both = predict(model, cfg, frames, future=4, samples=2, observed=6, moves={0: (8.0, 0.0)})
    assert plain.shape == (10, 64, 3 * 64, 3) and both.shape == (10, 64, 5 * 64, 3)
    np.testing.assert_array_equal(both[:, :, :3 * 64], plain)  # same seed: the originals are unchanged
    assert not np.array_equal(both[:, :, 3 * 64:], plain[:, :, 64:])  # the manipulation changed the futures
    assert exit_status(main, "--run", "x", "--video", "x.mp4", "--move", "3", "--out", str(tmp_path / "o.mp4")) == 2
    assert "K:DX,DY" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--observed", "--future", "--samples"])
def test_predict_refuses_a_non_positive_count(tmp_path, flag, capsys):
    assert exit_status(main, "--run", "x", "--video", "x.mp4", flag, "0", "--out", str(tmp_path / "o.mp4")) == 2
    err = capsys.readouterr().err
    assert flag in err and "positive" in err
