"""docs/FORMAT.md's promises about reading the shards with other tools, checked with those tools."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import webdataset as wds

from pipeline.schema import split_shards, wids_index_name
from pipeline.store.runner import ConvertConfig, convert_zips
from pipeline.store.synth import synth_zips
from pipeline.store.tarread import read_samples
from pipeline.store.verify import verify_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Two synthetic zips (batch 1 train, batch 10 test) in shards of 10 samples."""
    root = tmp_path_factory.mktemp("format")
    zips = synth_zips(root / "zips", batches=[1, 10], samples=25, seed=3)
    summary = convert_zips(zips, ConvertConfig(out=root / "shards", shard_samples=10))
    assert summary.ok
    return root / "shards"


def _our_samples(shards: Path, split: str) -> list[dict]:
    manifest = json.loads((shards / "manifest.json").read_text())
    samples = []
    for shard in split_shards(manifest, split):
        with open(shards / shard["path"], "rb") as stream:
            samples += list(read_samples(stream, shard["path"]))
    return samples


def test_convert_writes_a_wids_index_that_wids_reads(shards: Path, tmp_path, monkeypatch) -> None:
    import wids

    monkeypatch.setenv("WIDS_CACHE", str(tmp_path / "cache"))
    ours = _our_samples(shards, "train")
    dataset = wids.ShardListDataset(str(shards / wids_index_name("train")))
    assert len(dataset) == len(ours) == 25
    for index in (0, 13, 24):  # random access, across shards
        sample = dataset[index]
        assert sample["__key__"] == ours[index]["__key__"]
        assert json.loads(ours[index]["json"]) == sample[".json"]
        assert sample[".mask.jpg"].size == (160, 160)


def test_verify_fails_on_a_missing_or_stale_wids_index(shards: Path, tmp_path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    assert verify_shards(copy, workers=1, progress=False).ok
    index = copy / wids_index_name("test")
    data = json.loads(index.read_text())
    data["shardlist"][0]["nsamples"] += 1
    index.write_text(json.dumps(data))
    problems = [p["problem"] for p in verify_shards(copy, workers=1, progress=False).problems]
    assert problems == ["test.wids.json does not list the manifest's test shards"]
    index.unlink()
    problems = [p["problem"] for p in verify_shards(copy, workers=1, progress=False).problems]
    assert problems == ["test.wids.json is missing (re-run convert to write it)"]


def test_stock_webdataset_pill_keeps_gray_and_pil_makes_rgb(shards: Path) -> None:
    urls = [str(shards / s["path"]) for s in json.loads((shards / "manifest.json").read_text())[
        "splits"]["test"]["shards"]]  # fmt: skip
    gray = next(iter(wds.WebDataset(urls, shardshuffle=False).decode("pill")))
    assert {gray[f"{f}.jpg"].mode for f in ("bg", "fg_bg", "mask", "depth")} == {"L"}
    rgb = next(iter(wds.WebDataset(urls, shardshuffle=False).decode("pil")))
    assert rgb["bg.jpg"].mode == "RGB"


def test_stock_webdataset_needs_empty_check_off_with_fewer_shards_than_workers(shards) -> None:
    one = [str(shards / "test" / "batch10-000000.tar")]

    def count(empty_check: bool) -> int:
        dataset = wds.WebDataset(one, shardshuffle=False, empty_check=empty_check)
        loader = torch.utils.data.DataLoader(dataset, num_workers=2, batch_size=None)
        return sum(1 for _ in loader)

    assert count(empty_check=False) == 10
    with pytest.raises(ValueError):
        count(empty_check=True)  # the worker without a shard raises


def test_hugging_face_datasets_loads_the_shards(shards: Path, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from datasets import load_dataset

    files = {split: str(shards / split / "*.tar") for split in ("train", "test")}
    data = load_dataset("webdataset", data_files=files, cache_dir=str(tmp_path / "hf"))
    assert (data["train"].num_rows, data["test"].num_rows) == (25, 25)
    first = data["test"][0]
    assert first["mask.jpg"].mode == "L" and first["json"]["batch"] == 10


def test_hugging_face_refuses_mixed_mask_formats_as_documented(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from datasets import load_dataset

    zips = synth_zips(tmp_path / "zips", batches=[1], samples=12, seed=4, png_masks=True)
    out = tmp_path / "shards"
    assert convert_zips(zips, ConvertConfig(out=out, test_batches=(), shard_samples=12)).ok
    samples = _our_samples(out, "train")
    assert {"mask.png", "mask.jpg"} <= {k for s in samples for k in s}  # both formats present
    gray = next(
        iter(wds.WebDataset([str(p) for p in (out / "train").glob("*.tar")]).decode("pill"))
    )
    assert (gray.get("mask.jpg") or gray["mask.png"]).mode == "L"
    with pytest.raises(ValueError, match="same prefix or the same types"):
        load_dataset("webdataset", data_files=str(out / "train" / "*.tar"), cache_dir=str(tmp_path))
