"""The CLI starts fast (no torch for commands that don't need it), Docker files lint clean."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from pipeline.cli import cli

ROOT = Path(__file__).resolve().parents[1]


def test_help_and_data_commands_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from pipeline import cli, convert, verify, synth, layout, jpeg, manifest, records\n"
        "from pipeline import shardwriter, shardreader, zipreader\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_command_has_help() -> None:
    runner = CliRunner()
    for args in (
        ["--help"],
        ["synth", "--help"],
        ["convert", "--help"],
        ["verify", "--help"],
        ["train", "--help"],
        ["evaluate", "--help"],
        ["predict", "--help"],
        ["export", "--help"],
        ["info", "--help"],
        ["bench", "loader", "--help"],
    ):
        result = runner.invoke(cli, args)
        assert result.exit_code == 0 and "Usage:" in result.output, args


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerignore_keeps_local_output_out() -> None:
    lines = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", "shards", "runs", ".git"} <= lines
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["pipeline"]' in dockerfile and dockerfile.startswith("#")
