"""`pipeline bench loader`: the training loader's samples/s beside the old loose-file workflow's.

Both sides turn the same kind of samples into the same augmented batches with the same number of
workers; only the reading differs. The loader streams tar shards and decodes with the measured
fastest decoder; the old way opens and decodes 4 loose JPEGs per sample with PIL, as the published
code did after unzipping the dataset.
"""

from __future__ import annotations

import itertools
import logging
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, RandomSampler

from pipeline.images import measure_decoders
from pipeline.schema import FIELDS, INPUTS, find_field
from pipeline.train.augment import AugmentConfig
from pipeline.train.loader import LoaderConfig, init_worker, make_train_loader
from pipeline.train.sources import open_manifest, shard_urls
from pipeline.train.stages import augment_batches, collate, join_inputs, read_shards

log = logging.getLogger(__name__)


def bench_loader(
    location: str | Path,
    workers: int,
    batch_size: int = 100,
    batches: int = 50,
    augment: bool = True,
    rounds: int = 2,
) -> dict:
    """Samples/s of the shard loader and of the old loose-file way, after one warm-up batch each.

    Each side runs `rounds` times, interleaved, and keeps its best run: on a shared machine other
    processes slow single runs down at random, and the best run is the least disturbed.
    """
    manifest = open_manifest(location)
    mode = manifest["mode"]
    aug = AugmentConfig() if augment else None
    config = LoaderConfig(batch_size=batch_size, workers=workers, augment=aug)
    # The old way gets as many samples as the timed run reads (fewer if the split is smaller).
    wanted = (batches + 1) * batch_size
    raw = list(itertools.islice(read_shards(shard_urls(location, manifest, "train")), wanted))
    rates: dict[str, list[float]] = {"shards": [], "old": []}
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        paths = write_loose_files(raw, Path(tmp))
        for _ in range(rounds):
            log.info("shard loader: %d batches of %d, %d workers", batches, batch_size, workers)
            stream = make_train_loader(location, config, epoch=0, steps=batches + 1)
            rates["shards"].append(time_batches(stream, batches))
            log.info("old way: %d samples as loose files, PIL, %d workers", len(paths), workers)
            rates["old"].append(time_batches(old_loader(paths, mode, config, batches + 1), batches))
    rate, old_rate = max(rates["shards"]), max(rates["old"])
    jpegs = [s["fg_bg.jpg"] for s in raw[:200] if "fg_bg.jpg" in s]
    decoders = measure_decoders(jpegs, 3 if mode == "RGB" else 1) if jpegs else {}
    per_worker = max(1, workers)
    return {
        "samples_per_s": round(rate, 1),
        "workers": workers,
        "batch_size": batch_size,
        "batches": batches,
        "augment": augment,
        "old_samples_per_s": round(old_rate, 1),
        "speedup": round(rate / old_rate, 2),
        "per_worker_samples_per_s": round(rate / per_worker, 1),
        "old_per_worker_samples_per_s": round(old_rate / per_worker, 1),
        "decoder": config.decoder,
        "decoders_images_per_s": {name: round(r) for name, r in decoders.items()},
        "mode": mode,
        "rounds": rounds,
    }


def time_batches(stream: Iterable[dict], batches: int) -> float:
    """Samples/s over `batches` batches that follow a first, untimed warm-up batch."""
    iterator = iter(stream)
    next(iterator)  # worker start-up, buffer fill, first imports: not the steady state
    samples, start = 0, time.perf_counter()
    for batch in itertools.islice(iterator, batches):
        samples += len(batch["keys"])
    elapsed = time.perf_counter() - start
    if samples == 0:
        raise ValueError("the loader gave no batch after the warm-up one")
    return samples / elapsed


def write_loose_files(samples: list[dict], folder: Path) -> list[dict[str, Path]]:
    """Write each raw sample's 4 JPEGs as files, named as in the unzipped published dataset."""
    out = []
    for sample in samples:
        key = sample["__key__"]
        paths = {}
        for field in FIELDS:
            # `FIELD_jpg/KEY.jpg`, one file per sample and field: what unzipping the batch gives
            # (bar bg, shared by many samples there, which can only favour the old way).
            path = folder / f"{field}_jpg" / f"{key}.jpg"
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
            with Image.open(path) as image:
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
        return next(join_inputs(batches))


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
