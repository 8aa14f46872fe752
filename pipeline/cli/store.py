"""Commands of the first stage, zips -> verified shards: synth, convert, verify (no torch)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from pipeline.cli.common import (
    batches_option,
    emit_json,
    json_flag,
    option_from,
    shown,
    user_errors,
)
from pipeline.schema import CHANNELS
from pipeline.store.runner import ConvertConfig
from pipeline.store.synth import synth_zips
from pipeline.store.verify import VerifyReport, problem, verify_shards


def _batch_list(batches) -> str:
    return ",".join(map(str, batches))


@click.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@option_from(
    synth_zips,
    "batches",
    "--batches",
    show=_batch_list,
    callback=batches_option,
    help="Batch numbers to write, e.g. 1-3,10: one batchN_images.zip each.",
)
@option_from(
    synth_zips,
    "samples",
    "--samples",
    type=click.IntRange(1),
    help="Samples per zip (the published zips hold 40,000).",
)
@option_from(
    synth_zips,
    "mode",
    "--mode",
    type=click.Choice(list(CHANNELS)),
    help="Image mode: L (grayscale, as published) or RGB.",
)
@option_from(synth_zips, "seed", "--seed", type=int, help="Seed: same seed, same bytes.")
@option_from(
    synth_zips,
    "png_masks",
    "--png-masks",
    is_flag=True,
    help="Write flip=0 masks as RGB PNGs under their .jpg names, as the published generator did.",
)
def synth(
    out: Path, batches: list[int], samples: int, mode: str, seed: int, png_masks: bool
) -> None:
    """Write synthetic batchN_images.zip files in the published layout.

    The scenes are learnable: a room with a wall and a tiled floor, person-like figures
    standing on the floor (some mirrored, flip=1), their exact masks, and depth maps where the
    floor nears towards the bottom and a figure is nearer than the floor behind it. Every
    member is a JPEG unless --png-masks.
    """
    with user_errors():
        paths = synth_zips(
            out, batches=batches, samples=samples, mode=mode, seed=seed, png_masks=png_masks
        )
    for path in paths:
        click.echo(str(path))


@click.command()
@click.argument(
    "zips", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Output folder: DIR/{train,test}/*.tar and DIR/manifest.json.",
)
@option_from(
    ConvertConfig,
    "test_batches",
    "--test-batches",
    show=_batch_list,
    callback=batches_option,
    help="Batches that go to the test split; the rest go to train.",
)
@option_from(
    ConvertConfig,
    "shard_samples",
    "--shard-samples",
    type=click.IntRange(1),
    help="At most this many samples per shard.",
)
@option_from(
    ConvertConfig,
    "workers",
    "--workers",
    type=click.IntRange(1),
    help="Zips converted in parallel processes.",
)
@option_from(
    ConvertConfig, "seed", "--seed", type=int, help="Seed of the order samples are written in."
)
@click.option("--strict", is_flag=True, help="Any skipped sample is fatal.")
@click.option(
    "--decode",
    is_flag=True,
    help="Also decode every image (about 2.5x the time): an image damaged past its headers "
    "skips its sample here, where verify would find it in a shard. Redoes zips converted "
    "without it.",
)
@click.option("--force", is_flag=True, help="Redo every zip, even those already converted.")
@option_from(
    ConvertConfig,
    "wait",
    "--wait/--no-wait",
    help="When another convert is writing the same batches there: wait for it, or refuse.",
)
@option_from(
    ConvertConfig,
    "forget_failed",
    "--forget-failed",
    is_flag=True,
    show_default=False,
    help="Forget zips that failed in earlier runs and are not given now: go on without them.",
)
@json_flag("Print only the summary, as JSON.")
def convert(
    zips,
    out,
    test_batches,
    shard_samples,
    workers,
    seed,
    strict,
    decode,
    force,
    wait,
    forget_failed,
    as_json,
) -> None:
    """Stream batch zips into WebDataset tar shards, with a manifest of hashes.

    Nothing is extracted: each member is read once from the zip and written, byte for byte,
    into a shard. Samples with a missing or broken member are skipped and reported (on
    stderr and in the manifest); --strict makes that fatal. Re-running redoes nothing that
    is already complete and correct.
    """
    from pipeline.store.runner import convert_zips

    config = ConvertConfig(
        out=out,
        test_batches=tuple(test_batches),
        shard_samples=shard_samples,
        workers=workers,
        seed=seed,
        strict=strict,
        decode=decode,
        force=force,
        progress=not as_json,
        wait=wait,
        forget_failed=forget_failed,
    )
    with user_errors():  # Ctrl-C: what was finished is logged, then `Commands` says the rest
        summary = convert_zips(list(zips), config)
    if as_json:
        emit_json(summary.to_dict())
    else:
        click.echo(shown(summary.summary_line()), err=True)
    if not summary.ok:
        sys.exit(1)


@click.command()
@click.argument("shards", type=click.Path(file_okay=False, path_type=Path))
@option_from(
    verify_shards,
    "workers",
    "--workers",
    type=click.IntRange(1),
    help="Shards checked in parallel processes.",
)
@json_flag("Print only the report, as JSON.")
def verify(shards: Path, workers: int, as_json: bool) -> None:
    """Prove a shard folder is intact and complete, or name what is wrong.

    Checks every shard's size and sha256 against the manifest, reads every sample, decodes
    every image and checks its size, and checks that keys are unique and counts match.
    Exit 0 only when everything holds.
    """
    with user_errors():
        try:
            report = verify_shards(shards, workers=workers, progress=not as_json)
        except ValueError as exc:  # no manifest, or not one to trust: --json still reports
            if not as_json:
                raise
            report = VerifyReport(shards, problems=[problem(None, None, str(exc))])
    if as_json:
        emit_json(report.to_dict())
    else:
        for line in report.problem_lines():
            click.echo(shown(line), err=True)
        click.echo(shown(report.summary_line()), err=True)  # it names the folder
    if not report.ok:
        sys.exit(1)
