"""Model registry: each model's config names it (`name`), and the name picks the model class."""

from __future__ import annotations

from typing import Annotated

from pydantic import Discriminator, Tag
from torch import nn

from kpscale.config import Config
from kpscale.models.cnn_vrnn.model import CNNVRNN, CNNVRNNConfig
from kpscale.models.struct_vrnn.model import StructVRNN, StructVRNNConfig

MODELS: dict[str, tuple[type[nn.Module], type[Config]]] = {
    "struct_vrnn": (StructVRNN, StructVRNNConfig),
    "cnn_vrnn": (CNNVRNN, CNNVRNNConfig),
}


def _family(value) -> str:
    """The tag of a model section: its `name`, struct_vrnn when it names none."""
    return value.get("name", "struct_vrnn") if isinstance(value, dict) else value.name


# What `model:` in a training config may be; its `name` picks the config class, so a key of
# another family is refused as unknown.
ModelConfig = Annotated[Annotated[StructVRNNConfig, Tag("struct_vrnn")] | Annotated[CNNVRNNConfig, Tag("cnn_vrnn")],
                        Discriminator(_family, custom_error_type="unknown_model",
                                      custom_error_message=f"model.name must be one of {', '.join(MODELS)}")]


def build_model(cfg: Config) -> nn.Module:
    """The model `cfg.name`, built from its config."""
    if getattr(cfg, "name", None) not in MODELS:
        raise KeyError(f"unknown model {getattr(cfg, 'name', None)!r}; known: {', '.join(MODELS)}")
    model_cls, config_cls = MODELS[cfg.name]
    if not isinstance(cfg, config_cls):
        raise TypeError(f"model {cfg.name!r} takes a {config_cls.__name__}, got {type(cfg).__name__}")
    return model_cls(cfg)
