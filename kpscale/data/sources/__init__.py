"""Where clips come from. Each source module has `plan(card, root) -> (specs per split, skipped
inputs)` and `make(card, root, split, spec) -> Clip`; specs are small and picklable so that
build processes can make any clip on their own."""

import zlib

import numpy as np


class SourceError(ValueError):
    """Input a source cannot make clips from; the message names the file, field or package."""


def numbered(card, root=None) -> tuple[dict[str, list[int]], list[str]]:
    """A generated source's plan: clip indices per split, as many as `card.splits` says (no
    inputs, so `root` is unused)."""
    return {split: list(range(count)) for split, count in card.splits.items()}, []


def clip_rng(card, split: str, index: int) -> np.random.Generator:
    """A generated clip's random generator, seeded by (card seed, split, index) alone, so that a
    clip does not depend on which shard or process builds it."""
    return np.random.default_rng([card.seed, zlib.crc32(split.encode()), index])


# After SourceError and the helpers, which the sources import from here.
from kpscale.data.sources import actors, basketball, dmcs, folder, moving_mnist  # noqa: E402

SOURCES = {"basketball": basketball, "moving_mnist": moving_mnist, "actors": actors, "dmcs": dmcs,
           "folder": folder}
