"""A loader worker's cache of decoded backgrounds: each distinct background is decoded once.

A published zip holds 100 backgrounds shared by its 40,000 samples, so without a cache a worker
decodes the same 100 images again and again (a quarter of its decoding). Entries are keyed by the
sha256 of the JPEG's bytes (6 us for a 3 kB background, against ~100 us to decode it), so only
identical bytes share an entry, whatever the shard or zip they come from. The cache is bounded in
entries, and every entry has the size the manifest fixes (decode_image checks it), so its memory
is bounded too: `max_entries x width x height x channels` bytes, e.g. 1000 gray 160x160
backgrounds = 25.6 MB, 1000 RGB ones = 76.8 MB, per worker. The least recently used entry goes
first. Cached arrays are read-only: a later stage that wrote into one would corrupt every sample
that shares the background, so writing raises instead (collate copies them into its batch).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

DEFAULT_ENTRIES = 1000  # ~100 backgrounds for each of the 9 training zips a worker may read


class DecodedCache:
    """A bounded LRU map from (image bytes, channels, size, name) to their read-only decoded
    array. The name (`bg.jpg`, `bg.png`) is in the key because decoding checks the bytes against
    it: the same PNG bytes named `bg.jpg` must fail that check, not hit `bg.png`'s entry."""

    def __init__(self, max_entries: int = DEFAULT_ENTRIES) -> None:
        if max_entries < 0:
            raise ValueError(f"a background cache needs 0 or more entries, not {max_entries}")
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached arrays."""
        return sum(array.nbytes for array in self._entries.values())

    def decode(
        self,
        data: bytes,
        channels: int,
        size: tuple[int, int],
        decode: Callable[[bytes, int, tuple[int, int]], np.ndarray],
        name: str = "",
    ) -> np.ndarray:
        """The decoded image of `data`: from the cache, or `decode(data, channels, size)` kept."""
        key = (hashlib.sha256(data).digest(), channels, tuple(size), name)
        array = self._entries.get(key)
        if array is not None:
            self.hits += 1
            self._entries.move_to_end(key)
            return array
        self.misses += 1
        array = decode(data, channels, size)  # a failure raises and caches nothing
        if self.max_entries == 0:
            return array
        array.flags.writeable = False
        self._entries[key] = array
        if len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return array
