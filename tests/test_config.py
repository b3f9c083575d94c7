import re

import pytest

from kpscale.config import ConfigError, apply_overrides, load, read_config
from kpscale.data.card import DatasetCard
from kpscale.data.stream import DataConfig, LoaderConfig
from conftest import CARD, ROOT


def test_overrides_take_yaml_types():
    tree = apply_overrides({"a": {"b": 1}}, ["a.b=3", "a.c=[1, 2]", "flag=true", "name=x"])
    assert tree == {"a": {"b": 3, "c": [1, 2]}, "flag": True, "name": "x"}


def test_card_loads_with_overrides():
    card = load(DatasetCard, CARD, ["splits.train=7", "resolution=128", "encoding.crf=20"])
    assert (card.splits["train"], card.resolution, card.encoding.crf) == (7, 128, 20)
    assert card.splits["test"] == 200  # untouched keys keep the file's values


@pytest.mark.parametrize("override, words", [
    ("resolution=-64", ["resolution", "-64"]),
    ("resolution=63", ["resolution", "even", "63"]),
    ("splits.train=-5", ["splits", "-5"]),
    ("clip_lenght=16", ["clip_lenght", "unknown key"]),
    ("encoding.pixel_format=rgb24", ["encoding.pixel_format", "rgb24"]),
    ("basketball.hold_frames=[9, 3]", ["basketball.hold_frames", "min <= max"]),
    ("source=folder", ["splits", "split_fractions"]),
])
def test_bad_card_values_are_named(override, words):
    with pytest.raises(ConfigError) as err:
        load(DatasetCard, CARD, [override])
    for word in words:
        assert word in str(err.value)
    assert str(CARD) in str(err.value)


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key.sub=value"):
        load(DatasetCard, CARD, ["resolution"])
    with pytest.raises(ConfigError, match="is a value"):
        load(DatasetCard, CARD, ["resolution.x=1"])
    with pytest.raises(ConfigError, match="does not exist"):
        load(DatasetCard, tmp_path / "nope.yaml")


def test_missing_shard_path_is_named(tmp_path):
    with pytest.raises(ConfigError) as err:
        load(DataConfig, None, [f"train={tmp_path}/missing"])
    assert "train" in str(err.value) and "missing" in str(err.value)
    assert load(DataConfig, None, [f"train={tmp_path}"]).train == str(tmp_path)
    # Remote URLs are not checked locally.
    assert load(DataConfig, None, ["train=s3://bucket/shards"]).train == "s3://bucket/shards"


def test_loader_config_rejects_cuda_decoding_in_workers():
    with pytest.raises(ConfigError, match="num_workers=0"):
        load(LoaderConfig, None, ["decode_device=cuda", "num_workers=2"])
    with pytest.raises(ConfigError, match="batch_size"):
        load(LoaderConfig, None, ["batch_size=0"])


def test_extends_starts_from_the_base_file_and_a_renamed_section_replaces_the_base_section(tmp_path):
    (tmp_path / "base.yaml").write_text("model:\n  name: a\n  width: 2\n  depth: 3\ntrain:\n  steps: 10\n  lr: 0.1\n")
    (tmp_path / "same.yaml").write_text("extends: base.yaml\nmodel:\n  depth: 4\ntrain:\n  lr: 0.2\n")
    (tmp_path / "other.yaml").write_text("extends: same.yaml\nmodel:\n  name: b\n  size: 5\n")
    assert read_config(tmp_path / "same.yaml") == {"model": {"name": "a", "width": 2, "depth": 4},
                                                   "train": {"steps": 10, "lr": 0.2}}
    assert read_config(tmp_path / "other.yaml") == {"model": {"name": "b", "size": 5}, "train": {"steps": 10, "lr": 0.2}}
    (tmp_path / "loop.yaml").write_text("extends: loop2.yaml\n")
    (tmp_path / "loop2.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        read_config(tmp_path / "loop.yaml")
    (tmp_path / "missing.yaml").write_text("extends: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml does not exist"):
        read_config(tmp_path / "missing.yaml")


def test_train_help_lists_every_shipped_training_config():
    import kpscale.train.__main__ as train_cli
    listed = set(re.findall(r"kpscale/models/\S+\.yaml", train_cli.__doc__))
    assert listed == {str(p.relative_to(ROOT)) for p in ROOT.glob("kpscale/models/*/configs/*.yaml")}
