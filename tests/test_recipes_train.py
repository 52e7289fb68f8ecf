"""Recipes end to end: exact resume, bfloat16 AMP on CPU, 2-process DDP with gloo."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
# The recipes live beside the package, not inside it: import them from the repository root.
sys.path.insert(0, str(ROOT))

import fgo_geoopt  # noqa: E402
from recipes import experiment, run  # noqa: E402
from recipes.checkpoint import load_checkpoint  # noqa: E402
from recipes.config import parse_args  # noqa: E402
from recipes.train import main  # noqa: E402

TINY = [
    "--model",
    "resnet8_cifar",
    "--train-subset",
    "96",
    "--eval-subset",
    "48",
    "-b",
    "32",
    "--no-progress",
]


def _run(argv):
    args, text = parse_args(argv)
    return experiment.run_experiment(args, text)


class _Interrupting:
    """A loader that raises KeyboardInterrupt (Ctrl-C) after ``after`` batches."""

    def __init__(self, loader, after):
        self.loader, self.after = loader, after

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i == self.after:
                raise KeyboardInterrupt
            yield batch


def test_resume_after_interrupt_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    # Dropout draws from the global generator: the resumed run must restore its state too.
    common = [
        *TINY,
        "--fg-strategy",
        "pio4",
        "--rescale",
        "--drop",
        "0.3",
        "--epochs",
        "2",
        "--decay-epochs",
        "1",
        "--diagnostics-every",
        "3",  # a snapshot at the epoch end (step 3) that the resumed run must take again
        "--output",
        str(tmp_path),
    ]
    full = _run([*common, "--experiment", "full"])[0]["model_obj"]

    original = run.train_one_epoch

    def interrupted(model, loader, *args, epoch, **kwargs):
        if epoch == 1:  # Ctrl-C in the middle of the second epoch
            loader = _Interrupting(loader, after=2)
        return original(model, loader, *args, epoch=epoch, **kwargs)

    monkeypatch.setattr(run, "train_one_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run([*common, "--experiment", "cut"])
    monkeypatch.undo()
    last = tmp_path / "cut" / "pio4-seed0" / "last.pth"
    assert load_checkpoint(last)["epoch"] == 0  # only the finished epoch was saved
    resumed = _run([*common, "--resume", str(tmp_path / "cut")])[0]["model_obj"]

    expected, got = full.state_dict(), resumed.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert fgo_geoopt.check(resumed) == []
    assert fgo_geoopt.grouping_state(resumed).keys() == fgo_geoopt.grouping_state(full).keys()
    summary = (tmp_path / "cut" / "pio4-seed0" / "summary.csv").read_text()
    assert summary == (tmp_path / "full" / "pio4-seed0" / "summary.csv").read_text()
    diagnostics = (tmp_path / "cut" / "pio4-seed0" / "diagnostics.csv").read_text()
    # The step after the resume is recorded (wrapped layers skip it: the epoch-start re-scaling
    # changed their scales, see fgo_geoopt.diagnostics).
    assert "\n4,fc.weight" in diagnostics
    assert diagnostics == (tmp_path / "full" / "pio4-seed0" / "diagnostics.csv").read_text()


def test_bfloat16_amp_on_cpu_keeps_weights_on_their_manifolds(tmp_path):
    result = _run(
        [
            *TINY,
            "--fg-strategy",
            "pio3",
            "--epochs",
            "1",
            "--amp",
            "--amp-dtype",
            "bfloat16",
            "--channels-last",
            "--output",
            str(tmp_path),
            "--experiment",
            "amp",
        ]
    )[0]
    model = result["model_obj"]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert fgo_geoopt.check(model) == []
    assert torch.isfinite(torch.tensor(result["train_loss"]))
    before = torch.load(tmp_path / "amp" / "pio3-seed0" / "model_best.pth", weights_only=True)
    assert before["epoch"] == 0


def test_missing_data_dir_is_one_clear_error(tmp_path, capsys):
    code = main(
        [
            "--dataset",
            "torch/cifar10",
            "--data-dir",
            str(tmp_path / "missing"),
            "--output",
            str(tmp_path),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "cifar-10-batches-py" in err[0] and err[0].startswith("error:")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_ddp_ranks_end_identical(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(
        textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(ROOT)!r})
        import torch, fgo_geoopt
        from recipes.config import parse_args
        from recipes.experiment import run_experiment

        args, text = parse_args(sys.argv[1:])
        model = run_experiment(args, text)[0]["model_obj"]
        torch.save({{"state": model.state_dict(), "violations": fgo_geoopt.check(model),
                     "grouping": fgo_geoopt.grouping_state(model)}},
                   os.path.join({str(tmp_path)!r}, f"rank{{os.environ['RANK']}}.pt"))
    """)
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        str(driver),
        *TINY,
        "--train-subset",
        "128",
        "--fg-strategy",
        "pio4",
        "--rescale",
        "--epochs",
        "2",
        "--output",
        str(tmp_path),
        "--experiment",
        "ddp",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "world size 2" in proc.stdout
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["violations"] == [] and ranks[1]["violations"] == []
    assert ranks[0]["state"].keys() == ranks[1]["state"].keys()
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
    for name, state in ranks[0]["grouping"].items():
        other = ranks[1]["grouping"][name]
        assert torch.equal(state["kernel_pom"], other["kernel_pom"]), name
        assert torch.equal(state["scale"], other["scale"]), name
    # The update before epoch 2 replaced R = gamma by gamma / lambda, which varies per channel.
    assert any(s["scale"].unique().numel() > 1 for s in ranks[0]["grouping"].values())
