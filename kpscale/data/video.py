"""mp4 encode/decode with torchcodec. Frames are uint8 tensors [T, C, H, W] throughout.

torchcodec is imported where a video is encoded or decoded: loading it (FFmpeg and its torch
ops) takes 2-3 s, which processes that never touch a video (a training driver, a sweep's trial
actors, `--help`) need not pay."""

from __future__ import annotations

import torch

from kpscale.data.card import Encoding


def encode_mp4(frames: torch.Tensor, fps: float, enc: Encoding) -> bytes:
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"expected uint8 frames [T, 3, H, W], got {frames.dtype} {tuple(frames.shape)}")
    from torchcodec.encoders import VideoEncoder

    extra = {"x264-params": enc.x264_params} if enc.codec == "libx264" and enc.x264_params else None
    data = VideoEncoder(frames.contiguous(), frame_rate=fps).to_tensor(
        format="mp4", codec=enc.codec, pixel_format=enc.pixel_format, crf=enc.crf, preset=enc.preset,
        extra_options=extra,
    )
    return data.numpy().tobytes()


def decode_mp4(data: bytes | str, start: int = 0, stop: int | None = None, step: int = 1,
               device: str = "cpu") -> torch.Tensor:
    """Frames [start, stop) of an encoded clip (bytes or a path), as uint8 [T, C, H, W]."""
    from torchcodec.decoders import VideoDecoder

    decoder = VideoDecoder(data, dimension_order="NCHW", num_ffmpeg_threads=1, device=device)
    count = decoder.metadata.num_frames
    stop = count if stop is None else stop
    if not 0 <= start < stop <= count:
        raise ValueError(f"frame range [{start}, {stop}) outside a video of {count} frames")
    return decoder.get_frames_in_range(start, stop, step).data


def decode_window(data: bytes, window: int | None, rng, device: str = "cpu", first: int = 0) -> tuple[torch.Tensor, int]:
    """A random run of `window` consecutive frames (all frames from `first` when None; the run from
    frame `first` when rng is None), and its first index."""
    from torchcodec.decoders import VideoDecoder

    decoder = VideoDecoder(data, dimension_order="NCHW", num_ffmpeg_threads=1, device=device)
    start, window = window_span(decoder.metadata.num_frames, window, rng, first)
    return decoder.get_frames_in_range(start, start + window).data, start


def window_span(count: int, window: int | None, rng, first: int = 0) -> tuple[int, int]:
    """The first index and length of decode_window's run in a clip of `count` frames (one draw
    from rng), so that a reader of already decoded frames cuts the same windows."""
    window = count - first if window is None else window
    if count < window or (rng is None and count < first + window) or window < 1:
        raise ValueError(f"clip has {count} frames, the window needs {window}" + (f" from frame {first}" if first else ""))
    return (int(rng.integers(count - window + 1)) if rng is not None else first), window


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 tensors."""
    mse = (a.float() - b.float()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(255.0**2 / mse)).item()
