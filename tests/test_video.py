import numpy as np
import pytest

from kpscale.data.card import BasketballOptions, Encoding
from kpscale.data.sources.basketball import make_clip
from kpscale.data.video import decode_mp4, encode_mp4, psnr


@pytest.fixture(scope="module")
def clip():
    return make_clip(BasketballOptions(), 16, 64, np.random.default_rng(1))


def _dot_colour_error(frames, decoded, coords):
    """Largest per-channel error at the centre pixels of the dots."""
    xy = np.floor(coords).astype(int).clip(0, frames.shape[-1] - 1)
    t = np.arange(len(frames))[:, None]
    original = frames.numpy()[t, :, xy[..., 1], xy[..., 0]].astype(int)
    return np.abs(original - decoded.numpy()[t, :, xy[..., 1], xy[..., 0]]).max()


def test_round_trip_keeps_frames_and_colours(clip):
    frames, coords = clip
    decoded = decode_mp4(encode_mp4(frames, 10, Encoding()))
    assert decoded.shape == frames.shape and decoded.dtype == frames.dtype
    assert psnr(frames, decoded) >= 40.0  # measured in docs/benchmarks.md
    assert _dot_colour_error(frames, decoded, coords) <= 24


def test_yuv420p_is_much_worse_on_small_dots(clip):
    """Why the default is yuv444p: 4:2:0 halves chroma resolution, smearing dot colours."""
    frames, _ = clip
    full = psnr(frames, decode_mp4(encode_mp4(frames, 10, Encoding())))
    half = psnr(frames, decode_mp4(encode_mp4(frames, 10, Encoding(pixel_format="yuv420p"))))
    assert half < 36.0 and full - half > 5.0


def test_basketball_at_128_pixels_round_trips():
    frames, coords = make_clip(BasketballOptions(), 8, 128, np.random.default_rng(2))
    assert frames.shape == (8, 3, 128, 128) and coords.shape == (8, 6, 2)
    assert 0 < coords.min() and coords.max() < 128
    assert psnr(frames, decode_mp4(encode_mp4(frames, 10, Encoding()))) >= 40.0


def test_decode_range_and_bad_input(clip):
    frames, _ = clip
    data = encode_mp4(frames, 10, Encoding())
    assert decode_mp4(data, 4, 9).shape[0] == 5
    with pytest.raises(ValueError, match="outside"):
        decode_mp4(data, 10, 40)
    with pytest.raises(ValueError, match="uint8"):
        encode_mp4(frames.float(), 10, Encoding())
