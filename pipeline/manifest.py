"""The manifest's schema (docs/FORMAT.md): build it from per-zip records, load it, write it."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.layout import MANIFEST_NAME, SIZES, SPLITS

FORMAT_NAME = "pipeline-shards"
FORMAT_VERSION = 1
CHANNELS = {"L": 1, "RGB": 3}


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temp file beside `path`, fsync it, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_manifest(records: Iterable[dict], test_batches: Iterable[int], mode: str) -> dict:
    """The manifest of a conversion from its per-zip records (see convert's `.parts/`)."""
    records = sorted(records, key=lambda r: r["batch"])
    splits: dict[str, dict] = {split: {"samples": 0, "shards": []} for split in SPLITS}
    for record in records:
        split = splits[record["split"]]
        split["samples"] += record["samples"]
        split["shards"].extend(record["shards"])
    for split in splits.values():
        split["shards"].sort(key=lambda s: s["path"])
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "mode": mode,
        "channels": CHANNELS[mode],
        "sizes": {field: list(size) for field, size in SIZES.items()},
        "test_batches": sorted(set(test_batches)),
        "splits": splits,
        "skipped": [skip for record in records for skip in record["skipped"]],
        "sources": [_source(record) for record in records],
        "tool": f"pipeline {__version__}",
    }


def _source(record: dict) -> dict:
    keys = ("zip", "batch", "split", "samples")
    return {
        **{k: record[k] for k in keys},
        "skipped": len(record["skipped"]),
        "bytes": record["bytes"],
        "fingerprint": record["fingerprint"],
    }


def load_manifest(root: Path) -> dict:
    """Load and sanity-check `root/manifest.json`; ValueError if absent or not one of ours."""
    path = Path(root) / MANIFEST_NAME
    if not Path(root).is_dir():
        raise ValueError(f"{root}: no such folder")
    if not path.is_file():
        raise ValueError(
            f"{root}: no {MANIFEST_NAME}, so not a finished conversion "
            "(run `pipeline convert ... --out` into it, or finish the interrupted one)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    validate_manifest(data, path)
    return data


def validate_manifest(data: Any, path: Path | str) -> None:
    """Raise ValueError naming `path` if `data` lacks what FORMAT.md promises."""
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise ValueError(f"{path}: not a pipeline shard manifest (format != {FORMAT_NAME!r})")
    if data.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: manifest version {data.get('version')!r}, this tool reads {FORMAT_VERSION}"
        )
    if data.get("mode") not in CHANNELS:
        raise ValueError(f"{path}: unknown image mode {data.get('mode')!r}")
    splits = data.get("splits")
    if not isinstance(splits, dict) or any(s not in splits for s in SPLITS):
        raise ValueError(f"{path}: 'splits' must hold {' and '.join(SPLITS)}")
    for split in SPLITS:
        for shard in splits[split].get("shards", []):
            missing = {"path", "samples", "bytes", "sha256"} - set(shard)
            if missing:
                raise ValueError(f"{path}: a {split} shard lacks {sorted(missing)}: {shard}")


def shard_entries(manifest: dict) -> list[tuple[str, dict]]:
    """Every shard of the manifest as (split, entry), train first."""
    return [(split, shard) for split in SPLITS for shard in manifest["splits"][split]["shards"]]
