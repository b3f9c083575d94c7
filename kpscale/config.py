"""The one config system: typed pydantic models, filled from YAML files plus dotted overrides.

Every config class derives from `Config`, which forbids unknown keys, so a typo is an error
instead of a silently ignored setting. `load` merges a YAML file with `key.sub=value`
overrides (values parsed as YAML, so `n=3`, `flag=true`, `xs=[1,2]` have their natural types)
and turns any validation failure into a `ConfigError` naming the key and the value.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

C = TypeVar("C", bound="Config")


class ConfigError(ValueError):
    """A config that cannot be used; the message names the source, the key and the value."""


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """Dotted key -> value, e.g. for logging as run parameters."""
        return _flatten(self.model_dump(mode="json"))


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from None
    return key.strip().split("."), value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `tree` with each `a.b.c=value` set; unknown keys are left for validation."""
    return with_values(tree, {".".join(path): value for path, value in map(parse_override, overrides)})


def with_values(tree: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of `tree` with each dotted key set to its value."""
    tree = _deepcopy(tree)
    for key, value in values.items():
        path, node = key.split("."), tree
        for i, part in enumerate(path):
            if isinstance(node, list):  # a list's items by index: train.stages.1.init_from=...
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"{key}: {'.'.join(path[:i])} is a list of {len(node)}, {part!r} is not "
                                      "one of its indices")
                part = int(part)
            elif not isinstance(node, dict):
                raise ConfigError(f"{key}: {'.'.join(path[:i])} is a value ({node!r}), not a section")
            if i == len(path) - 1:
                node[part] = value
            else:
                node = node.setdefault(part, {}) if isinstance(node, dict) else node[part]
    return tree


def _deepcopy(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _deepcopy(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_deepcopy(v) for v in tree]
    return tree


def parse_with_overrides(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse a command line whose `key=value` overrides may sit before or after its options;
    they are collected in `args.overrides`."""
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*getattr(args, "overrides", []), *extra]
    return args


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(tree).__name__}")
    return tree


def read_config(path: str | Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML config file. `extends: FILE` (relative to this file) starts from that file's
    settings and overrides them key by key, except that a section naming another `name` (a
    model section of another family) replaces the base's section whole."""
    path = Path(path).resolve()
    if path in seen:
        raise ConfigError(f"{path}: extends itself (via {' -> '.join(map(str, seen))})")
    tree = read_yaml(path)
    parent = tree.pop("extends", None)
    if parent is None:
        return tree
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: extends must be a file path, got {parent!r}")
    return _merge(read_config(path.parent / parent, (*seen, path)), tree)


def validate(cls: type[C], tree: dict[str, Any], source: str = "config") -> C:
    try:
        return cls.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(f"{source}: invalid config\n" + describe(exc, tree)) from None


def _key(loc: tuple, tree: Any) -> str:
    """The dotted key of an error location, without the tags pydantic inserts for a tagged
    union (`model.cnn_vrnn.num_keypoints` is the user's `model.num_keypoints`)."""
    parts = []
    for i, part in enumerate(loc):
        if isinstance(tree, dict) and part not in tree and i < len(loc) - 1:
            continue
        parts.append(str(part))
        tree = tree.get(part) if isinstance(tree, dict) else None
    return ".".join(parts)


def describe(exc: ValidationError, tree: Any = None) -> str:
    lines = []
    for err in exc.errors():
        key = _key(err["loc"], tree) or "<root>"
        if err["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (value {err['input']!r})")
        elif err["type"] == "missing":
            lines.append(f"  {key}: required key is missing")
        else:  # a section's own check names its values: its input, the whole section, would bury them
            got = "" if isinstance(err["input"], dict) else f" (got {err['input']!r})"
            lines.append(f"  {key}: {err['msg']}{got}")
    return "\n".join(lines)


def load(cls: type[C], path: str | Path | None = None, overrides: list[str] = (),
         base: dict[str, Any] | None = None) -> C:
    """Build a `cls` from `base` (defaults), then the YAML file at `path`, then `overrides`."""
    tree = _deepcopy(base or {})
    if path is not None:
        tree = _merge(tree, read_config(path))
    tree = apply_overrides(tree, list(overrides))
    source = str(path) if path is not None else cls.__name__
    if overrides:
        source += " + overrides " + " ".join(overrides)
    return validate(cls, tree, source)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` over `base`, key by key; a section of `top` with a `name` other than the base
    section's replaces it (another model family has other keys)."""
    out = dict(base)
    for key, value in top.items():
        if (isinstance(value, dict) and isinstance(out.get(key), dict)
                and value.get("name", out[key].get("name")) == out[key].get("name")):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def positive(text: str) -> int:
    """argparse type of a count given on the command line."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)
