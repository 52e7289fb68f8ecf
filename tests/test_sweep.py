"""The tuning study (recipes/sweep.py): validation split, equal budget, outputs, resume."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from recipes import sweep  # noqa: E402
from recipes.data import carve_validation, create_datasets, dataset_labels  # noqa: E402


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_validation_split_comes_from_the_training_data_only():
    data = create_datasets("digits")
    tune = carve_validation(data, 0.25)
    fit, val = tune.train.indices, tune.eval.indices
    assert tune.train.dataset is data.train and tune.eval.dataset is data.train
    assert not set(fit) & set(val)
    assert len(fit) + len(val) == len(data.train)
    # Stratified: every class keeps about a quarter of its samples in the validation part.
    labels = dataset_labels(data.train)
    for c in range(10):
        n_c = int((labels == c).sum())
        assert abs(int((labels[val] == c).sum()) - round(0.25 * n_c)) <= 1
    # The same split every time (it never depends on a run's seed).
    again = carve_validation(create_datasets("digits"), 0.25)
    assert again.eval.indices == val


def test_sweep_picks_on_validation_and_reports_every_seed(tmp_path, capsys):
    argv = [
        "--datasets",
        "digits",
        "--rows",
        "euc",
        "pio4",
        "--lrs",
        "0.05",
        "0.2",
        "--seeds",
        "0",
        "1",
        "--workers",
        "1",
        "--output",
        str(tmp_path),
        "--experiment",
        "s",
        "--epochs",
        "1",
        "--diagnostics-every",
        "5",
    ]
    assert sweep.main(argv) == 0
    out = tmp_path / "s" / "digits"
    tuning = _read(out / "tuning.csv")
    results = _read(out / "results.csv")
    # Equal budget: every row tried every lr of the grid, once.
    assert sorted((t["row"], float(t["lr"])) for t in tuning) == [
        ("euc", 0.05),
        ("euc", 0.2),
        ("pio4", 0.05),
        ("pio4", 0.2),
    ]
    for row in ("euc", "pio4"):
        mine = [t for t in tuning if t["row"] == row]
        best = min(mine, key=lambda t: (float(t["val_error"]), float(t["val_loss"])))
        finals = [r for r in results if r["row"] == row]
        assert sorted(int(r["seed"]) for r in finals) == [0, 1]
        assert {float(r["lr"]) for r in finals} == {float(best["lr"])}
    table = (out / "table.md").read_text()
    assert "Euc. (SGD)" in table and "PIO (Sp+Ob+St+Euc.)" in table and "22.89" in table
    assert (out / "curves.png").is_file()
    diag = (out / "diagnostics.md").read_text()
    assert "layer3.0.conv2.weight" in diag and "PIO (Sp+Ob+St+Euc.)" in diag
    # The test split is what the final runs report: the same samples as the recipe's eval set.
    summary = _read(out / "final" / "euc-seed0" / "summary.csv")
    err = 100 - float(summary[-1]["eval_top1"])
    assert float(
        next(r for r in results if r["row"] == "euc" and r["seed"] == "0")["test_error"]
    ) == pytest.approx(err)

    # Resume: every run is finished, nothing trains again, the same table comes out.
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("last.pth")}
    capsys.readouterr()
    assert sweep.main([*argv[:-4], "--resume", str(tmp_path / "s"), *argv[-4:]]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("last.pth")} == stamps
    assert (out / "table.md").read_text() == table


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rows", "nope"], "unknown rows"),
        (["--datasets", "imagenet1k"], "unknown dataset"),
        (["--lrs", "0"], "learning rates must be positive"),
        (["--lr", "0.1"], "the sweep sets --lr itself"),
        (["--val-fraction", "1.5"], "--val-fraction"),
        (["--bogus-flag"], "unrecognized arguments"),
    ],
)
def test_sweep_rejects_bad_arguments_before_training(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        sweep.main([*argv, "--output", str(tmp_path)])
    assert message in str(err.value.code) + capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_adam_rows_tune_on_their_own_grid(tmp_path):
    argv = ["--datasets", "digits", "--rows", "euc-adamw", "pio4-fgadam", "--lrs", "0.1", "0.2"]
    argv += ["--adam-lrs", "0.001", "0.003", "--seeds", "0", "--workers", "1"]
    argv += ["--output", str(tmp_path), "--experiment", "a", "--epochs", "1"]
    assert sweep.main(argv) == 0
    out = tmp_path / "a" / "digits"
    tuning = _read(out / "tuning.csv")
    assert sorted((t["row"], float(t["lr"])) for t in tuning) == [
        ("euc-adamw", 0.001),
        ("euc-adamw", 0.003),
        ("pio4-fgadam", 0.001),
        ("pio4-fgadam", 0.003),
    ]
    table = (out / "table.md").read_text()
    assert "{0.001, 0.003}" in table and "Euc. (AdamW)" in table and "FG-Adam" in table
    args = (out / "final" / "pio4-fgadam-seed0" / "args.yaml").read_text()
    assert "opt: adamw" in args and "fg_strategy:\n- pio4" in args


def test_adam_grid_must_give_the_same_budget(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        sweep.main(["--rows", "euc-adamw", "--adam-lrs", "0.001", "--output", str(tmp_path)])
    assert "same tuning budget" in str(err.value.code)
    with pytest.raises(SystemExit) as err:
        sweep.main(["--rows", "pio4-fgadam", "--opt", "sgd", "--output", str(tmp_path)])
    assert "the sweep sets --opt itself" in str(err.value.code)
    assert not any(tmp_path.iterdir())
