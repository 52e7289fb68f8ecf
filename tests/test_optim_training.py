"""A real training run: a timm CNN on scikit-learn's 8x8 digits, FGSGD (PIO Sp+Ob+St+Euc)
against torch.optim.SGD with the same budget, seed and data order."""

from __future__ import annotations

import geoopt
import pytest
import torch
import torch.nn.functional as F

from fgo_geoopt import FGSGD, build_collection
from fgo_geoopt.collections import layer_seed

timm = pytest.importorskip("timm")
datasets = pytest.importorskip("sklearn.datasets")

EPOCHS = 3
BATCH = 32
LR = 0.05
SEED = 0


def _digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 1,797 digits (shipped with scikit-learn), upsampled to 16x16; a fixed 80/20 split."""
    bunch = datasets.load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    x = (x - 0.5) / 0.5
    y = torch.tensor(bunch.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1437], perm[1437:]
    return x[train], y[train], x[test], y[test]


def _model(fg: bool) -> torch.nn.Module:
    torch.manual_seed(SEED)  # both runs start from the same initial weights
    model = timm.create_model("test_resnet", pretrained=False, num_classes=10, in_chans=1)
    if fg:
        # Every conv weight (3x3 kernels and 1x1 convs in the filter view) on a PIO
        # Sp+Ob+St+Euc collection; the head, the norms and the biases stay plain.
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Conv2d):
                coll = build_collection(module.weight.shape, "pio4", seed=layer_seed(SEED, name))
                weight = coll.projx(module.weight.detach())
                module.weight = geoopt.ManifoldParameter(weight, manifold=coll)
    return model


def _train_and_test(fg: bool, data) -> tuple[float, torch.nn.Module, torch.optim.Optimizer]:
    x_train, y_train, x_test, y_test = data
    model = _model(fg)
    opt_cls = FGSGD if fg else torch.optim.SGD
    opt = opt_cls(model.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
    steps = EPOCHS * (len(y_train) // BATCH)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(SEED)  # same data order for both runs
    model.train()
    for _ in range(EPOCHS):
        order = torch.randperm(len(y_train), generator=gen)
        for i in range(0, len(order) - BATCH + 1, BATCH):
            idx = order[i : i + BATCH]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x_test).argmax(dim=1) == y_test).float().mean().item()
    return acc, model, opt


def test_fgsgd_trains_a_timm_cnn_on_digits(record_property):
    data = _digits()
    fg_acc, fg_model, fg_opt = _train_and_test(True, data)
    sgd_acc, _, _ = _train_and_test(False, data)
    print(f"test accuracy after {EPOCHS} epochs: FGSGD (pio4) {fg_acc:.3f}, SGD {sgd_acc:.3f}")
    record_property("fgsgd_accuracy", fg_acc)
    record_property("sgd_accuracy", sgd_acc)

    wrapped = [p for p in fg_model.parameters() if isinstance(p, geoopt.ManifoldParameter)]
    assert len(wrapped) == sum(isinstance(m, torch.nn.Conv2d) for m in fg_model.modules())
    for p in wrapped:
        assert not p.manifold.violations(p.detach(), atol=1e-4, rtol=0.0)
    assert fg_opt.nonfinite_count == 0
    # A sane floor, not a tuned number: ten classes, chance is 0.1.
    assert fg_acc >= 0.8
    assert fg_acc >= sgd_acc - 0.1
