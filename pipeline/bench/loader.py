"""`pipeline bench loader`: the training loader's samples/s against the decode-only floor, with
the augmentation on the device (as on a GPU) or in the workers, and beside the old loose-file way.

All on the same samples, in one run:
- the floor: one thread decoding all four fields of every sample (bytes already in memory), the
  most a worker could do if decoding were all it did;
- the read floor: one thread reading the samples from the shards (the loader's tar reader, the
  shards in the page cache) and decoding all four fields: slower than the floor, an easier mark
  (the issue's "decode only" row read its bytes with Python's tarfile, and does not say whether
  its timing included that: the goal is held to the floor, the stricter reading);
- the loader as the trainer runs it on a GPU (its defaults: no augmentation in the workers, each
  distinct background decoded once), with 1 worker and with `--workers N`;
- the same with `--augment-on workers` (the default on CPU);
- the old workflow: the 4 JPEGs of each sample as loose files, opened and decoded with PIL, with
  the same augmentation (in the workers) and batching, and N workers.

On a machine of 2 or more CPUs the floors and the 1-worker rows run on one CPU (`pin`): the
floors' thread, and the worker process with all its threads, while the training process's
threads keep to the others. On a shared VM one vCPU can run 1.5x as fast as another for
minutes (the host's other load), so a floor on one CPU against a worker on another measures
the CPUs as much as the loader.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, RandomSampler

from pipeline.images import get_decoder, measure_decoders
from pipeline.schema import FIELDS, INPUTS, field_sizes, find_field
from pipeline.train.augment import AugmentConfig
from pipeline.train.config import TrainConfig
from pipeline.train.feed import loader_config
from pipeline.train.loader import LoaderConfig, init_worker, make_train_loader
from pipeline.train.shards import read_shards
from pipeline.train.sources import open_manifest, shard_urls
from pipeline.train.stages import (
    LogOnce,
    SampleDecoder,
    SkipCounter,
    augment_batches,
    collate,
    decode_samples,
)

log = logging.getLogger(__name__)

GPU = torch.device("cuda")  # the loader as the trainer sets it up for a GPU (no GPU needed)


def bench_loader(
    location: str | Path,
    workers: int,
    batch_size: int = 100,
    batches: int = 50,
    augment: bool = True,
    augment_on: str = "auto",
    rounds: int = 2,
    old: bool = True,
    pin: bool = True,
) -> dict:
    """Samples/s of the floor, the loader (1 and N workers, augmenting where `augment_on` says
    and in the workers) and the old way, after one warm-up batch from each worker; and their
    ratios.

    Each measurement runs `rounds` times, interleaved, and keeps its best run: on a shared
    machine other processes slow single runs down at random, and the best run is the least
    disturbed. The main ratios are also given round by round (`ratios_by_round`) and as those
    rounds' medians (`median_ratios_by_round`). `augment_on` is resolved as the trainer would
    on a GPU (auto = device). With `pin`, the floors and the 1-worker rows share one CPU (see
    the module's docstring; nothing is pinned with fewer than 2 CPUs).
    """
    manifest = open_manifest(location)
    # Everything measures the same samples: as many as a timed run reads (fewer if fewer).
    wanted = (batches + 1) * batch_size
    urls = shard_urls(location, manifest, "train")
    raw = usable_samples(itertools.islice(read_shards(urls), wanted), manifest)
    configs = _loader_configs(workers, batch_size, augment, augment_on)
    rates: dict[str, list[float]] = {name: [] for name in ("floor", "read_floor", *configs, "old")}
    cpus = bench_cpus() if pin else None
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        paths = write_loose_files(raw, Path(tmp)) if old else []
        for _ in range(rounds):
            with on_cpus(cpus and cpus[0]):
                rates["floor"].append(decode_floor(raw, manifest))
                rates["read_floor"].append(read_decode_floor(urls, manifest, len(raw)))
            for name, config in configs.items():
                log.info("shard loader %s: %d batches of %d", name, batches, batch_size)
                one = cpus is not None and config.workers == 1
                warmup = max(1, config.workers)  # one batch from each worker
                with on_cpus(cpus[0] if one else None):  # the workers start on it
                    steps = batches + warmup
                    stream = make_train_loader(location, config, epoch=0, steps=steps)
                    started = (lambda: move_threads(cpus[1])) if one else None
                    rates[name].append(time_batches(stream, batches, started, warmup))
            if old:
                log.info("old way: %d samples as loose files, PIL, %d workers", len(paths), workers)
                config = configs[f"{workers}_workers_augmenting"]
                loose = old_loader(paths, manifest["mode"], config, batches + 1)
                rates["old"].append(time_batches(loose, batches))
    best = {name: max(values) for name, values in rates.items() if values}
    result = _report(best, manifest, raw, workers, batch_size, batches, augment, rounds)
    # Each round's own ratios too: measured seconds apart, so the machine's drift between
    # rounds (30% here) moves both sides of a ratio alike.
    n = f"{workers}_workers"
    pairs = {"one_worker_vs_floor": ("1_workers", "floor"), "n_workers_vs_one": (n, "1_workers")}
    result["ratios_by_round"], result["median_ratios_by_round"] = ratios_by_round(rates, pairs)
    result["pinned"] = None if cpus is None else {"cpu": min(cpus[0]), "others": sorted(cpus[1])}
    return result


def bench_cpus() -> tuple[set[int], set[int]] | None:
    """({the CPU of the floors and the 1-worker rows}, {the training process's CPUs}), or None
    where threads cannot be pinned or fewer than 2 CPUs are available."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        return None
    return {available[0]}, set(available[1:])


@contextlib.contextmanager
def on_cpus(cpus: set[int] | None) -> Iterator[None]:
    """Every thread of this process on `cpus` (nothing changes for None); as before, after."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    move_threads(cpus)
    try:
        yield
    finally:
        move_threads(before)


def move_threads(cpus: set[int]) -> None:
    """Pin every thread of this process (torch's, DataLoader's) to `cpus`; processes it has
    started keep theirs."""
    for task in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that has just ended
            os.sched_setaffinity(int(task), cpus)


def ratios_by_round(
    rates: dict[str, list[float]], pairs: dict[str, tuple[str, str]]
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Each round's ratio of each pair (name: (top, bottom) rows), and their medians: the two
    rows of a round are measured seconds apart, so the median is the steadier summary here."""
    ratios = {
        name: [a / b for a, b in zip(rates[top], rates[bottom], strict=True)]
        for name, (top, bottom) in pairs.items()
    }
    by_round = {name: [round(r, 2) for r in values] for name, values in ratios.items()}
    medians = {name: round(statistics.median(values), 2) for name, values in ratios.items()}
    return by_round, medians


def _loader_configs(
    workers: int, batch_size: int, augment: bool, augment_on: str
) -> dict[str, LoaderConfig]:
    """The loaders measured, by name: 1 and N workers, as on a GPU and augmenting in workers."""
    configs = {}
    for count in dict.fromkeys((1, workers)):  # 1 first; once if N is 1
        for where, suffix in ((augment_on, ""), ("workers", "_augmenting")):
            train = TrainConfig(
                batch_size=batch_size, workers=count, augment=augment, augment_on=where
            )
            config = loader_config(train, GPU)
            config.pin_memory = torch.cuda.is_available()  # as on a GPU, where there is one
            configs[f"{count}_workers{suffix}"] = config
    return configs


def usable_samples(raw: Iterable[dict], manifest: dict) -> list[dict]:
    """The raw samples the loader would train on: each one that does not decode (a missing or
    broken field, a header declaring 30000x30000) is skipped with a warning naming it, as the
    loader skips it, so that neither the old way's loose files nor the decoder measurement
    ever holds one; ValueError if none is left."""
    decoder = SampleDecoder(manifest["channels"], field_sizes(manifest), get_decoder())
    handler, usable = LogOnce(), []
    for sample in raw:
        try:
            decoder.sample(sample)
        except ValueError as exc:
            handler(ValueError(f"sample {sample.get('__key__')} in {sample.get('__url__')}: {exc}"))
            continue
        usable.append(sample)
    if not usable:
        raise ValueError("no sample of the train split's first shards could be decoded")
    return usable


def decode_floor(raw: list[dict], manifest: dict) -> float:
    """Samples/s of one thread decoding all four fields of each raw sample (the loader's decode
    stage, without its background cache)."""
    return _decode_rate(raw, manifest, time.perf_counter())


def read_decode_floor(urls: list[str], manifest: dict, samples: int) -> float:
    """The same for the first `samples` samples read from the shards, the reading timed too."""
    start = time.perf_counter()
    return _decode_rate(itertools.islice(read_shards(urls), samples), manifest, start)


def _decode_rate(raw: Iterable[dict], manifest: dict, start: float) -> float:
    decoder = SampleDecoder(manifest["channels"], field_sizes(manifest), get_decoder())
    count = sum(1 for _ in decode_samples(raw, decoder, SkipCounter(), LogOnce()))
    if count == 0:
        raise ValueError("no sample could be decoded")
    return count / (time.perf_counter() - start)


def _report(best, manifest, raw, workers, batch_size, batches, augment, rounds) -> dict:
    """The figures and their ratios, rounded."""
    n = f"{workers}_workers"
    one, many = best["1_workers"], best[n]
    mode = manifest["mode"]
    jpegs = [s["fg_bg.jpg"] for s in raw[:200] if "fg_bg.jpg" in s]
    decoders = measure_decoders(jpegs, 3 if mode == "RGB" else 1) if jpegs else {}
    result = {
        "samples_per_s": round(many, 1),  # the loader with N workers, as the trainer on a GPU
        "workers": workers,
        "batch_size": batch_size,
        "batches": batches,
        "augment": augment,
        "samples": len(raw),
        "rates": {name: round(rate, 1) for name, rate in best.items()},
        "ratios": {
            "one_worker_vs_floor": round(one / best["floor"], 2),
            "one_worker_vs_read_floor": round(one / best["read_floor"], 2),
            "n_workers_vs_one": round(many / one, 2),
            "augmenting_in_workers_vs_not_1_worker": round(best["1_workers_augmenting"] / one, 2),
        },
        "decoder": LoaderConfig().decoder,
        "decoders_images_per_s": {name: round(r) for name, r in decoders.items()},
        "mode": mode,
        "rounds": rounds,
    }
    if "old" in best:
        augmenting = best[f"{n}_augmenting"]
        result["old_samples_per_s"] = round(best["old"], 1)
        result["speedup"] = round(augmenting / best["old"], 2)  # both augment in the workers
    return result


def time_batches(
    stream: Iterable[dict],
    batches: int,
    started: Callable[[], None] | None = None,
    warmup: int = 1,
) -> float:
    """Samples/s over `batches` batches that follow `warmup` untimed ones (after them, `started`
    is called: the workers run by then). With N workers the warm-up is one batch from each:
    they start together, so when the first batch arrives the other N - 1 are (nearly) made
    too, and timed they would come at once, which overstates the rate (by N - 1 batches)."""
    iterator = iter(stream)
    for _ in itertools.islice(iterator, warmup):  # start-up, buffer fill: not the steady state
        pass
    if started is not None:
        started()
    samples, start = 0, time.perf_counter()
    for batch in itertools.islice(iterator, batches):
        samples += len(batch["keys"])
    elapsed = time.perf_counter() - start
    if samples == 0:
        raise ValueError("the loader gave no batch after the warm-up one")
    return samples / elapsed


def write_loose_files(samples: list[dict], folder: Path) -> list[dict[str, Path]]:
    """Write each raw sample's 4 JPEGs as files, laid out as in the unzipped published dataset."""
    out = []
    for index, sample in enumerate(samples):
        paths = {}
        for field in FIELDS:
            # `FIELD_jpg/NNNNNN.jpg`, one file per sample and field: what unzipping the batch
            # gives (bar bg, shared by many samples there, which can only favour the old way).
            # Named by index, never by key: a key is a shard's member name, which may hold
            # `../` or start with `/`, and the file would then be written outside `folder`.
            path = folder / f"{field}_jpg" / f"{index:06d}.jpg"
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(sample[find_field(sample, field)])  # a PNG keeps the .jpg name
            paths[field] = path
        out.append(paths)
    return out


class LooseFiles(Dataset):
    """The old workflow's dataset: 4 loose JPEG files per sample, opened and decoded with PIL."""

    def __init__(self, paths: list[dict[str, Path]], mode: str) -> None:
        self.paths, self.mode = paths, mode

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        sample: dict = {"key": self.paths[index]["fg_bg"].stem}
        for field, path in self.paths[index].items():
            mode = self.mode if field in INPUTS else "L"
            with Image.open(path, formats=("JPEG", "PNG")) as image:
                array = np.asarray(image.convert(mode))
            sample[field] = array[:, :, None] if array.ndim == 2 else array  # (H, W, C)
        return sample


class AugmentingCollate:
    """Stack, convert and augment exactly as the shard loader's workers do (picklable)."""

    def __init__(self, augment: AugmentConfig | None, seed: int) -> None:
        self.augment, self.seed, self.generator = augment, seed, None

    def __call__(self, samples: list[dict]) -> dict:
        batches: Iterable[dict] = [collate(samples, 0)]
        if self.augment is not None:
            if self.generator is None:  # one per worker, made in the worker
                self.generator = torch.Generator().manual_seed(torch.initial_seed() + self.seed)
            batches = augment_batches(batches, self.augment, self.generator)
        return next(iter(batches))


def old_loader(
    paths: list[dict[str, Path]], mode: str, config: LoaderConfig, batches: int
) -> DataLoader:
    """A DataLoader over loose files with `batches` shuffled batches (repeating samples if few)."""
    dataset = LooseFiles(paths, mode)
    sampler = RandomSampler(dataset, replacement=True, num_samples=batches * config.batch_size)
    return DataLoader(
        dataset,
        batch_size=config.batch_size,
        sampler=sampler,
        num_workers=config.workers,
        collate_fn=AugmentingCollate(config.augment, config.seed),
        worker_init_fn=init_worker,
        drop_last=True,
        **({"prefetch_factor": config.prefetch_factor} if config.workers > 0 else {}),
    )
