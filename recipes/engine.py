"""One training epoch and one evaluation pass, with AMP, DDP and progress bars."""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from .distributed import DistEnv, all_reduce_sum

__all__ = ["autocast", "evaluate", "train_one_epoch"]


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    """``torch.autocast`` for ``amp_dtype``, or a no-op context when AMP is off."""
    if amp_dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def _bar(iterable, *, total: int, desc: str, enabled: bool):
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        disable=not enabled,
        leave=False,
        file=sys.stderr,
        dynamic_ncols=True,
    )


def _to_device(x, y, device: torch.device, channels_last: bool):
    x = x.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


def train_one_epoch(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    *,
    env: DistEnv,
    epoch: int,
    scheduler=None,
    num_updates: int = 0,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    clip_grad: float | None = None,
    channels_last: bool = False,
    progress: bool = True,
    desc: str = "train",
    after_step: Callable[[int], None] | None = None,
) -> tuple[dict[str, float], int]:
    """Train ``model`` for one pass over ``loader``.

    ``after_step(num_updates)`` runs after every optimizer step (the EMA update).

    Returns:
        ``({"loss": mean loss, "top1": accuracy in %}, num_updates)``, both averaged over
        every sample seen by every rank.
    """
    model.train()
    device = env.device
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    bar = _bar(loader, total=len(loader), desc=f"{desc} {epoch}", enabled=progress)
    for x, y in bar:
        x, y = _to_device(x, y, device, channels_last)
        with autocast(device, amp_dtype):
            out = model(x)
            loss = loss_fn(out, y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if clip_grad is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if clip_grad is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            optimizer.step()
        num_updates += 1
        if after_step is not None:
            after_step(num_updates)
        if scheduler is not None:
            scheduler.step_update(num_updates=num_updates)
        with torch.no_grad():
            n = y.shape[0]
            sums += torch.stack(
                [
                    loss.detach().double() * n,
                    (out.argmax(dim=1) == y).sum().double(),
                    torch.tensor(float(n), dtype=torch.float64, device=device),
                ]
            )
        if progress:
            bar.set_postfix(
                loss=f"{float(sums[0] / sums[2]):.4f}",
                acc=f"{100.0 * float(sums[1] / sums[2]):.2f}",
                lr=f"{optimizer.param_groups[0]['lr']:.3g}",
            )
    bar.close()
    sums = all_reduce_sum(sums, env)
    count = max(float(sums[2]), 1.0)
    return {"loss": float(sums[0]) / count, "top1": 100.0 * float(sums[1]) / count}, num_updates


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    loss_fn: nn.Module,
    *,
    env: DistEnv,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    progress: bool = True,
    desc: str = "eval",
) -> dict[str, Any]:
    """Loss, top-1 and top-5 accuracy (in %) over the evaluation set, summed over ranks."""
    model.eval()
    device = env.device
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, count
    bar = _bar(loader, total=len(loader), desc=desc, enabled=progress)
    for x, y in bar:
        x, y = _to_device(x, y, device, channels_last)
        with autocast(device, amp_dtype):
            out = model(x)
        out = out.float()
        loss = loss_fn(out, y)
        k = min(5, out.shape[1])
        top = out.topk(k, dim=1).indices
        hits = top == y[:, None]
        n = y.shape[0]
        sums += torch.stack(
            [
                loss.double() * n,
                hits[:, 0].sum().double(),
                hits.any(dim=1).sum().double(),
                torch.tensor(float(n), dtype=torch.float64, device=device),
            ]
        )
        if progress:
            bar.set_postfix(acc=f"{100.0 * float(sums[1] / sums[3]):.2f}")
    bar.close()
    sums = all_reduce_sum(sums, env)
    count = max(float(sums[3]), 1.0)
    return {
        "loss": float(sums[0]) / count,
        "top1": 100.0 * float(sums[1]) / count,
        "top5": 100.0 * float(sums[2]) / count,
    }
