"""Recipes: data, CIFAR ResNets, configs, checkpoints, tables and the default command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
# The recipes live beside the package, not inside it: import them from the repository root.
sys.path.insert(0, str(ROOT))

from recipes import checkpoint, data, models, table  # noqa: E402
from recipes.config import fg_optimizer, load_config, parse_args, row_label  # noqa: E402

CONFIGS = sorted((ROOT / "recipes" / "configs").rglob("*.yaml"))


# ---------------------------------------------------------------------------- models
@pytest.mark.parametrize("depth", models.CIFAR_DEPTHS)
def test_cifar_resnets_are_timm_models(depth):
    name = f"resnet{depth}_cifar"
    assert timm.is_model(name)
    model = timm.create_model(name, pretrained=False, num_classes=7, in_chans=1)
    weighted = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(weighted) == depth  # option A shortcuts have no weights: 6n + 2 layers
    assert model.pretrained_cfg["classifier"] == "fc"
    assert model.get_classifier().out_features == 7
    if depth <= 20:  # the deeper ones share the code; their forward passes only cost time
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 7)


def test_rcd110_matches_he_et_al():
    model = timm.create_model("resnet110_cifar", pretrained=False)
    # He et al. 2016, Table 6: ResNet-110 has 1.7M parameters.
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(1.7e6, rel=0.03)
    assert not any(isinstance(m, timm.layers.DropPath) for m in model.modules())
    stochastic = timm.create_model("resnet110_cifar", drop_path_rate=0.5)
    assert any(isinstance(m, timm.layers.DropPath) for m in stochastic.modules())


def test_cifar_resnet_rejects_pretrained_and_bad_depth():
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("resnet20_cifar", pretrained=True)
    with pytest.raises(ValueError, match="6n \\+ 2"):
        models.CifarResNet(depth=21)


# ---------------------------------------------------------------------------- data
def test_mnist5k_is_the_real_shipped_subset():
    images, labels = data.load_mnist5k()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [500] * 10
    assert images.max() == 255 and images.min() == 0


def test_embedded_split_is_fixed_and_stratified():
    a = data.create_datasets("mnist5k")
    b = data.create_datasets("mnist5k")
    assert (len(a.train), len(a.eval)) == (4000, 1000)
    assert (a.num_classes, a.in_chans, a.img_size) == (10, 1, 28)
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    assert np.bincount(a.eval.tensors[1].numpy()).tolist() == [100] * 10
    _, labels = data.load_mnist5k()
    train_idx, test_idx = data.stratified_split(labels, 0.2)
    assert not set(train_idx) & set(test_idx)
    digits = data.create_datasets("digits")
    assert (len(digits.train) + len(digits.eval), digits.img_size) == (1797, 8)


def test_subsets_are_fixed():
    a = data.create_datasets("digits", train_subset=50, eval_subset=20)
    b = data.create_datasets("digits", train_subset=50, eval_subset=20)
    assert (len(a.train), len(a.eval)) == (50, 20)
    assert a.train.indices == b.train.indices


def test_shard_sampler_orders_by_seed_and_epoch_and_splits_ranks():
    s = data.ShardSampler(10, seed=3)
    s.set_epoch(1)
    first = list(s)
    s.set_epoch(2)
    assert sorted(first) == list(range(10)) and list(s) != first
    s.set_epoch(1)
    assert list(s) == first
    shards = [data.ShardSampler(10, rank=r, world_size=3, seed=3) for r in range(3)]
    assert {len(sh) for sh in shards} == {4}
    assert set().union(*map(set, shards)) == set(range(10))
    evals = [list(data.ShardSampler(10, rank=r, world_size=3, shuffle=False)) for r in range(3)]
    assert sorted(i for shard in evals for i in shard) == list(range(10))


@pytest.mark.parametrize("name", ["torch/cifar10", "cifar100", "torch/fashion_mnist"])
def test_missing_torchvision_data_names_what_is_expected(tmp_path, name):
    with pytest.raises(data.DataError, match="--data-dir") as missing:
        data.create_datasets(name, str(tmp_path / "nope"))
    expected = {
        "torch/cifar10": "cifar-10-batches-py",
        "cifar100": "cifar-100-python",
        "torch/fashion_mnist": "FashionMNIST/raw",
    }[name]
    assert expected in str(missing.value)
    with pytest.raises(data.DataError, match="nothing is downloaded") as empty:
        data.create_datasets(name, str(tmp_path))
    assert expected in str(empty.value)


def _image_tree(root: Path, splits=("train", "val"), classes=("cat", "dog")) -> None:
    from PIL import Image

    for split in splits:
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (40, 30), (i * 90, 20, 200)).save(root / split / c / f"{i}.png")


def test_image_folder_tree(tmp_path):
    _image_tree(tmp_path)
    info = data.create_datasets("imagenet", str(tmp_path), img_size=32)
    assert (info.num_classes, info.in_chans, len(info.train), len(info.eval)) == (2, 3, 4, 4)
    x, y = info.eval[0]
    assert x.shape == (3, 32, 32) and y == 0


def test_malformed_image_folder_trees(tmp_path):
    _image_tree(tmp_path / "no_val", splits=("train",))
    with pytest.raises(data.DataError, match="val is missing; expected DATA_DIR/train/<class>"):
        data.create_datasets("folder", str(tmp_path / "no_val"))
    (tmp_path / "flat" / "train").mkdir(parents=True)
    (tmp_path / "flat" / "val").mkdir(parents=True)
    with pytest.raises(data.DataError, match="one sub-folder per class"):
        data.create_datasets("folder", str(tmp_path / "flat"))
    _image_tree(tmp_path / "mismatch" / "a", splits=("train",))
    _image_tree(tmp_path / "mismatch" / "b", splits=("val",), classes=("cat", "cow"))
    os.rename(tmp_path / "mismatch" / "a" / "train", tmp_path / "mismatch" / "train")
    os.rename(tmp_path / "mismatch" / "b" / "val", tmp_path / "mismatch" / "val")
    with pytest.raises(data.DataError, match="names differ"):
        data.create_datasets("folder", str(tmp_path / "mismatch"))


def test_unknown_dataset_lists_the_valid_names():
    with pytest.raises(ValueError, match="mnist5k, digits, torch/cifar10"):
        data.canonical_dataset("svhn")


# ---------------------------------------------------------------------------- configs
def test_defaults_are_the_default_config():
    from_flags, _ = parse_args([])
    from_file, _ = parse_args(["--config", str(ROOT / "recipes/configs/default.yaml")])
    assert {**vars(from_file), "config": ""} == vars(from_flags)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_every_config_parses_and_names_real_things(path):
    from fgo_geoopt.collections import resolve_strategy

    args, text = parse_args(["--config", str(path), "--epochs", "7"])
    assert args.epochs == 7  # command line beats the file
    assert yaml.safe_load(text)["model"] == args.model
    assert timm.is_model(args.model)
    for row in args.fg_strategy:
        resolve_strategy(row)
        fg_optimizer(args.opt, row)
    data.canonical_dataset(args.dataset)


@pytest.mark.parametrize("model", ["resnet50", "seresnet50", "resnet101", "seresnet101"])
def test_imagenet_configs_follow_the_protocol(model):
    args, _ = parse_args(["--config", str(ROOT / f"recipes/configs/imagenet/{model}.yaml")])
    assert (args.model, args.dataset, args.opt, args.momentum) == (
        model,
        "imagenet",
        "momentum",
        0.9,
    )
    assert (args.sched, args.epochs, args.decay_epochs) == ("step", 100, 30)
    assert set(args.fg_strategy) == set(table.PAPER_TABLE3[model])


def test_config_rejects_unknown_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("modle: resnet50\n")
    with pytest.raises(SystemExit, match="unknown keys \\['modle'\\]"):
        load_config(bad)


def test_fg_optimizer_keeps_momentum_semantics():
    # timm's "sgd" is Nesterov SGD; its FG counterpart must be Nesterov too.
    assert fg_optimizer("sgd", "pio4") == "nfgsgd"
    assert fg_optimizer("momentum", "st") == "fgsgd"
    assert fg_optimizer("momentum", "euc") == "momentum"
    assert fg_optimizer("adamw", "pio3") == "fgadam"  # decoupled decay on both sides
    assert fg_optimizer("adamw", "euc") == "adamw"
    with pytest.raises(ValueError, match="no FG counterpart"):
        fg_optimizer("adam", "pio3")  # timm's adam couples the decay to the gradient
    assert row_label("pio4") == "PIO (Sp+Ob+St+Euc.)"
    assert row_label("pi", ["sphere", "stiefel"]) == "PI (Sp+St)"


# ---------------------------------------------------------------------------- checkpoints
def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    checkpoint.save_checkpoint(path, {"epoch": 1, "w": torch.ones(3)})

    def dying_save(obj, f):
        Path(f).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(path, {"epoch": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    assert checkpoint.load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    # The legacy numpy generator on purpose: it is the global state a checkpoint must keep.
    import random

    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)  # noqa: NPY002
    checkpoint.save_checkpoint(tmp_path / "rng.pth", {"rng": checkpoint.rng_state()})
    expected = (torch.rand(3), random.random(), np.random.rand())  # noqa: NPY002
    torch.manual_seed(9)
    random.seed(9)
    np.random.seed(9)  # noqa: NPY002
    checkpoint.set_rng_state(checkpoint.load_checkpoint(tmp_path / "rng.pth")["rng"])
    got = (torch.rand(3), random.random(), np.random.rand())  # noqa: NPY002
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


# ---------------------------------------------------------------------------- tables
def _result(row, seed, top1, model="resnet50", dataset="imagenet"):
    return {"row": row, "seed": seed, "eval_top1": top1, "model": model, "dataset": dataset}


def test_table_has_mean_std_and_the_papers_column_for_imagenet():
    results = [_result("pio4", 0, 77.0), _result("euc", 0, 75.0), _result("euc", 1, 76.0)]
    text = table.results_table(results)
    lines = text.splitlines()
    assert lines[0] == (
        "| Row | resnet50 on imagenet: top-1 err. % (n=1/2) | paper: ImageNet ResNet-50 |"
    )
    assert lines[2] == "| Euc. | 24.50 ± 0.71 | 24.73 ± 0.32 |"  # Table 3 row order
    assert lines[-1] == "| PIO (Sp+Ob+St+Euc.) | 23.00 | 22.89 ± 0.08 |"
    cifar = table.results_table([_result("euc", 0, 90.0, "resnet20_cifar", "torch/cifar10")])
    assert "paper" not in cifar


# ---------------------------------------------------------------------------- the CLI
def test_default_command_at_a_tiny_budget(tmp_path):
    """README's main command (the offline Euc. vs PIO default) with a tiny budget."""
    cmd = [
        sys.executable,
        str(ROOT / "recipes" / "train.py"),
        "--epochs",
        "1",
        "--train-subset",
        "192",
        "--eval-subset",
        "96",
        "--output",
        str(tmp_path),
        "--experiment",
        "tiny",
        "--no-progress",
    ]
    proc = subprocess.run(
        cmd,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| Euc. |" in proc.stdout and "| PIO (Sp+Ob+St+Euc.) |" in proc.stdout
    exp = tmp_path / "tiny"
    for name in ("args.yaml", "table.md", "results.csv", "curves.png", "bounds.png"):
        assert (exp / name).is_file(), name
    for run in ("euc-seed0", "pio4-seed0"):
        for name in (
            "args.yaml",
            "summary.csv",
            "bounds.csv",
            "last.pth",
            "model_best.pth",
            "curves.png",
            "bounds.png",
        ):
            assert (exp / run / name).is_file(), f"{run}/{name}"
    header = (exp / "pio4-seed0" / "summary.csv").read_text().splitlines()[0]
    assert header == "epoch,train_loss,eval_loss,eval_top1,eval_top5,lr"
    collected = table.collect([exp])
    assert sorted(r["row"] for r in collected) == ["euc", "pio4"]
    assert table.results_table(collected) == (exp / "table.md").read_text().strip()
