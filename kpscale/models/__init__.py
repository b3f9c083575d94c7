"""The model-family registry: a config's `model.name` picks the family, which builds the
modules and says how they train (kpscale.models.family)."""

from __future__ import annotations

from typing import Annotated

from pydantic import PlainValidator, SerializeAsAny
from pydantic_core import PydanticCustomError

from kpscale.config import Config
from kpscale.models.class_conditional.family import ClassConditionalFamily
from kpscale.models.cnn_vrnn.model import CNNVRNNFamily
from kpscale.models.drnet.family import DrNetFamily
from kpscale.models.family import Family
from kpscale.models.struct_vrnn.model import StructVRNNConfig, StructVRNNFamily

FAMILIES: dict[str, type[Family]] = {
    "struct_vrnn": StructVRNNFamily,
    "cnn_vrnn": CNNVRNNFamily,
    "drnet": DrNetFamily,
    "class_conditional": ClassConditionalFamily,
}


def _model_config(value) -> Config:
    """A model section validated by the config class of the family its `name` picks
    (struct_vrnn when it names none), so a key of another family is refused as unknown."""
    if isinstance(value, Config):
        return value
    name = value.get("name", "struct_vrnn") if isinstance(value, dict) else None
    if name not in FAMILIES:
        raise PydanticCustomError("unknown_model", "model.name must be one of {known}", {"known": ", ".join(FAMILIES)})
    return FAMILIES[name].config.model_validate(value)


# What `model:` in a training config may be. The registry is read at validation time, so a
# family added to FAMILIES (a test's toy family too) is a valid `model.name` at once.
ModelConfig = Annotated[SerializeAsAny[Config], PlainValidator(_model_config)]


def build_family(cfg: Config) -> Family:
    """The family `cfg.name`, its modules built from `cfg`."""
    family = FAMILIES.get(getattr(cfg, "name", None))
    if family is None:
        raise KeyError(f"unknown model {getattr(cfg, 'name', None)!r}; known: {', '.join(FAMILIES)}")
    if not isinstance(cfg, family.config):
        raise TypeError(f"model {cfg.name!r} takes a {family.config.__name__}, got {type(cfg).__name__}")
    return family(cfg)


__all__ = ["FAMILIES", "ModelConfig", "StructVRNNConfig", "build_family"]
