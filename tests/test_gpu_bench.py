"""benchmarks/launches.py and benchmarks/gpu_bench.py run end to end (on the meta device and on
CPU: the GPU figures themselves come from a machine with one, through benchmarks/gpu_check.sh)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("timm")

ROOT = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"fgo_benchmark_{name}", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _run(module, argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        rc = module.main(argv)
    return rc, out.getvalue()


def test_launches_counts_ops_and_syncs_per_step():
    launches = _load("launches")
    rc, text = _run(launches, ["--models", "test_resnet", "--device", "meta", "--json"])
    result = json.loads(text.strip().splitlines()[-1])
    (row,) = result["rows"]
    assert 0 < row["sgd"]["ops"] < row["fgsgd"]["ops"] <= launches.OP_BUDGET
    assert row["fgsgd"]["syncs"] == 0 and row["layers"] > 0
    assert rc == 0 and "FAIL" not in text and "PASS" in text


@pytest.mark.parametrize(("extra", "rc"), [([], 1), (["--no-strict"], 0)])
def test_launches_fails_on_a_fail_line_unless_no_strict(monkeypatch, extra, rc):
    launches = _load("launches")
    monkeypatch.setattr(launches, "checks", lambda rows: [("a target", False, "missed")])
    argv = ["--models", "test_resnet", "--device", "meta", *extra]
    got, text = _run(launches, argv)
    assert got == rc and "FAIL  a target" in text


def test_gpu_bench_smoke_run_on_cpu():
    bench = _load("gpu_bench")
    rc, text = _run(bench, ["--device", "cpu", "--tiny", "--json"])
    assert rc == 0
    (row,) = json.loads(text.strip().splitlines()[-1])["rows"]
    assert {"FG-SGD pio4 auto", "FG-SGD pio4 torch", "SGD foreach"} <= set(row["step_ms"])
    assert all(ms > 0 for ms in row["step_ms"].values())
    assert all(n > 0 for n in row["launches"].values())
    assert row["train_ms"]["FG-SGD pio4 auto"] > 0
