"""Kim et al. 2019's networks (kpscale.models.class_conditional): the detector's keypoints are
its maps' expected coordinates, the translator draws only where its mask lets it, and the
motion generator's sequences follow the class and z it is given."""

import json
import logging
import tarfile

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from kpscale.models.class_conditional.family import (ClassConditionalFamily, frame_pairs, keypoints_from_pixels,
                                                     keypoints_to_pixels)
from kpscale.evaluate.snapshot import fixed_batches
from kpscale.models.class_conditional.model import ClassConditional, ClassConditionalConfig, soft_argmax
from kpscale.models.keypoints import coordinate_grid

SMALL = dict(num_keypoints=5, filters=8, lstm_size=16, latent_size=4)


def test_soft_argmax_finds_a_peak_at_its_pixel():
    logits = torch.full((2, 3, 16, 16), -50.0)
    peaks = [(2, 13), (8, 8), (15, 0)]  # (row, column)
    for k, (row, col) in enumerate(peaks):
        logits[:, k, row, col] = 50.0
    grid = coordinate_grid(16, 16)  # (x, y) of each pixel centre
    expected = torch.stack([grid[:, row, col] for row, col in peaks])
    torch.testing.assert_close(soft_argmax(logits), expected.expand(2, -1, -1))


def test_translator_output_is_the_mask_blend_of_reference_and_drawing():
    torch.manual_seed(0)
    model = ClassConditional(ClassConditionalConfig(**SMALL))
    reference = torch.rand(3, 3, 64, 64)
    keypoints = torch.rand(3, 5, 2) * 2 - 1
    out, drawn, mask = model.translator(reference, keypoints, keypoints.roll(1, 0))
    assert mask.shape == (3, 1, 64, 64) and 0 <= mask.min() and mask.max() <= 1
    torch.testing.assert_close(out, mask * reference + (1 - mask) * drawn)
    # A mask driven to 1 passes the reference frame through, whatever is drawn.
    with torch.no_grad():
        model.translator.decode[-1].bias[3] = 1e4
    out, _, mask = model.translator(reference, keypoints, keypoints.roll(1, 0))
    assert mask.min() == 1
    torch.testing.assert_close(out, reference)


def test_the_target_keypoints_change_the_translation():
    torch.manual_seed(0)
    model = ClassConditional(ClassConditionalConfig(**SMALL))  # training mode, as stage 1 runs it
    reference = torch.rand(2, 3, 64, 64)
    keypoints = torch.rand(2, 5, 2) * 2 - 1
    same = model.translator(reference, keypoints, keypoints)[0]
    moved = model.translator(reference, keypoints, keypoints + 0.5)[0]
    assert (same - moved).abs().mean() > 1e-3


def test_motion_follows_the_class_and_z():
    torch.manual_seed(0)
    generator = ClassConditional(ClassConditionalConfig(**SMALL)).motion_generator
    first = torch.rand(4, 5, 2) * 2 - 1
    z = torch.randn(4, 4)
    walk, wave = torch.zeros(4, dtype=torch.long), torch.full((4,), 3)
    base = generator.decode(z, first, walk, 10)
    assert base.shape == (4, 10, 5, 2) and base.abs().max() <= 1
    torch.testing.assert_close(generator.decode(z, first, walk, 10), base)  # a function of (z, first, class)
    assert (generator.decode(z, first, wave, 10) - base).abs().mean() > 1e-3  # only the class changed
    assert (generator.decode(torch.randn(4, 4), first, walk, 10) - base).abs().mean() > 1e-3  # only z changed


def test_kl_is_the_gaussian_posteriors_divergence_from_the_prior():
    torch.manual_seed(0)
    generator = ClassConditional(ClassConditionalConfig(**SMALL)).motion_generator
    sequence, first, label = torch.rand(3, 7, 5, 2) * 2 - 1, torch.rand(3, 5, 2), torch.tensor([0, 1, 5])
    mean, log_var = generator.encode(sequence, first, label)
    posterior = torch.distributions.Normal(mean, (0.5 * log_var).exp())
    prior = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expected = torch.distributions.kl_divergence(posterior, prior).sum(-1).mean()
    torch.testing.assert_close(generator(sequence, first, label)["kl"], expected)


def test_labels_become_class_indices_and_an_unknown_one_is_named():
    cfg = ClassConditionalConfig()
    assert cfg.class_index(["wave", "walk", "kick"]).tolist() == [2, 0, 5]
    with pytest.raises(ValueError, match=r"\['dance'\]; model.classes are \['walk', 'run'"):
        cfg.class_index(["walk", "dance"])


def test_generation_starts_from_the_given_frame_and_its_keypoints():
    torch.manual_seed(0)
    model = ClassConditional(ClassConditionalConfig(**SMALL)).eval()
    frames = torch.rand(2, 3, 64, 64)
    video, keypoints = model.generate(frames, torch.tensor([1, 4]), steps=3)
    assert video.shape == (2, 4, 3, 64, 64) and keypoints.shape == (2, 4, 5, 2)
    torch.testing.assert_close(video[:, 0], frames)
    torch.testing.assert_close(keypoints[:, 0], model.detector(frames))


@pytest.mark.parametrize("overrides, words", [
    ({"reconstruction": "vgg19"}, ["vgg19_weights", "nothing is downloaded"]),
    ({"pair_gap": (5, 2)}, ["pair_gap", "[5, 2]"]),
    ({"classes": ("walk", "walk")}, ["classes", "two different names"]),
])
def test_bad_configs_are_refused_naming_the_key(overrides, words):
    with pytest.raises(ValidationError) as err:
        ClassConditionalConfig(**overrides)
    assert all(word in str(err.value) for word in words), str(err.value)


# The family: stage 1's pairs, the pseudo-label shards stage 2 streams, and optimisers that each
# move only what they own.

FAMILY = dict(SMALL, generated=6, pair_gap=(2, 4))


def test_frame_pairs_are_a_gap_apart_within_each_clip():
    video = torch.arange(5 * 7, dtype=torch.float).view(5, 7, 1, 1, 1).expand(5, 7, 3, 2, 2)  # frame t of clip b: 7b + t
    torch.manual_seed(0)
    for _ in range(20):
        reference, target = frame_pairs(video, (2, 4))
        clip, start = reference[:, 0, 0, 0].div(7, rounding_mode="floor"), reference[:, 0, 0, 0] % 7
        assert torch.equal(clip, torch.arange(5.0))  # the same clip
        gap = target[:, 0, 0, 0] - reference[:, 0, 0, 0]
        assert ((2 <= gap) & (gap <= 4)).all() and (start + gap <= 6).all()


@pytest.mark.parametrize("map_size", [16, 64])
def test_pixels_and_keypoints_convert_both_ways(map_size):
    from kpscale.evaluate.media import keypoint_pixels

    keypoints = torch.rand(3, 5, 2) * 2 - 1
    pixels = keypoints_to_pixels(keypoints, map_size, 64)
    torch.testing.assert_close(keypoints_from_pixels(pixels, map_size, 64), keypoints)
    torch.testing.assert_close(pixels, torch.from_numpy(keypoint_pixels(keypoints, map_size, 64)))
    corners = keypoints_to_pixels(torch.tensor([[-1.0, 1.0], [1.0, -1.0]]), map_size, 64)
    cell = 64 / map_size
    assert corners.tolist() == [[cell / 2] * 2, [64 - cell / 2] * 2]  # the top-left and bottom-right cells' centres


@pytest.fixture(scope="module")
def tiny_actors(tmp_path_factory):
    from kpscale.config import load
    from kpscale.data.build import build
    from kpscale.data.card import DatasetCard
    from conftest import ROOT

    out = tmp_path_factory.mktemp("actors")
    card = load(DatasetCard, ROOT / "datasets" / "actors.yaml",
                ["workers=1", "splits={train: 12, test: 6}", "clip_length=10", "clips_per_shard=6"])
    build(card, out, progress=False)
    return out


def test_pseudo_label_shards_hold_the_detectors_keypoints_and_read_back(tiny_actors, tmp_path):
    from kpscale.data.derived import PROVENANCE, derive_shards
    from kpscale.data.shards import MANIFEST, read_manifest
    from kpscale.data.stream import ClipLoader, DataConfig
    from kpscale.data.video import decode_window

    torch.manual_seed(0)
    family = ClassConditionalFamily(ClassConditionalConfig(**FAMILY))
    family.root.train()  # derive must use the detector in eval mode whatever mode it is in
    out = str(tmp_path / "pseudo_labels")
    provenance = {"name": "pseudo_labels", "weights": "a"}
    derive_shards(str(tiny_actors / "train"), out, lambda v: family.derive("pseudo_labels", v), provenance)
    assert family.root.detector.training
    rows = read_manifest(tmp_path / "pseudo_labels" / MANIFEST).to_pylist()
    source = read_manifest(tiny_actors / "train" / MANIFEST).to_pylist()
    assert [(r["key"], r["label"]) for r in rows] == [(r["key"], r["label"]) for r in source]
    assert {r["objects"] for r in rows} == {5} and {r["frames"] for r in source} == {10}
    assert json.loads((tmp_path / "pseudo_labels" / PROVENANCE).read_text())["weights"] == "a"

    cfg = DataConfig(batch_size=4, num_workers=0, shuffle=False, random_window=False, frames=False)
    batches = list(ClipLoader(out, cfg, window=7))
    assert len(batches) == 3 and all("video" not in b for b in batches)
    batch = batches[0]
    assert batch["coords"].shape == (4, 7, 5, 2) and batch["label"] == [r["label"] for r in source[:4]]
    # The coords are the detector's keypoints of the clip's frames, which the shards still hold as they were.
    with tarfile.open(tiny_actors / "train" / "shard-000000.tar") as tar:
        mp4 = tar.extractfile(f"{source[0]['key']}.mp4").read()
    frames = decode_window(mp4, None, None)[0].float() / 255
    with torch.no_grad():
        want = keypoints_to_pixels(family.root.eval().detector(frames[:7]), 64, 64)
    torch.testing.assert_close(batch["coords"][0], want, atol=1e-4, rtol=0)
    video = next(iter(ClipLoader(out, cfg.model_copy(update={"frames": True}), window=7)))["video"]
    torch.testing.assert_close(video[0], frames[:7])
    assert torch.equal(family.pseudo_labels(batch), keypoints_from_pixels(batch["coords"], 64, 64))

    shard = tmp_path / "pseudo_labels" / "shard-000000.tar"
    written = shard.stat().st_mtime_ns
    derive_shards(str(tiny_actors / "train"), out, lambda v: family.derive("pseudo_labels", v), provenance)
    assert shard.stat().st_mtime_ns == written  # the same model's labels: reused
    derive_shards(str(tiny_actors / "train"), out, lambda v: family.derive("pseudo_labels", v),
                  {**provenance, "weights": "b"})
    assert shard.stat().st_mtime_ns != written  # another model's: written again
    with pytest.raises(ValueError, match=r"pseudo-label shards with 3 keypoints.*these clips have 5"):
        ClassConditionalFamily(ClassConditionalConfig(**{**FAMILY, "num_keypoints": 3})).pseudo_labels(batch)


def _stage_batches(stage):
    g = torch.Generator().manual_seed(7)
    if stage == "translation":
        return [{"video": torch.rand(4, 7, 3, 64, 64, generator=g)} for _ in range(3)]
    return [{"coords": torch.rand(4, 7, 5, 2, generator=g) * 63 + 0.5, "label": ["walk", "wave", "kick", "run"]}
            for _ in range(3)]


@pytest.mark.parametrize("stage", ["translation", "motion"])
def test_each_discriminators_loss_moves_only_its_own_engines_parameters(stage, monkeypatch):
    """The loop's two optimiser steps under ZeRO-0 (where a gradient one loss leaves in another
    optimiser's parameters would be added silently to that optimiser's step) against plain
    PyTorch with every gradient dropped before each optimiser's backward pass."""
    from kpscale.train.config import load_train_config
    from kpscale.train.engine import build_engine
    from kpscale.train.loop import optimiser_steps
    from test_train import _init_single_process

    _init_single_process(monkeypatch, 29740 + (stage == "motion"))
    cfg = load_train_config(None, ["model={name: class_conditional, num_keypoints: 5, filters: 8, lstm_size: 16, "
                                   "latent_size: 4, generated: 6, pair_gap: [2, 4]}", "train.zero_stage=0",
                                   "train.lr_schedule=constant", "train.warmup_steps=1", "train.grad_clip=0",
                                   "train.weight_decay=0", "train.lr=0.01", "train.steps=3", "data.batch_size=4"])
    order = ClassConditionalFamily.stages[stage == "motion"].optimisers
    batches = _stage_batches(stage)
    torch.manual_seed(3)
    family = ClassConditionalFamily(cfg.model)
    before = {k: v.clone() for k, v in family.root.state_dict().items()}
    engines = {name: build_engine(family.optimiser(name), cfg, bf16=False, steps=3) for name in order}
    trainable = {n: [p for p in e.module.parameters() if p.requires_grad] for n, e in engines.items()}
    lrs = []
    torch.manual_seed(4)
    for step, batch in enumerate(batches):
        lrs.append(engines[order[0]].get_lr()[0])
        optimiser_steps(family, stage, engines, trainable, batch, step)
    assert lrs[0] == 0 and lrs[-1] > 0  # the warm-up starts at 0

    torch.manual_seed(3)
    reference = ClassConditionalFamily(cfg.model)
    optimisers = {name: torch.optim.Adam(reference.losses[name].parameters(), betas=(0.5, 0.999)) for name in order}
    torch.manual_seed(4)
    for step, (batch, lr) in enumerate(zip(batches, lrs)):
        outputs = {}
        for name in order:
            reference.root.zero_grad(set_to_none=True)  # what another optimiser's loss left
            for group in optimisers[name].param_groups:
                group["lr"] = lr
            outputs[name] = reference.loss(stage, name, reference.losses[name], batch, step, outputs)
            outputs[name]["loss"].backward()
            optimisers[name].step()
    after, want = family.root.state_dict(), reference.root.state_dict()
    for key in after:
        torch.testing.assert_close(after[key], want[key], rtol=1e-4, atol=1e-6, msg=key)
    moved = {key.split(".")[0] for key in after if not torch.equal(after[key], before[key])}
    assert moved == ({"detector", "translator", "image_discriminator"} if stage == "translation"
                     else {"motion_generator", "sequence_discriminator"})


def test_predict_animates_one_image_as_the_named_action_and_refuses_an_unknown_one(tmp_path, capsys):
    from PIL import Image

    from kpscale.data.video import decode_mp4
    from kpscale.predict import main
    from kpscale.train.config import load_train_config

    cfg = load_train_config(None, ["model={name: class_conditional, num_keypoints: 5, filters: 8, lstm_size: 16, "
                                   "latent_size: 4, generated: 6, pair_gap: [2, 4]}"])
    torch.manual_seed(0)
    (tmp_path / "config.yaml").write_text(cfg.to_yaml())
    torch.save(ClassConditionalFamily(cfg.model).root.state_dict(), tmp_path / "weights.pt")
    Image.fromarray((torch.rand(80, 96, 3) * 255).byte().numpy()).save(tmp_path / "frame.png")
    args = ["--run", str(tmp_path), "--image", str(tmp_path / "frame.png"), "--future", "5", "--samples", "2"]
    assert main([*args, "--label", "wave", "--out", str(tmp_path / "wave.mp4")]) == 0
    video = decode_mp4(tmp_path / "wave.mp4")
    assert video.shape[0] == 6 and video.shape[-1] == 3 * 64  # the frame, then 5 generated, input + 2 samples
    assert main([*args, "--label", "dance", "--out", str(tmp_path / "x.mp4")]) == 2
    err = capsys.readouterr().err
    assert "unknown action label(s) ['dance']" in err and "'wave'" in err
    assert main([*args, "--out", str(tmp_path / "x.mp4")]) == 2
    assert "--label" in capsys.readouterr().err


def test_the_separation_term_is_opt_in_and_reaches_the_detector():
    from kpscale.models.struct_vrnn.model import separation_loss

    torch.manual_seed(0)
    frames = torch.rand(4, 7, 3, 64, 64)
    plain = ClassConditionalFamily(ClassConditionalConfig(**FAMILY))
    assert "separation" not in plain.losses["main"](frames[:, 0], frames[:, 3])["terms"]
    family = ClassConditionalFamily(ClassConditionalConfig(**FAMILY, separation_weight=10.0))
    out = family.losses["main"](frames[:, 0], frames[:, 3])
    reference, target = family.root.detector(torch.cat([frames[:, 0], frames[:, 3]])).chunk(2)
    want = separation_loss(torch.stack([reference, target], 1), 0.1)
    assert out["terms"]["separation"].item() == pytest.approx(want.item(), rel=1e-5) and want.item() > 0
    grads = torch.autograd.grad(out["terms"]["separation"], list(family.root.detector.parameters()), allow_unused=True)
    assert sum(g.abs().sum() for g in grads if g is not None) > 0
    torch.testing.assert_close(out["loss"], 10 * out["terms"]["reconstruction"] + out["terms"]["adversarial"]
                               + 10 * out["terms"]["separation"])


def test_the_motion_term_weighs_the_pixels_that_moved_and_is_opt_in():
    from kpscale.models.class_conditional.family import motion_l1

    reference = torch.zeros(1, 3, 64, 64)
    target = reference.clone()
    target[..., 10:14, 20:24] = 1.0  # a 4x4 limb moved in: 16 of 4096 pixels
    # Copying the reference costs as much as a frame wrong everywhere (plain L1: 16 / 4096 of that).
    assert motion_l1(reference, target, reference).item() == pytest.approx(1.0)
    assert motion_l1(target, target, reference).item() == 0
    elsewhere = target.clone()
    elsewhere[..., 40:, 40:] = 0.5  # wrong only where nothing moved: free for this term
    assert motion_l1(elsewhere, target, reference).item() == 0
    torch.manual_seed(0)
    frames = torch.rand(4, 7, 3, 64, 64)
    assert "motion" not in ClassConditionalFamily(ClassConditionalConfig(**FAMILY)).losses["main"](
        frames[:, 0], frames[:, 3])["terms"]
    out = ClassConditionalFamily(ClassConditionalConfig(**FAMILY, motion_weight=5.0)).losses["main"](
        frames[:, 0], frames[:, 3])
    torch.testing.assert_close(out["loss"], 10 * out["terms"]["reconstruction"] + out["terms"]["adversarial"]
                               + 5 * out["terms"]["motion"])


def test_evaluation_recognises_each_class_of_generated_videos_and_draws_the_figures(tiny_actors, tmp_path,
                                                                                     monkeypatch):
    """The motion stage's evaluation on held-out clips: every first frame animated as every class
    and judged batch by batch (the confusion matrix counts them all), the judge's accuracy on real
    clips beside it, the tracking error beside its null model, FVD per class where I3D weights are
    given, and the figures: the confusion matrix, and the diversity grid whose rows each start with
    their first frame."""
    from PIL import Image

    from kpscale.evaluate.i3d import I3D
    from kpscale.evaluate.media import to_rgb
    from kpscale.models.class_conditional import evaluation
    from kpscale.train.config import load_train_config

    monkeypatch.setenv("KPSCALE_CACHE", str(tmp_path / "cache"))  # the judge trains once, here
    # A judge of a few steps: this is the evaluation's wiring (the judge's own tests train it properly).
    monkeypatch.setattr(evaluation, "JUDGE", {"steps": 5, "batch_size": 8})
    i3d_weights = tmp_path / "i3d.pt"  # random: this is the FVD's wiring (tests/test_fvd.py tests FVD)
    torch.manual_seed(1)
    i3d = I3D()
    for m in i3d.modules():  # PyTorch's default init leaves random I3D logits nearly constant
        if isinstance(m, torch.nn.Conv3d):
            torch.nn.init.kaiming_normal_(m.weight)
    torch.save(i3d.state_dict(), i3d_weights)
    cfg = load_train_config(None, [
        "model={name: class_conditional, num_keypoints: 5, filters: 8, lstm_size: 16, latent_size: 4, "
        "generated: 8, pair_gap: [2, 4]}", f"data.train={tiny_actors / 'train'}",
        # The training clips as the held-out ones: 12, two of a class, so FVD has a Gaussian per class.
        f"data.test={tiny_actors / 'train'}", "data.batch_size=3", "data.num_workers=0", "train.eval_clips=12",
        f"train.i3d={i3d_weights}"])
    torch.manual_seed(0)
    family = ClassConditionalFamily(cfg.model)
    assert family.figures(str(tmp_path)) == []  # nothing evaluated yet
    metrics, video = family.evaluate(cfg, "translation", torch.device("cpu"), torch.float32)
    assert set(metrics) == {"tracking_error", "tracking_error_null", "psnr_translation"}
    assert 0 < metrics["tracking_error"] and 0 < metrics["tracking_error_null"]
    metrics, video = family.evaluate(cfg, "motion", torch.device("cpu"), torch.float32)
    assert all(0 <= metrics[f"recognition_accuracy{kind}"] <= 1
               for kind in ("", "_real", "_keypoints", "_keypoints_real", "_drawn"))
    # The diagnostics per class: the generated keypoints 12 sequences a class (one per first frame),
    # the drawn test clips as many as the 12 test clips hold of each; the overall figure counts the
    # same clips.
    test_labels = [label for b in fixed_batches(cfg.data.test, cfg.data, cfg.window, 12) for label in b["label"]]
    for diagnostic, counts in (("_keypoints", [12] * 6), ("_drawn", [test_labels.count(c) for c in cfg.model.classes])):
        recognised = []
        for name, count in zip(cfg.model.classes, counts):
            value = metrics[f"recognition_accuracy{diagnostic}/{name}"]
            assert np.isnan(value) if count == 0 else value * count == pytest.approx(round(value * count))
            recognised.append(0 if count == 0 else value * count)
        assert metrics[f"recognition_accuracy{diagnostic}"] == pytest.approx(sum(recognised) / sum(counts))
    assert "keypoint motion alone" in family.describe(metrics)
    assert "drawing of real clips' motion" in family.describe(metrics)
    confusion = family.evaluated["confusion"]
    assert confusion.shape == (6, 6) and confusion.sum(1).tolist() == [12] * 6  # each of 12 first frames
    assert metrics["recognition_accuracy"] == confusion.diag().sum().item() / 72
    assert [metrics[f"recognition_accuracy/{name}"] for name in cfg.model.classes] == (confusion.diag() / 12).tolist()
    # FVD for each class the 6 test clips hold twice or more (a Gaussian needs two), and their mean.
    compared = [c for c in cfg.model.classes if test_labels.count(c) > 1]
    assert compared and set(k for k in metrics if k.startswith("fvd")) == {"fvd", *(f"fvd/{c}" for c in compared)}
    assert all(np.isfinite(metrics[f"fvd/{c}"]) and metrics[f"fvd/{c}"] > 0 for c in compared)
    weakest = cfg.model.classes[confusion.diag().argmin()]
    assert f"the weakest class, {weakest}, {100 * confusion.diag().min().item():.1f}%" in family.describe(metrics)
    assert metrics["diversity_px"] > 0  # an untrained generator's draws differ with z
    # A row per class, a column per shown clip, 1 + 8 frames.
    assert video.shape == (9, 6 * 66, evaluation.SHOWN * 66, 3)
    paths = family.figures(str(tmp_path))
    assert [p.name for p in paths] == ["recognition_confusion.png", "diversity.png"]
    grid = np.asarray(Image.open(paths[1]))
    rows = evaluation.DIVERSITY_FIGURE_CLIPS * evaluation.DIVERSITY_SAMPLES
    assert grid.shape == (rows * 66, (1 + evaluation.DIVERSITY_FIGURE_STEPS) * 66, 3)
    firsts = torch.cat([b["video"][:, 0] for b in fixed_batches(cfg.data.test, cfg.data, cfg.window, 12)])
    for row in range(rows):  # each z's row starts with its first frame
        np.testing.assert_array_equal(grid[row * 66:row * 66 + 64, :64],
                                      to_rgb(firsts[row // evaluation.DIVERSITY_SAMPLES][None])[0])


def test_fvd_per_class_compares_each_class_with_its_real_clips():
    from kpscale.evaluate.fvd import fvd
    from kpscale.models.class_conditional.evaluation import fvd_per_class

    torch.manual_seed(0)
    classes = ("walk", "wave", "jump")
    labels = torch.tensor([0, 1, 2] * 8 + [2])  # 8, 8 and 9 real clips
    real = torch.randn(25, 16, dtype=torch.float64) + labels[:, None] * 3.0  # each class apart
    own = torch.stack([real[labels == c][:8] for c in range(3)])  # "generated": each class's own real clips
    same = fvd_per_class(real, labels, own, classes)
    assert same["fvd/walk"] == pytest.approx(0, abs=1e-6) and same["fvd/wave"] == pytest.approx(0, abs=1e-6)
    assert same["fvd/jump"] == pytest.approx(fvd(real[labels == 2], own[2]))  # 8 of its 9 clips: near, not 0
    assert same["fvd"] == pytest.approx(sum(same[f"fvd/{c}"] for c in classes) / 3)
    swapped = fvd_per_class(real, labels, own.roll(1, 0), classes)  # each class given another's clips
    assert all(swapped[f"fvd/{c}"] > 10 * max(same.values()) for c in classes), (same, swapped)
    assert set(fvd_per_class(real, labels.clamp(max=1), own, classes)) == {"fvd", "fvd/walk", "fvd/wave"}


def test_fvd_is_said_unavailable_once_without_i3d_weights(monkeypatch, caplog):
    from kpscale.evaluate.i3d import ENV_VAR
    from kpscale.models.class_conditional import evaluation
    from kpscale.train.config import load_train_config

    cfg = load_train_config(None, ["model={name: class_conditional, generated: 8, pair_gap: [2, 4]}"])
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr(evaluation, "_SAID", set())  # as in a fresh process
    caplog.set_level(logging.WARNING, logger=evaluation.__name__)
    for _ in range(2):
        assert evaluation._i3d(cfg, torch.device("cpu")) is None
    assert caplog.text.count("FVD is unavailable: no weights given") == 1 and "train.i3d=PATH" in caplog.text
    cfg.train.i3d = "/nonexistent/i3d.pt"
    assert evaluation._i3d(cfg, torch.device("cpu")) is None
    assert "weights file /nonexistent/i3d.pt not found" in caplog.text


def test_the_paper_config_holds_the_papers_settings(tiny_actors):
    """paper_penn_action.yaml against the paper (lambda_1..3, Sec. 3.2) and the official code
    (../shared/reference/official-implementations.md), whatever the CPU config it extends sets."""
    from conftest import ROOT
    from kpscale.train.config import load_train_config

    cfg = load_train_config(ROOT / "kpscale/models/class_conditional/configs/paper_penn_action.yaml",
                            [f"data.train={tiny_actors / 'train'}", "model.vgg19_weights=vgg19-dcbb9e9d.pth"])
    m = cfg.model
    assert (m.image_size, m.num_keypoints, m.heatmap_size, m.pair_gap) == (128, 40, 128, (8, 11))
    assert (m.reconstruction, m.reconstruction_weight, m.l1_weight, m.sequence_adversarial_weight) == \
        ("vgg19", 1.0, 1000.0, 2.0)
    assert (m.lstm_size, m.latent_size, m.generated, m.kl_weight, m.adam_beta1) == (1024, 64, 32, 1.0, 0.5)
    assert (m.separation_weight, m.motion_weight) == (0.0, 0.0)  # kpscale's terms off
    assert (cfg.train.lr, cfg.data.batch_size) == (1e-4, 16)
