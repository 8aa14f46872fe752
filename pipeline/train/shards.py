"""Reading a split's shards in a loader worker: a local file through a big buffer (and only a
regular file), anything else through WebDataset's gopen, each shard's samples counted against its
manifest entry, and every failure handed to the stream's handler with the shard named."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO

from webdataset.gopen import gopen
from webdataset.handlers import reraise_exception

from pipeline.schema import open_regular
from pipeline.store.tarread import read_samples
from pipeline.train.sources import local_path

Handler = Callable[[Exception], bool]  # webdataset semantics: True continue, False stop, or raise

# A local shard's read buffer: 13-16% less reading time than 8 KB (benchmarks/shard_read.py).
SHARD_BUFFER = 1 << 18


def open_shard(url: str) -> BinaryIO:
    """A local shard (a path, or a file:// URL) opened with a 256 KB buffer; anything else
    (http://, pipe:, …) with gopen, whose local files get Python's default 8 KB.

    A local path must be a regular file: a FIFO or a device is a ValueError, never read (a
    FIFO with no writer would block the worker forever, in open() or in read())."""
    path = local_path(url)
    if path is None:
        return gopen(url)
    return open(open_regular(path), "rb", buffering=SHARD_BUFFER)  # closed by read_shards


def read_shards(
    urls: Iterable[str],
    handler: Handler = reraise_exception,
    expected: dict[str, int] | None = None,
) -> Iterator[dict]:
    """Open each shard (`open_shard`: a path, http://, pipe:, …) and yield its raw samples.

    `expected`: the samples each shard holds by the manifest; a shard that ends with another
    count (cut short at a member's boundary, or replaced since convert) goes to the handler once
    its samples are read: a warning in training, an error in evaluation, whose metrics over part
    of a split would mislead."""
    for url in urls:
        try:
            stream = open_shard(url)
        except Exception as exn:
            if handler(ValueError(f"{url}: cannot open the shard ({exn})")):
                continue
            return
        count = 0
        try:
            for sample in read_samples(stream, url):
                count += 1
                yield sample
        except (OSError, ValueError) as exn:
            if not handler(ValueError(f"{url}: cannot read the shard ({exn})")):
                return
            continue
        finally:
            failed = _close(stream, url)  # a pipe: or http shard reports its errors on close
        if failed is not None and not handler(failed):
            return
        want = expected.get(url) if expected else None
        if want is not None and count != want and not handler(_miscounted(url, count, want)):
            return


class ShardMiscounted(ValueError):
    """A shard read to its end holds another number of samples than its manifest entry: its
    samples were all yielded (a handler that continues keeps them; none was skipped)."""


def _miscounted(url: str, count: int, want: int) -> ShardMiscounted:
    return ShardMiscounted(
        f"{url}: holds {count} samples, the manifest says {want} (cut short or changed since "
        "convert: `pipeline verify` the folder)"
    )


def _close(stream: BinaryIO, url: str) -> ValueError | None:
    """Close a shard's stream; the error closing it raised, if any (a failed pipe command)."""
    try:
        stream.close()
    except OSError as exn:
        return ValueError(f"{url}: the shard's stream failed ({exn})")
    return None
