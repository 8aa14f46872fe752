"""Running zip jobs: here in one process, or in a pool of worker processes, with progress.

Each job converts one zip (`store.convert`); results come back as zips finish, a failure as its
exception, so one zip's failure never stops the others. Workers end with the convert that
started them (`store.guard`); Ctrl-C cancels the queued zips and ends the running ones at once.
"""

from __future__ import annotations

import queue as queue_lib
import sys
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from multiprocessing.managers import SyncManager

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from pipeline.store.convert import Reporter, ZipJob, convert_zip
from pipeline.store.guard import die_with_parent


def run_jobs(jobs: list[ZipJob], workers: int, progress: bool):
    """Yield (job, record or exception) as zips finish, with a progress bar on a terminal."""
    if not jobs:
        return
    show = progress and sys.stderr.isatty()
    if workers == 1 or len(jobs) == 1:
        yield from _run_here(jobs, show)
    else:
        yield from _run_pool(jobs, min(workers, len(jobs)), show)


@contextmanager
def _progress_bar(show: bool) -> Iterator[Reporter | None]:
    """A sample-counting bar on stderr, and logging routed around it; None when not shown."""
    if not show:
        yield None
        return
    with tqdm(total=0, unit="sample", file=sys.stderr, smoothing=0.1) as bar:
        with logging_redirect_tqdm():

            def report(kind: str, n: int) -> None:
                if kind == "total":  # each zip's count arrives when a worker has listed it
                    bar.total += n
                    bar.refresh()
                else:
                    bar.update(n)

            yield report


def _run_here(jobs: list[ZipJob], show: bool):
    # One process: no pool to start, no pickling; a failed zip does not stop the others.
    with _progress_bar(show) as report:
        for job in jobs:
            try:
                yield job, convert_zip(job, report)
            except Exception as exc:  # as in a pool: one zip's failure must not stop the others
                yield job, exc


_QUEUE = None  # a worker's progress channel to the parent


def _init_worker(progress_queue) -> None:
    global _QUEUE
    die_with_parent()  # no worker outlives a killed convert, nor runs on after Ctrl-C
    _QUEUE = progress_queue


def _queue_report(kind: str, n: int) -> None:
    _QUEUE.put((kind, n))


def _convert_in_worker(job: ZipJob) -> dict:
    return convert_zip(job, _queue_report if _QUEUE is not None else None)


def _run_pool(jobs: list[ZipJob], workers: int, show: bool):
    # A manager's queue: put() returns once the message is queued, so when a zip's result
    # arrives, all its progress messages are already there to drain.
    if not show:
        yield from _pool_results(jobs, workers, show, None)
        return
    manager = SyncManager()
    manager.start(die_with_parent)  # the manager's process, too, ends with this one
    try:
        yield from _pool_results(jobs, workers, show, manager.Queue())
    finally:
        manager.shutdown()


def _pool_results(jobs: list[ZipJob], workers: int, show: bool, progress_queue):
    pool = ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(progress_queue,))
    try:
        # Submit before the bar exists: workers fork here, before tqdm starts its monitor thread.
        futures: dict[Future, ZipJob] = {pool.submit(_convert_in_worker, j): j for j in jobs}
        pending = set(futures)
        with _progress_bar(show) as report:
            while pending:
                done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                _drain(progress_queue, report)
                for future in done:
                    exc = future.exception()
                    yield futures[future], exc if exc is not None else future.result()
    except BaseException:  # Ctrl-C, or the caller stopped early: don't finish work to discard
        _stop_pool(pool)
        raise
    pool.shutdown()


def _stop_pool(pool: ProcessPoolExecutor) -> None:
    """Cancel the queued zips and end the running ones now (their output is discarded).

    The workers are ended first, so nothing in the executor waits on a running zip while it
    shuts down, and one that outlives SIGTERM by 5 s is killed."""
    terminate = getattr(pool, "terminate_workers", None)  # Python 3.14+
    processes = list((getattr(pool, "_processes", None) or {}).values())  # before 3.14
    if terminate is not None:
        terminate()
    else:
        for process in processes:
            process.terminate()
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.join(5)
        if process.is_alive():
            process.kill()
            process.join(5)


def _drain(progress_queue, report: Reporter | None) -> None:
    while report is not None:
        try:
            report(*progress_queue.get_nowait())
        except queue_lib.Empty:
            return
