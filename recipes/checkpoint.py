"""Checkpoints that survive Ctrl-C and load with ``torch.load(weights_only=True)``.

Every file is written to a temporary file in the same folder and then moved over the target
with :func:`os.replace`, which is atomic on POSIX and Windows: an interrupted save leaves the
previous checkpoint intact, never half a file. Checkpoints hold only tensors and plain
containers (dicts, lists, strings, numbers), so loading them needs no pickled code.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["atomic_copy", "load_checkpoint", "rng_state", "save_checkpoint", "set_rng_state"]


def _atomic(target: Path, write) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        # Also on KeyboardInterrupt: drop the partial file, keep the previous checkpoint.
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    _atomic(Path(path), lambda tmp: torch.save(state, tmp))


def atomic_copy(src: str | Path, dst: str | Path) -> None:
    """Copy a finished file to ``dst`` atomically (used for ``model_best.pth``)."""
    _atomic(Path(dst), lambda tmp: shutil.copyfile(src, tmp))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return torch.load(path, map_location=map_location, weights_only=True)


def _plain(obj: Any) -> Any:
    """Tuples to lists, recursively: ``random.getstate()`` as plain data."""
    if isinstance(obj, (tuple, list)):
        return [_plain(o) for o in obj]
    return obj


def _tuples(obj: Any) -> Any:
    if isinstance(obj, list):
        return tuple(_tuples(o) for o in obj)
    return obj


def rng_state() -> dict[str, Any]:
    """The states of every random generator a training loop touches, as plain data."""
    # The legacy global generator is the one third-party augmentations draw from.
    np_state = np.random.get_state()  # noqa: NPY002
    state = {
        "torch": torch.get_rng_state(),
        "python": _plain(random.getstate()),
        "numpy": {
            "kind": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore generator states saved by :func:`rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(_tuples(state["python"]))
    np_state = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
