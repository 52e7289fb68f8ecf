"""Command line: per-POM norms and generalisation bounds of a saved checkpoint.

``python -m fgo_geoopt.integrations.bounds_cli CHECKPOINT --model NAME --num-samples N`` (or the
``fgo-bounds`` script) builds the timm model ``NAME``, loads the checkpoint into it (the saved
groupings first, so that wrapped layers are measured per POM) and prints the table of
:mod:`fgo_geoopt.bounds`. It lives here because it imports timm: the library proper does not.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..bounds import COORDS, claim_holds, format_table, generalization_bounds, layer_norms
from ..wrapping import load_grouping_state

__all__ = ["main"]

# Checkpoint keys of the groupings ({parameter name: KernelCollection.state_dict()}), as written
# by fgo_geoopt.grouping_state: the recipes save it under "grouping".
_GROUPING_KEYS = ("grouping", "fg_grouping")


def _find_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """The model state dict inside a checkpoint (plain, or under ``state_dict`` / ``model``)."""
    for _ in range(4):
        if (
            isinstance(obj, Mapping)
            and obj
            and all(isinstance(v, torch.Tensor) for v in obj.values())
        ):
            return dict(obj)
        if isinstance(obj, Mapping):
            for key in ("state_dict", "model", "state_dict_ema", "model_state"):
                if key in obj:
                    obj = obj[key]
                    break
            else:
                break
        else:
            break
    raise ValueError(
        "could not find a model state dict in the checkpoint (looked at the top level and "
        "under 'state_dict' / 'model')"
    )


def _strip(name: str) -> str:
    return name[len("module.") :] if name.startswith("module.") else name


def _grouping_state(checkpoint: Any) -> dict[str, Any]:
    """``{parameter name: collection state}`` saved beside the weights, or ``{}``."""
    if not isinstance(checkpoint, Mapping):
        return {}
    for key in _GROUPING_KEYS:
        state = checkpoint.get(key)
        if isinstance(state, Mapping) and state:
            return {_strip(k): v for k, v in state.items()}
    return {}


def _build_model(name: str, num_classes: int | None) -> nn.Module:
    import timm  # lazily: ``--help`` works without it

    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    return timm.create_model(name, pretrained=False, **kwargs)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: norms and bounds of a saved checkpoint."""
    parser = argparse.ArgumentParser(
        prog="fgo-bounds",
        description="Per-POM norms and norm-based generalisation bounds (log10) of a checkpoint.",
    )
    parser.add_argument("checkpoint", help="a file saved with torch.save (state dict inside)")
    parser.add_argument("--model", required=True, help="timm model name, e.g. resnet50")
    parser.add_argument("--num-classes", type=int, default=None)
    parser.add_argument(
        "--num-samples", type=int, required=True, help="N, the number of training samples"
    )
    parser.add_argument("--coords", choices=COORDS, default="stored")
    parser.add_argument(
        "--width",
        type=int,
        default=None,
        help="varpi of Neyshabur et al. 2018 (default: max output channels)",
    )
    args = parser.parse_args(argv)

    checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    state = {_strip(k): v for k, v in _find_state_dict(checkpoint).items()}
    model = _build_model(args.model, args.num_classes)
    grouping = _grouping_state(checkpoint)
    if grouping:
        # The groupings (with their scales) first, so that the stored weights R * w load as
        # points of their collections.
        load_grouping_state(model, grouping)
    model.load_state_dict(state)
    rows = layer_norms(model, coords=args.coords)
    bounds = {
        "per POM": generalization_bounds(rows, args.num_samples, width=args.width),
        "per layer": generalization_bounds(rows, args.num_samples, width=args.width, level="layer"),
    }
    print(format_table(rows, bounds))
    fg = [r for r in rows if r["kind"] == "fg"]
    if fg:
        verdict = "holds" if claim_holds(rows) else "does not hold"
        print(f"\nTable 2 claim (every per-POM norm of the {len(fg)} FG layers <= 1): {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
