"""Where clips come from. Each source module has `plan(card, root) -> (specs per split, skipped
inputs)` and `make(card, root, split, spec) -> Clip`; specs are small and picklable so that
build processes can make any clip on their own."""

from kpscale.data.sources import basketball, folder

SOURCES = {"basketball": basketball, "folder": folder}
