import subprocess
import sys

import numpy as np
import torch

from kpscale.data.card import BasketballOptions, Encoding
from kpscale.data.sources.basketball import make_clip
from kpscale.data.video import decode_mp4, encode_mp4
from kpscale.models import build_model
from kpscale.train.config import load_train_config
from conftest import ROOT, TINY_MODEL


def test_predict_reads_a_video_and_writes_a_playable_one(tmp_path):
    cfg = load_train_config(None, TINY_MODEL)
    model = build_model(cfg.model)
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


def test_predict_names_a_bad_run(tmp_path):
    result = subprocess.run([sys.executable, "-m", "kpscale.predict", "--run", str(tmp_path), "--video", "x.mp4",
                             "--out", str(tmp_path / "o.mp4")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "weights.pt" in result.stderr and "Traceback" not in result.stderr
