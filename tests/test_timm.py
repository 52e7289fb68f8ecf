"""Integration with real timm models: wrap, timm's optimizer factory, training steps, checkpoints.

Every model is built with ``pretrained=False`` and trained for a few steps on real images (the
scikit-learn digits, upsampled to 32x32 RGB); after every step every wrapped weight must still be
on its manifold.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import io
import sys

import geoopt
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fgo_geoopt as fg
from fgo_geoopt.integrations import timm as fg_timm

timm = pytest.importorskip("timm")
from timm.optim import create_optimizer_v2, optimizer_kwargs  # noqa: E402

NUM_CLASSES = 10
FAST_MODELS = [
    "resnet18",
    "efficientnet_b0",
    "mobilenetv3_small_100",
    "vit_tiny_patch16_224",
    "convnext_atto",
    "regnetx_002",
]
SLOW_MODELS = ["resnet50", "seresnet50"]
MODEL_KWARGS = {"vit_tiny_patch16_224": {"img_size": 32}}


def create(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(
        name, pretrained=False, num_classes=NUM_CLASSES, **MODEL_KWARGS.get(name, {})
    )


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Eight real digits (one per class 0-7), 32x32, three channels, normalised."""
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32) / 16.0
    labels = torch.as_tensor(digits.target)
    idx = torch.stack([torch.nonzero(labels == c)[0, 0] for c in range(8)])
    x = F.interpolate(images[idx].unsqueeze(1), size=(32, 32), mode="bilinear")
    x = ((x - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()
    return x, labels[idx]


def expected_wrapped(model: nn.Module) -> set[str]:
    """Conv2d / Linear weights outside the head named by timm's ``pretrained_cfg``."""
    head = model.pretrained_cfg["classifier"]
    return {
        f"{name}.weight"
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
        and not (name == head or name.startswith(head + "."))
    }


def manifold_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if isinstance(p, geoopt.ManifoldParameter)}


def train_steps(model, optimizer, batch, steps=3):
    x, y = batch
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
        assert fg.check(model) == []
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert manifold_names(model) <= set(moved)


def roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def check_optimizer(model, optimizer) -> None:
    assert isinstance(optimizer, fg.FGSGD)
    grouped = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped})
    assert {id(p) for p in grouped} == {id(p) for p in model.parameters()}


@pytest.mark.parametrize(
    "name", [*FAST_MODELS, *[pytest.param(n, marks=pytest.mark.slow) for n in SLOW_MODELS]]
)
def test_model_matrix(name, batch):
    """One wrap; 3 steps with timm's default groups, then 3 with ``param_group_fn``; after
    every step every wrapped weight is on its manifold; checkpoints go both ways."""
    plain = create(name)
    model = create(name)
    keys = list(plain.state_dict())
    assert fg.wrap(model) is model
    assert manifold_names(model) == expected_wrapped(model)
    assert len(fg.describe(model)) == len(expected_wrapped(model))
    assert list(model.state_dict()) == keys
    assert fg.check(model) == []

    for group_fn in (None, fg.param_groups):
        optimizer = create_optimizer_v2(
            model, "fgsgd", lr=0.05, momentum=0.9, weight_decay=1e-4, param_group_fn=group_fn
        )
        check_optimizer(model, optimizer)
        train_steps(model, optimizer, batch)
    assert list(model.state_dict()) == keys

    # The wrapped model's checkpoint loads into a plain model, exactly.
    wrapped_state = roundtrip(model.state_dict())
    plain.load_state_dict(wrapped_state)
    for key, value in plain.state_dict().items():
        assert torch.equal(value, wrapped_state[key]), key

    # A plain model's checkpoint loads into the wrapped model and is projected.
    fresh = roundtrip(create(name, seed=1).state_dict())
    model.load_state_dict(fresh)
    assert manifold_names(model) == expected_wrapped(model)
    assert fg.check(model) == []
    params = dict(model.named_parameters())
    for row in fg.describe(model)[:5]:
        p = params[row["name"]]
        torch.testing.assert_close(p.detach(), p.manifold.projx(fresh[row["name"]]))


@pytest.mark.slow
def test_resnet101_wrap_and_describe():
    model = create("resnet101")
    keys = list(model.state_dict())
    fg.wrap(model)
    rows = fg.describe(model)
    assert {r["name"] for r in rows} == expected_wrapped(model)
    assert list(model.state_dict()) == keys
    table = fg.format_table(rows)
    assert "layer4.2.conv3.weight" in table and "fc.weight" not in table


def test_heads_stay_euclidean():
    for name, head in [("test_resnet", "fc"), ("test_efficientnet", "classifier")]:
        model = fg.wrap(create(name))
        assert not isinstance(model.get_submodule(head).weight, geoopt.ManifoldParameter)
        assert manifold_names(model) == expected_wrapped(model)


def test_depthwise_convs_are_wrapped():
    model = fg.wrap(create("test_efficientnet"))
    dw = model.blocks[3][0].conv_dw
    assert dw.groups == dw.in_channels > 1
    assert isinstance(dw.weight, geoopt.ManifoldParameter)
    assert dw.weight.manifold.shape == (dw.out_channels, 1, *dw.kernel_size)


def test_nesterov_and_lookahead_names():
    model = fg.wrap(create("test_resnet"), "pio3")
    opt = create_optimizer_v2(model, "nfgsgd", lr=0.1)
    assert isinstance(opt, fg.FGSGD)
    assert opt.defaults["nesterov"] is True and opt.defaults["momentum"] == 0.9
    assert "fgsgd" in timm.optim.list_optimizers() and "nfgsgd" in timm.optim.list_optimizers()


def test_registration_is_idempotent(caplog):
    assert fg_timm.register_timm_optimizers()
    with caplog.at_level("WARNING"):
        assert fg_timm.register_timm_optimizers()
    assert "already registered" not in caplog.text


def test_registry_guarded_by_timm_version(monkeypatch):
    monkeypatch.setattr(timm, "__version__", "1.0.11")
    with pytest.raises(RuntimeError, match="no optimizer registry"):
        fg_timm._timm_registry()
    assert fg_timm.register_timm_optimizers() is False


def test_timm_decay_groups_equal_param_groups(batch):
    """timm's default groups decay every weight; FGSGD ignores decay on constrained kernels,
    so the steps equal those with :func:`param_groups` (which decays Euclidean kernels only)."""
    a, b = fg.wrap(create("test_resnet")), fg.wrap(create("test_resnet"))
    opt_a = create_optimizer_v2(a, "fgsgd", lr=0.1, weight_decay=0.05)
    opt_b = create_optimizer_v2(
        b, "fgsgd", lr=0.1, param_group_fn=functools.partial(fg.param_groups, weight_decay=0.05)
    )
    decayed = [p for g in opt_a.param_groups if g["weight_decay"] > 0 for p in g["params"]]
    assert any(isinstance(p, geoopt.ManifoldParameter) for p in decayed)
    x, y = batch
    for model, opt in ((a, opt_a), (b, opt_b)):
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, msg=name)


def test_weight_decay_never_touches_constrained_kernels(batch):
    """pio3 has no Euclidean kernels: decay changes plain parameters only."""
    runs = []
    for wd in (0.0, 0.5):
        model = fg.wrap(create("test_resnet"), "pio3")
        opt = create_optimizer_v2(model, "fgsgd", lr=0.1, momentum=0.0, weight_decay=wd)
        opt.zero_grad()
        F.cross_entropy(model(batch[0]), batch[1]).backward()
        opt.step()
        runs.append(dict(model.named_parameters()))
    for name, p in runs[0].items():
        if isinstance(p, geoopt.ManifoldParameter):
            torch.testing.assert_close(p, runs[1][name], msg=name)
    assert not torch.equal(runs[0]["fc.weight"], runs[1]["fc.weight"])


def test_param_groups_follow_timm_rules():
    model = fg.wrap(create("test_vit"), "pio4")
    groups = fg.param_groups(model, weight_decay=0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    by_decay = {}
    for g in groups:
        assert set(g) == {"params", "weight_decay"}
        for p in g["params"]:
            by_decay[names[id(p)]] = g["weight_decay"]
    assert by_decay["pos_embed"] == 0.0 and by_decay["cls_token"] == 0.0
    assert by_decay["head.weight"] == 0.01 and by_decay["head.bias"] == 0.0
    assert by_decay["blocks.0.norm1.weight"] == 0.0
    assert by_decay["blocks.0.attn.qkv.weight"] == 0.01  # pio4: Euclidean kernels decay
    strict = fg.param_groups(fg.wrap(create("test_vit"), "pio3"), weight_decay=0.01)
    assert all(
        g["weight_decay"] == 0.0
        for g in strict
        if isinstance(g["params"][0], geoopt.ManifoldParameter)
    )
    no_euc = fg.param_groups(model, weight_decay=0.01, euclidean_kernel_decay=False)
    assert all(
        g["weight_decay"] == 0.0
        for g in no_euc
        if isinstance(g["params"][0], geoopt.ManifoldParameter)
    )


def test_optimizer_state_resumes_with_weights_only(batch):
    """timm's resume loads with weights_only=True: groups must hold plain values only."""
    model = fg.wrap(create("test_resnet"))
    opt = create_optimizer_v2(model, "fgsgd", lr=0.05, param_group_fn=fg.param_groups)
    train_steps(model, opt, batch, steps=1)
    state = roundtrip(opt.state_dict())
    other = fg.wrap(create("test_resnet"))
    other.load_state_dict(model.state_dict())
    opt2 = create_optimizer_v2(other, "fgsgd", lr=0.05, param_group_fn=fg.param_groups)
    opt2.load_state_dict(state)
    for m, o in ((model, opt), (other, opt2)):
        o.zero_grad()
        F.cross_entropy(m(batch[0]), batch[1]).backward()
        o.step()
    for (name, p), q in zip(model.named_parameters(), other.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_channels_last_training(batch):
    model = fg.wrap(create("test_resnet")).to(memory_format=torch.channels_last)
    assert model.layer1[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert isinstance(model.layer1[0].conv1.weight, geoopt.ManifoldParameter)
    assert len(manifold_names(model)) == len(expected_wrapped(model))
    opt = create_optimizer_v2(model, "fgsgd", lr=0.05)
    train_steps(model, opt, (batch[0].contiguous(memory_format=torch.channels_last), batch[1]))


def test_model_ema_leaves_the_manifold_and_reproject_restores(batch):
    from timm.utils import ModelEmaV3

    model = fg.wrap(create("test_resnet"), "pio3")
    ema = ModelEmaV3(model, decay=0.5)
    opt = create_optimizer_v2(model, "fgsgd", lr=1.0)
    for step in range(1, 4):
        opt.zero_grad()
        F.cross_entropy(model(batch[0]), batch[1]).backward()
        opt.step()
        ema.update(model, step=step)
    assert manifold_names(ema.module) == manifold_names(model)
    assert fg.check(model) == []
    assert fg.check(ema.module) != []  # an average of points of a sphere is inside it
    fg.reproject(ema.module)
    assert fg.check(ema.module) == []


@pytest.fixture
def plugin(monkeypatch):
    monkeypatch.setenv("FGO_STRATEGY", "pio3")
    monkeypatch.setenv("FGO_SEED", "7")
    monkeypatch.setenv("FGO_EXCLUDE", "conv1.*,layer4.0.downsample.*")
    module = importlib.import_module("fgo_geoopt.integrations.timm_plugin")
    module.install()
    yield module
    module.uninstall()


def test_train_script_sequence_with_plugin(plugin, batch, tmp_path):
    """The calls timm's train.py makes, in its order, after ``--device-modules`` imported the
    plugin: create_model, channels_last, create_optimizer_v2(model, **optimizer_kwargs(args)),
    EMA, training, CheckpointSaver, and --resume into a fresh process-like setup."""
    from timm.models import resume_checkpoint
    from timm.utils import CheckpointSaver, ModelEmaV3

    args = argparse.Namespace(
        model="test_resnet", opt="fgsgd", lr=0.05, weight_decay=2e-5, momentum=0.9
    )

    def build():
        model = create("test_resnet", seed=3).to(memory_format=torch.channels_last)
        optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args))
        return model, optimizer

    model, optimizer = build()
    assert isinstance(optimizer, fg.FGSGD)
    excluded = {n for n in expected_wrapped(model) if n.startswith(("conv1.", "layer4.0.down"))}
    assert len(excluded) == 4  # the three convs of the deep stem and one shortcut conv
    assert manifold_names(model) == expected_wrapped(model) - excluded
    assert {r["strategy"] for r in fg.describe(model)} == {"pio"}
    ema = ModelEmaV3(model, decay=0.9)
    train_steps(model, optimizer, batch, steps=2)
    ema.update(model, step=1)
    saver = CheckpointSaver(
        model,
        optimizer,
        args=args,
        model_ema=ema,
        checkpoint_dir=str(tmp_path),
        recovery_dir=str(tmp_path),
        max_history=1,
    )
    saver.save_checkpoint(epoch=0, metric=0.0)

    resumed, opt2 = build()  # same env, same seed: the same groupings
    assert fg.grouping_state(resumed).keys() == fg.grouping_state(model).keys()
    for name, state in fg.grouping_state(model).items():
        other = fg.grouping_state(resumed)[name]
        assert torch.equal(state["kernel_pom"], other["kernel_pom"]), name
    resume_checkpoint(resumed, str(tmp_path / "last.pth.tar"), optimizer=opt2)
    for m, o in ((model, optimizer), (resumed, opt2)):
        o.zero_grad()
        F.cross_entropy(m(batch[0]), batch[1]).backward()
        o.step()
    for (name, p), q in zip(model.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_plugin_leaves_other_optimizers_and_wrapped_models_alone(plugin):
    plain = create("test_resnet")
    opt = create_optimizer_v2(plain, "sgd", lr=0.1)
    assert not manifold_names(plain) and type(opt) is torch.optim.SGD
    wrapped = fg.wrap(create("test_resnet"), "st")
    create_optimizer_v2(wrapped, "fgsgd", lr=0.1)
    assert {r["strategy"] for r in fg.describe(wrapped)} == {"single"}
    wrapped.to("meta")  # torch replaces the parameters: FG-SGD must not run them as plain
    with pytest.raises(ValueError, match="lost its manifold"):
        create_optimizer_v2(wrapped, "fgsgd", lr=0.1)


def test_plugin_config_from_env():
    from fgo_geoopt.integrations.timm_plugin import config_from_env

    cfg = config_from_env(
        {"FGO_STRATEGY": "pio", "FGO_MANIFOLDS": "sphere, stiefel", "FGO_INCLUDE": "layer*"}
    )
    assert cfg == {
        "strategy": "pio",
        "manifolds": ["sphere", "stiefel"],
        "seed": 0,
        "kernel": "auto",
        "include": ["layer*"],
        "exclude": None,
    }


def test_core_package_imports_without_timm(tmp_path):
    """``import fgo_geoopt`` and ``wrap`` work with timm unavailable; registration is skipped."""
    code = (
        "import sys, warnings; sys.modules['timm'] = None\n"
        "warnings.simplefilter('ignore', FutureWarning)\n"
        "import torch, fgo_geoopt as fg\n"
        "from fgo_geoopt.integrations.timm import register_timm_optimizers\n"
        "m = fg.wrap(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 8, 3)))\n"
        "assert fg.check(m) == [] and len(fg.describe(m)) == 2\n"
        "assert register_timm_optimizers() is False\n"
        "assert sys.modules['timm'] is None\n"
    )
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
