"""Runs the fused steps of a parameter group's layers together: the threads, and the order.

``run_jobs`` takes one job per layer (``FusedJob``, or FG-Adam's ``AdamJob``) and runs their
phases in lock-step (phase ``i`` of every job before phase ``i + 1`` of any), sharing each
split phase out to threads: on torch's own OpenMP team where torch runs on GNU OpenMP
(``_team``; FG-SGD's memory-order paths only), else on a Python thread pool whose threads pull
pieces of about ``PIECE_NUMEL`` entries from a queue (the numba functions release the GIL).
This is the top of the package: it imports ``_jobs`` (and ``_team`` on first use), nothing
imports it but the package's entry points.

A forked child re-creates the pool and never uses the team (``_after_fork_in_child``).
"""

from __future__ import annotations

import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch

from ._jobs import FusedJob

__all__ = ["run_jobs"]

#: Layers with fewer entries stay off torch's OpenMP team (a team call costs microseconds).
TEAM_MIN_NUMEL = 1 << 13
#: Entries per piece of work handed to a thread (smaller layers are one piece).
PIECE_NUMEL = 1 << 19

_POOL: ThreadPoolExecutor | None = None


def _parallel(tasks: list) -> list:
    """Run the callables of ``tasks`` on as many threads (the first on the calling one).

    The numba functions release the GIL (``nogil``), so plain Python threads run them in
    parallel; unlike numba's parallel regions this never competes with torch's OpenMP pool
    for the cores (docs/performance.md).
    """
    global _POOL
    if len(tasks) == 1:
        return [tasks[0]()]
    if _POOL is None or _POOL._max_workers < len(tasks) - 1:
        _POOL = ThreadPoolExecutor(max_workers=len(tasks) - 1, thread_name_prefix="fgo-fused")
    futures = [_POOL.submit(task) for task in tasks[1:]]
    first = tasks[0]()
    return [first, *(f.result() for f in futures)]


def run_jobs(jobs: list[FusedJob], threads: int | None = None) -> int:
    """Run the fused steps of ``jobs`` together; returns the number of skipped POMs.

    Phase by phase: large float32 layers of the memory-order paths run their split phases on
    torch's own OpenMP team (``_team``: one call per layer, every thread a share), where torch
    runs on GNU OpenMP; everything else is cut into pieces of about ``PIECE_NUMEL`` entries
    (a small layer is one piece), largest first, that threads of our own pull from a queue.
    Pulling matters there: after each parallel torch op, torch's OpenMP workers keep spinning
    on their cores for milliseconds, and a thread sharing a core with one runs at half speed.
    """
    threads = max(1, torch.get_num_threads() if threads is None else threads)
    try:
        team = _team_module() if threads > 1 else None
        for job in jobs:
            job.on_team = (
                team is not None
                and job.team is not None
                and job.numel >= TEAM_MIN_NUMEL
                and _team_has(team, job.team)
            )
            if job.on_team:
                job.parts = threads
            else:
                job.parts = max(1, job.numel // PIECE_NUMEL) if threads > 1 else 1
            job.prepare(job.parts)
        skipped = 0
        for phase in range(max((len(j.phases) for j in jobs), default=0)):
            pieces, on_team = [], {}
            for job in jobs:
                if phase >= len(job.phases):
                    continue
                ph = job.phases[phase]
                if ph.active is not None and not ph.active():
                    continue  # nothing to do in this phase (decided by an earlier one)
                if ph.split and job.on_team:
                    on_team.setdefault(job.team, []).append((job, ph.run, ph.team_kind))
                    continue
                parts = job.parts if ph.split else 1
                pieces += [(job.numel // parts, ph.run, c, parts) for c in range(parts)]
            for key, members in on_team.items():  # one team call per path and index type
                count = None if team is None else _run_on_team(team, key, members, threads)
                if count is None:  # the team failed before it ran: these go to the pool
                    team = None
                    for job, fn, _ in members:
                        pieces += [
                            (job.numel // job.parts, fn, c, job.parts) for c in range(job.parts)
                        ]
                    for job in jobs:
                        job.on_team = False
                else:
                    skipped += count
            pieces.sort(key=lambda piece: -piece[0])
            queue = iter(pieces)
            lock = threading.Lock()

            def worker(queue=queue, lock=lock) -> int:
                total = 0
                while True:
                    with lock:
                        piece = next(queue, None)
                    if piece is None:
                        return total
                    _, fn, c, parts = piece
                    total += int(fn(c, parts))

            if pieces:
                skipped += sum(_parallel([worker] * min(threads, len(pieces))))
        return skipped
    finally:  # the jobs must not keep this step's arrays (gradients) alive
        for job in jobs:
            job.release()


def _run_on_team(team, key, members, threads) -> int | None:
    """One team call for the split phase of the jobs in ``members`` (``(job, fn, kind)``, all
    of one ``key``); the number of skipped POMs, or ``None`` where the team failed before any
    work was done (then it is off for the rest of the process, with one warning)."""
    try:
        parts = [job.team_phase(team, kind, threads) for job, _, kind in members]
        team.run(*key, [desc for desc, _ in parts], threads)
    except Exception as exc:  # only speed is at stake: the thread pool remains
        _team_off(exc)
        return None
    return sum(count() for _, count in parts)


_TEAM: list = []
_TEAM_FAILED: set = set()
_TEAM_WARNED: list = []


def _team_module():
    """``_team`` where torch runs on GNU OpenMP, else ``None`` (checked once per process)."""
    if not _TEAM:
        try:
            from . import _team

            _TEAM.append(_team if _team.load() else None)
        except Exception as exc:  # only speed is at stake: the thread pool remains
            _TEAM.append(None)
            _team_warning(exc)
    return _TEAM[0]


def _team_has(team, key) -> bool:
    """Whether the team runs layers of ``key``: its entry point compiles (on first use)."""
    if key not in team.KEYS or key in _TEAM_FAILED:
        return False
    try:
        team.entry(key)
    except Exception as exc:  # only speed is at stake: the thread pool remains
        _TEAM_FAILED.add(key)
        _team_warning(exc)
        return False
    return True


def _team_off(exc: Exception) -> None:
    """The team failed to run: off for the rest of the process, with one warning."""
    global _TEAM
    _TEAM = [None]
    _team_warning(exc)


def _team_warning(exc: Exception) -> None:
    """One warning per process, whatever failed (finding, compiling or calling the team)."""
    if _TEAM_WARNED:
        return
    _TEAM_WARNED.append(exc)
    warnings.warn(
        f"fgo_geoopt: the fused step cannot use torch's OpenMP threads ({exc!r}); "
        "it runs on its own thread pool (FGO_DISABLE_OMP_TEAM=1 silences this)",
        RuntimeWarning,
        stacklevel=4,
    )


def _after_fork_in_child() -> None:
    """A forked child has none of its parent's threads. The parent's pool looks idle there (its
    workers released their semaphore before the fork), so it would start no worker and
    ``_parallel`` would wait forever: the child makes its own on first use. GNU OpenMP cannot
    run a team in the child of a process that ran one either (``GOMP_parallel`` waits forever,
    as torch's own parallel ops do there): the child's split phases take the pool instead."""
    global _POOL, _TEAM
    _POOL = None  # dropped, not shut down: shutting down would join threads that do not exist
    _TEAM = [None]


if hasattr(os, "register_at_fork"):  # POSIX; elsewhere there is no fork()
    os.register_at_fork(after_in_child=_after_fork_in_child)
