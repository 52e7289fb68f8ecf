"""Recipes check their arguments before anything trains or any folder is written."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from recipes.config import parse_args  # noqa: E402
from recipes.data import create_datasets  # noqa: E402
from recipes.experiment import plan_runs, validate_runs  # noqa: E402
from recipes.train import main  # noqa: E402


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--fg-strategy", "euc", "pio5"], "--fg-strategy pio5: unknown strategy 'pio5'"),
        (["--model", "not_a_model"], "--model 'not_a_model' is not a timm model"),
        (["--model", "convnext_atto"], "give a larger --img-size"),
        (["--fg-strategy", "pio4", "--opt", "adam"], "has no FG counterpart"),
        (["--opt", "adamww"], "--opt 'adamww' is not a timm optimizer"),
        (["--fg-strategy", "pio4", "--fg-moment", "kernel"], "--fg-moment applies to FG-Adam"),
        (["--opt", "adamw", "--opt-betas", "0.9", "1.0"], "--opt-betas must lie in [0, 1)"),
        (["--opt", "adamw", "--opt-eps", "0"], "--opt-eps must be positive"),
    ],
)
def test_bad_runs_fail_at_start_without_folders(flags, message, tmp_path, capsys):
    argv = [*flags, "--output", str(tmp_path), "--epochs", "1", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not any(tmp_path.iterdir())  # no experiment folder, nothing trained


def test_adam_flags_reach_the_optimizers():
    import fgo_geoopt
    from recipes.distributed import init_distributed
    from recipes.run import _optimizer, create_run_model

    data = create_datasets("digits")
    args, _ = parse_args(
        [
            "--opt",
            "adamw",
            "--opt-betas",
            "0.8",
            "0.99",
            "--opt-eps",
            "1e-6",
            "--fg-moment",
            "kernel",
        ]
    )
    env = init_distributed("cpu")
    for row, kind in (("euc", "AdamW"), ("pio4", "FGAdam")):
        model, _ = create_run_model(args, row, 0, data, env)
        opt = _optimizer(args, row, model)
        assert type(opt).__name__ == kind
        assert opt.defaults["betas"] == (0.8, 0.99) and opt.defaults["eps"] == 1e-6
        if row == "pio4":
            assert opt.defaults["moment"] == "kernel" and opt.defaults["metric"] == "stored"
            assert isinstance(opt, fgo_geoopt.FGAdam)


def test_img_size_resamples_the_embedded_data_and_lets_larger_models_run():
    data = create_datasets("digits", img_size=32)
    assert data.img_size == 32
    assert tuple(data.train[0][0].shape) == (1, 32, 32)
    assert tuple(data.eval[0][0].shape) == (1, 32, 32)
    args, _ = parse_args(["--dataset", "digits", "--model", "convnext_atto", "--img-size", "32"])
    validate_runs(args, plan_runs(args, Path("unused")), data)  # no error at 32x32
