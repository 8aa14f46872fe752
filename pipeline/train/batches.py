"""What the trainer iterates: a loader's batches per epoch or pass, with its errors made plain.

`BatchStream` is one epoch (train) or one pass (eval) of a DataLoader; `TrainBatches` is every
epoch of a run from one set of workers (see `loader.ShardStream`), `EpochBatches` one of them.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Iterator

from torch.utils.data import DataLoader

from pipeline.train.ring import RingMappings

log = logging.getLogger(__name__)


class LoaderError(ValueError):
    """The loader could not go on (no readable shard, no decodable sample); the message says why."""


class BatchStream:
    """The batches of one epoch (train) or one pass (eval); `skipped` totals undecodable samples.

    Each iteration starts the loader's workers and stops them at its end, unless `keep_workers`
    (a persistent DataLoader, iterated pass after pass by the trainer): then `close()` does.
    """

    def __init__(
        self,
        loader: DataLoader,
        length: int,
        limit: int | None,
        *,
        epoch: int | None = None,
        keep_workers: bool = False,
    ) -> None:
        self.loader = loader
        self.length = length  # batches it will yield (eval: fewer if whole batches are skipped)
        self.limit = limit  # stop after this many batches: the workers' train streams are endless
        self.epoch = epoch  # training: the epoch every batch must carry
        self.keep_workers = keep_workers
        self.skipped = 0
        self._rings = RingMappings()

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[dict]:
        self.skipped = 0
        batches = iter(self.loader)
        try:
            with _loader_errors():
                for batch in itertools.islice(batches, self.limit):
                    if self.epoch is not None and batch["epoch"] != self.epoch:
                        raise RuntimeError(f"a batch of epoch {batch['epoch']} in {self.epoch}")
                    batch = self._rings.own(batch)  # before asking for the next: train.ring
                    self.skipped += batch["skipped"]
                    if batch["keys"]:  # else only a worker's skips (stages.decode_batches)
                        yield batch
        finally:
            # Stop the workers now rather than when the iterator is garbage-collected: endless
            # train workers would otherwise keep decoding into their queues.
            if not self.keep_workers:
                self._rings.clear(_shutdown(batches))

    def close(self) -> None:
        """Stop the workers of a persistent loader (a no-op otherwise)."""
        self._rings.clear(_shutdown(getattr(self.loader, "_iterator", None)))


class TrainBatches:
    """The training batches of a whole run, from loader workers that start once.

    `epoch(e)` gives epoch e's `steps` batches; the workers run on into the next epoch while the
    trainer evaluates (see ShardStream), so no epoch waits for workers to start or fill their
    shuffle buffers. Epochs are taken in order; use as a context manager, or call `close()`.
    """

    def __init__(self, loader: DataLoader, steps: int, first_epoch: int) -> None:
        self.loader, self.steps, self.next_epoch = loader, steps, first_epoch
        self._batches: Iterator[dict] | None = None
        self._rings = RingMappings()

    def epoch(self, epoch: int) -> EpochBatches:
        """The batches of `epoch`: the one after the previous call's (or the first epoch)."""
        if epoch != self.next_epoch:
            raise ValueError(f"epoch {epoch} asked for, the loader's next is {self.next_epoch}")
        self.next_epoch += 1
        return EpochBatches(self, epoch)

    def take(self, epoch: int) -> Iterator[dict]:
        """Epoch `epoch`'s batches from the workers' stream, dropping any left of earlier ones."""
        if self._batches is None:
            self._batches = iter(self.loader)
        taken = 0
        while taken < self.steps:
            batch = next(self._batches, None)
            if batch is None:
                raise RuntimeError("the training stream ended (its workers are endless)")
            if batch["epoch"] < epoch:  # an earlier epoch's consumer stopped before its end
                continue
            if batch["epoch"] > epoch:
                raise RuntimeError(f"a batch of epoch {batch['epoch']} in epoch {epoch}")
            taken += 1
            yield self._rings.own(batch)  # before asking for the next: see train.ring

    def close(self) -> None:
        """Stop the workers."""
        workers = _shutdown(self._batches)
        self._batches = None
        self._rings.clear(workers)

    def __enter__(self) -> TrainBatches:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class EpochBatches:
    """One epoch of a TrainBatches: exactly `steps` batches; `skipped` as in BatchStream."""

    def __init__(self, source: TrainBatches, epoch: int) -> None:
        self.source, self.epoch, self.skipped = source, epoch, 0

    def __len__(self) -> int:
        return self.source.steps

    def __iter__(self) -> Iterator[dict]:
        self.skipped = 0
        with _loader_errors():
            for batch in self.source.take(self.epoch):
                self.skipped += batch["skipped"]
                yield batch


@contextlib.contextmanager
def _loader_errors() -> Iterator[None]:
    """Expected data problems become one line; the worker's traceback stays chained (-v).

    Anything else (a bug) propagates as it is.
    """
    try:
        yield
    except (ValueError, OSError) as exc:
        log.debug("loader failure: %s", exc)
        raise LoaderError(f"the loader failed: {_worker_message(exc)}") from exc


def _shutdown(batches: Iterator[dict] | None) -> list[int]:
    """Stop a DataLoader iterator's worker processes now (nothing for an in-process one); the
    process ids they had."""
    workers = [w.pid for w in getattr(batches, "_workers", ()) if w.pid is not None]
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    return workers


def _worker_message(exc: Exception) -> str:
    """The original message of a DataLoader worker's error, without the re-raised traceback."""
    text = str(exc)
    if "Original Traceback" not in text:
        return text
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].split(": ", 1)[-1] if lines else text
