"""import-weights: the published network's state_dict -> a checkpoint that evaluate, predict,
export and train --init accept, giving the published outputs."""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import smoke_config
from torch.nn import functional as F

from model import UNet, UNetConfig
from pipeline.cli import cli
from pipeline.deploy.weights import import_weights
from pipeline.train.checkpoint import load_checkpoint, model_from_checkpoint

REAL = Path(__file__).parent / "fixtures" / "real-sample"

# The published layout, written from docs/PUBLISHED.md's list (not from model/unet.py): each
# DoubleConv as (prefix, in, mid, out), then the heads as (prefix, in, out, stride).
BLOCKS = [
    ("inc.double_conv", None, 32, 32),  # in: 2 x the image channels
    ("down1.maxpool_conv.1.double_conv", 32, 64, 64),
    ("down2.maxpool_conv.1.double_conv", 64, 128, 128),
    ("down3.maxpool_conv.1.double_conv", 128, 256, 256),
    ("down4.maxpool_conv.1.double_conv", 256, 256, 256),
    ("up1.conv.double_conv", 512, 256, 128),
    ("up2.conv.double_conv", 256, 128, 64),
    ("up3.conv.double_conv", 128, 64, 32),
    ("up4.conv.double_conv", 64, 32, 32),
]
HEADS = [("outc.conv", 32, 1, 1), ("outd.conv", 32, 1, 2)]
SPOT_CHECKS = {  # lines copied from PUBLISHED.md
    "inc.double_conv.0.pointwise.weight": (32, 2, 1, 1),
    "down1.maxpool_conv.1.double_conv.1.num_batches_tracked": (),
    "down4.maxpool_conv.1.double_conv.0.pointwise.weight": (256, 256, 1, 1),
    "up1.conv.double_conv.0.depthwise.weight": (512, 1, 3, 3),
    "up1.conv.double_conv.3.pointwise.weight": (128, 256, 1, 1),
    "up4.conv.double_conv.4.running_var": (32,),
    "outd.conv.pointwise.weight": (1, 32, 1, 1),
}


def _separable(prefix: str, cin: int, cout: int) -> list[tuple[str, tuple]]:
    return [
        (f"{prefix}.depthwise.weight", (cin, 1, 3, 3)),
        (f"{prefix}.depthwise.bias", (cin,)),
        (f"{prefix}.pointwise.weight", (cout, cin, 1, 1)),
        (f"{prefix}.pointwise.bias", (cout,)),
    ]


def _batch_norm(prefix: str, n: int) -> list[tuple[str, tuple]]:
    names = ("weight", "bias", "running_mean", "running_var")
    return [(f"{prefix}.{name}", (n,)) for name in names] + [(f"{prefix}.num_batches_tracked", ())]


def published_layout(channels: int = 1) -> list[tuple[str, tuple]]:
    """The 170 (name, shape) entries of the published state_dict, in order."""
    layout = []
    for prefix, cin, mid, cout in BLOCKS:
        cin = cin or 2 * channels
        layout += _separable(f"{prefix}.0", cin, mid) + _batch_norm(f"{prefix}.1", mid)
        layout += _separable(f"{prefix}.3", mid, cout) + _batch_norm(f"{prefix}.4", cout)
    for prefix, cin, cout, _ in HEADS:
        layout += _separable(prefix, cin, cout)
    return layout


def published_state(channels: int = 1, seed: int = 0, prefix: str = "") -> OrderedDict:
    """Random weights in the published layout, scaled like a trained network's (activations
    stay near 1), BatchNorm statistics plausible."""
    g = torch.Generator().manual_seed(seed)
    state = OrderedDict()
    for name, shape in published_layout(channels):
        if name.endswith("num_batches_tracked"):
            value = torch.tensor(7)
        elif name.endswith(("running_var", ".1.weight", ".4.weight")):
            value = 0.5 + torch.rand(shape, generator=g)
        elif len(shape) == 4:  # a convolution: scaled by its fan-in
            value = torch.randn(shape, generator=g) / torch.Size(shape[1:]).numel() ** 0.5
        else:
            value = 0.1 * torch.randn(shape, generator=g)
        state[prefix + name] = value
    return state


def published_forward(state: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The published forward pass from the state_dict alone (eval mode): the decoder run once
    per head, raw mask logits, raw depth min-max normalised per image."""

    def sep(x, p, stride=1):
        x = F.conv2d(x, state[f"{p}.depthwise.weight"], state[f"{p}.depthwise.bias"], stride, 1,
                     groups=x.shape[1])  # fmt: skip
        return F.conv2d(x, state[f"{p}.pointwise.weight"], state[f"{p}.pointwise.bias"])

    def bn(x, p):
        s = {k: state[f"{p}.{k}"] for k in ("running_mean", "running_var", "weight", "bias")}
        return F.batch_norm(x, s["running_mean"], s["running_var"], s["weight"], s["bias"])

    def double(x, p):
        x = F.relu(bn(sep(x, f"{p}.0"), f"{p}.1"))
        return F.relu(bn(sep(x, f"{p}.3"), f"{p}.4"))

    def up(x, skip, p):
        x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)
        return double(torch.cat([skip, x], dim=1), p)

    x1 = double(x, "inc.double_conv")
    features = [x1]
    for k in range(1, 5):
        features.append(double(F.max_pool2d(features[-1], 2), BLOCKS[k][0]))

    def decoder():
        y = features[4]
        for k, skip in zip(range(1, 5), features[3::-1], strict=True):
            y = up(y, skip, f"up{k}.conv.double_conv")
        return y

    mask = sep(decoder(), "outc.conv")
    depth = sep(decoder(), "outd.conv", stride=2)
    depth = depth - depth.amin(dim=(2, 3), keepdim=True)
    return mask, depth / depth.amax(dim=(2, 3), keepdim=True)


@pytest.fixture(scope="module")
def seed_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("published") / "5_final.pth"
    torch.save(published_state(), path)
    return path


@pytest.fixture(scope="module")
def imported(seed_file: Path) -> Path:
    out = seed_file.parent / "imported.pt"
    import_weights(seed_file, out)
    return out


def run_cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_the_layout_copied_from_published_md():
    layout = dict(published_layout())
    assert len(published_layout()) == len(layout) == 170
    assert {name: layout[name] for name in SPOT_CHECKS} == SPOT_CHECKS
    learned = [
        shape for name, shape in layout.items() if "running" not in name and "num_" not in name
    ]
    assert sum(torch.Size(shape).numel() for shape in learned) == 513_206
    # entry i of the published state_dict has the shape of entry i of ours
    ours = [tuple(t.shape) for t in UNet(UNetConfig()).state_dict().values()]
    assert ours == [shape for _, shape in published_layout()]


@pytest.mark.parametrize("prefix", ["", "module."])  # plain, and saved from nn.DataParallel
def test_import_gives_the_published_outputs(tmp_path: Path, prefix: str):
    state = published_state(seed=1, prefix=prefix)
    torch.save(state, tmp_path / "seed.pth")
    result = import_weights(tmp_path / "seed.pth", tmp_path / "ckpt.pt")
    assert result["entries"] == 170 and result["data_parallel_prefix"] == bool(prefix)
    assert (result["mode"], result["params"], result["depth_output"]) == ("L", 513_206, "minmax")
    checkpoint = load_checkpoint(tmp_path / "ckpt.pt")
    assert checkpoint["config"]["model_args"] == {"image_channels": 1, "depth_output": "minmax"}
    model = model_from_checkpoint(checkpoint)
    x = torch.rand(3, 2, 160, 160, generator=torch.Generator().manual_seed(2))
    plain = {k.removeprefix(prefix): v for k, v in state.items()}
    with torch.no_grad():
        mask, depth = model(x)
        want_mask, want_depth = published_forward(plain, x)
    assert mask.shape == (3, 1, 160, 160) and depth.shape == (3, 1, 80, 80)
    assert torch.allclose(mask, want_mask, atol=1e-5, rtol=1e-5)
    assert torch.allclose(depth, want_depth, atol=1e-5)
    assert depth.amin(dim=(2, 3)).eq(0).all() and depth.amax(dim=(2, 3)).eq(1).all()


def test_rgb_weights_are_recognised_and_a_wrong_mode_is_named(tmp_path: Path):
    torch.save(published_state(channels=3), tmp_path / "rgb.pth")
    assert import_weights(tmp_path / "rgb.pth", tmp_path / "a.pt", mode="RGB")["mode"] == "RGB"
    assert load_checkpoint(tmp_path / "a.pt")["config"]["model_args"]["image_channels"] == 3
    with pytest.raises(ValueError, match=r"holds weights for RGB images .* not L"):
        import_weights(tmp_path / "rgb.pth", tmp_path / "b.pt", mode="L")
    assert not (tmp_path / "b.pt").exists()


def test_a_wrong_shape_or_a_missing_or_extra_key_is_named(tmp_path: Path):
    cases = {}
    state = published_state()
    state["up2.conv.double_conv.3.pointwise.weight"] = torch.zeros(64, 100, 1, 1)
    cases["shape"] = state
    state = published_state()
    del state["outd.conv.pointwise.bias"]
    cases["missing"] = state
    state = published_state()
    state["outd.conv.pointwise.bias"] = state.pop("outd.conv.pointwise.weight")  # swapped
    state["outd.conv.pointwise.weight"] = torch.zeros(1, 32, 1, 1)
    cases["order"] = state
    state = published_state()
    state["extra.weight"] = torch.zeros(1)
    cases["extra"] = state
    state = published_state()
    state["inc.double_conv.0.depthwise.weight"] = torch.ones(2, 1, 3, 3, dtype=torch.int64)
    cases["integers"] = state
    state = published_state()
    state["outc.conv.pointwise.bias"] = torch.full_like(state["outc.conv.pointwise.bias"], math.nan)
    cases["nan"] = state
    for kind, odd in {
        "meta": torch.empty(1, device="meta"),
        "sparse": torch.ones(1).to_sparse(),
    }.items():
        state = published_state()
        state["outc.conv.pointwise.bias"] = odd
        cases[kind] = state
    messages = {}
    for name, state in cases.items():
        torch.save(state, tmp_path / f"{name}.pth")
        with pytest.raises(ValueError) as info:
            import_weights(tmp_path / f"{name}.pth", tmp_path / f"{name}.pt")
        messages[name] = str(info.value)
        assert not (tmp_path / f"{name}.pt").exists()
    assert messages["shape"].endswith(
        "up2.conv.double_conv.3.pointwise.weight has shape (64, 100, 1, 1), the network needs "
        "(64, 128, 1, 1)"
    )
    assert "missing key outd.conv.pointwise.bias (entry 169 of 170)" in messages["missing"]
    assert "entry 168 is outd.conv.pointwise.bias, the published layout has " in messages["order"]
    assert "unexpected key extra.weight (entry 170)" in messages["extra"]
    assert messages["integers"].endswith(
        "inc.double_conv.0.depthwise.weight holds torch.int64 numbers, the network needs "
        "torch.float32"
    )
    assert messages["meta"].endswith(
        "outc.conv.pointwise.bias is a meta tensor (a shape without numbers), not one holding its "
        "numbers"
    )
    assert messages["sparse"].endswith(
        "outc.conv.pointwise.bias is a sparse_coo tensor, not one holding its numbers"
    )
    assert messages["nan"].endswith("1 entries hold NaN or inf (outc.conv.pointwise.bias)")


def test_import_never_replaces_its_own_source(seed_file: Path) -> None:
    before = seed_file.read_bytes()
    with pytest.raises(ValueError, match="is the weights file being imported"):
        import_weights(seed_file, seed_file)
    assert seed_file.read_bytes() == before


def test_a_pickled_model_and_other_files_are_refused_clearly(tmp_path: Path, imported: Path):
    torch.save(UNet(UNetConfig()), tmp_path / "whole.pth")  # torch.save(model): pickled code
    result = run_cli("import-weights", tmp_path / "whole.pth", "--out", tmp_path / "x.pt")
    assert result.exit_code == 1
    assert (
        "whole.pth: not a readable PyTorch weights file: it holds pickled Python objects "
        "(model.unet.UNet), which could run code" in result.output
    )
    assert "save `model.state_dict()` from the published code" in result.output
    assert "Traceback" not in result.output
    (tmp_path / "junk.pth").write_bytes(b"not a weights file")
    result = run_cli("import-weights", tmp_path / "junk.pth", "--out", tmp_path / "x.pt")
    assert (
        result.exit_code == 1 and "junk.pth: not a readable PyTorch weights file" in result.output
    )
    result = run_cli("import-weights", imported, "--out", tmp_path / "x.pt")
    assert result.exit_code == 1 and "already a pipeline checkpoint" in result.output
    result = run_cli("import-weights", tmp_path / "none.pth", "--out", tmp_path / "x.pt")
    assert result.exit_code == 1 and "none.pth: no such weights file" in result.output
    assert not (tmp_path / "x.pt").exists()


def test_cli_json(seed_file: Path, tmp_path: Path):
    result = run_cli("import-weights", seed_file, "--out", tmp_path / "c.pt", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["entries"] == 170 and report["mode"] == "L" and len(report["sha256"]) == 64
    text = run_cli("import-weights", seed_file, "--out", tmp_path / "d.pt", "--mode", "L")
    assert text.exit_code == 0 and "170 entries, L images, 513,206 parameters" in text.output


def test_the_onnx_export_of_an_imported_checkpoint_matches_pytorch(imported: Path, tmp_path):
    import onnxruntime as ort

    out = tmp_path / "published.onnx"
    result = run_cli("export", imported, "--onnx", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["max_abs_diff"] < 1e-4 and report["depth_output"] == "minmax"
    x = torch.rand(2, 2, 160, 160, generator=torch.Generator().manual_seed(5))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    mask, depth = session.run(["mask_logits", "depth"], {"inputs": x.numpy()})
    want_mask, want_depth = published_forward(published_state(), x)
    assert torch.allclose(torch.from_numpy(depth), want_depth, atol=1e-4)
    assert torch.allclose(torch.from_numpy(mask), want_mask, atol=1e-4, rtol=1e-4)


def test_evaluate_and_predict_an_imported_checkpoint(imported: Path, tiny_shards: Path, tmp_path):
    result = run_cli(
        "evaluate", imported, "--shards", tiny_shards, "--json", "--device", "cpu",
        "--workers", "0", "--batch-size", "16",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["samples"] == 48 and 0.0 <= metrics["iou_published"] <= 1.0
    assert 0.0 <= metrics["depth_ssim"] <= 1.0
    result = run_cli(
        "predict", imported, "--bg", REAL / "bg_img_51.jpg", "--fg-bg",
        REAL / "fg_bg_9_51_1_2.jpg", "--out", tmp_path / "pred", "--device", "cpu",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (tmp_path / "pred" / "fg_bg_9_51_1_2_depth.png").is_file()


def test_train_init_starts_a_new_run_from_the_imported_weights(
    imported: Path, tiny_shards: Path, tmp_path: Path, monkeypatch
):
    from pipeline.train.run import train

    out = tmp_path / "finetune"
    reads = []
    monkeypatch.setattr(
        "pipeline.train.resume.load_checkpoint",
        lambda path: reads.append(path) or load_checkpoint(path),
    )
    # lr 0: the parameters must come out exactly as imported (BatchNorm statistics still move).
    train(smoke_config(tiny_shards, out, init=str(imported), lr=0.0, weight_decay=0.0))
    assert reads == [imported]  # read once: its network's outputs and its weights
    state = load_checkpoint(out / "last.pt")
    assert state["epoch"] == 1 and state["step"] == 1
    assert state["config"]["init"] == str(imported)
    assert state["config"]["model_args"] == {"image_channels": 1, "depth_output": "minmax"}
    start = model_from_checkpoint(load_checkpoint(imported))
    end = model_from_checkpoint(state)
    for (name, before), after in zip(start.named_parameters(), end.parameters(), strict=True):
        assert torch.equal(before, after), name
    # Into a folder that holds a run, with --resume, or onto shards of another mode: refused.
    again = run_cli(
        "train", "--shards", tiny_shards, "--out", out, "--init", imported, "--device", "cpu",
        "--steps-per-epoch", "1", "--workers", "0",
    )  # fmt: skip
    assert again.exit_code == 1 and "already holds" in again.output and "last.pt" in again.output
    both = run_cli("train", "--shards", tiny_shards, "--out", out, "--init", imported, "--resume")
    assert both.exit_code in (1, 2) and "give one of them" in both.output  # 2: a usage error
    torch.save(published_state(channels=3), tmp_path / "rgb.pth")
    import_weights(tmp_path / "rgb.pth", tmp_path / "rgb.pt")
    with pytest.raises(ValueError, match="takes 3-channel images, the shards hold 1-channel"):
        train(smoke_config(tiny_shards, tmp_path / "rgb-run", init=str(tmp_path / "rgb.pt")))


def test_resume_keeps_the_published_depth_output(imported: Path, tiny_shards: Path, tmp_path):
    from pipeline.train.run import train

    out = tmp_path / "run"
    train(smoke_config(tiny_shards, out, init=str(imported)))
    train(smoke_config(tiny_shards, out, epochs=2, resume=True))
    state = load_checkpoint(out / "last.pt")
    assert state["epoch"] == 2 and state["config"]["model_args"]["depth_output"] == "minmax"


class RunsCode:
    def __reduce__(self):
        return (Path.touch, (Path("ran.txt"),))


def test_a_plain_pickle_is_one_line_without_torch_warnings(tmp_path: Path, monkeypatch):
    import pickle
    import warnings

    monkeypatch.chdir(tmp_path)
    Path("plain.pth").write_bytes(pickle.dumps(RunsCode(), protocol=4))  # not torch.save's
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_cli("import-weights", "plain.pth", "--out", "x.pt")
    assert result.exit_code == 1 and not Path("ran.txt").exists()
    assert result.stderr.strip() == (
        "error: plain.pth: not a readable PyTorch weights file: it was not written by torch.save"
    )
    assert not [w for w in caught if "pickle protocol" in str(w.message)]  # torch's two lines
