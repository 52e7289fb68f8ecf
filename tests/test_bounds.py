"""Norms and generalisation bounds: every formula against direct computations on small
matrices, the command line on saved checkpoints, and the paper's claims on a trained resnet18."""

from __future__ import annotations

import contextlib
import importlib
import io
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fgo_geoopt as fg
from fgo_geoopt import bounds
from fgo_geoopt.collections import build_collection
from fgo_geoopt.integrations import bounds_cli
from fgo_geoopt.rescaling import unit_weight
from fgo_geoopt.testing import collections, layer_shapes


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


def _direct_norms(m: np.ndarray) -> tuple[float, float, float]:
    """Frobenius, spectral and l2->1 (sum of row norms) of one matrix, one at a time."""
    rows = sum(float(np.sqrt(np.sum(r**2))) for r in m)
    return float(np.linalg.norm(m, "fro")), float(np.linalg.norm(m, 2)), rows


def _direct_pom_matrices(weight: torch.Tensor, coll) -> list[np.ndarray]:
    """The POM matrices of the docs, built kernel by kernel with Python loops."""
    w = _np(weight)
    a, b = coll.kernel_shape
    kernels = w.reshape(coll.num_kernels, a, b)
    pom_of = coll.kernel_pom.tolist()
    out = []
    for g in range(coll.num_poms):
        members = [kernels[k] for k in range(coll.num_kernels) if pom_of[k] == g]
        if coll.view == "spatial":
            out.append(np.concatenate(members, axis=1))  # (w^1, ..., w^|g|) side by side
        else:
            out.append(np.stack([m.reshape(-1) for m in members]))  # filters as rows
    return out


# ---------------------------------------------------------------------- matrix norms
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (7, 1), (3, 3), (3, 12), (12, 3), (5, 40)])
def test_spectral_and_l21_match_direct_computations(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    batch = torch.randn(4, *shape, generator=gen, dtype=torch.float64)
    spec, l21 = bounds.spectral_norm(batch), bounds.l21_norm(batch)
    for i in range(4):
        _, s, r = _direct_norms(_np(batch[i]))
        assert spec[i].item() == pytest.approx(s, rel=1e-10)
        assert l21[i].item() == pytest.approx(r, rel=1e-12)


def test_spectral_norm_of_known_matrices():
    q, _ = torch.linalg.qr(
        torch.randn(5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    )
    diag = torch.diag(torch.tensor([3.0, -7.0, 2.0], dtype=torch.float64))
    assert bounds.spectral_norm(torch.stack([q, 2 * q])).tolist() == pytest.approx([1.0, 2.0])
    assert bounds.spectral_norm(diag).item() == pytest.approx(7.0)
    assert bounds.spectral_norm(torch.zeros(2, 3, 4)).tolist() == [0.0, 0.0]
    assert bounds.l21_norm(diag).item() == pytest.approx(12.0)


@given(
    coll=collections(shapes=layer_shapes(max_channels=9, kernel_sizes=(1, 3, (2, 3)))),
    seed=st.integers(0, 2**16),
)
def test_pom_norms_match_loops_over_poms(coll, seed):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(coll.shape, generator=gen)
    norms = bounds.pom_norms(weight, coll)
    mats = _direct_pom_matrices(weight, coll)
    assert norms["fro"].shape == (coll.num_poms,)
    assert norms["size"].tolist() == coll.pom_sizes.tolist()
    for g, m in enumerate(mats):
        fro, spec, l21 = _direct_norms(m)
        assert norms["fro"][g].item() == pytest.approx(fro, rel=1e-9)
        assert norms["spec"][g].item() == pytest.approx(spec, rel=1e-9)
        assert norms["l21"][g].item() == pytest.approx(l21, rel=1e-9)


def test_unwrapped_layers_have_one_pom_per_output_filter():
    weight = torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    norms = bounds.pom_norms(weight)
    rows = weight.reshape(6, -1).double().norm(dim=1)
    for key in bounds.NORMS:
        torch.testing.assert_close(norms[key], rows)


def test_unit_coordinates_divide_constrained_kernels_only():
    coll = build_collection((6, 4, 3, 3), "pio4", seed=3)
    gen = torch.Generator().manual_seed(0)
    unit = coll.projx(torch.randn(coll.shape, generator=gen, dtype=torch.float64))
    scale = torch.tensor([0.5, 2.0, 3.0, 0.25], dtype=torch.float64)
    coll.set_scale(scale)
    euclidean = coll.kernel_type() == coll.manifold_names.index("euclidean")
    factor = scale.view(1, 4, 1, 1).expand(6, 4, 3, 3).clone()
    factor.view(-1, 9)[euclidean] = 1.0
    stored = unit * factor
    for key, value in bounds.pom_norms(stored, coll, coords="unit").items():
        torch.testing.assert_close(value, bounds.pom_norms(unit, coll)[key])
    direct = _direct_pom_matrices(stored, coll)
    got = bounds.pom_norms(stored, coll)["fro"]
    assert got.tolist() == pytest.approx([_direct_norms(m)[0] for m in direct], rel=1e-12)


def test_invalid_arguments():
    coll = build_collection((4, 2, 3, 3), "pio3")
    with pytest.raises(ValueError, match="coords"):
        bounds.pom_norms(torch.zeros(coll.shape), coll, coords="scaled")
    with pytest.raises(ValueError, match="does not match"):
        bounds.pom_norms(torch.zeros(4, 2, 1, 1), coll)
    rows = bounds.layer_norms(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="num_samples"):
        bounds.generalization_bounds(rows, 0)
    with pytest.raises(ValueError, match="level"):
        bounds.generalization_bounds(rows, 10, level="kernel")
    with pytest.raises(ValueError, match="no layers"):
        bounds.generalization_bounds([], 10)


# ---------------------------------------------------------------------- the bounds
class _Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3)
        self.point = nn.Conv2d(5, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.point(self.conv(x).relu()).mean((2, 3)))


def _small_model(wrapped: bool) -> nn.Module:
    torch.manual_seed(0)
    model = _Small()
    if wrapped:
        fg.wrap(model, "pio3", rescale=True)
    return model


def _direct_bounds(layers: list[dict[str, np.ndarray]], n: int, width: int) -> dict[str, float]:
    """Table 1 with plain products (no logs): fine for a handful of small layers."""
    big_l = len(layers)
    prod_f = math.prod(float(np.prod(d["fro"])) for d in layers)
    prod_2 = math.prod(float(np.prod(d["spec"])) for d in layers)
    bart = sum(float(np.prod((d["l21"] / d["spec"]) ** (2 / 3))) for d in layers) ** 1.5
    ney = math.sqrt(
        big_l**2 * width * sum(float(np.prod(d["fro"] ** 2 / d["spec"] ** 2)) for d in layers)
    )
    return {
        "neyshabur2015": 2**big_l * prod_f / math.sqrt(n),
        "bartlett2017": prod_2 / math.sqrt(n) * bart,
        "neyshabur2018": prod_2 / math.sqrt(n) * ney,
    }


@pytest.mark.parametrize("wrapped", [False, True])
@pytest.mark.parametrize("coords", bounds.COORDS)
def test_bounds_match_the_table_1_formulas(wrapped, coords):
    model = _small_model(wrapped)
    rows = bounds.layer_norms(model, coords=coords)
    assert [r["layer"] for r in rows] == ["conv", "point", "fc"]
    assert [r["kind"] for r in rows] == (["fg", "fg", "plain"] if wrapped else ["plain"] * 3)
    per_pom, per_layer = [], []
    for name in ("conv", "point", "fc"):
        module = getattr(model, name)
        coll = getattr(module.weight, "manifold", None)
        w = module.weight.detach()
        if coords == "unit" and coll is not None:
            w = unit_weight(w, coll)
        mats = (
            _direct_pom_matrices(w, coll)
            if coll is not None
            else list(_np(w).reshape(w.shape[0], 1, -1))
        )
        per_pom.append(
            {k: np.array([_direct_norms(m)[i] for m in mats]) for i, k in enumerate(bounds.NORMS)}
        )
        whole = _direct_norms(_np(w).reshape(w.shape[0], -1))
        per_layer.append({k: np.array([whole[i]]) for i, k in enumerate(bounds.NORMS)})
    for level, layers in (("pom", per_pom), ("layer", per_layer)):
        got = bounds.generalization_bounds(rows, 1000, level=level)
        want = _direct_bounds(layers, 1000, width=5)
        for key in bounds.BOUNDS:
            assert got[key] == pytest.approx(math.log10(want[key]), abs=1e-9)
    for row, layer in zip(rows, per_pom, strict=True):
        assert row["fro_max"] == pytest.approx(layer["fro"].max())
        assert row["log10_prod_spec"] == pytest.approx(np.log10(layer["spec"]).sum())


def test_width_and_samples_enter_as_documented():
    rows = bounds.layer_norms(_small_model(False))
    base = bounds.generalization_bounds(rows, 100)
    wide = bounds.generalization_bounds(rows, 100, width=500)
    more = bounds.generalization_bounds(rows, 10_000)
    assert wide["neyshabur2018"] - base["neyshabur2018"] == pytest.approx(0.5 * math.log10(100))
    assert wide["bartlett2017"] == base["bartlett2017"]
    for key in bounds.BOUNDS:
        assert base[key] - more[key] == pytest.approx(1.0)


def test_log10_form_does_not_overflow():
    # 300 layers of POM norms 1e3 (or 1e-3): the plain products over- / underflow float64.
    row = {
        "out_channels": 64,
        "log10_prod_fro": 3.0,
        "log10_prod_spec": 3.0,
        "log10_prod_l21_spec": 400.0,
        "log10_prod_fro_spec": 500.0,
    }
    for sign in (1.0, -1.0):
        rows = [{k: (v * sign if k != "out_channels" else v) for k, v in row.items()}] * 300
        out = bounds.generalization_bounds(rows, 50_000)
        assert all(math.isfinite(v) for v in out.values())
        expected = 300 * math.log10(2) + 900 * sign - 0.5 * math.log10(50_000)
        assert out["neyshabur2015"] == pytest.approx(expected)
    assert bounds.generalization_bounds(rows, 10)["bartlett2017"] == pytest.approx(
        -900 - 0.5 + 1.5 * (math.log10(300) - 400 * 2 / 3)
    )


def test_claim_and_table():
    rows = bounds.layer_norms(_small_model(True))
    assert bounds.claim_holds(rows) == all(
        r[f"{n}_max"] <= 1 for r in rows if r["kind"] == "fg" for n in bounds.NORMS
    )
    assert not bounds.claim_holds([dict(rows[0], l21_max=1.5)])
    with pytest.raises(ValueError, match="no layer of kind fg"):
        bounds.claim_holds(bounds.layer_norms(_small_model(False)))
    text = bounds.format_table(rows, {"per POM": bounds.generalization_bounds(rows, 10)})
    assert "point" in text and "5x3x3x3" in text and "per POM" in text


# ---------------------------------------------------------------------- command line
def _run_cli(argv: list[str]) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert bounds_cli.main(argv) == 0
    return buf.getvalue()


def test_cli_on_wrapped_and_plain_checkpoints(tmp_path):
    pytest.importorskip("timm")
    import timm

    torch.manual_seed(0)
    model = fg.wrap(
        timm.create_model("test_resnet", pretrained=False, num_classes=4), "pio3", rescale=True
    )
    wrapped = tmp_path / "fg.pth"
    torch.save(
        {"model": model.state_dict(), "grouping": fg.grouping_state(model), "epoch": 3}, wrapped
    )
    expected = bounds.format_table(
        bounds.layer_norms(model),
        {"per POM": bounds.generalization_bounds(bounds.layer_norms(model), 500)},
    )
    out = _run_cli(
        [str(wrapped), "--model", "test_resnet", "--num-classes", "4", "--num-samples", "500"]
    )
    assert expected.split("\n\n")[0] in out  # same per-layer table as in memory
    assert "Table 2 claim" in out and " fg " in out

    plain = tmp_path / "plain.pth"
    torch.save(
        timm.create_model("test_resnet", pretrained=False, num_classes=4).state_dict(), plain
    )
    out = _run_cli(
        [
            str(plain),
            "--model",
            "test_resnet",
            "--num-classes",
            "4",
            "--num-samples",
            "500",
            "--coords",
            "unit",
        ]
    )
    assert " fg " not in out and "plain" in out and "Table 2 claim" not in out


def test_cli_module_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "fgo_geoopt.integrations.bounds_cli", "--help"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 0 and "--num-samples" in proc.stdout
    assert "RuntimeWarning" not in proc.stderr


def test_cli_script_is_declared_and_importable():
    """``fgo-bounds`` in ``pyproject.toml`` names the command line's ``main``."""
    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parents[1]
    scripts = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, name = scripts["fgo-bounds"].partition(":")
    assert getattr(importlib.import_module(module), name) is bounds_cli.main


def test_only_integrations_import_timm():
    """timm stays an optional extra: only ``fgo_geoopt/integrations`` imports it."""
    package = Path(fg.__file__).resolve().parent
    importers = {
        path.relative_to(package).parts[0]
        for path in package.rglob("*.py")
        if re.search(r"^\s*(import timm|from timm)", path.read_text(), re.MULTILINE)
    }
    assert importers <= {"integrations"}


def test_cli_rejects_a_checkpoint_without_weights(tmp_path):
    path = tmp_path / "empty.pth"
    torch.save({"epoch": 1}, path)
    with pytest.raises(ValueError, match="state dict"):
        bounds_cli.main([str(path), "--model", "test_resnet", "--num-samples", "5"])


# ---------------------------------------------------------------------- the paper's claims
def _digits(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` real 8x8 digits (scikit-learn, shipped offline), upsampled to 32x32 RGB."""
    datasets = pytest.importorskip("sklearn.datasets")
    data = datasets.load_digits()
    x = torch.tensor(data.images[:n], dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    return (x - x.mean()) / x.std(), torch.tensor(data.target[:n])


def _train_one_epoch(fg_model: bool, x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    if fg_model:
        # Sp+Ob+St: every wrapped kernel is renormalised (Euclidean kernels of pio4 are not).
        fg.wrap(model, "pio3", rescale=True)
        opt = fg.FGSGD(fg.param_groups(model, weight_decay=0.0), lr=0.1, momentum=0.9)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    for idx in order.split(32):
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    if fg_model:
        model.fgo_rescaler.update()  # the end of the epoch: R from this epoch's statistics
        assert fg.check(model) == []
    return model


@pytest.fixture(scope="module")
def trained_resnet18():
    pytest.importorskip("timm")
    x, y = _digits(256)
    euc, fgm = _train_one_epoch(False, x, y), _train_one_epoch(True, x, y)
    return bounds.layer_norms(euc), bounds.layer_norms(fgm), len(x)


def test_rescaled_resnet18_spectral_norms_are_at_most_one(trained_resnet18):
    euc, fgm, _ = trained_resnet18
    wrapped = [r for r in fgm if r["kind"] == "fg"]
    assert len(wrapped) == 20  # every conv; the head stays Euclidean
    assert max(r["spec_max"] for r in wrapped) <= 1.0
    # The same layers of the unnormalised network are far from it.
    assert max(r["spec_max"] for r in euc if r["layer"] != "fc") > 1.0


@pytest.mark.xfail(
    strict=True,
    reason="Table 2 claim only partly reproduced: l2->1 norms of large POMs exceed 1, and so "
    "can Frobenius norms where the input stds are small (docs/bounds.md)",
)
def test_rescaled_resnet18_every_per_pom_norm_is_at_most_one(trained_resnet18):
    _, fgm, _ = trained_resnet18
    assert bounds.claim_holds(fgm)


def test_fg_training_gives_tighter_layer_bounds_than_euclidean(trained_resnet18):
    euc, fgm, n = trained_resnet18
    for level in ("pom", "layer"):
        b_euc = bounds.generalization_bounds(euc, n, level=level)
        b_fg = bounds.generalization_bounds(fgm, n, level=level)
        for key in bounds.BOUNDS:
            assert b_fg[key] < b_euc[key]
