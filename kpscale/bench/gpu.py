"""GPU benchmark: the training step of one model config side by side in one run, each part
within its own time budget so that the whole finishes in minutes on a lent GPU machine.

- step: a bare loop (Adam, clipping, random clips already on the device) in fp32, bf16 autocast
  and torch.compile'd bf16, without and (on a GPU) with CUDA graphs, per batch size: clips/s,
  the first steps' seconds (compilation), peak memory, the fraction of the wall time the GPU
  runs kernels (torch.profiler), and the host syncs a step makes (CUDA's sync debug mode). A
  batch that fails says why.
- engine: the DeepSpeed engine kpscale.train builds (bf16, ZeRO-0/2, eager and compiled), in
  this process without Ray, against the bare bf16 loop at the same batch.
- decode: mp4 frames/s decoded by torchcodec on one CPU thread (the shards' yuv444p, and
  yuv420p) and on the GPU (yuv420p: NVDEC cannot decode H.264 4:4:4); then what feeding the
  fastest case takes (decoding threads, or the GPU decoder's share).

Ray is not needed (the Ray Train path is `bench train`). `--device cpu` runs the same parts
small, as a check of the command: none of its figures is a GPU's."""

from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch._dynamo

from kpscale.config import ConfigError
from kpscale.train.config import TrainConfig, load_train_config
from kpscale.train.engine import param_groups

OFFICIAL = Path(__file__).resolve().parents[1] / "models" / "struct_vrnn" / "configs" / "paper_basketball.yaml"
# Past every schedule's ramp (KL, teacher forcing): the steady state's step.
STEP = 10**6


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: the parts small, a check of the command (default: cuda)")
    parser.add_argument("--config", default=str(OFFICIAL),
                        help="training config whose model is measured (default: Struct-VRNN's official widths)")
    parser.add_argument("--batches", type=_sizes, default=None, metavar="32,128,256",
                        help="batch sizes (default: 32,128,256 on cuda, 2 on cpu)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps a case (default: 10 on cuda, 2 on cpu)")
    parser.add_argument("--budgets", type=_sizes, default=[180, 60, 30], metavar="STEP,ENGINE,DECODE",
                        help="seconds each part may start new cases in (default: 180,60,30)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="training config overrides")


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return sizes


class Budget:
    """A part's seconds: a case starts only while some are left; a case already running ends."""

    def __init__(self, seconds: float):
        self.ends = time.monotonic() + seconds

    def left(self) -> bool:
        return time.monotonic() < self.ends


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_steps(step, steps: int, device: torch.device) -> float:
    _sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return time.perf_counter() - started


def _gpu_busy(step, device: torch.device) -> float | None:
    """Kernel time over wall time across 3 steps, from torch.profiler (None on the CPU)."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall = _time_steps(step, 3, device)
    kernels = sum(e.self_device_time_total for e in prof.key_averages() if e.device_type.name == "CUDA")
    return kernels / 1e6 / wall


def _host_syncs(step, device: torch.device) -> int | None:
    """Host syncs in one step, as CUDA's sync debug mode warns of them (None on the CPU)."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def _peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None


def bare_step(cfg: TrainConfig, device: torch.device, bf16: bool = False, compiled: bool = False, first: int = 0):
    """The training step of a bare loop, without Ray or DeepSpeed: the config's model on `device`,
    Adam over kpscale's parameter groups, clipping; `step(video)` trains on one batch, counting
    its steps from `first` on the device as kpscale.train does. `compiled`: with the config's
    train.compile_backend and train.compile_mode. `bench train` compares Ray Train + DeepSpeed
    with it, and so does this benchmark."""
    from kpscale.models import build_family

    torch.manual_seed(cfg.train.seed)
    model = build_family(cfg.model).root.to(device)
    if compiled:
        model.compile(backend=cfg.train.compile_backend, mode=cfg.train.compile_mode)
    optimiser = torch.optim.Adam(param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr)
    counter = torch.tensor(first, device=device)

    def step(video: torch.Tensor) -> None:
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            loss = model(video, counter, decode_predictions=False)["loss"]
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip or float("inf"))  # 0: off
        optimiser.step()
        counter.add_(1)
    return step


def _bare_step(cfg: TrainConfig, device: torch.device, bf16: bool, compiled: bool):
    """`bare_step` on random clips already on the device."""
    step = bare_step(cfg, device, bf16, compiled, first=STEP)
    video = torch.rand(cfg.data.batch_size, cfg.window, 3, cfg.model.image_size, cfg.model.image_size, device=device)
    return lambda: step(video)


def _engine_step(cfg: TrainConfig, device: torch.device, compiled: bool):
    """A step of the DeepSpeed engine kpscale.train builds, bf16 as on a GPU."""
    from kpscale.models import build_family
    from kpscale.train.engine import build_engine

    torch.manual_seed(cfg.train.seed)
    family = build_family(cfg.model)
    engine = build_engine(family.optimiser("model"), cfg, bf16=True, steps=10**9)
    if compiled:
        engine.compile(backend=cfg.train.compile_backend, compile_kwargs={"mode": cfg.train.compile_mode})
    video = torch.rand(cfg.data.batch_size, cfg.window, 3, cfg.model.image_size, cfg.model.image_size,
                       device=device, dtype=torch.bfloat16)
    counter = torch.tensor(STEP, device=device)

    def step() -> None:
        engine.backward(engine(video, counter, decode_predictions=False)["loss"])
        engine.step()
        counter.add_(1)
    return step


def _case(make_step, clips: int, device: torch.device, steps: int, warmup: int) -> dict:
    """clips/s and the rest of a case whose steps train on `clips` clips; {"error": ...} when the
    batch does not run."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        step = make_step()
        first = _time_steps(step, warmup, device)
        seconds = _time_steps(step, steps, device)
    except (RuntimeError, torch.OutOfMemoryError) as exc:  # a batch too large, a kernel's limit
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    result = {"clips_per_s": clips * steps / seconds, "first_steps_s": first, "peak_memory_mb": _peak_mb(device)}
    for name, measure in (("gpu_busy", _gpu_busy), ("host_syncs_per_step", _host_syncs)):
        try:
            result[name] = measure(step, device)
        except Exception as exc:  # a diagnostic that fails must not cost the lease's other figures
            result[name] = None
            print(f"  {name} unavailable: {type(exc).__name__}: {exc}", flush=True)
    torch._dynamo.reset()  # compiled graphs keep their model alive: free it for the next case
    return result


def _init_single_process(device: torch.device) -> None:
    """torch.distributed of one process, which DeepSpeed's engine needs, without Ray."""
    import deepspeed

    from kpscale.train.engine import skip_shm_comm_op

    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": os.environ.get("MASTER_PORT", "29650")}.items():
        os.environ.setdefault(key, value)
    skip_shm_comm_op()
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")


def _decode_rates(device: torch.device, budget: Budget, clips: int = 16) -> dict[str, float | str]:
    """Frames/s decoding basketball clips of 48 frames at 64 px, per encoding and decode device."""
    try:
        import torchcodec  # noqa: F401  (said once here rather than per case)
    except ImportError as exc:
        return {"error": f"torchcodec not importable here: {exc}"}
    from kpscale.data.card import BasketballOptions, Encoding
    from kpscale.data.sources.basketball import make_clip
    from kpscale.data.video import decode_mp4, encode_mp4

    rng = np.random.default_rng(0)
    frames = [make_clip(BasketballOptions(), 48, 64, rng)[0] for _ in range(clips)]
    rates: dict[str, float | str] = {}
    for pixel_format in ("yuv444p", "yuv420p"):
        encoded = [encode_mp4(f, 25.0, Encoding(pixel_format=pixel_format)) for f in frames]
        for where in ("cpu", "cuda"):
            name = f"{pixel_format} on {where}"
            if where == "cuda" and (device.type != "cuda" or pixel_format == "yuv444p"):
                continue
            if not budget.left():
                rates[name] = "skipped: over the part's budget"
                continue
            torch.set_num_threads(1)
            try:
                decode_mp4(encoded[0], device=where)  # warm-up: the decoder's first open
                _sync(device)
                started = time.perf_counter()
                decoded = sum(len(decode_mp4(data, device=where)) for data in encoded)
                _sync(device)
                rates[name] = decoded / (time.perf_counter() - started)
            except (RuntimeError, ValueError) as exc:
                rates[name] = f"error: {str(exc).splitlines()[0][:200]}"
    return rates


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("bench gpu: torch sees no CUDA device here; `--device cpu` runs its parts small on the "
                          "CPU, as a check of the command")
    batches = args.batches or ([32, 128, 256] if device.type == "cuda" else [2])
    steps = args.steps or (10 if device.type == "cuda" else 2)
    if len(args.budgets) != 3:
        raise ConfigError(f"--budgets takes 3 numbers (step, engine, decode seconds), got {len(args.budgets)}")
    if device.type == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"  # before DeepSpeed is first imported

    def config(batch: int, *overrides: str) -> TrainConfig:
        return load_train_config(args.config, [f"data.batch_size={batch}", *overrides, *args.overrides])

    base = config(batches[0])
    print(f"kpscale.bench gpu: {base.model.name}, {base.window} frames at {base.model.image_size}px, "
          f"on {torch.cuda.get_device_name() if device.type == 'cuda' else 'the CPU (a check, not a measurement)'}",
          flush=True)
    results: dict[str, dict] = {}
    budget = Budget(args.budgets[0])
    modes = {" compiled": "default"}
    if device.type == "cuda":  # torch.compile makes no CUDA graphs on the CPU
        modes[" compiled, CUDA graphs"] = "reduce-overhead"
    # Cheap cases first, then the compiled ones (a minute or more each) by how much they tell.
    plan = [("fp32", batches[0], None)] + [("bf16", b, None) for b in batches] + \
           [("bf16" + variant, b, mode) for b in dict.fromkeys([batches[0], batches[-1], *batches[1:-1]])
            for variant, mode in modes.items()]
    for precision, batch, mode in plan:
        name = f"bare {precision}, batch {batch}"
        if not budget.left():
            results[name] = {"error": "skipped: over the part's budget"}
            continue
        print(f"{name} ...", end=" ", flush=True)
        cfg = config(batch, *([f"train.compile_mode={mode}"] if mode else []))
        results[name] = _case(lambda: _bare_step(cfg, device, precision != "fp32", mode is not None), batch, device,
                              steps, warmup=3 if mode else 2)
        print(_brief(results[name]), flush=True)
    _init_single_process(device)
    budget = Budget(args.budgets[1])
    engine_cases = dict.fromkeys([(0, batches[0], ""), (2, batches[0], ""), (2, batches[-1], ""),
                                  *((2, b, variant) for variant in modes for b in (batches[-1], batches[0]))])
    for zero, batch, variant in engine_cases:  # once each when there is one batch size
        name = f"DeepSpeed bf16 ZeRO-{zero}{variant}, batch {batch}"
        if not budget.left():
            results[name] = {"error": "skipped: over the part's budget"}
            continue
        print(f"{name} ...", end=" ", flush=True)
        cfg = config(batch, f"train.zero_stage={zero}", *([f"train.compile_mode={modes[variant]}"] if variant else []))
        results[name] = _case(lambda: _engine_step(cfg, device, bool(variant)), batch, device, steps,
                              warmup=3 if variant else 2)
        print(_brief(results[name]), flush=True)
        bare = results.get(f"bare bf16{variant}, batch {batch}", {})
        if "clips_per_s" in bare and "clips_per_s" in results[name]:
            results[name]["of_bare"] = results[name]["clips_per_s"] / bare["clips_per_s"]
    print("decoding ...", flush=True)
    decode = _decode_rates(device, Budget(args.budgets[2]))
    reader = _reader(results, decode, base.window)
    _print(results, decode, reader)
    return {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "steps": results,
            "decode_frames_per_s": decode, "reader": reader}


# (decode case, the reader's key, what its figure counts): the decoders the fastest case would need.
READER_SHARES = (("yuv444p on cpu", "cpu_decode_threads", "CPU threads decoding the shards' yuv444p"),
                 ("yuv420p on cpu", "cpu_decode_threads_yuv420p", "CPU threads decoding yuv420p"),
                 ("yuv420p on cuda", "gpu_decode_share", "of what the GPU decodes (yuv420p)"))


def _reader(results: dict[str, dict], decode: dict, window: int) -> dict:
    """What feeding the fastest case takes: its frames/s, and the CPU decode threads or the share
    of the GPU's decoding that many frames/s needs."""
    timed = {name: r["clips_per_s"] for name, r in results.items() if "clips_per_s" in r}
    if not timed:
        return {}
    fastest = max(timed, key=timed.get)
    needed = timed[fastest] * window
    reader = {"fastest_case": fastest, "frames_per_s_needed": needed}
    for name, key, _ in READER_SHARES:
        if isinstance(decode.get(name), float):
            reader[key] = needed / decode[name]
    return reader


def _brief(result: dict) -> str:
    """A case's progress line, so that a run cut short by its time limit has said what it measured."""
    if "error" in result:
        return result["error"]
    return f"{result['clips_per_s']:.1f} clips/s, first steps {result['first_steps_s']:.1f} s"


def _print(results: dict[str, dict], decode: dict, reader: dict) -> None:
    def number(value, form: str) -> str:
        return "-" if value is None else format(value, form)

    print(f"\n{'case':<44}{'clips/s':>9}{'of bare':>9}{'first s':>9}{'peak MB':>10}{'GPU busy':>10}{'syncs':>7}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<44}  {r['error']}")
            continue
        print(f"{name:<44}{r['clips_per_s']:>9.1f}{number(r.get('of_bare'), '.2f'):>9}{r['first_steps_s']:>9.1f}"
              f"{number(r['peak_memory_mb'], '.0f'):>10}{number(r['gpu_busy'], '.0%'):>10}"
              f"{number(r['host_syncs_per_step'], 'd'):>7}")
    print("\ndecode (one CPU thread, or the GPU), frames/s:")
    for name, rate in decode.items():
        print(f"  {name:<20}{rate:>10.0f}" if isinstance(rate, float) else f"  {name:<20}{rate}")
    if reader:
        print(f"\nfeeding the fastest case ({reader['fastest_case']}) takes {reader['frames_per_s_needed']:,.0f} "
              f"frames/s:", flush=True)
        for _, key, what in READER_SHARES:
            if key in reader:
                print(f"  {reader[key]:.2f} {what}")
