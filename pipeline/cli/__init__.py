"""The `pipeline` command line: parses options and calls one library function per command.

A module per stage (`store`, `train`, `deploy`) and the benchmarks (`bench`). Library code raises
exceptions with clear messages; only the CLI turns them into messages and exit codes. torch is
imported inside the commands that need it, so `--help` is quick.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading

import click

from pipeline import __version__
from pipeline.cli import bench, deploy, store, train
from pipeline.cli.common import ShownFormatter


class Terminated(KeyboardInterrupt):
    """SIGTERM (`docker stop`, `timeout`, a job scheduler, torchrun stopping the other ranks):
    it stops a command as Ctrl-C does, through the same cleanup (workers stopped, temp files
    removed, what was finished kept)."""


class Commands(click.Group):
    """pipeline's commands, where Ctrl-C stops any command with exit code 130 (128 + SIGINT, as
    a shell reports it) and one line, rather than click's "Aborted!" and 1, a failure's code;
    SIGTERM with 143 (128 + SIGTERM) and one line, rather than none."""

    def invoke(self, ctx: click.Context):  # noqa: D102 - click's hook
        try:
            with _sigterm_stops():
                return super().invoke(ctx)
        except Terminated:
            click.echo(f"{ctx.invoked_subcommand or 'pipeline'} stopped (SIGTERM)", err=True)
            ctx.exit(128 + signal.SIGTERM)
        except KeyboardInterrupt:
            click.echo(f"{ctx.invoked_subcommand or 'pipeline'} interrupted", err=True)
            ctx.exit(130)


@contextlib.contextmanager
def _sigterm_stops():
    """SIGTERM raises Terminated in this process while the block runs. A process forked from
    it meanwhile (a loader or convert worker) inherits the handler: there it ends the worker
    as SIGTERM would have, which is what its parent (or PR_SET_PDEATHSIG) means by it."""
    # Only the main thread may set handlers (a test's CliRunner in a thread). Not under
    # torchrun: its agent stops the other ranks with SIGTERM when one fails, and a rank waiting
    # in a collective would run no handler until the agent's SIGKILL, 30 s later.
    # Started with SIGTERM ignored (`trap '' TERM`, nohup-like wrappers), it stays ignored.
    ranks = os.environ.get("WORLD_SIZE", "1")
    main = threading.current_thread() is threading.main_thread()
    if not main or ranks not in ("", "1") or signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
        yield
        return
    owner = os.getpid()

    def stop(signum, frame) -> None:
        if os.getpid() != owner:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise Terminated

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@click.group(
    cls=Commands,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, prog_name="pipeline")
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages (and tracebacks).")
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
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(ShownFormatter("%(levelname)s %(message)s" if verbose else "%(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])


for command in (
    store.synth,
    store.convert,
    store.verify,
    train.train,
    train.evaluate,
    deploy.predict,
    deploy.export,
    deploy.info,
    deploy.import_weights,
    bench.bench,
):
    cli.add_command(command)


def main() -> None:
    """Entry point of the `pipeline` console script."""
    cli(prog_name="pipeline")


if __name__ == "__main__":
    main()
