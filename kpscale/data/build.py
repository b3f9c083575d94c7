"""Build a dataset from a card: plan clips, write shards as parallel Ray tasks, write manifests.

Every clip is a pure function of (card, split, spec), so the output is the same for any number
of workers, and a build that was interrupted resumes: shards already on disk are complete
(they are renamed into place only when whole) and are kept; only missing ones are written.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterator

import torch
import yaml
from tqdm import tqdm

from kpscale.config import ConfigError
from kpscale.data.card import DatasetCard
from kpscale.data.shards import scan_shard, shard_name, write_manifest, write_shard
from kpscale.data.sources import SOURCES

log = logging.getLogger(__name__)
CARD_FILE = "card.yaml"
PROVENANCE = "provenance.json"  # what the card does not say: the input folder, the outcome
SOURCE_DIR = "source_dir"
# Settings that change how a build runs, not what it writes.
RUN_ONLY = {"workers"}


def _claim(out: Path, card: DatasetCard, root: str | None) -> None:
    """Record the card (and the input folder) in `out`, or check that the dataset already
    there was built from the same ones."""
    wanted = {k: v for k, v in card.model_dump(mode="json").items() if k not in RUN_ONLY}
    wanted[SOURCE_DIR] = root
    path = out / CARD_FILE
    if path.exists():
        found = {k: v for k, v in (yaml.safe_load(path.read_text()) or {}).items() if k not in RUN_ONLY}
        found[SOURCE_DIR] = json.loads((out / PROVENANCE).read_text()).get(SOURCE_DIR) \
            if (out / PROVENANCE).exists() else None
        if found != wanted:
            keys = sorted(k for k in wanted.keys() | found.keys() if wanted.get(k) != found.get(k))
            raise ConfigError(f"{out} holds a dataset built from another card or input folder "
                              f"(differs in {', '.join(keys)}); choose another --out or delete it")
        return
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / PROVENANCE, json.dumps({SOURCE_DIR: root}, indent=2))
    _write_atomic(path, card.to_yaml())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write(card_json: str, root: str | None, split: str, specs: list, path: str) -> list[dict]:
    torch.set_num_threads(1)  # one core per build task
    card = DatasetCard.model_validate_json(card_json)
    source = SOURCES[card.source]
    clips = (source.make(card, root, split, spec) for spec in specs)
    return write_shard(Path(path), clips, card.name, card.encoding)


def _run_on_ray(card_json: str, root: str | None, jobs: list, workers: int | None) -> Iterator[tuple[str, list[dict]]]:
    """Write the shards of `jobs` as Ray tasks, at most `workers` at a time (None: one per CPU of
    the cluster); yield (split, rows) as each finishes. Joins the Ray this process already uses,
    or the cluster of RAY_ADDRESS (set inside `ray job submit`), else starts a local Ray of
    `workers` CPUs, stopped at the end."""
    import ray

    started = not ray.is_initialized()
    if started:
        local = {} if os.environ.get("RAY_ADDRESS") else {"num_cpus": workers}
        ray.init(**local, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                 configure_logging=True)
    if workers is None:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        workers = min(cpus, len(jobs))
        log.info("the cluster has %d CPUs: %d Ray tasks at a time", cpus, workers)
    task = ray.remote(num_cpus=1, max_retries=0)(_write)
    queue, pending = list(jobs), {}
    try:
        while queue or pending:
            while queue and len(pending) < workers:  # no more at once on a cluster either
                split, chunk, path = queue.pop(0)
                pending[task.remote(card_json, root, split, chunk, str(path))] = split
            done, _ = ray.wait(list(pending), num_returns=1)
            split = pending.pop(done[0])
            yield split, ray.get(done[0])  # a task's error is raised here, with its traceback
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
        if started:
            ray.shutdown()


def build(card: DatasetCard, out: str | Path, root: str | Path | None = None, progress: bool = True) -> dict:
    """Write the dataset described by `card` under `out`. Returns {"splits": {split: {clips,
    shards, bytes}}, "skipped_inputs": [...]}, also saved in `out/provenance.json`."""
    out = Path(out)
    root = None if root is None else str(Path(root).resolve())
    specs, skipped = SOURCES[card.source].plan(card, root)  # bad input fails before `out` is touched
    _claim(out, card, root)
    jobs, rows = [], {split: [] for split in specs}
    for split, split_specs in specs.items():
        (out / split).mkdir(exist_ok=True)
        for stale in (out / split).glob("*.tmp*"):  # left by a build that was killed
            stale.unlink()
        for start in range(0, len(split_specs), card.clips_per_shard):
            path = out / split / shard_name(start // card.clips_per_shard)
            chunk = split_specs[start:start + card.clips_per_shard]
            if path.exists():
                rows[split] += scan_shard(path)
            else:
                jobs.append((split, chunk, path))
    total = sum(len(s) for s in specs.values())
    resumed = sum(len(r) for r in rows.values())
    if resumed:
        log.info("resuming: %d of %d clips already in %s", resumed, total, out)
    if card.workers or not os.environ.get("RAY_ADDRESS") or len(jobs) <= 1:
        workers = min(card.workers or os.cpu_count() or 1, max(len(jobs), 1))
        where = "in this process" if workers == 1 else f"in {workers} Ray tasks at a time"
    else:  # 0 under `ray job submit`: one per CPU of the cluster, not of the machine that submitted
        workers, where = None, "in Ray tasks on the cluster"
    log.info("building %s: %d clips in %d shards %s", card.name, total - resumed, len(jobs), where)
    card_json = card.model_dump_json()
    with tqdm(total=total, initial=resumed, desc=f"building {card.name}", unit="clip", disable=not progress) as bar:
        if workers == 1:
            for split, chunk, path in jobs:
                rows[split] += _write(card_json, root, split, chunk, str(path))
                bar.update(len(chunk))
        else:
            for split, new_rows in _run_on_ray(card_json, root, jobs, workers):
                rows[split] += new_rows
                bar.update(len(new_rows))
    splits = {}
    for split, split_rows in rows.items():
        split_rows.sort(key=lambda r: (r["shard"], r["index"]))
        write_manifest(out / split, split_rows)
        splits[split] = {"clips": len(split_rows), "shards": len({r["shard"] for r in split_rows}),
                         "bytes": sum(r["bytes"] for r in split_rows)}
    summary = {"splits": splits, "skipped_inputs": skipped}
    _write_atomic(out / PROVENANCE, json.dumps({SOURCE_DIR: root, **summary}, indent=2))
    return summary
