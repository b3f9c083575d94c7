import importlib
import subprocess
import sys

import pytest
import torch

from conftest import CARD, ROOT, TINY_MODEL, exit_status


def run(*args, **kw):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, **kw)


ENTRY_POINTS = {name: importlib.import_module(module).main for name, module in [
    ("kpscale.data", "kpscale.data.__main__"), ("kpscale.bench", "kpscale.bench.__main__"),
    ("kpscale.train", "kpscale.train.__main__"), ("kpscale.tune", "kpscale.tune.__main__"),
    ("kpscale.predict", "kpscale.predict"), ("kpscale.evaluate", "kpscale.evaluate.__main__"),
    ("kpscale.compare", "kpscale.compare")]}


@pytest.mark.parametrize("command", [
    ["kpscale.data"], ["kpscale.data", "build"], ["kpscale.data", "convert"], ["kpscale.data", "stream"],
    ["kpscale.bench"], ["kpscale.bench", "data"], ["kpscale.bench", "train"], ["kpscale.bench", "evaluate"],
    ["kpscale.bench", "dynamics"], ["kpscale.bench", "swap"], ["kpscale.bench", "gpu"], ["kpscale.train"], ["kpscale.tune"], ["kpscale.predict"], ["kpscale.evaluate"],
    ["kpscale.compare"]], ids=" ".join)
def test_every_entry_point_has_help(command, capsys):
    assert exit_status(ENTRY_POINTS[command[0]], *command[1:], "--help") == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m {command[0]}")


def test_stream_reports_batches(basketball):
    result = run("kpscale.data", "stream", str(basketball / "train"), "--window", "8", "batch_size=5", "num_workers=1")
    assert result.returncode == 0, result.stderr
    assert "50 clips in 4 shards, 10 batches per epoch" in result.stdout
    assert "video [5, 8, 3, 64, 64]" in result.stdout and "coords [5, 8, 6, 2]" in result.stdout
    assert "skipped: none" in result.stdout


def test_bad_input_gets_one_clear_line(tmp_path, capsys):
    for command, words in [
            (["kpscale.data", "build", str(CARD), "--out", str(tmp_path), "splits.train=-3"], ["splits", "-3"]),
            (["kpscale.data", "stream", str(tmp_path / "none")], ["no shards found", str(tmp_path / "none")]),
            (["kpscale.bench", "dynamics", "model.nope=1"], ["model.nope"]),
            (["kpscale.bench", "dynamics", "--dots", "0"], ["--dots"])]:
        assert exit_status(ENTRY_POINTS[command[0]], *command[1:]) == 2, command
        err = capsys.readouterr().err
        assert "error: " in err and all(w in err for w in words), (command, err)


@pytest.mark.slow
def test_data_benchmark_prints_side_by_side_ratios(tmp_path):
    result = run("kpscale.bench", "--json", str(tmp_path / "b.json"), "data", "--clips", "32", "--epochs", "1",
                 "--quality-clips", "2", "--batch-size", "8")
    assert result.returncode == 0, result.stderr
    assert "smaller than raw npz" in result.stdout and "x its clips/s" in result.stdout
    import json
    figures = json.loads((tmp_path / "b.json").read_text())
    sizes = figures["bytes_per_clip"]
    assert sizes["npz (raw uint8, official)"] > 10 * sizes["shards (mp4)"]
    assert all(v > 0 for v in figures["clips_per_s"].values())


@pytest.mark.slow
def test_train_benchmark_prints_side_by_side_ratios(tmp_path):
    result = run("kpscale.bench", "--json", str(tmp_path / "b.json"), "train", "--clips", "32", "--steps", "8", "--zero-steps", "2",
                 "--zero-stages", "3", *TINY_MODEL, "data.batch_size=4", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ratio" in result.stdout and "x what a step consumes" in result.stdout
    import json
    figures = json.loads((tmp_path / "b.json").read_text())
    assert figures["bare_clips_per_s"] > 0 and figures["ray_deepspeed_clips_per_s"] > 0
    assert set(figures["peak_memory_mb"]) == {"3"} and min(figures["peak_memory_mb"].values()) > 100


def test_gpu_benchmark_needs_no_ray_nor_mlflow_and_says_when_there_is_no_gpu():
    """`bench gpu` runs on a lent GPU machine where Ray and MLflow are not installed (the Ray Train
    path is `bench train`'s); without a GPU it says what to do instead."""
    probe = ("import sys; from kpscale.bench.__main__ import main; status = main(['gpu']); "
             "print(status, [m for m in ('ray', 'mlflow', 'dm_control') if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the no-GPU message is not shown")
    assert result.stdout.split()[0] == "2" and result.stdout.strip().endswith("[]"), result.stdout
    assert "no CUDA device" in result.stderr and "--device cpu" in result.stderr


@pytest.mark.slow
def test_gpu_benchmark_runs_every_part_small_on_the_cpu(tmp_path):
    """`--device cpu`: each case of each part runs (tiny model, aot_eager for the compiled ones),
    the DeepSpeed rows are set against the bare loop's, and mp4 frames decode in both encodings."""
    import json

    result = run("kpscale.bench", "--json", str(tmp_path / "b.json"), "gpu", "--device", "cpu", "--steps", "1",
                 "train.compile_backend=aot_eager", *TINY_MODEL, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads((tmp_path / "b.json").read_text())
    steps = figures["steps"]
    assert list(steps) == ["bare fp32, batch 2", "bare bf16, batch 2", "bare bf16 compiled, batch 2",
                           "DeepSpeed bf16 ZeRO-0, batch 2", "DeepSpeed bf16 ZeRO-2, batch 2",
                           "DeepSpeed bf16 ZeRO-2 compiled, batch 2"], steps
    assert all(case["clips_per_s"] > 0 for case in steps.values()), steps
    assert all(case["of_bare"] > 0 for name, case in steps.items() if name.startswith("DeepSpeed"))
    assert set(figures["decode_frames_per_s"]) == {"yuv444p on cpu", "yuv420p on cpu"}
    assert min(figures["decode_frames_per_s"].values()) > 100
    reader = figures["reader"]  # what feeding the fastest case takes
    fastest = max(steps, key=lambda name: steps[name]["clips_per_s"])
    assert reader["fastest_case"] == fastest
    assert reader["frames_per_s_needed"] == pytest.approx(steps[fastest]["clips_per_s"] * 8)  # TINY_MODEL's window
    assert reader["cpu_decode_threads"] == pytest.approx(
        reader["frames_per_s_needed"] / figures["decode_frames_per_s"]["yuv444p on cpu"])
    assert "clips/s" in result.stdout and "of bare" in result.stdout and "CPU threads decoding" in result.stdout


def test_dynamics_toy_and_its_baselines():
    """Dots on a straight path: constant velocity is exact, holding still lags by speed * steps."""
    import torch

    from kpscale.bench.dynamics import SIZE, baselines, bouncing_dots
    dots = bouncing_dots(64, 16, 3, torch.Generator().manual_seed(0))
    assert dots.shape == (64, 16, 3, 3) and (dots[..., 2] == 1).all()
    xy = (dots[..., :2] + 1) * SIZE / 2
    assert xy.min() >= 4 and xy.max() <= SIZE - 4  # reflected at the walls, never through them
    speed = (xy[:, 1:] - xy[:, :-1]).norm(dim=-1)
    straight = (speed.amax(1) - speed.amin(1) < 1e-3).all(-1)  # windows with no bounce
    assert 0 < straight.sum() < 64
    figures = baselines(dots[straight], observed=8)
    assert figures["constant_velocity"] == pytest.approx(0, abs=1e-3)
    assert figures["hold"] == pytest.approx(speed[straight].mean().item() * 4.5, rel=1e-3)  # mean of 1..8 steps ahead


@pytest.mark.slow
def test_the_default_dynamics_learn_the_toy_motion(tmp_path):
    """The default config's VRNN, fed ground-truth dots for 300 steps, predicts them far better
    than holding still (best of 10: ~3.8 px against 8.2; the paper's dynamics at beta 0.01
    reach 6.8, at beta 1 12.1, docs/benchmarks.md)."""
    result = run("kpscale.bench", "--json", str(tmp_path / "b.json"), "dynamics", "--beta", "0.01",
                 "--steps", "300", "--windows", "100", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    import json
    figures = json.loads((tmp_path / "b.json").read_text())
    hold, model = figures["baselines"]["hold"], figures["models"]["beta=0.01"]
    assert model["best_predicted"] < 0.6 * hold, (model, hold)
    assert model["forced_predicted"] < 0.4 * hold, (model, hold)  # one step ahead from the true keypoints


def test_dynamics_benchmark_trains_each_beta_on_the_same_windows(tmp_path):
    result = run("kpscale.bench", "--json", str(tmp_path / "b.json"), "dynamics", "--beta", "1", "0", "--steps", "20",
                 "--windows", "16", "--samples", "3", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "constant velocity" in result.stdout and "beta=0 " in result.stdout
    import json
    figures = json.loads((tmp_path / "b.json").read_text())
    models = figures["models"]
    assert set(models) == {"beta=1", "beta=0"}
    for m in models.values():
        assert len(m["kl_per_step"]) == 8 and len(m["error_per_step"]) == 16
        assert m["best_predicted"] <= m["mean_predicted"]  # the best of 3 samples, per object
    assert models["beta=1"]["best_predicted"] != models["beta=0"]["best_predicted"]
