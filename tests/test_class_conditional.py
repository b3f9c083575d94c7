"""Kim et al. 2019's networks (kpscale.models.class_conditional): the detector's keypoints are
its maps' expected coordinates, the translator draws only where its mask lets it, and the
motion generator's sequences follow the class and z it is given."""

import pytest
import torch
from pydantic import ValidationError

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
