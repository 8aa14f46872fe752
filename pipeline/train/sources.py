"""Where shards come from and who reads which: locations, the manifest, work split per epoch.

A location is a local shard folder or a URL prefix that WebDataset's gopen opens (`http://…`,
`pipe:…`). Work is split over `slots = world_size x workers` readers: every rank and worker reads
different shards (or, with fewer shards than slots, different samples), in an order that depends
only on (seed, epoch, cycle), so every process agrees on who reads what.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
from torch.utils.data import get_worker_info
from webdataset.gopen import gopen

from pipeline.schema import (
    MANIFEST_NAME,
    check_shard_path,
    load_manifest,
    max_shard_samples,
    read_json,
    split_samples,
    split_shards,
    validate_manifest,
)

log = logging.getLogger(__name__)


def is_url(location: str | Path) -> bool:
    """True for `http://…`, `pipe:…`, `file://…` and the like; False for a local path."""
    return len(urlparse(str(location)).scheme) > 1  # one letter is a Windows drive


def local_path(url: str) -> str | None:
    """The local file a shard location names (a path, or a `file://` URL read as gopen reads
    one: percent-decoded, on this host), or None for anything else."""
    if not is_url(url):
        return url
    parsed = urlparse(url)
    if parsed.scheme == "file" and parsed.netloc in ("", "localhost"):
        return url2pathname(parsed.path)
    return None


def open_manifest(location: str | Path) -> dict:
    """The manifest of a local shard folder or of a URL prefix (`URL/manifest.json` via gopen)."""
    if not is_url(location):
        return load_manifest(Path(location))
    url = f"{str(location).rstrip('/')}/{MANIFEST_NAME}"
    try:
        with gopen(url) as stream:
            data = read_json(stream)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{url}: cannot read the manifest ({exc})") from None
    validate_manifest(data, url)
    return data


def warn_if_incomplete(location: str | Path, manifest: dict) -> None:
    """Log a warning when the manifest lists zips a convert did not finish: what is there is
    usable, but it is not the whole dataset (`pipeline verify` fails on such a folder)."""
    failed = manifest.get("failed") or []
    if failed:
        names = ", ".join(str(entry.get("zip")) for entry in failed)
        log.warning(
            "%s is not a complete conversion: %d zip%s not converted (%s); reading the rest "
            "(`pipeline verify %s` says why)",
            location,
            len(failed),
            "" if len(failed) == 1 else "s",
            names,
            location,
        )


def shard_urls(location: str | Path, manifest: dict, split: str) -> list[str]:
    """The split's shards in manifest order: local paths, or URLs (base + "/" + path).

    Only the prefix the user typed may be a URL (`pipe:…`, `https://…`): each path from the
    manifest is checked again to be `SPLIT/NAME.tar`, so no manifest can run a command.
    """
    paths = [check_shard_path(split, shard["path"]) for shard in split_shards(manifest, split)]
    if is_url(location):
        base = str(location).rstrip("/")
        return [f"{base}/{rel}" for rel in paths]
    return [str(Path(location) / rel) for rel in paths]


def trainable_samples(
    location: str | Path, manifest: dict, warn: bool = True, found: list | None = None
) -> int:
    """Samples the train split's shards can give an epoch: their manifest counts, except that a
    local shard file not the size its entry says counts at most what its size can hold.

    Such a file is not the one convert wrote, so its count cannot be trusted either: an epoch
    taken from it would repeat the samples the file holds for as long as the count says. A
    warning names each one (`warn`). A shard read over http(s)://, pipe: and the like is not
    looked at before it is read. `found`, if given, gets (url, what was found) for each.
    """
    entries = split_shards(manifest, "train")
    urls = shard_urls(location, manifest, "train")
    return sum(
        _shard_capacity(url, entry, location, warn, found)
        for url, entry in zip(urls, entries, strict=True)
    )


def _shard_capacity(url: str, entry: dict, location: str | Path, warn: bool, found_list) -> int:
    """A shard's count, or for a local file of another size than `entry` says, at most what
    its size can hold (none for a file that cannot be stat'ed)."""
    path = local_path(url)
    if path is None:
        return entry["samples"]
    try:
        size = os.stat(path).st_size
        found = f"{size} bytes"
    except OSError as exc:
        size, found = None, f"cannot stat it ({exc.strerror or exc})"
    if size == entry["bytes"]:
        return entry["samples"]
    held = min(entry["samples"], max_shard_samples(size or 0))
    if found_list is not None:
        found_list.append((url, found))
    if warn:
        log.warning(
            "%s: %s, the manifest says %d bytes (cut short or changed since convert: `pipeline "
            "verify %s` says what is wrong); the steps per epoch count at most %d samples in "
            "it, not the manifest's %d",
            url,
            found,
            entry["bytes"],
            location,
            held,
            entry["samples"],
        )
    return held


def train_steps_per_epoch(
    manifest: dict, batch_size: int, world_size: int, samples: int | None = None
) -> int:
    """Batches each rank runs per epoch: floor(samples / (world_size x batch)), at least 1.

    `samples`: what the train shards can give (`trainable_samples`); the manifest's if None."""
    counted = split_samples(manifest, "train")
    samples = counted if samples is None else samples
    if samples == 0 and counted:
        raise ValueError(
            f"the train split's shard files can hold none of the {counted} samples the manifest "
            "counts (the warnings say why; `pipeline verify` the folder)"
        )
    if samples == 0:
        raise ValueError("the train split holds no samples")
    return max(1, samples // (world_size * batch_size))


def shard_order(urls: list[str], seed: int, epoch: int, cycle: int = 0) -> list[str]:
    """A permutation of `urls` that depends on (seed, epoch, cycle) only, so every slot agrees."""
    order = list(urls)
    random.Random(mix_seed(1, seed, epoch, cycle)).shuffle(order)
    return order


def assign_shards(urls: list[str], slot: int, slots: int) -> tuple[list[str], bool]:
    """This slot's shards, and whether it must also keep only every slots-th sample.

    With at least `slots` shards each slot takes every slots-th shard; with fewer, every slot
    reads them all and keeps samples with index % slots == slot, so tiny datasets still work
    with several workers and ranks, and no sample is read twice in a pass.
    """
    if len(urls) >= slots:
        return urls[slot::slots], False
    return list(urls), True


def slot_sample_counts(counts: list[int], slots: int) -> list[int]:
    """Samples each slot reads in one pass, given the shards' sample counts (in reading order)."""
    if len(counts) >= slots:
        return [sum(counts[slot::slots]) for slot in range(slots)]
    total = sum(counts)
    return [total // slots + (1 if slot < total % slots else 0) for slot in range(slots)]


def worker_slot(rank: int, world_size: int) -> tuple[int, int, int]:
    """(slot, slots, worker id) of the calling DataLoader worker (or main process)."""
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * workers + worker, world_size * workers, worker


def mix_seed(*numbers: int) -> int:
    """A 63-bit seed from several small integers (well mixed, the same in every process)."""
    state = np.random.SeedSequence([abs(int(n)) for n in numbers]).generate_state(2, np.uint32)
    return int(state[0]) << 31 ^ int(state[1])
