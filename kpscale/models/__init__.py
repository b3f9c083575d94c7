"""Model registry: each model's config names it (`name`), and the name picks the model class."""

from __future__ import annotations

from torch import nn

from kpscale.config import Config
from kpscale.models.struct_vrnn.model import StructVRNN, StructVRNNConfig

MODELS: dict[str, tuple[type[nn.Module], type[Config]]] = {
    "struct_vrnn": (StructVRNN, StructVRNNConfig),
}


def build_model(cfg: Config) -> nn.Module:
    """The model `cfg.name`, built from its config."""
    if getattr(cfg, "name", None) not in MODELS:
        raise KeyError(f"unknown model {getattr(cfg, 'name', None)!r}; known: {', '.join(MODELS)}")
    model_cls, config_cls = MODELS[cfg.name]
    if not isinstance(cfg, config_cls):
        raise TypeError(f"model {cfg.name!r} takes a {config_cls.__name__}, got {type(cfg).__name__}")
    return model_cls(cfg)
