"""The `pipeline` command line: parses options and calls one library function per command.

Library code raises exceptions with clear messages; only this module turns them into messages and
exit codes. Heavy imports (torch) happen inside the commands that need them, so `--help` is quick.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from pipeline import __version__
from pipeline.layout import parse_batches

log = logging.getLogger("pipeline")


class UserError(click.ClickException):
    """An error the user can act on: printed as `error: …`, exit code 1."""

    def show(self, file=None) -> None:  # noqa: D102 - click's hook
        click.echo(f"error: {self.message}", err=True)


def _batches(_ctx, _param, value):
    if value is None:
        return None
    try:
        return parse_batches(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _emit_json(data: dict) -> None:
    click.echo(json.dumps(data, indent=None, sort_keys=False))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="pipeline")
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def cli(verbose: bool) -> None:
    """Mask and depth from a background and a composite: zips -> shards -> a trained UNet.

    \b
    Typical use:
      pipeline synth data/                      # or use the published batch*_images.zip
      pipeline convert data/*.zip --out shards
      pipeline verify shards
      pipeline train --shards shards --out runs/r1
      pipeline evaluate runs/r1/best.pt --shards shards --grid grid.png
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(message)s" if verbose else "%(message)s",
        stream=sys.stderr,
    )


@cli.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--batches", default="1-3", show_default=True, callback=_batches,
              help="Batch numbers to write, e.g. 1-3,10: one batchN_images.zip each.")
@click.option("--samples", default=200, show_default=True, type=click.IntRange(1),
              help="Samples per zip (the published zips hold 40,000).")
@click.option("--mode", type=click.Choice(["L", "RGB"]), default="L", show_default=True,
              help="Image mode: L (grayscale, as published) or RGB.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed: same seed, same bytes.")
def synth(out: Path, batches: list[int], samples: int, mode: str, seed: int) -> None:
    """Write synthetic batchN_images.zip files in the published layout.

    The scenes are learnable: textured backgrounds, shapes pasted at random places (some
    flipped), their exact masks, and depth maps where the shape is nearer than the floor.
    """
    from pipeline.synth import synth_zips

    paths = synth_zips(out, batches=batches, samples=samples, mode=mode, seed=seed)
    for path in paths:
        click.echo(str(path))


@cli.command()
@click.argument("zips", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder: DIR/{train,test}/*.tar and DIR/manifest.json.")
@click.option("--test-batches", default="10", show_default=True, callback=_batches,
              help="Batches that go to the test split; the rest go to train.")
@click.option("--shard-samples", default=5000, show_default=True, type=click.IntRange(1),
              help="At most this many samples per shard.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1),
              help="Zips converted in parallel processes.")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Seed of the order samples are written in.")
@click.option("--strict", is_flag=True, help="Any skipped sample is fatal.")
@click.option("--force", is_flag=True, help="Redo every zip, even those already converted.")
@click.option("--json", "as_json", is_flag=True, help="Print only the summary, as JSON.")
def convert(zips, out, test_batches, shard_samples, workers, seed, strict, force, as_json) -> None:
    """Stream batch zips into WebDataset tar shards, with a manifest of hashes.

    Nothing is extracted: each member is read once from the zip and written, byte for byte,
    into a shard. Samples with a missing or broken member are skipped and reported (on
    stderr and in the manifest); --strict makes that fatal. Re-running redoes nothing that
    is already complete and correct.
    """
    from pipeline.convert import ConvertConfig, convert_zips

    config = ConvertConfig(
        out=out, test_batches=tuple(test_batches), shard_samples=shard_samples,
        workers=workers, seed=seed, strict=strict, force=force, progress=not as_json,
    )
    try:
        summary = convert_zips(list(zips), config)
    except (ValueError, OSError) as exc:
        raise UserError(str(exc)) from None
    if as_json:
        _emit_json(summary.to_dict())
    else:
        click.echo(summary.summary_line(), err=True)
    if not summary.ok:
        sys.exit(1)


@cli.command()
@click.argument("shards", type=click.Path(file_okay=False, path_type=Path))
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1),
              help="Shards checked in parallel processes.")
@click.option("--json", "as_json", is_flag=True, help="Print only the report, as JSON.")
def verify(shards: Path, workers: int, as_json: bool) -> None:
    """Prove a shard folder is intact and complete, or name what is wrong.

    Checks every shard's size and sha256 against the manifest, reads every sample, decodes
    every image and checks its size, and checks that keys are unique and counts match.
    Exit 0 only when everything holds.
    """
    from pipeline.verify import verify_shards

    try:
        report = verify_shards(shards, workers=workers, progress=not as_json)
    except (ValueError, OSError) as exc:
        raise UserError(str(exc)) from None
    if as_json:
        _emit_json(report.to_dict())
    else:
        for line in report.problem_lines():
            click.echo(line, err=True)
        click.echo(report.summary_line(), err=True)
    if not report.ok:
        sys.exit(1)


def main() -> None:
    """Entry point of the `pipeline` console script."""
    cli(prog_name="pipeline")


if __name__ == "__main__":
    main()
