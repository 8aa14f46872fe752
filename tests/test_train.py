"""The trainer: checkpoints, TensorBoard scalars, --resume, and its errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import smoke_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_guard import error_line

from pipeline.cli import cli
from pipeline.train.checkpoint import load_checkpoint
from pipeline.train.config import TrainConfig
from pipeline.train.run import build_stepper, train

REQUIRED_SCALARS = {
    "train/loss",
    "train/loss_mask",
    "train/loss_depth",
    "train/iou",
    "test/loss",
    "test/iou",
    "test/iou_published",
    "test/dice",
    "test/depth_rmse",
    "test/depth_abs_rel",
    "test/depth_delta1",
    "test/depth_ssim",
    "lr",
    "perf/samples_per_s",
    "perf/data_wait_fraction",
}


def train_cli(*args):
    """`pipeline train ARGS` through click's test runner (paths may be Path objects)."""
    return CliRunner().invoke(cli, ["train", *map(str, args)])


def read_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in a run folder, read with TensorBoard's own event reader."""
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_two_steps_write_checkpoints_config_and_scalars(tiny_run: Path) -> None:
    for name in ("last.pt", "best.pt"):
        state = load_checkpoint(tiny_run / name)
        assert {"model", "optimizer", "scheduler", "epoch", "step", "config"} <= set(state)
        assert state["epoch"] == 1 and state["step"] == 2
        assert state["config"]["world_size"] == 1
        assert state["config"]["model_args"] == {"image_channels": 1, "depth_output": "sigmoid"}
    config = json.loads((tiny_run / "config.json").read_text())
    assert config["steps_per_epoch"] == 2 and config["lr"] == 0.01
    scalars = read_scalars(tiny_run)
    assert REQUIRED_SCALARS <= set(scalars), REQUIRED_SCALARS - set(scalars)
    assert all(0.0 <= v <= 1.0 for _, v in scalars["test/iou"])
    acc = EventAccumulator(str(tiny_run), size_guidance={"images": 0})
    acc.Reload()
    assert "test/grid" in acc.Tags()["images"]


def test_resume_continues_epochs_and_step_count(
    tiny_run: Path, tiny_shards: Path, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = load_checkpoint(run / "last.pt")
    config = TrainConfig(**{**before["config"], "out": str(run), "epochs": 2, "resume": True})
    config.shards = str(tiny_shards)
    reads = []
    monkeypatch.setattr(
        "pipeline.train.resume.load_checkpoint",
        lambda path: reads.append(path) or load_checkpoint(path),
    )
    train(config)
    # last.pt read once: network, weights, optimizer all from it (best.pt: is it readable?)
    assert reads == [run / "last.pt", run / "best.pt"]
    after = load_checkpoint(run / "last.pt")
    assert after["epoch"] == 2
    assert after["step"] == before["step"] + 2
    # The optimizer really continued: SGD momentum buffers exist and moved on.
    assert after["optimizer"]["state"], "optimizer state was not carried over"
    assert after["scheduler"]["last_epoch"] == 2
    assert max(step for step, _ in read_scalars(run)["test/iou"]) == 4


def test_resume_without_a_checkpoint_is_a_clear_error(tiny_shards: Path, tmp_path) -> None:
    result = train_cli(
        "--shards",
        str(tiny_shards),
        "--out",
        str(tmp_path / "none"),
        "--resume",
        "--device",
        "cpu",
        "--workers",
        "0",
    )
    assert result.exit_code == 1
    assert "last.pt" in result.output and "nothing to resume" in result.output


def test_shard_folder_without_manifest_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "shards" / "train").mkdir(parents=True)
    result = train_cli(
        "--shards", str(tmp_path / "shards"), "--out", str(tmp_path / "run"), "--device", "cpu"
    )
    assert result.exit_code == 1
    assert "manifest.json" in result.output


def test_bad_options_fail_before_any_work(tiny_shards: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="optimizer"):
        train(TrainConfig(shards=str(tiny_shards), out=str(tmp_path), optimizer="lbfgs"))
    assert not any(tmp_path.iterdir())


def test_cprofile_writes_a_dump(tiny_shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(smoke_config(tiny_shards, run, profile="cprofile"))
    import pstats

    stats = pstats.Stats(str(run / "profile-rank0.prof"))
    assert any("train_one_epoch" in func[2] for func in stats.stats)


@pytest.mark.slow
def test_torch_profiler_writes_a_trace(tiny_shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(smoke_config(tiny_shards, run, steps_per_epoch=6, profile="torch"))
    traces = list((run / "profile").glob("*.pt.trace.json*"))
    assert traces, "no torch.profiler trace written"


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16"), (False, "off")])
def test_amp_auto_on_cpu_follows_native_bf16(monkeypatch, native, expected) -> None:
    from pipeline.train import runtime

    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
    assert runtime.resolve_amp("auto", torch.device("cpu")) == expected
    assert runtime.resolve_amp("off", torch.device("cpu")) == "off"
    assert runtime.resolve_amp("bf16", torch.device("cpu")) == "bf16"  # asked for: as asked
    with pytest.raises(ValueError, match="fp16"):
        runtime.resolve_amp("fp16", torch.device("cpu"))


def test_native_bf16_is_what_pytorch_reports(monkeypatch) -> None:
    from pipeline.train import runtime

    for avx512_bf16, amx, expected in [
        (False, False, False),
        (True, False, True),
        (False, True, True),
    ]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert runtime.cpu_has_native_bf16() is expected
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")  # a build without the checks
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert runtime.cpu_has_native_bf16() is False


def test_the_stepper_trains_in_bf16_on_such_a_cpu(tiny_shards, tmp_path, monkeypatch) -> None:
    from pipeline.train import runtime

    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    _, stepper = build_stepper(smoke_config(tiny_shards, tmp_path), torch.device("cpu"), {})
    assert stepper.amp == "bf16"


def test_without_a_test_split_best_follows_training_and_no_test_scalars(tmp_path, caplog):
    from pipeline.store.runner import ConvertConfig, convert_zips
    from pipeline.store.synth import synth_zips

    zips = synth_zips(tmp_path / "zips", batches=[1], samples=16, seed=3)
    shards = tmp_path / "shards"
    assert convert_zips(zips, ConvertConfig(out=shards, shard_samples=8, progress=False)).ok
    run = tmp_path / "run"
    with caplog.at_level("WARNING"):
        train(smoke_config(shards, run))
    assert "test split is empty" in caplog.text
    assert (run / "best.pt").is_file()
    scalars = read_scalars(run)
    assert not [tag for tag in scalars if tag.startswith("test/")]
    assert {"train/loss", "train/iou", "train_epoch/iou", "lr"} <= set(scalars)


def test_steps_per_epoch_caps_but_never_extends_an_epoch(tiny_shards: Path, tmp_path) -> None:
    run = tmp_path / "run"
    # 48 training samples in batches of 16: an epoch is 3 steps, asking for 50 must not repeat data.
    train(smoke_config(tiny_shards, run, batch_size=16, steps_per_epoch=50))
    assert load_checkpoint(run / "last.pt")["step"] == 3


def test_a_broken_shard_is_a_clean_error_not_a_traceback(tiny_shards: Path, tmp_path) -> None:
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    for tar in (shards / "train").glob("*.tar"):
        tar.write_bytes(b"this is no tar file" * 40)
    result = train_cli(
        "--shards",
        str(shards),
        "--out",
        str(tmp_path / "run"),
        "--device",
        "cpu",
        "--workers",
        "1",
        "--batch-size",
        "8",
        "--steps-per-epoch",
        "1",
    )
    assert result.exit_code == 1
    assert "error:" in result.output and "Traceback" not in result.output
    assert "train split's shard files can hold none of the 48 samples" in result.stderr


def test_a_shard_file_not_the_size_its_manifest_says_bounds_the_epoch(
    tiny_shards: Path, tmp_path, monkeypatch, caplog
) -> None:
    from pipeline.schema import SAMPLE_MIN_BYTES
    from pipeline.train import run as run_module

    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    entry = manifest["splits"]["train"]["shards"][0]
    size = (shards / entry["path"]).stat().st_size
    # Within the bytes bound (2**53 bytes could hold 2**40 samples): only the file disagrees.
    # The run was planned as 1 epoch x 2**40 / 4 steps over the shard's 16 samples.
    entry.update(samples=2**40, bytes=2**53)
    (shards / "manifest.json").write_text(json.dumps(manifest))
    planned = []  # the steps per epoch the run was to train

    def no_feed(config, dist, *, steps, **_):  # the plan is made: stop before training
        planned.append(steps)
        raise ValueError("stopped before training")

    monkeypatch.setattr(run_module, "open_feed", no_feed)
    options = ("--out", tmp_path / "run", "--device", "cpu", "--workers", 0, "--batch-size", 4)
    with caplog.at_level("INFO"):
        result = train_cli("--shards", shards, *options)
    held = size // SAMPLE_MIN_BYTES + 32  # what the file can hold, and the other 2 shards' 32
    assert planned == [held // 4] and held < 100
    warning = (
        f"{shards / entry['path']}: {size} bytes, the manifest says {2**53} bytes (cut short or "
        f"changed since convert: `pipeline verify {shards}` says what is wrong); the steps per "
        f"epoch count at most {held - 32} samples in it, not the manifest's {2**40}"
    )
    assert warning in caplog.text and f"5 epochs x {held // 4} steps of 4 samples" in caplog.text
    assert error_line(result) == "error: stopped before training"


def test_resume_with_other_settings_is_a_clear_error(tiny_run: Path, tiny_shards, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    result = train_cli(
        "--shards",
        str(tiny_shards),
        "--out",
        str(run),
        "--resume",
        "--epochs",
        "2",
        "--optimizer",
        "adamw",
        "--device",
        "cpu",
        "--workers",
        "0",
    )
    assert result.exit_code == 1, result.output
    assert "--optimizer sgd -> adamw" in result.output and "Traceback" not in result.output


def test_undecodable_test_samples_are_reported_beside_the_metrics(tmp_path: Path) -> None:
    from test_loader import write_test_shards

    from model import UNet
    from pipeline.train.loader import LoaderConfig, make_eval_loader
    from pipeline.train.loop import EpochStats, evaluate
    from pipeline.train.report import epoch_line

    bad = ["b10_3_4_0_0", "b10_11_12_0_0"]
    write_test_shards(tmp_path, n_train=4, n_test=12, shard_samples=6, bad_keys=bad)
    stream = make_eval_loader(tmp_path, "test", LoaderConfig(batch_size=4, workers=0))
    metrics, _ = evaluate(UNet.from_args({}), stream, torch.device("cpu"))
    assert metrics["samples"] == 10 and metrics["skipped"] == 2
    stats = EpochStats(steps=1, loss=1.0, iou=0.5, train_s=1.0, data_s=0.1)
    perf = {"samples_per_s": 10.0, "data_wait_fraction": 0.1}
    timing = {"train_step_s": 1.0, "data_wait_s": 0.1, "eval_s": 0.5, "other_s": 0.1}
    line = epoch_line("1/1", 1, 0.01, stats, {**metrics, "loss": 1.0}, perf, timing)
    assert line.endswith(", 2 undecodable test samples skipped")


@pytest.mark.parametrize("rank", [0, 1])
def test_ranks_whose_shard_files_differ_train_the_fewest_steps(
    tiny_shards: Path, tmp_path, monkeypatch, caplog, rank: int
) -> None:
    """Under torchrun each rank stats its own view of the shards (a copy on each node, say):
    all take the fewest steps, or DDP would wait for ever on the rank that ended its epoch."""
    from pipeline.train import run as run_module
    from pipeline.train.runtime import DistInfo

    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    short = shards / manifest["splits"]["train"]["shards"][0]["path"]
    if rank == 1:  # this rank's copy of a shard is short; rank 0's are whole
        short.write_bytes(short.read_bytes()[:20480])  # room for 4 of its 16 samples
    others = 4 if rank == 0 else 6  # the other rank's steps (48 samples / (2 ranks x 4) = 6)

    def all_reduce_min(tensor):  # this rank's [steps, -steps] against the other rank's
        return torch.minimum(tensor, torch.tensor([others, -others]))

    monkeypatch.setattr(run_module, "all_reduce_min", all_reduce_min)
    config = smoke_config(shards, tmp_path / "run", batch_size=4)
    with caplog.at_level("WARNING"):
        steps = run_module._train_steps(config, DistInfo(rank=rank, world_size=2), manifest)
    if rank == 0:  # whole files: the other rank's fewer steps, and a line saying so
        assert steps == 4
        assert "another rank's train shards hold fewer samples: 4 steps per epoch, not 6" in (
            caplog.text
        )
    else:  # its short copy: the fewest steps, and its own warning naming the file
        assert steps == (4 + 32) // 8
        assert f"{short}: 20480 bytes, the manifest says" in caplog.text


def test_a_rank_whose_odd_shard_file_keeps_the_steps_still_names_it(
    tiny_shards: Path, tmp_path, monkeypatch, caplog
) -> None:
    """Rank 1's copy of a shard has another size yet can hold its count: the steps agree, but
    the file is not the one convert wrote, and only rank 0 had named its own files."""
    import zlib

    from pipeline.train import run as run_module
    from pipeline.train.runtime import DistInfo

    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    odd = shards / manifest["splits"]["train"]["shards"][0]["path"]
    odd.write_bytes(odd.read_bytes() + bytes(10240))  # bigger: its 16 samples still fit
    whole = zlib.crc32(repr([]).encode())  # rank 0's checksum: none of its files are odd

    def all_reduce_sum(tensor):  # rank 0's entry filled in, as the collective would
        return tensor + torch.tensor([whole, 0.0], dtype=tensor.dtype)

    monkeypatch.setattr(run_module, "all_reduce_min", lambda tensor: tensor)  # steps agree
    monkeypatch.setattr(run_module, "all_reduce_sum", all_reduce_sum)
    config = smoke_config(shards, tmp_path / "run", batch_size=4)
    with caplog.at_level("WARNING"):
        steps = run_module._train_steps(config, DistInfo(rank=1, world_size=2), manifest)
    assert steps == 48 // 8
    assert "rank 1: its train shard files differ from rank 0's:" in caplog.text
    assert f"{odd}: {odd.stat().st_size} bytes, the manifest says" in caplog.text


def test_a_rank_whose_shard_files_are_whole_says_so_where_rank_0_s_differ(
    tiny_shards: Path, tmp_path, monkeypatch, caplog
) -> None:
    """Rank 0 named an odd file of its own; rank 1's copies are all as the manifest says: its
    line must not announce files of its own that differ and then name none."""
    import zlib

    from pipeline.train import run as run_module
    from pipeline.train.runtime import DistInfo

    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    rank0 = zlib.crc32(repr([("a.tar", "10 bytes")]).encode())  # rank 0 had one odd file

    def all_reduce_sum(tensor):  # rank 0's entry filled in, as the collective would
        return tensor + torch.tensor([rank0, 0.0], dtype=tensor.dtype)

    monkeypatch.setattr(run_module, "all_reduce_min", lambda tensor: tensor)
    monkeypatch.setattr(run_module, "all_reduce_sum", all_reduce_sum)
    config = smoke_config(tiny_shards, tmp_path / "run", batch_size=4)
    with caplog.at_level("WARNING"):
        run_module._train_steps(config, DistInfo(rank=1, world_size=2), manifest)
    (line,) = [r.getMessage() for r in caplog.records]
    assert line == (
        "rank 1: its train shard files differ from rank 0's: each is the size the manifest "
        "says (rank 0 named its own)"
    )


def test_a_batch_larger_than_the_train_split_says_it_repeats_samples(
    tiny_shards: Path, tmp_path, monkeypatch, caplog
) -> None:
    from pipeline.train import run as run_module

    planned = []

    def no_feed(config, dist, *, steps, **_):  # the plan is made: stop before training
        planned.append(steps)
        raise ValueError("stopped before training")

    monkeypatch.setattr(run_module, "open_feed", no_feed)
    options = ("--out", tmp_path / "run", "--device", "cpu", "--workers", 0)
    with caplog.at_level("WARNING"):
        result = train_cli("--shards", tiny_shards, *options, "--batch-size", 64)
    assert planned == [1] and error_line(result) == "error: stopped before training"
    assert (
        "the train split's 48 samples do not fill one step of 1 x 64: each epoch is 1 step that "
        "repeats samples (give a --batch-size of at most 48)"
    ) in caplog.text
    caplog.clear()
    train_cli("--shards", tiny_shards, *options, "--batch-size", 48, "--overwrite")
    assert "do not fill one step" not in caplog.text
