"""Peak memory of `pipeline convert` on a deflate bomb (issue 9): a zip of a few synthetic
samples plus one fg_bg member that inflates to 1 GiB of zeros (about 1 MB compressed).

    python benchmarks/bomb_memory.py [--gib 1] [--work DIR]

Builds two zips, each converted by `pipeline convert` in a child process; prints the child's
peak resident memory (ru_maxrss) for each:
- "honest": the bomb's header declares its 1 GiB (refused from the header alone);
- "lying": its header declares 8,000 bytes (the inflate must stop there by itself).
"""

from __future__ import annotations

import argparse
import resource
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from pipeline.store.synth import synth_zips

CHUNK = 1 << 24


def add_bomb(path: Path, gib: float) -> str:
    """Append a bomb sample (an existing sample's mask and depth, a bomb fg_bg); its name."""
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as zf:
        first = next(n for n in zf.namelist() if n.startswith("fg_bg_jpg/fg_bg_"))
        stem = first.removeprefix("fg_bg_jpg/fg_bg_").removesuffix(".jpg")
        bomb_stem = "999_" + stem.split("_", 1)[1]  # the same background, another foreground
        for folder, prefix in (("mask_black_jpg", "bg_mask_"), ("depth_fg_bg_jpg", "depth_fg_bg_")):
            data = zf.read(f"{folder}/{prefix}{stem}.jpg")
            zf.writestr(f"{folder}/{prefix}{bomb_stem}.jpg", data)
        bomb = f"fg_bg_jpg/fg_bg_{bomb_stem}.jpg"
        left = int(gib * (1 << 30))
        with zf.open(bomb, "w") as member:
            zeros = bytes(CHUNK)
            while left > 0:
                member.write(zeros[: min(left, CHUNK)])
                left -= CHUNK
    return bomb


def declare_size(path: Path, name: str, size: int) -> None:
    """Patch the member's uncompressed size in its local header and its directory entry."""
    data = bytearray(path.read_bytes())
    raw = name.encode()
    with zipfile.ZipFile(path) as zf:
        offset = zf.getinfo(name).header_offset
    struct.pack_into("<L", data, offset + 22, size)  # local header: uncompressed size
    central = data.rfind(b"PK\x01\x02", 0, data.rindex(raw))
    struct.pack_into("<L", data, central + 24, size)  # central directory: uncompressed size
    path.write_bytes(bytes(data))


def peak_of_convert(zip_path: Path, out: Path) -> tuple[int, float, str]:
    """(exit code, peak resident MB of the child, what it said of the bomb) of one convert."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    cmd = [sys.executable, "-m", "pipeline", "convert", str(zip_path), "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak <= before:
        raise RuntimeError("ru_maxrss did not grow: measure one convert per process")
    told = [line for line in done.stderr.splitlines() if "999_" in line] or [done.stderr[-300:]]
    return done.returncode, peak / 1024, told[0]


def main() -> None:
    """Build the bombs, convert each in a child, print the peaks."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="what the bomb inflates to")
    parser.add_argument("--work", type=Path, default=None, help="folder for the zips")
    parser.add_argument("--variant", choices=["honest", "lying"], required=True)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.work, prefix="bomb-") as tmp:
        root = Path(tmp)
        (path,) = synth_zips(root / "zips", batches=[1], samples=20, seed=0)
        bomb = add_bomb(path, args.gib)
        if args.variant == "lying":
            declare_size(path, bomb, 8000)
        size_mb = path.stat().st_size / 1e6
        code, peak, line = peak_of_convert(path, root / "shards")
        print(f"{args.variant}: zip {size_mb:.2f} MB, exit {code}, peak RSS {peak:.0f} MB")
        print(f"  {line}")


if __name__ == "__main__":
    main()
