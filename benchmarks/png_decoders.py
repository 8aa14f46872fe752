"""Which library decodes the published kind of PNG member faster: OpenCV or PIL?

The dataset's generator saved every flip=0 mask as an RGB PNG (a white mask on black) under a
`.jpg` name; the loader reads masks as one channel. This script writes a synthetic zip with such
masks (`pipeline synth --png-masks`), takes its PNG masks and, for comparison, its JPEG masks,
and times each decoder on one thread, `--rounds` times interleaved, keeping each one's best round
(the least disturbed on a shared machine). The figures go to docs/BENCHMARKS.md.

    .venv/bin/python benchmarks/png_decoders.py --samples 400 --seconds 1 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import tempfile
import zipfile
from pathlib import Path

from pipeline.images import DECODERS, PNG_DECODERS, image_format, measure_decoders
from pipeline.store.synth import synth_zip


def mask_members(samples: int, seed: int) -> dict[str, list[bytes]]:
    """The masks of a synthetic zip with PNG masks, by format (PNG, JPEG)."""
    with tempfile.TemporaryDirectory(prefix="png-decoders-") as tmp:
        path = synth_zip(Path(tmp) / "batch1_images.zip", 1, samples, seed=seed, png_masks=True)
        with zipfile.ZipFile(path) as zf:
            masks = [zf.read(n) for n in zf.namelist() if n.startswith("mask_black_jpg/bg_")]
    found: dict[str, list[bytes]] = {"PNG": [], "JPEG": []}
    for data in masks:
        found[image_format(data)].append(data)
    return found


def main() -> None:
    """Measure and print the best rate of each decoder as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    masks = mask_members(args.samples, args.seed)
    best: dict[str, float] = {}
    for _ in range(args.rounds):
        rates = {
            **{
                f"png/{k}": v
                for k, v in measure_decoders(masks["PNG"], 1, args.seconds, PNG_DECODERS).items()
            },
            **{
                f"jpeg/{k}": v
                for k, v in measure_decoders(masks["JPEG"], 1, args.seconds, DECODERS).items()
            },
        }
        best = {k: max(v, best.get(k, 0.0)) for k, v in rates.items()}
    counts = {fmt: len(v) for fmt, v in masks.items()}
    sizes = {fmt: round(sum(map(len, v)) / max(len(v), 1)) for fmt, v in masks.items()}
    print(
        json.dumps(
            {
                "masks": counts,
                "mean_bytes": sizes,
                "images_per_s": {k: round(v) for k, v in best.items()},
                "png_cv2_over_pil": round(best["png/cv2"] / best["png/pil"], 2),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
