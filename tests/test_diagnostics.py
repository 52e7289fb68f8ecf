"""Step diagnostics, the matched step geometry (metric="stored" + matched gamma)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import fgo_geoopt
from fgo_geoopt.diagnostics import DIAGNOSTIC_FIELDS, StepRecorder, read_csv, summarize
from fgo_geoopt.rescaling import Rescaler, entry_scale, matched_gamma

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import recipes.models  # noqa: E402, F401  (registers resnet8_cifar)


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def _train(model, opt, recorder, steps, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(6, 3, 8, 8, generator=gen)
        y = torch.randint(0, 4, (6,), generator=gen)
        loss = nn.functional.cross_entropy(model(x), y) * scale
        opt.zero_grad()
        loss.backward()
        opt.step()
        recorder.record(opt)


def test_recorder_rows_per_layer_and_type():
    model = fgo_geoopt.wrap(_net(), "pio4", include=["0.weight", "3.weight"])
    opt = fgo_geoopt.FGSGD(fgo_geoopt.param_groups(model), lr=0.1, momentum=0.9)
    rec = StepRecorder(model, every=1)
    _train(model, opt, rec, 4)
    rows = rec.rows()
    # The first call has no snapshot of the point before its step: steps 2, 3, 4 recorded.
    assert sorted({r["step"] for r in rows}) == [2, 3, 4]
    kinds = {(r["layer"], r["type"]) for r in rows}
    for layer in ("0.weight", "3.weight"):
        names = model.get_parameter(layer).manifold.manifold_names
        assert {(layer, n) for n in names} <= kinds
    assert ("8.weight", "plain") in kinds
    for r in rows:
        assert set(DIAGNOSTIC_FIELDS) <= set(r)
        assert r["filter_angle"] > 0
        assert r["lr"] == pytest.approx(0.1)
        if r["type"] != "plain":
            assert r["tau_mean"] >= 1.0
            assert 0.0 <= r["tau_gt1"] <= 1.0


def test_recorded_angles_match_a_direct_computation():
    model = fgo_geoopt.wrap(_net(), "st", include=["3.weight"])
    opt = fgo_geoopt.FGSGD(fgo_geoopt.param_groups(model), lr=0.2)
    rec = StepRecorder(model)
    rec.snapshot()
    p = model.get_parameter("3.weight")
    before = p.detach().clone()
    _train(model, opt, rec, 1)
    after = p.detach()
    a, b = before.flatten(1).double(), after.flatten(1).double()
    expect = torch.arccos((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).mean().item()
    row = next(r for r in rec.rows() if r["layer"] == "3.weight")
    assert row["filter_angle"] == pytest.approx(expect, rel=1e-9)
    assert row["step"] == 1


def test_tau_share_sees_eq7():
    # Huge gradients: Eq. (7) shortens the step of every POM, and the recorder says so.
    model = fgo_geoopt.wrap(_net(), "pio3", include=["3.weight"])
    opt = fgo_geoopt.FGSGD(fgo_geoopt.param_groups(model), lr=0.01)
    rec = StepRecorder(model)
    rec.snapshot()
    _train(model, opt, rec, 1, scale=1e4)
    rows = [r for r in rec.rows() if r["layer"] == "3.weight"]
    assert rows and all(r["tau_gt1"] == 1.0 and r["tau_mean"] > 1.0 for r in rows)
    # ... and reports tau = 1 where Eq. (7) is switched off.
    for group in opt.param_groups:
        group["adaptive_step"] = False
    rec.clear()
    rec.snapshot()
    _train(model, opt, rec, 1, scale=1e4)
    rows = [r for r in rec.rows() if r["layer"] == "3.weight"]
    assert rows and all(r["tau_gt1"] == 0.0 for r in rows)


def test_every_and_outputs(tmp_path):
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rec = StepRecorder(model, every=3)
    _train(model, opt, rec, 9)
    assert sorted({r["step"] for r in rec.rows()}) == [4, 7]
    assert {r["type"] for r in rec.rows()} == {"plain"}
    path = rec.to_csv(tmp_path / "d.csv")
    back = read_csv(path)
    assert len(back) == len(rec.rows())
    for mine, theirs in zip(rec.rows(), back, strict=True):
        assert theirs["layer"] == mine["layer"]
        assert theirs["filter_angle"] == pytest.approx(mine["filter_angle"])
    table = rec.describe()
    assert "0.weight" in table and "filter_ang" in table
    summary = summarize(back)
    assert {s["layer"] for s in summary} == {"0.weight", "3.weight", "8.weight"}
    assert all(s["steps"] == 2 for s in summary)
    assert rec.plot(tmp_path / "d.png").is_file()


def test_steps_across_a_rescaling_update_are_not_recorded():
    model = fgo_geoopt.wrap(_net(), "pio4", include=["3.weight"])
    rescaler = Rescaler(model)
    opt = fgo_geoopt.FGSGD(fgo_geoopt.param_groups(model), lr=0.1)
    rec = StepRecorder(model)
    _train(model, opt, rec, 2)
    rescaler.update()  # changes the stored weights of 3.weight, not by a step
    rec.clear()
    _train(model, opt, rec, 1)
    assert "3.weight" not in {r["layer"] for r in rec.rows()}
    _train(model, opt, rec, 1)
    assert "3.weight" in {r["layer"] for r in rec.rows()}


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_recorder_rejects_bad_every(bad):
    with pytest.raises(ValueError, match="every"):
        StepRecorder(_net(), every=bad)


# ----------------------------------------------------------------- the matched step geometry
def test_matched_gamma_restores_the_init_scale():
    torch.manual_seed(0)
    model = timm.create_model("resnet8_cifar", num_classes=10, in_chans=1)
    init = {n: p.detach().pow(2).mean().sqrt().item() for n, p in model.named_parameters()}
    fgo_geoopt.wrap(model, "pio3")
    Rescaler(model, "matched")
    for name, p in model.named_parameters():
        coll = getattr(p, "manifold", None)
        if not isinstance(coll, fgo_geoopt.KernelCollection):
            continue
        rms = p.detach().double().pow(2).mean().sqrt().item()
        assert rms == pytest.approx(init[name], rel=1e-6), name
        assert coll.init_rms == pytest.approx(init[name])


def test_matched_gamma_without_a_recorded_init_uses_kaiming():
    conv = nn.Conv2d(4, 6, 3)
    coll = fgo_geoopt.build_collection(conv.weight.shape, "pio3", seed=0)
    with torch.no_grad():
        conv.weight.copy_(coll.projx(conv.weight))
    gamma = matched_gamma(conv, coll)
    unit_rms = conv.weight.detach().pow(2).mean().sqrt().item()
    assert gamma * unit_rms == pytest.approx(math.sqrt(2.0 / (6 * 9)))


def test_unknown_gamma_name():
    model = fgo_geoopt.wrap(_net(), "pio3")
    with pytest.raises(ValueError, match="unknown gamma 'nope'; valid: fan, glorot, matched"):
        Rescaler(model, "nope")


def test_stored_metric_equals_unit_metric_without_scales():
    runs = []
    for metric in ("unit", "stored"):
        model = fgo_geoopt.wrap(_net(), "pio4")
        opt = fgo_geoopt.FGSGD(fgo_geoopt.param_groups(model), lr=0.1, momentum=0.9, metric=metric)
        _train(model, opt, StepRecorder(model, every=100), 3)
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_stored_metric_moves_scaled_kernels_by_the_stored_gradient():
    # One step without momentum or Eq. (7), tiny lr: the stored weights of a re-scaled
    # sphere kernel move by lr * (tangent part of dL/dW), as SGD would move them.
    conv = nn.Conv2d(3, 4, 3, bias=False).double()
    model = fgo_geoopt.wrap(nn.Sequential(conv), "single", manifolds=["sphere"])
    Rescaler(model, "matched", attach=False)
    p = model[0].weight
    p.grad = torch.randn_like(p)
    before = p.detach().clone()
    lr = 1e-6
    fgo_geoopt.FGSGD([p], lr=lr, adaptive_step=False, metric="stored").step()
    r = entry_scale(p.manifold, dtype=p.dtype)
    w = (before / r).flatten(2)
    g = p.grad.flatten(2)
    tangent = g - (w * g).sum(-1, keepdim=True) * w  # per kernel, unit coordinates
    expect = -lr * tangent.reshape(before.shape)
    assert torch.allclose(p.detach() - before, expect, rtol=0, atol=1e-4 * expect.abs().max())


def test_invalid_metric():
    with pytest.raises(ValueError, match="metric must be one of unit, stored"):
        fgo_geoopt.FGSGD([torch.zeros(2, requires_grad=True)], lr=0.1, metric="natural")


def _first_step_angles(strategy: str, rule: str) -> dict[str, float]:
    """Mean angle per 3x3 filter after one momentum-free step on real digits."""
    from recipes.data import load_mnist5k

    images, labels = load_mnist5k()
    x = torch.tensor(images[:64], dtype=torch.float32).unsqueeze(1) / 255.0
    x = (x - x.mean()) / x.std()
    y = torch.tensor(labels[:64])
    torch.manual_seed(0)
    model = timm.create_model("resnet8_cifar", num_classes=10, in_chans=1)
    if strategy == "euc":
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
    else:
        fgo_geoopt.wrap(model, strategy)
        Rescaler(model, "matched" if rule == "matched" else "fan")
        metric = "stored" if rule == "matched" else "unit"
        opt = fgo_geoopt.FGSGD(fgo_geoopt.param_groups(model, 0.0), lr=0.1, metric=metric)
    rec = StepRecorder(model)
    rec.snapshot()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    rec.record(opt)
    return {
        r["layer"]: r["filter_angle"]
        for r in rec.summary()
        if r["layer"].startswith("layer") and r["layer"].endswith("conv2.weight")
    }


@pytest.mark.parametrize("strategy", ["st", "pio4"])
def test_matched_rule_turns_filters_like_sgd(strategy):
    # The derivation of docs/optimizer.md: with the paper's geometry the angle of a step
    # shrinks like 1 / c_in (re-scaled Sp/Ob/St kernels) or leaves the constrained kernels
    # behind (pio4); with the matched rule every layer turns by about SGD's angle.
    sgd = _first_step_angles("euc", "")
    matched = _first_step_angles(strategy, "matched")
    paper = _first_step_angles(strategy, "paper")
    deepest = "layer3.0.conv2.weight"
    for layer, angle in sgd.items():
        assert 0.25 < matched[layer] / angle < 4.0, (layer, matched[layer], angle)
    if strategy == "st":
        assert paper[deepest] / sgd[deepest] < 0.2
