"""What every command shares: turning the library's errors into messages, JSON output, and
options whose defaults come from the library's own config dataclasses (one source)."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import math
import re
import subprocess
import zipfile
from collections.abc import Callable
from typing import Any

import click

log = logging.getLogger("pipeline")


# Control characters, newline and tab too: what a terminal would act on rather than show.
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def shown(text: str) -> str:
    """`text` as one line for a terminal, its control characters as `\\x1b`-style escapes:
    names in a message come from the data (a shard's member names, a manifest's strings), and
    an escape sequence in one could hide the lines after it (`ESC[8m` conceals them) or rewrite
    them, and a newline in one could forge a line of its own (`…: ok`)."""
    return _escaped(_CONTROLS, text)


def _escaped(controls: re.Pattern, text: str) -> str:
    return controls.sub(lambda found: f"\\x{ord(found[0]):02x}", text)


# In a traceback, the same but newline and tab: its lines stay lines.
_CONTROLS_IN_LINES = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


class ShownFormatter(logging.Formatter):
    """A log formatter whose messages go out through `shown`, one line each; a traceback
    (`-v`) follows on lines of its own, as logging prints it, its other control characters
    escaped too (an exception's message names data)."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: D102, N802 - logging's
        return shown(super().formatMessage(record))

    def formatException(self, ei) -> str:  # noqa: D102, N802 - logging's hook
        return _escaped(_CONTROLS_IN_LINES, super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:  # noqa: D102, N802 - logging's hook
        return _escaped(_CONTROLS_IN_LINES, super().formatStack(stack_info))


class UserError(click.ClickException):
    """An error the user can act on: printed as `error: …`, exit code 1."""

    def show(self, file=None) -> None:  # noqa: D102 - click's hook
        click.echo(f"error: {shown(self.message)}", err=True)


# Bad input, missing or unreadable files, a zip that is not one, an external tool that failed.
EXPECTED = (ValueError, OSError, zipfile.BadZipFile, subprocess.CalledProcessError)
TORCH_EXPECTED = (*EXPECTED, RuntimeError)  # torch's own (CUDA out of memory, a bad checkpoint)


@contextlib.contextmanager
def user_errors(kinds: tuple[type[Exception], ...] = EXPECTED):
    """Turn the library's expected exceptions into `error: …` and exit 1 (traceback with -v)."""
    try:
        yield
    except kinds as exc:
        log.debug("traceback:", exc_info=True)
        text = str(exc)
        if not isinstance(exc, EXPECTED):  # torch's own: often many lines (CUDA, compile)
            text = torch_summary(text) or type(exc).__name__
            if not log.isEnabledFor(logging.DEBUG):
                text += " (`pipeline -v COMMAND …` shows its traceback)"
        raise UserError(text) from None


def torch_summary(text: str, limit: int = 400) -> str:
    """The line of a torch error's many that says what went wrong: the first, and the ones
    it introduces (`backend='inductor' raised:` is followed by the compiler's error); for an
    error re-raised from a DataLoader worker, the worker's own last line too."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return ""
    summary, rest = lines[0], lines[1:]
    if "Original Traceback" in text:  # "Caught X in DataLoader worker process 0." ... "X: why"
        return f"{summary} {lines[-1]}"[:limit]
    while summary.endswith(":") and rest:
        summary = f"{summary} {rest.pop(0)}"
    return summary[:limit]


def default_of(source: Any, name: str) -> Any:
    """The default of a dataclass field or of a function's parameter called `name`."""
    if dataclasses.is_dataclass(source):
        found = {f.name: f for f in dataclasses.fields(source)}[name]
        if found.default is not dataclasses.MISSING:
            return found.default
        if found.default_factory is not dataclasses.MISSING:
            return found.default_factory()
        raise TypeError(f"{source.__name__}.{name} has no default")
    default = inspect.signature(source).parameters[name].default
    if default is inspect.Parameter.empty:
        raise TypeError(f"{source.__name__}({name}) has no default")
    return default


def option_from(
    source: Any, name: str, *decls: str, show: Callable[[Any], Any] | None = None, **kwargs
) -> Callable:
    """A click option for `name` whose default is `source`'s (a dataclass or a function).

    `show` turns the default into what the option takes (e.g. a tuple into "1,2").
    """
    default = default_of(source, name)
    if show is not None:
        default = show(default)
    kwargs.setdefault("show_default", True)
    return click.option(*decls, name, default=default, **kwargs)


class FiniteFloatRange(click.FloatRange):
    """click.FloatRange, but finite: click takes "nan" and "inf" as floats, NaN compares false
    with both bounds and would pass, and either trains to NaN."""

    def convert(self, value, param, ctx):  # noqa: D102 - click's hook
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value} is not a finite number", param, ctx)
        return number


POSITIVE = FiniteFloatRange(min=0, min_open=True)  # a decay factor
NON_NEGATIVE = FiniteFloatRange(min=0)  # a rate, momentum, decay, a loss weight: 0 turns it off


def finite(value: Any) -> Any:
    """NaN (a metric with nothing to average) or inf (no best IoU yet) becomes null: strict
    JSON has neither."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def emit_json(data: dict, indent: int | None = None) -> None:
    """Print `data` as strict JSON on stdout."""
    click.echo(json.dumps(finite(data), indent=indent, allow_nan=False))


def batches_option(_ctx, _param, value):
    """click callback: `1-3,5` -> [1, 2, 3, 5], or a usage error."""
    from pipeline.store.names import parse_batches

    if value is None:
        return None
    try:
        return parse_batches(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def json_flag(help_text: str = "Print only the result, as JSON.") -> Callable:
    """The `--json` flag, as every command spells it."""
    return click.option("--json", "as_json", is_flag=True, help=help_text)
