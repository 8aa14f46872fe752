"""What keeps a run from destroying another or saving garbage: the run-folder check and lock,
the watch on non-finite losses (no host sync a step), and the finite-weights check before any save.

Every check here reaches the same answer on every rank (one small all_reduce), so that no rank
stops while the others wait for it in a collective.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
from pathlib import Path

import torch

from pipeline.train.checkpoint import non_finite
from pipeline.train.runtime import (
    DistInfo,
    all_reduce_min,
    count_ranks,
    failing_together,
)

log = logging.getLogger(__name__)

RUN_FILES = ("last.pt", "best.pt", "config.json")  # what `train` writes into OUT
EVENTS = "events.out.tfevents.*"  # TensorBoard's files
LOSS_PARTS = ("total", "mask", "depth")  # train_step's values [loss, loss_mask, loss_depth, iou]
NEVER = 2**62  # the watch's "no non-finite step yet"
RUN_LOCK = ".run.lock"  # held by the training process of rank 0 while a run writes OUT
LEFTOVERS = (".last.pt.tmp", ".best.pt.tmp")  # a save a killed run never finished
_LOCKS: set[int] = set()  # run-lock fds this process holds
# flock's answers where a file system has no locks (Lustre without -o flock, some FUSE mounts):
# training goes on, unguarded, as it did before the lock.
NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
TRIES = 100  # takes of the lock file that another process removed as it was taken


def _close_copies() -> None:
    """In a forked child (a loader worker): close the copies of the parent's lock fds, so the
    lock ends with the run's own process, not when its last worker notices and exits."""
    for fd in _LOCKS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _LOCKS.clear()


os.register_at_fork(after_in_child=_close_copies)


class NonFiniteError(ValueError):
    """Training produced NaN or inf; nothing of that epoch was saved."""


def earlier_run(out: Path) -> list[Path]:
    """The files an earlier run left in OUT: checkpoints, config.json, TensorBoard events."""
    if not out.is_dir():
        return []
    return [out / n for n in RUN_FILES if (out / n).exists()] + sorted(out.glob(EVENTS))


def claim_run_folder(out: Path, resume: bool, overwrite: bool, dist: DistInfo) -> RunLock | None:
    """Refuse, on every rank alike, to train over an earlier run without --resume/--overwrite,
    or into a folder another run is writing; rank 0's lock on the folder (close it at the end).

    Called before any rank writes; with --overwrite, rank 0 then removes the earlier run's files
    (a best.pt of another run would otherwise survive an epoch that does not improve on it).
    """
    found = [] if resume else earlier_run(out)
    (refusing,) = count_ranks([bool(found) and not overwrite], dist.device)
    if refusing:
        what = _describe(found) if found else "seen by another rank"
        raise FileExistsError(
            f"{out} already holds a run ({what}): continue it with --resume, train into "
            "a new folder, or replace it with --overwrite"
        )
    with failing_together(dist.device, (OSError, ValueError)):  # rank 0's folder, or its lock
        lock = RunLock(out) if dist.is_main else None
    try:
        # No rank looks at the folder (--init's check) before rank 0 has emptied it.
        with failing_together(dist.device, (OSError,)):
            if lock is not None:
                _remove_earlier(out, found)
    except BaseException:
        if lock is not None:
            lock.close()
        raise
    return lock


def _remove_earlier(out: Path, found: list[Path]) -> None:
    if found:
        log.warning("--overwrite: removing the earlier run in %s (%s)", out, _describe(found))
    for path in [*found, *(out / name for name in LEFTOVERS)]:  # leftovers: never read
        path.unlink(missing_ok=True)


class RunLock:
    """An OS lock (`fcntl.flock`) on OUT/.run.lock, so that no second run (a requeued job, a
    second --resume or --overwrite) writes OUT while this one does; the kernel drops it when
    the process ends, even by `kill -9`, so it is never stale."""

    def __init__(self, out: Path) -> None:
        self.out, self.made = out, False
        self.fd: int | None = None
        for _ in range(TRIES):  # again when the file went as it was taken (a run ending)
            if self._take(out / RUN_LOCK):
                return
        raise OSError(f"{out / RUN_LOCK}: removed each time it was locked, {TRIES} times")

    def _take(self, path: Path) -> bool:
        """Lock `path`: True, or False when the file (or folder) went as it was taken."""
        self.made = not self.out.exists()  # each try: another run may have removed it since
        self.out.mkdir(parents=True, exist_ok=True)
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except FileNotFoundError:
            return False
        try:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in NO_LOCKS:
                    raise
                log.warning(
                    "%s: its file system takes no locks (%s): nothing keeps a second run from "
                    "writing the folder while this one does",
                    self.out,
                    exc.strerror or exc,
                )
                self.made = False  # the run goes on into it
                self.close()
                return True
            if os.fstat(self.fd).st_ino != os.stat(path, follow_symlinks=False).st_ino:
                raise FileNotFoundError(path)  # a file no longer there: lock the one there now
        except FileNotFoundError:
            os.close(self.fd)
            self.fd = None
            return False
        except BlockingIOError:
            holder = os.pread(self.fd, 32, 0).decode("ascii", "replace").strip()
            self.made = False  # the folder is the other run's, whoever made it
            self.close()
            pid = f" (process {holder})" if holder.isdigit() else ""
            raise ValueError(
                f"{self.out} is being written by another training run{pid}: wait for it to end, "
                "or train into another folder"
            ) from None
        except BaseException:
            self.close()
            raise
        _LOCKS.add(self.fd)
        with contextlib.suppress(OSError):  # the pid is for the message alone (a full disk)
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)
        return True

    def close(self) -> None:
        """Let the folder go. The file stays (removing it would race a run taking it), unless
        this lock made the folder and nothing else came into it: a run that failed before
        writing anything leaves no folder."""
        if self.fd is None:
            return
        _LOCKS.discard(self.fd)
        with contextlib.suppress(OSError):
            if self.made and [p.name for p in self.out.iterdir()] == [RUN_LOCK]:
                (self.out / RUN_LOCK).unlink()
                self.out.rmdir()
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self.fd = None


def _describe(files: list[Path]) -> str:
    names = [p.name for p in files if p.name in RUN_FILES]
    events = len(files) - len(names)
    if events:
        names.append(f"{events} TensorBoard event file{'s' if events > 1 else ''}")
    return ", ".join(names)


class LossWatch:
    """The first step whose loss was not finite, kept on the device: no host sync a step.

    `check` (every `every` steps and at the epoch's end, on every rank) reads it. Until then a
    non-finite step may have spoilt the weights, which is why nothing is saved before a check.
    """

    def __init__(self, device: torch.device, every: int, start_step: int = 0, epoch: int = 1):
        self.first = torch.full((len(LOSS_PARTS),), NEVER, dtype=torch.int64, device=device)
        self.every = every  # steps between checks (each one host sync and one tiny all_reduce)
        self.start_step = start_step  # optimizer steps before this epoch, for the message
        self.epoch = epoch

    def update(self, values: torch.Tensor, step: int) -> None:
        """Note `step` (1-based in the epoch) where a loss part of `values` is not finite."""
        bad = ~torch.isfinite(values[: len(LOSS_PARTS)])
        # `step` is a Python number: a kernel argument, no host-to-device copy.
        self.first = torch.where(bad, self.first.clamp(max=step), self.first)

    def check(self) -> None:
        """Raise NonFiniteError on every rank when any rank saw a non-finite loss."""
        first = all_reduce_min(self.first.clone()).tolist()
        step = min(first)
        if step == NEVER:
            return
        parts = [p for p, s in zip(LOSS_PARTS, first, strict=True) if s == step and p != "total"]
        what = " and ".join(f"the {p} loss" for p in parts) or "the weighted total loss"
        raise NonFiniteError(
            f"training stopped: {what} was not finite (NaN or inf) at step "
            f"{self.start_step + step} (step {step} of epoch {self.epoch}); nothing of this "
            "epoch was saved. Try a lower --lr or other loss weights"
        )


def check_weights(model: torch.nn.Module, step: int, epoch: int, dist: DistInfo) -> None:
    """Raise NonFiniteError on every rank when any rank's weights hold NaN or inf."""
    bad = non_finite(model.state_dict())
    (spoilt,) = count_ranks([bool(bad)], dist.device)
    if spoilt:
        where = f" ({', '.join(bad[:3])})" if bad else " on another rank"
        raise NonFiniteError(
            f"training stopped after step {step} (epoch {epoch}): the weights hold NaN or inf"
            f"{where} though every loss was finite; nothing of this epoch was saved. "
            "Try a lower --lr"
        )
