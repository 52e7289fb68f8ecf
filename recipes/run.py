"""One training run: a Table 3 row with one seed, from model creation to its last epoch."""

from __future__ import annotations

import argparse
import functools
import hashlib
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import yaml
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn
from torch.utils.data import DataLoader

import fgo_geoopt
from fgo_geoopt import bounds as fg_bounds
from fgo_geoopt.diagnostics import StepRecorder
from fgo_geoopt.diagnostics import read_csv as read_diagnostics

from . import models as _models  # noqa: F401  (registers the CIFAR ResNets with timm)
from .checkpoint import atomic_copy, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import FG_ADAM, fg_optimizer, row_label
from .data import DataInfo, ShardSampler
from .distributed import DistEnv, barrier
from .engine import evaluate, train_one_epoch
from .outputs import SUMMARY_FIELDS, plot_bounds, plot_curves, write_csv, write_text

__all__ = ["BOUND_FIELDS", "RunSpec", "create_run_model", "plain_args", "run_name", "train_run"]

CHECKPOINT_VERSION = 1
BOUND_FIELDS = ("epoch", *fg_bounds.BOUNDS, "fro_max", "spec_max", "l21_max")


@dataclass
class RunSpec:
    """One training run: a row of Table 3 with one seed, in its own folder."""

    row: str
    seed: int
    run_dir: Path
    resume: Path | None = None


def run_name(row: str, seed: int) -> str:
    """Folder name of a run inside its experiment."""
    return f"{row}-seed{seed}"


# ---------------------------------------------------------------------------- helpers
def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002  (the global generator augmentations use)
    torch.manual_seed(seed)


def _grouping_digest(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, state in sorted(fgo_geoopt.grouping_state(model).items()):
        digest.update(name.encode())
        digest.update(state["kernel_pom"].numpy().tobytes())
        digest.update(state["pom_type"].numpy().tobytes())
    return digest.hexdigest()


def _bound_row(model: nn.Module, epoch: int, num_samples: int) -> dict[str, float]:
    rows = fg_bounds.layer_norms(model)
    row: dict[str, float] = {"epoch": epoch}
    row.update(fg_bounds.generalization_bounds(rows, num_samples))
    for n in fg_bounds.NORMS:
        row[f"{n}_max"] = max(r[f"{n}_max"] for r in rows)
    return row


def plain_args(args: argparse.Namespace, **override: Any) -> dict[str, Any]:
    """``vars(args)`` with ``override`` applied, as plain YAML- and checkpoint-safe data."""
    out = dict(vars(args))
    out.update(override)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in out.items()}


def _amp_dtype(args: argparse.Namespace) -> torch.dtype | None:
    if not args.amp:
        return None
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}[args.amp_dtype]


def _loader(ds, batch_size: int, sampler: ShardSampler, args, env: DistEnv, gen, train: bool):
    return DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=args.workers,
        pin_memory=env.device.type == "cuda",
        drop_last=train and len(sampler) >= batch_size,
        generator=gen,
        persistent_workers=False,
    )


# ---------------------------------------------------------------------------- one run
def create_run_model(
    args: argparse.Namespace,
    row: str,
    seed: int,
    data: DataInfo,
    env: DistEnv,
    resume: dict[str, Any] | None = None,
):
    """The timm model of one run, wrapped for FG rows, restored from ``resume`` if given.

    Returns:
        ``(model, rescaler)``; ``rescaler`` is ``None`` for the Euclidean row, and for the
        ``paper`` rule without ``--rescale``.
    """
    fg = row != "euc"
    model = timm.create_model(
        args.model,
        pretrained=False,
        num_classes=args.num_classes or data.num_classes,
        in_chans=data.in_chans,
        drop_rate=args.drop,
        drop_path_rate=args.drop_path,
    )
    model.to(env.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    rescaler = None
    if fg:
        fg_seed = seed if args.fg_seed is None else args.fg_seed
        manifolds = args.fg_manifolds if row not in fgo_geoopt.PRESETS else None
        fgo_geoopt.wrap(model, row, manifolds=manifolds, seed=fg_seed, kernel=args.fg_kernel)
        if resume is not None:
            # The grouping (with its scales) first, so that the loaded weights R * w are
            # checked against the right collections and kept bit-exact.
            fgo_geoopt.load_grouping_state(model, resume["grouping"])
        if env.distributed:
            digests = [None] * env.world_size
            torch.distributed.all_gather_object(digests, _grouping_digest(model))
            if len(set(digests)) != 1:
                raise RuntimeError("the POM groupings differ between ranks; check --fg-seed")
    if resume is not None:
        model.load_state_dict(resume["model"])
    matched = args.fg_lr_rule == "matched"
    if fg and (args.rescale or matched):
        from fgo_geoopt.rescaling import Rescaler

        # Layers restored from a checkpoint keep their scales; fresh ones start at R = gamma.
        # The 'matched' rule sets R = gamma also without --rescale (then never updated, so no
        # statistics hooks).
        rescaler = Rescaler(model, "matched" if matched else "fan", attach=args.rescale)
        if resume is not None:
            rescaler.load_state_dict(resume["rescaler"])
    return model, rescaler


def _optimizer(args: argparse.Namespace, row: str, model: nn.Module) -> torch.optim.Optimizer:
    fg = row != "euc"
    opt_name = fg_optimizer(args.opt, row)
    adam = opt_name.split("_")[-1] in FG_ADAM
    extra: dict[str, Any] = {}
    if fg:
        extra["metric"] = "stored" if args.fg_lr_rule == "matched" else "unit"
        if adam:
            extra["moment"] = args.fg_moment or "pom"
        else:
            extra["adaptive_step"] = args.adaptive_step
    # timm drops betas / eps for optimizers that take none
    if args.opt_betas is not None:
        extra["betas"] = tuple(args.opt_betas)
    if args.opt_eps is not None:
        extra["eps"] = args.opt_eps
    return create_optimizer_v2(
        model,
        opt=opt_name,
        lr=args.lr,
        weight_decay=args.weight_decay,
        momentum=args.momentum,
        param_group_fn=(
            functools.partial(fgo_geoopt.param_groups, weight_decay=args.weight_decay)
            if fg
            else None
        ),
        **extra,
    )


def _after_step(model, model_ema, recorder, optimizer):
    """What runs after every optimizer step: the EMA update and the diagnostics recorder."""
    if model_ema is None and recorder is None:
        return None

    def after(num_updates: int) -> None:
        if model_ema is not None:
            model_ema.update(model, step=num_updates)
        if recorder is not None:
            recorder.record(optimizer)

    return after


def _scheduler(args: argparse.Namespace, optimizer, updates_per_epoch: int):
    scheduler, num_epochs = create_scheduler_v2(
        optimizer,
        sched=args.sched,
        num_epochs=args.epochs,
        decay_epochs=args.decay_epochs,
        decay_milestones=args.decay_milestones,
        decay_rate=args.decay_rate,
        min_lr=args.min_lr,
        warmup_lr=args.warmup_lr,
        warmup_epochs=args.warmup_epochs,
        step_on_epochs=not args.sched_on_updates,
        updates_per_epoch=updates_per_epoch,
    )
    return scheduler, num_epochs


def train_run(args: argparse.Namespace, spec: RunSpec, data: DataInfo, env: DistEnv) -> dict:
    """Train one row with one seed; returns its final metrics (see :func:`run_experiment`)."""
    row, seed = spec.row, spec.seed
    fg = row != "euc"
    label = row_label(row, args.fg_manifolds)
    # Rank-dependent global seed (augmentation, dropout); the weights and groupings come from
    # rank 0 (DDP broadcasts the initial weights, the grouping is checked below).
    _seed_everything(seed + env.rank)
    resume = load_checkpoint(spec.resume, map_location=env.device) if spec.resume else None
    if resume is not None and (resume["row"], int(resume["seed"])) != (row, seed):
        raise SystemExit(f"error: {spec.resume} holds row {resume['row']} seed {resume['seed']}")

    model, rescaler = create_run_model(args, row, seed, data, env, resume)
    optimizer = _optimizer(args, row, model)
    train_sampler = ShardSampler(
        len(data.train), rank=env.rank, world_size=env.world_size, shuffle=True, seed=seed
    )
    eval_sampler = ShardSampler(
        len(data.eval), rank=env.rank, world_size=env.world_size, shuffle=False
    )
    gen = torch.Generator()
    train_loader = _loader(data.train, args.batch_size, train_sampler, args, env, gen, True)
    eval_loader = _loader(
        data.eval,
        args.validation_batch_size or 2 * args.batch_size,
        eval_sampler,
        args,
        env,
        None,
        False,
    )
    scheduler, num_epochs = _scheduler(args, optimizer, len(train_loader))
    amp_dtype = _amp_dtype(args)
    scaler = None
    if amp_dtype == torch.float16:
        scaler = torch.amp.GradScaler(env.device.type)

    model_ema = None
    if args.model_ema:
        if rescaler is not None and args.rescale:
            raise ValueError(
                "--model-ema with --rescale is not supported: the average would mix weights "
                "stored under different scales R"
            )
        from timm.utils import ModelEmaV3

        model_ema = ModelEmaV3(model, decay=args.model_ema_decay)
        if resume is not None:
            model_ema.module.load_state_dict(resume["model_ema"])

    start_epoch, num_updates = 0, 0
    history: list[dict[str, float]] = []
    bound_history: list[dict[str, float]] = []
    best = {"top1": -1.0, "epoch": -1}
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        if scaler is not None and resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        start_epoch = int(resume["epoch"]) + 1
        num_updates = int(resume["num_updates"])
        history = [dict(r) for r in resume["history"]]
        bound_history = [dict(r) for r in resume["bounds"]]
        best = dict(resume["best"])
        rngs = resume["rng"]
        set_rng_state(rngs[env.rank] if len(rngs) == env.world_size else rngs[0])
    if 0 < start_epoch < num_epochs:
        # As timm does on resume (the optimizer state already holds the same rate).
        if args.sched_on_updates:
            scheduler.step_update(num_updates)
        else:
            scheduler.step(start_epoch)

    train_model: nn.Module = model
    if env.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == "cuda" else None
        )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=args.smoothing)
    eval_loss_fn = nn.CrossEntropyLoss()
    run_dir = spec.run_dir
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        run_args = plain_args(args, fg_strategy=[row], seed=seed, seeds=[seed])
        write_text(run_dir / "args.yaml", yaml.safe_dump(run_args, sort_keys=False))
    progress = env.is_main and not args.no_progress
    recorder = None
    if env.is_main and args.diagnostics_every > 0:
        recorder = StepRecorder(model, every=args.diagnostics_every)
        # A resumed run goes on counting steps and keeps the rows recorded before it stopped
        # (the CSV is written with each checkpoint, so it matches the checkpoint).
        recorder.calls = num_updates
        if resume is not None and (spec.run_dir / "diagnostics.csv").is_file():
            recorder.extend(read_diagnostics(spec.run_dir / "diagnostics.csv"))
        if num_updates and num_updates % args.diagnostics_every == 0:
            recorder.snapshot()  # the uninterrupted run took one here
    after_step = _after_step(model, model_ema, recorder, optimizer)
    t0 = time.time()
    for epoch in range(start_epoch, num_epochs):
        train_sampler.set_epoch(epoch)
        # Worker seeds come from this generator: a function of (seed, epoch, rank) only.
        gen.manual_seed((seed * 1_000_003 + epoch) * 4_099 + env.rank)
        t_epoch = time.time()
        if rescaler is not None and args.rescale and epoch > 0:
            # R = gamma / lambda from the statistics of the previous epoch (docs/rescaling.md),
            # set before this epoch trains: batch-norm statistics then follow the new scales
            # before anything is evaluated.
            rescaler.update()
        train_metrics, num_updates = train_one_epoch(
            train_model,
            train_loader,
            optimizer,
            loss_fn,
            env=env,
            epoch=epoch,
            scheduler=scheduler,
            num_updates=num_updates,
            amp_dtype=amp_dtype,
            scaler=scaler,
            clip_grad=args.clip_grad,
            channels_last=args.channels_last,
            progress=progress,
            desc=f"{label} s{seed}",
            after_step=after_step,
        )
        if env.distributed:
            # Rank 0's batch-norm statistics everywhere; evaluation then runs on the plain
            # module (shards may differ by one batch: no collective inside the loop).
            for buf in model.buffers():
                torch.distributed.broadcast(buf, src=0)
        eval_metrics = evaluate(
            model,
            eval_loader,
            eval_loss_fn,
            env=env,
            amp_dtype=amp_dtype,
            channels_last=args.channels_last,
            progress=progress,
        )
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step(epoch + 1, eval_metrics["top1"])
        history.append(
            {
                "epoch": epoch,
                "train_loss": train_metrics["loss"],
                "eval_loss": eval_metrics["loss"],
                "eval_top1": eval_metrics["top1"],
                "eval_top5": eval_metrics["top5"],
                "lr": lr,
                "train_top1": train_metrics["top1"],
            }
        )
        if model_ema is not None:
            if fg:
                # An average of manifold points is off the manifold: project it back.
                fgo_geoopt.reproject(model_ema.module)
            ema_metrics = evaluate(
                model_ema.module,
                eval_loader,
                eval_loss_fn,
                env=env,
                amp_dtype=amp_dtype,
                channels_last=args.channels_last,
                progress=progress,
                desc="eval ema",
            )
            history[-1].update(ema_eval_loss=ema_metrics["loss"], ema_eval_top1=ema_metrics["top1"])
        is_best = eval_metrics["top1"] > best["top1"]
        if is_best:
            best = {"top1": eval_metrics["top1"], "epoch": epoch}
        rngs = [rng_state()]
        if env.distributed:
            rngs = [None] * env.world_size
            torch.distributed.all_gather_object(rngs, rng_state())
        if env.is_main:
            bound_history.append(_bound_row(model, epoch, len(data.train)))
            state = {
                "version": CHECKPOINT_VERSION,
                "epoch": epoch,
                "num_epochs": num_epochs,
                "row": row,
                "seed": seed,
                "arch": args.model,
                "args": plain_args(args, fg_strategy=[row], seed=seed, seeds=[seed]),
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": None if scaler is None else scaler.state_dict(),
                "model_ema": None if model_ema is None else model_ema.module.state_dict(),
                "grouping": fgo_geoopt.grouping_state(model) if fg else {},
                "rescaler": None if rescaler is None else rescaler.state_dict(),
                "rng": [
                    {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in r.items()}
                    for r in rngs
                ],
                "num_updates": num_updates,
                "history": history,
                "bounds": bound_history,
                "best": best,
            }
            save_checkpoint(run_dir / "last.pth", state)
            if is_best:
                atomic_copy(run_dir / "last.pth", run_dir / "model_best.pth")
            fields = SUMMARY_FIELDS + (("ema_eval_loss", "ema_eval_top1") if model_ema else ())
            write_csv(run_dir / "summary.csv", history, fields)
            write_csv(run_dir / "bounds.csv", bound_history, BOUND_FIELDS)
            if recorder is not None:
                recorder.to_csv(run_dir / "diagnostics.csv")
            print(
                f"[{label} seed {seed}] epoch {epoch + 1}/{num_epochs}  "
                f"train_loss {train_metrics['loss']:.4f}  eval_loss {eval_metrics['loss']:.4f}  "
                f"top1 {eval_metrics['top1']:.2f}  top5 {eval_metrics['top5']:.2f}  "
                f"lr {lr:.4g}  ({time.time() - t_epoch:.1f}s)",
                flush=True,
            )
        barrier(env)
    if env.is_main:
        # Plots once per run (the CSV files are complete after every epoch).
        title = f"{args.model} {label} seed {seed}"
        plot_curves(run_dir / "curves.png", history, title)
        plot_bounds(run_dir / "bounds.png", bound_history, fg_bounds.BOUNDS, title)
        if recorder is not None and recorder.rows():
            recorder.plot(run_dir / "diagnostics.png", title)
            write_text(run_dir / "diagnostics.txt", recorder.describe(last=20) + "\n")
    if env.is_main and fg:
        violations = fgo_geoopt.check(model)
        if violations:
            print(
                f"warning: {len(violations)} manifold violations: {violations[:3]}", file=sys.stderr
            )
    final = history[-1] if history else {}
    return {
        "row": row,
        "label": label,
        "seed": seed,
        "model": args.model,
        "dataset": args.dataset,
        "epochs": len(history),
        "eval_top1": final.get("eval_top1", float("nan")),
        "eval_top5": final.get("eval_top5", float("nan")),
        "eval_loss": final.get("eval_loss", float("nan")),
        "train_loss": final.get("train_loss", float("nan")),
        "best_top1": best["top1"],
        "time_s": time.time() - t0,
        "history": history,
        "bounds": bound_history,
        "model_obj": model,
        "diagnostics": [] if recorder is None else recorder.summary(last=20),
    }
