"""The fused step in forked processes: a child steps after its parent has.

A forked child inherits the parent's memory but none of its threads. A thread pool created in
the parent looks idle to the child (its workers did release their semaphore there), so work
submitted in the child would wait forever for a worker that does not exist; and GNU OpenMP
cannot run a team in the child of a process that ran one (``GOMP_parallel`` waits forever).
These tests step an optimizer in the parent first (pool, OpenMP team and caches all in use),
then in a ``multiprocessing`` child and in ``DataLoader`` workers, and check that each finishes
in time with the same result as the parent.

In the children torch's own forward and backward run on one thread, as in ``DataLoader``
workers: with GNU OpenMP (torch's Linux wheels), torch's parallel ops hang there too. The
optimizer step runs on two threads, so it takes the thread pool.
"""

from __future__ import annotations

import contextlib
import copy
import multiprocessing
import os

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import fgo_geoopt
from fgo_geoopt import FGSGD
from fgo_geoopt.optim import cpu

pytestmark = [
    pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() on this platform"),
    pytest.mark.skipif(not cpu.AVAILABLE, reason="numba fused backend unavailable"),
]

JOIN_S = 60  # a child that takes longer than this is taken to hang
THREADS = 2  # more than one: the step then uses the thread pool (and the OpenMP team)


def _setup(dtype):
    """A small wrapped conv net: 3x3 layers (one large enough for the OpenMP team in float32),
    a 1x1 conv and a linear layer, so that every kind of job runs; and its optimizer."""
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 64, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 32, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 16),
        nn.ReLU(),
        nn.Linear(16, 10),
    ).to(dtype)
    for p in model.parameters():
        p.data.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) * 0.1)
    fgo_geoopt.wrap(model, "pio4")
    opt = FGSGD(model.parameters(), lr=0.05, momentum=0.9, backend="fused")
    return model, opt


@contextlib.contextmanager
def _num_threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _steps(model, opt, steps, seed, torch_threads=THREADS) -> float:
    """``steps`` training steps on seeded random data (forward and backward on
    ``torch_threads``, the optimizer step on ``THREADS``); a checksum of the weights."""
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        x = torch.randn(4, 3, 8, 8, generator=gen, dtype=dtype)
        opt.zero_grad()
        with _num_threads(torch_threads):
            model(x).square().mean().backward()
        with _num_threads(THREADS):
            opt.step()
    return float(sum(p.detach().double().abs().sum() for p in model.parameters()))


def _child(model, opt, conn):
    conn.send(_steps(model, opt, 2, seed=1, torch_threads=1))
    conn.close()


@pytest.mark.timeout(4 * JOIN_S)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_multiprocessing_fork_child_steps_after_the_parent(dtype):
    model, opt = _setup(dtype)
    _steps(model, opt, 2, seed=0)  # the parent steps first: pools and caches exist
    twin, twin_opt = copy.deepcopy((model, opt))

    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(model, opt, send))
    child.start()
    send.close()
    child.join(JOIN_S)
    if child.is_alive():
        child.kill()
        child.join()
        pytest.fail(f"the forked child did not finish its steps within {JOIN_S} s")
    assert child.exitcode == 0
    assert receive.poll(1)
    got = receive.recv()
    # the same two steps in the parent, on a copy of the state the child started from
    want = _steps(twin, twin_opt, 2, seed=1)
    assert got == pytest.approx(want, rel=1e-5)
    _steps(model, opt, 1, seed=2)  # the parent's own pool still works after the fork


class _Stepping(Dataset):
    """Each item steps a copy of a model (inherited from the parent) once: a worker that
    touches the optimizer. Returns a checksum of the stepped weights."""

    def __init__(self, model, opt):
        self.model, self.opt = model, opt

    def __len__(self):
        return 4

    def __getitem__(self, index):
        checksum = _steps(self.model, self.opt, 1, seed=10 + index, torch_threads=1)
        return torch.tensor(checksum, dtype=torch.float64)


@pytest.mark.timeout(4 * JOIN_S)
def test_dataloader_fork_workers_step_after_the_parent():
    model, opt = _setup(torch.float32)
    _steps(model, opt, 2, seed=0)
    loader = DataLoader(
        _Stepping(model, opt),
        batch_size=1,
        num_workers=2,
        multiprocessing_context="fork",
        timeout=JOIN_S,
    )
    got = torch.cat(list(loader))
    assert got.shape == (4,)
    assert torch.isfinite(got).all()
    # items 0 and 1 are the first of each worker: one step from the parent's state
    for index in (0, 1):
        want = _steps(*copy.deepcopy((model, opt)), 1, seed=10 + index)
        assert got[index].item() == pytest.approx(want, rel=1e-5)
