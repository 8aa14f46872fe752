"""The house: three stages that import downwards only, no torch where none is needed, small
modules, a CLI that starts fast, and Docker files that lint clean."""

from __future__ import annotations

import ast
import getpass
import pwd
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from pipeline.cli import cli

ROOT = Path(__file__).resolve().parents[1]
# Floors, lowest first: a module may import its own floor and those below, never above.
FLOORS = {
    "model": 0,
    "pipeline": 1,  # __init__ (the version)
    "pipeline.schema": 1,
    "pipeline.images": 1,
    "pipeline.store": 2,
    "pipeline.train": 3,
    "pipeline.deploy": 4,
    "pipeline.bench": 5,
    "pipeline.cli": 6,
    "pipeline.__main__": 6,
}
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted([*ROOT.glob("pipeline/**/*.py"), *ROOT.glob("model/**/*.py")]):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _floor(module: str) -> int:
    best = max((k for k in FLOORS if module == k or module.startswith(k + ".")), key=len)
    return FLOORS[best]


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """The project modules a file imports (at module level only, if asked)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    modules = _modules()
    return {name for name in names if name in modules}


def test_every_import_points_down() -> None:
    wrong = []
    for name, path in _modules().items():
        for target in _imports(path, top_level_only=False):
            if _floor(target) > _floor(name):
                wrong.append(f"{name} imports {target}")
    assert not wrong, wrong


def test_no_import_circle() -> None:
    graph = {name: _imports(path, True) - {name} for name, path in _modules().items()}
    # A package's submodule importing its package's __init__ only is not a circle here:
    # every __init__ of ours is a docstring (checked below).
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError(" -> ".join([*trail, node, nxt]))
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])


def test_stage_packages_import_nothing_on_their_own() -> None:
    for package in ("store", "train", "deploy", "bench"):
        tree = ast.parse((ROOT / "pipeline" / package / "__init__.py").read_text())
        assert all(isinstance(node, ast.Expr) for node in tree.body), package


def test_no_module_over_400_lines() -> None:
    long = {
        name: n
        for name, path in _modules().items()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, long


def test_store_and_the_cli_never_import_torch() -> None:
    store = [name for name in _modules() if name.startswith("pipeline.store.")]
    code = (
        "import importlib, sys\n"
        f"for name in {store + ['pipeline.cli', 'pipeline.schema', 'pipeline.images']!r}:\n"
        "    importlib.import_module(name)\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert len(store) >= 8  # names, zipread, tar, tarread, convert, runner, catalog, verify, synth


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
        ["bench", "quality", "--help"],
    ):
        result = runner.invoke(cli, args)
        assert result.exit_code == 0 and "Usage:" in result.output, args


def test_option_defaults_are_the_config_dataclasses() -> None:
    from pipeline.store.runner import ConvertConfig
    from pipeline.train.config import TrainConfig

    train = {p.name: p.default for p in cli.commands["train"].params}
    for name in ("epochs", "batch_size", "lr", "momentum", "workers", "mask_weight", "amp"):
        assert train[name] == getattr(TrainConfig, name), name
    convert = {p.name: p.default for p in cli.commands["convert"].params}
    assert convert["shard_samples"] == ConvertConfig.shard_samples
    assert convert["test_batches"] == ",".join(map(str, ConvertConfig.test_batches))


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerignore_keeps_local_output_out() -> None:
    lines = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", "shards", "runs", ".git"} <= lines
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert '"pipeline"]' in dockerfile and dockerfile.startswith("#")
    assert not any(line.startswith("docker") for line in lines)  # the constraints go in


def test_dockerfile_installs_pinned_dependencies_before_the_sources_as_no_root() -> None:
    steps = [
        line.split("#")[0].strip()
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    text = "\n".join(steps)
    deps = text.index("pip install --no-cache-dir -r docker/constraints.txt")
    assert deps < text.index("COPY pipeline") < text.index('".[export]"')
    assert "USER 1000" in text and 'ENTRYPOINT ["/usr/bin/tini", "--", "pipeline"]' in text


def dockerfile_env() -> dict[str, str]:
    """The variables the Dockerfile's ENV instructions set."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    env = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(word.split("=", 1) for word in shlex.split(line[4:]))
    return env


def test_the_image_names_a_user_docker_run_user_gives_no_name(monkeypatch) -> None:
    # `docker run --user "$(id -u):$(id -g)"` (the README's examples) runs as a uid without an
    # /etc/passwd entry; torch before 2.13 names its --compile cache by getpass.getuser().
    for name in ("LOGNAME", "USER", "LNAME", "USERNAME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in dockerfile_env().items():
        monkeypatch.setenv(name, value)

    def no_entry(uid: int):
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    assert getpass.getuser() == "pipeline"


def test_docker_constraints_pin_every_dependency_but_torch() -> None:
    import configparser

    from packaging.requirements import Requirement

    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    wanted = config["options"]["install_requires"].split()
    wanted += config["options.extras_require"]["export"].split()
    pins = {}
    for line in (ROOT / "docker" / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name] = version
    assert "torch" not in pins  # the base image's CUDA build stays
    for text in wanted:
        req = Requirement(text)
        name = req.name.lower().replace("_", "-")
        if name == "torch":
            continue
        assert name in pins, f"{name}: run scripts/docker_constraints.py"
        assert req.specifier.contains(pins[name]), (name, pins[name], str(req.specifier))
