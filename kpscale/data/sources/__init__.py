"""Where clips come from. Each source module has `plan(card, root) -> (specs per split, skipped
inputs)` and `make(card, root, split, spec) -> Clip`; specs are small and picklable so that
build processes can make any clip on their own."""


class SourceError(ValueError):
    """Input a source cannot make clips from; the message names the file, field or package."""


# After SourceError, which the sources import from here.
from kpscale.data.sources import actors, basketball, folder, moving_mnist  # noqa: E402

SOURCES = {"basketball": basketball, "moving_mnist": moving_mnist, "actors": actors, "folder": folder}
