"""Misuse is loud: stale optimizers, non-Riemannian optimizers, FG-SGD names in timm."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fgo_geoopt as fg


def make() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten())


def backward(model: nn.Module) -> None:
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    F.mse_loss(model(x), torch.zeros(2, 32)).backward()


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, fg.FGSGD])
def test_optimizer_created_before_wrap_warns_with_the_fix(opt_cls):
    model = make()
    opt = opt_cls(model.parameters(), lr=0.1)
    fg.wrap(model, "pio4")
    backward(model)
    with pytest.warns(UserWarning, match="replaced.*Create the optimizer after wrap"):
        opt.step()
    opt.step()  # once per optimizer


def test_optimizer_created_after_wrap_is_silent():
    model = fg.wrap(make(), "pio4")
    opt = fg.FGSGD(model.parameters(), lr=0.1)
    backward(model)
    opt.step()  # warnings are errors in this suite
    assert fg.check(model) == []


def test_non_riemannian_optimizer_warns_and_check_names_it():
    model = fg.wrap(make(), "pio3")
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    backward(model)
    with pytest.warns(UserWarning, match="AdamW is not a Riemannian optimizer.*FGSGD"):
        opt.step()
    problems = fg.check(model)
    named = {p.split(":")[0] for p in problems if "stepped by AdamW" in p}
    assert named == {"0.weight", "2.weight"}
    fg.reproject(model)
    assert fg.check(model) == []


def test_timm_knows_fgsgd_after_import_alone():
    pytest.importorskip("timm")
    code = (
        "import fgo_geoopt, timm, timm.optim\n"
        "m = timm.create_model('resnet18', num_classes=2)\n"
        "opt = timm.optim.create_optimizer_v2(m, 'fgsgd', lr=0.1)\n"
        "print(type(opt).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "FGSGD"


def test_import_does_not_import_timm():
    code = "import sys, fgo_geoopt; print('timm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
