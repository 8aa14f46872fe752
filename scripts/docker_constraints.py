"""Write docker/constraints.txt: the versions installed here of everything `.[export]` needs.

    .venv/bin/python scripts/docker_constraints.py

The image pins exactly what was tested here. torch and everything torch itself requires are left
out: the base image provides its own CUDA build of torch, and pip must keep it (and the versions
torch was built with) rather than swap them for the CPU build used here.
"""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = "maskdepth-pipeline"
EXTRAS = ("export",)
OUT = Path(__file__).resolve().parents[1] / "docker" / "constraints.txt"


def canonical(name: str) -> str:
    """PEP 503 name: `Typing_Extensions` -> `typing-extensions`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def needs(name: str, extras: tuple[str, ...] = ()) -> list[str]:
    """The distributions `name` (with `extras`) requires in this environment."""
    found = []
    for text in distribution(name).requires or []:
        req = Requirement(text)
        wanted = [{**default_environment(), "extra": e} for e in ("", *extras)]
        if req.marker is None or any(req.marker.evaluate(env) for env in wanted):
            found.append(canonical(req.name))
    return found


def closure(roots: list[str]) -> set[str]:
    """Every distribution reachable from `roots` that is installed here."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            todo.extend(needs(name))
        except PackageNotFoundError:
            continue
        seen.add(name)
    return seen


def main() -> None:
    """Write the constraints file."""
    ours = closure(needs(ROOT, EXTRAS))
    torchs = closure(["torch"])
    pinned = sorted(ours - torchs)
    lines = [f"{name}=={distribution(name).version}" for name in pinned]
    header = (
        "# Made by scripts/docker_constraints.py from the versions tested here (Python 3.11);\n"
        "# torch and its own requirements are the base image's. Installed by the Dockerfile.\n"
    )
    OUT.write_text(header + "\n".join(lines) + "\n")
    print(f"{OUT}: {len(lines)} pins")


if __name__ == "__main__":
    main()
