"""The re-scaling reparameterization: statistics, the update, the constraint, state and DDP."""

from __future__ import annotations

import copy
import io
import math
import statistics
import time
from collections import Counter

import geoopt
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fgo_geoopt as fg
from fgo_geoopt.collections import build_collection
from fgo_geoopt.optim import cpu
from fgo_geoopt.rescaling import (
    Rescaler,
    entry_scale,
    fan_gamma,
    glorot_gamma,
    unit_weight,
    wrapped_layers,
)
from fgo_geoopt.testing import collections, layer_shapes

WRAPPED = ("stem", "grouped", "point", "proj")


class Net(nn.Module):
    """A conv, a grouped conv, a 1x1 conv (filter view), a body Linear and the head ``fc``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.point = nn.Conv2d(8, 12, 1)
        self.proj = nn.Linear(12, 16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.stem(x)).relu()
        x = self.bn2(self.grouped(x)).relu()
        x = self.point(x).mean((2, 3))
        return self.fc(self.proj(x).relu())


def make(strategy: str = "pio4", seed: int = 0, **kwargs) -> tuple[Net, Rescaler]:
    torch.manual_seed(seed)
    model = fg.wrap(Net(), strategy)
    return model, Rescaler(model, **kwargs)


def batches(n: int, seed: int = 0, size: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Inputs whose three channels have very different means and spreads."""
    gen = torch.Generator().manual_seed(seed)
    spread = torch.tensor([0.1, 1.0, 5.0]).view(1, 3, 1, 1)
    shift = torch.tensor([2.0, 0.0, -1.0]).view(1, 3, 1, 1)
    return [
        (torch.randn(size, 3, 6, 6, generator=gen) * spread + shift,
         torch.randint(0, 5, (size,), generator=gen))
        for _ in range(n)
    ]  # fmt: skip


def train(model: nn.Module, opt: torch.optim.Optimizer, data) -> None:
    model.train()
    for x, y in data:
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


class _Inputs:
    """Records the inputs of modules (to compute the statistics directly)."""

    def __init__(self, model: nn.Module, names) -> None:
        self.seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        self.handles = [
            model.get_submodule(n).register_forward_pre_hook(
                lambda m, args, n=n: self.seen[n].append(args[0].detach().clone())
            )
            for n in names
        ]

    def std(self, name: str, module: nn.Module) -> torch.Tensor:
        """Std per weight input channel over everything recorded, computed in float64."""
        x = torch.cat(self.seen[name]).double()
        if isinstance(module, nn.Linear):
            per_channel = x.reshape(-1, x.shape[-1]).t()
        else:
            per_channel = x.transpose(0, 1).reshape(x.shape[1], -1)
        groups = getattr(module, "groups", 1)
        width = per_channel.shape[0] // groups
        # Weight channel j of a grouped conv meets input channels j, j + width, ...
        pooled = per_channel.reshape(groups, width, -1).transpose(0, 1).reshape(width, -1)
        return pooled.std(dim=1, correction=0)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


# ---------------------------------------------------------------------- construction
def test_construction_sets_gamma_and_rescales_constrained_kernels_only():
    torch.manual_seed(0)
    model = fg.wrap(Net(), "pio4")
    before = {n: model.get_submodule(n).weight.detach().clone() for n in WRAPPED}
    rescaler = Rescaler(model)
    assert list(rescaler.layers) == list(WRAPPED) and rescaler.attached
    for name in WRAPPED:
        module = model.get_submodule(name)
        coll = module.weight.manifold
        gamma = fan_gamma(module, coll)
        fan_in, fan_out = (
            module.weight[0].numel(),
            module.weight.shape[0]
            * (module.weight[0][0].numel() if module.weight.dim() == 4 else 1),
        )
        assert gamma == pytest.approx(1 / math.sqrt(fan_in + fan_out))
        assert torch.equal(coll.scale, torch.full((coll.in_channels,), gamma, dtype=torch.float64))
        factor = entry_scale(coll, dtype=torch.float32)
        euclidean = factor == 1.0
        assert euclidean.any() and (~euclidean).any()  # pio4 mixes both
        torch.testing.assert_close(module.weight.detach(), before[name] * factor)
        assert torch.equal(module.weight.detach()[euclidean], before[name][euclidean])
    assert fg.check(model) == []


def test_existing_scales_are_kept():
    model, rescaler = make()
    scales = rescaler.scales()
    weights = [p.detach().clone() for p in model.parameters()]
    again = Rescaler(model, attach=False)
    assert all(torch.equal(scales[n], s) for n, s in again.scales().items())
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))


def test_invalid_arguments():
    with pytest.raises(ValueError, match="wrap it first"):
        Rescaler(nn.Linear(3, 2))
    torch.manual_seed(0)
    model = fg.wrap(Net(), "pio3")
    with pytest.raises(ValueError, match="gamma_fn gave"):
        Rescaler(model, lambda m, c: 0.0)
    with pytest.raises(ValueError, match="floor"):
        Rescaler(model, floor=-1.0)
    rescaler = Rescaler(model)
    with pytest.raises(ValueError, match="missing layers"):
        rescaler.load_state_dict({"layers": {}})


def _hand_wrapped(module: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    coll = build_collection(shape, "pio3")
    module.weight = geoopt.ManifoldParameter(coll.projx(torch.randn(shape)), manifold=coll)
    return module


def test_modules_of_other_types_are_skipped_with_a_reason():
    odd = _hand_wrapped(nn.Module(), (4, 3))
    model = nn.Sequential(_hand_wrapped(nn.Linear(3, 3), (3, 3)), odd)
    rescaler = Rescaler(model)
    assert [n for n, _, _ in wrapped_layers(model)] == ["0", "1"]
    assert list(rescaler.layers) == ["0"]
    assert "not an nn.Conv2d or nn.Linear" in rescaler.skipped["1"]


# ---------------------------------------------------------------------- statistics and update
def test_update_uses_the_input_std_of_the_epoch():
    model, rescaler = make(floor=0.0)
    inputs = _Inputs(model, WRAPPED)
    old = {
        n: (model.get_submodule(n).weight.detach().clone(), s) for n, s in rescaler.scales().items()
    }
    opt = fg.FGSGD(model.parameters(), lr=0.05, momentum=0.9)
    train(model, opt, batches(3))
    trained = {n: model.get_submodule(n).weight.detach().clone() for n in WRAPPED}
    new = rescaler.update()
    for name in WRAPPED:
        module = model.get_submodule(name)
        coll = module.weight.manifold
        std = inputs.std(name, module)
        assert std.shape == (coll.in_channels,)
        # Per-batch partial sums run in float32: channels with a large mean lose a few digits.
        torch.testing.assert_close(new[name], rescaler.layers[name].gamma / std, rtol=1e-4, atol=0)
        # W <- W / R_old * R_new on constrained kernels; Euclidean kernels untouched.
        ratio = entry_scale(coll, scale=new[name] / old[name][1], dtype=torch.float64)
        torch.testing.assert_close(module.weight.detach().double(), trained[name].double() * ratio)
    assert fg.check(model) == []
    inputs.remove()
    assert all(r["samples"] == 0 for r in rescaler.describe())  # sums reset
    assert rescaler.num_updates == 1


def test_grouped_conv_pools_the_channels_of_each_weight_channel():
    model, rescaler = make(floor=0.0)
    inputs = _Inputs(model, ["grouped"])
    model.train()
    with torch.no_grad():
        for x, _ in batches(2):
            model(x)
    std = rescaler._std(rescaler.layers["grouped"])
    # Weight channel j of a 2-group conv meets input channels j and j + 4.
    raw = torch.cat(inputs.seen["grouped"]).double()
    for j in range(4):
        pooled = torch.stack([raw[:, j], raw[:, j + 4]]).std(correction=0)
        assert std[j].item() == pytest.approx(pooled.item(), rel=1e-6)
    inputs.remove()


def test_floor_keeps_dead_channels_from_exploding():
    model, rescaler = make(floor=0.25)
    model.train()
    with torch.no_grad():
        for x, _ in batches(2):
            x[:, 1] = 3.0  # a constant input channel: std 0
            model(x)
    layer = rescaler.layers["stem"]
    std = rescaler._std(layer)
    scales = rescaler.update()
    assert std[1] == 0
    assert scales["stem"][1].item() == pytest.approx(layer.gamma / (0.25 * std.mean().item()))
    assert torch.isfinite(scales["stem"]).all()


def test_layers_without_statistics_keep_their_scales():
    model, rescaler = make()
    before = rescaler.scales()
    model.eval()  # validation passes are not recorded
    with torch.no_grad():
        model(batches(1)[0][0])
    assert all(r["samples"] == 0 for r in rescaler.describe())
    after = rescaler.update()
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_hooks_attach_remove_and_record_modes():
    model, rescaler = make(attach=False)
    assert not rescaler.attached and not model.stem._forward_pre_hooks
    rescaler.attach().attach()
    assert len(model.stem._forward_pre_hooks) == 1
    x = batches(1)[0][0]
    with torch.no_grad():
        model.train()(x)
        assert rescaler.describe()[0]["samples"] == x.shape[0] * 36
        rescaler.remove()
        model(x)
        assert rescaler.describe()[0]["samples"] == x.shape[0] * 36
        assert not model.stem._forward_pre_hooks
        with rescaler:  # a context attaches and removes
            model(x)
        assert rescaler.describe()[0]["samples"] == 2 * x.shape[0] * 36
        with rescaler.recording():  # records in eval mode too
            model.eval()(x)
        assert rescaler.describe()[0]["samples"] == 3 * x.shape[0] * 36
    assert not rescaler.attached
    _, eval_rescaler = make(record_eval=True)
    with torch.no_grad():
        eval_rescaler.model.eval()(x)
    assert eval_rescaler.describe()[0]["samples"] == x.shape[0] * 36


def test_calibrate_runs_one_pass_and_updates():
    _, rescaler = make()
    before = rescaler.scales()["stem"]
    scales = rescaler.calibrate([x for x, _ in batches(2)])
    assert rescaler.num_updates == 1 and not torch.equal(before, scales["stem"])
    # The input channels have stds 0.1, 1 and 5: the scales follow gamma / lambda.
    assert scales["stem"][0] > scales["stem"][1] > scales["stem"][2]


def test_linear_on_sequences_uses_the_last_dim():
    torch.manual_seed(0)
    model = fg.wrap(nn.Sequential(nn.Linear(6, 4)), "pio3")
    rescaler = Rescaler(model, floor=0.0)
    x = torch.randn(5, 7, 6) * torch.arange(1, 7)
    model(x)
    std = x.reshape(-1, 6).double().std(dim=0, correction=0)
    torch.testing.assert_close(rescaler.update()["0"], rescaler.layers["0"].gamma / std)


def test_channels_last_inputs_give_the_same_statistics():
    model, rescaler = make(floor=0.0)
    x = batches(1)[0][0]
    model.train()
    with torch.no_grad():
        model(x)
        a = rescaler.layers["stem"].stats.sumsq.clone()
        rescaler.reset()
        model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(rescaler.layers["stem"].stats.sumsq, a, rtol=1e-6, atol=0)


def test_gamma_functions():
    torch.manual_seed(0)
    model = fg.wrap(Net(), "pio4")
    for name in WRAPPED:
        module = model.get_submodule(name)
        coll = module.weight.manifold
        fan_in = module.weight[0].numel()
        fan_out = module.weight.shape[0] * module.weight[0][0].numel()
        gamma = glorot_gamma(module, coll)
        # The effective kernel gamma * w has Glorot's entry variance 2 / (fan_in + fan_out).
        constrained = entry_scale(coll, scale=torch.full((coll.in_channels,), 2.0)) == 2.0
        unit = unit_weight(module.weight.detach(), coll).double()[constrained]
        assert (gamma * unit).pow(2).mean().item() == pytest.approx(2 / (fan_in + fan_out))


# ---------------------------------------------------------------------- the constraint
@settings(max_examples=15)
@given(
    coll=collections(shapes=layer_shapes(max_channels=6, kernel_sizes=(1, 3, (2, 3)))),
    backend=st.sampled_from(["torch", "fused"] if cpu.AVAILABLE else ["torch"]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_constraint_holds_after_every_step_and_update(coll, backend, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    if len(coll.shape) == 4:
        c_out, c_in, kh, kw = coll.shape
        layer = nn.Conv2d(c_in, c_out, (kh, kw), bias=False)
        shape = (3, c_in, kh + 2, kw + 1)
    else:
        layer = nn.Linear(coll.shape[1], coll.shape[0], bias=False)
        shape = (3, coll.shape[1])
    layer = layer.to(dtype)
    layer.weight = geoopt.ManifoldParameter(
        coll.projx(torch.randn(coll.shape, generator=gen, dtype=dtype)), manifold=coll
    )
    rescaler = Rescaler(layer)
    opt = fg.FGSGD(layer.parameters(), lr=0.3, momentum=0.9, backend=backend)
    for _ in range(2):
        for _ in range(3):
            # Channel stds spread over four orders of magnitude.
            spread = 10.0 ** (4 * torch.rand(shape[1], generator=gen, dtype=dtype) - 2)
            x = torch.randn(shape, generator=gen, dtype=dtype)
            x = x * spread.view(1, -1, *([1] * (len(shape) - 2)))
            opt.zero_grad()
            out = layer(x)
            (out * torch.randn(out.shape, generator=gen, dtype=dtype)).sum().backward()
            opt.step()
            assert coll.violations(layer.weight.detach()) == []
        rescaler.update()
        assert coll.violations(layer.weight.detach()) == []
    assert rescaler.num_updates == 2


# ---------------------------------------------------------------------- state
def test_resume_is_exact_mid_epoch():
    data = batches(8, seed=3)
    model, rescaler = make("pio3")
    opt = fg.FGSGD(fg.param_groups(model), lr=0.05, momentum=0.9)
    train(model, opt, data[:3])
    rescaler.update()
    train(model, opt, data[3:5])  # the checkpoint holds half an epoch of statistics
    buf = io.BytesIO()
    torch.save(
        {
            "model": model.state_dict(),
            "grouping": fg.grouping_state(model),
            "rescaler": rescaler.state_dict(),
            "optimizer": opt.state_dict(),
        },
        buf,
    )
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    train(model, opt, data[5:7])
    rescaler.update()
    train(model, opt, data[7:])

    torch.manual_seed(123)  # another initialisation, fully overwritten by the checkpoint
    other = Net()
    fg.load_grouping_state(other, ckpt["grouping"])  # the scales come with the grouping
    other.load_state_dict(ckpt["model"])
    resumed = Rescaler(other)
    resumed.load_state_dict(ckpt["rescaler"])
    opt2 = fg.FGSGD(fg.param_groups(other), lr=0.05, momentum=0.9)
    opt2.load_state_dict(ckpt["optimizer"])
    train(other, opt2, data[5:7])
    resumed.update()
    train(other, opt2, data[7:])
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert all(torch.equal(rescaler.scales()[n], s) for n, s in resumed.scales().items())
    assert resumed.num_updates == rescaler.num_updates == 2


def test_rescaler_follows_a_reloaded_grouping():
    model, rescaler = make("pio3")
    state = fg.grouping_state(model)
    fg.load_grouping_state(model, state)  # new collection objects
    scales = rescaler.calibrate([batches(1)[0][0]])
    for name in WRAPPED:
        assert torch.equal(model.get_submodule(name).weight.manifold.scale, scales[name])
    assert fg.check(model) == []


def test_describe_and_scales():
    model, rescaler = make()
    rescaler.calibrate([batches(1)[0][0]])
    rows = rescaler.describe()
    assert [r["layer"] for r in rows] == list(WRAPPED)
    for row, (name, scale) in zip(rows, rescaler.scales().items(), strict=True):
        assert row["scale_min"] == pytest.approx(scale.min().item())
        assert row["std_mean"] > 0 and row["groups"] == (2 if name == "grouped" else 1)
    assert "Rescaler(layers=4" in repr(rescaler)
    assert all(r["rescaled"] for r in fg.describe(model))


# ---------------------------------------------------------------------- distributed
def _hand_wrapped_net() -> tuple[Net, Rescaler]:
    """:class:`Net` wrapped without :func:`fgo_geoopt.wrap` (which imports timm): quicker
    to start in fresh processes."""
    torch.manual_seed(0)
    model = Net()
    for name in WRAPPED:
        module = model.get_submodule(name)
        coll = build_collection(module.weight.shape, "pio3", seed=len(name))
        module.weight = geoopt.ManifoldParameter(coll.projx(module.weight.detach()), manifold=coll)
    return model, Rescaler(model, floor=0.0)


def _ddp_worker(rank: int, world: int, init: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model, rescaler = _hand_wrapped_net()
        model.train()
        with torch.no_grad():
            for x, _ in batches(4, seed=10)[rank::world]:  # each rank sees its own shard
                model(x)
        torch.save(rescaler.update(), f"{out}{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_all_reduces_the_statistics(tmp_path):
    out = str(tmp_path / "scales")
    mp.spawn(_ddp_worker, args=(2, f"file://{tmp_path / 'init'}", out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}{r}.pt", weights_only=True) for r in range(2)]
    model, rescaler = _hand_wrapped_net()
    model.train()
    with torch.no_grad():
        for x, _ in batches(4, seed=10):  # one process, all the data
            model(x)
    single = rescaler.update()
    for name in WRAPPED:
        assert torch.equal(ranks[0][name], ranks[1][name])
        torch.testing.assert_close(ranks[0][name], single[name], rtol=1e-12, atol=0)


# ---------------------------------------------------------------------- forward cost
class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _forward_ops(model: nn.Module, x: torch.Tensor) -> Counter[str]:
    with torch.no_grad(), _OpCounter() as counter:
        model(x)
    return counter.ops


def test_rescaling_adds_no_operation_to_the_forward_pass():
    torch.manual_seed(0)
    plain = fg.wrap(Net(), "pio4")
    rescaled = copy.deepcopy(plain)
    rescaler = Rescaler(rescaled)
    rescaler.calibrate([batches(1)[0][0]])
    x = batches(1, seed=1)[0][0]
    for model in (plain, rescaled):
        model.eval()
    assert _forward_ops(rescaled, x) == _forward_ops(plain, x)
    # In training mode only the statistics hooks add work.
    plain.train()
    rescaled.train()
    extra = _forward_ops(rescaled, x) - _forward_ops(plain, x)
    assert sum(extra.values()) > 0
    rescaler.remove()
    assert _forward_ops(rescaled, x) == _forward_ops(plain, x)


def forward_time_ratio(
    model_a: nn.Module, model_b: nn.Module, x: torch.Tensor, repeats: int = 15
) -> float:
    """Median forward time of ``model_a`` over that of ``model_b``, interleaved in one run."""
    times: dict[int, list[float]] = {0: [], 1: []}
    with torch.no_grad():
        for _ in range(2):
            model_a(x), model_b(x)
        for _ in range(repeats):
            for i, m in enumerate((model_a, model_b)):
                start = time.perf_counter()
                m(x)
                times[i].append(time.perf_counter() - start)
    return statistics.median(times[0]) / statistics.median(times[1])


def test_forward_time_ratio_with_and_without_rescaling():
    pytest.importorskip("timm")
    import timm

    torch.manual_seed(0)
    plain = fg.wrap(timm.create_model("test_resnet", pretrained=False), "pio4").eval()
    rescaled = copy.deepcopy(plain)
    Rescaler(rescaled, attach=False).calibrate([torch.randn(2, 3, 64, 64)])
    x = torch.randn(4, 3, 64, 64)
    ratio = forward_time_ratio(rescaled, plain, x, repeats=10)
    # The same operations on the same shapes: only machine noise separates the two.
    assert np.isfinite(ratio) and 0.5 < ratio < 2.0
