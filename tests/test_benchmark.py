"""The step benchmark (``benchmarks/step.py``) runs end to end and reports sane numbers.

Speed is not asserted here (that is what the benchmark itself reports); these tests keep the
script from rotting: every measure is present, positive, JSON-serialisable, and the memory
accounting counts what it claims to.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("timm")

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "step.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("fgo_benchmark_step", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def result(bench):
    """One tiny run through the command line, read back from its JSON line."""
    numba = pytest.importorskip("numba")
    threads = torch.get_num_threads(), numba.get_num_threads()
    try:
        return _run_main(bench)
    finally:  # the run sets both thread counts
        torch.set_num_threads(threads[0])
        numba.set_num_threads(threads[1])


def _run_main(bench):
    import contextlib
    import io

    buf = io.StringIO()
    argv = [
        "--model", "test_resnet", "--presets", "st,pio4", "--repeats", "2", "--warmup", "1",
        "--geoopt-repeats", "1", "--train-repeats", "1", "--batch-size", "2", "--img-size", "32",
        "--wrap-model", "test_resnet", "--launches", "--malloc", "default", "--json",
        "--no-strict",  # a tiny model on a busy machine need not meet resnet50's targets
    ]  # fmt: skip
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        rc = bench.main(argv)
    assert rc == 0
    text = buf.getvalue().strip().splitlines()
    return {"json": json.loads(text[-1]), "table": "\n".join(text[:-1])}


@pytest.mark.parametrize(("extra", "rc"), [([], 1), (["--strict"], 1), (["--no-strict"], 0)])
def test_a_missed_target_fails_the_command_unless_no_strict(bench, monkeypatch, extra, rc):
    checks = [{"pass": True}, {"pass": False}]
    monkeypatch.setattr(bench, "run", lambda cfg, log: {"checks": checks})
    monkeypatch.setattr(bench, "format_report", lambda result: "FAIL")
    with contextlib.redirect_stdout(io.StringIO()):
        assert bench.main(["--model", "test_resnet", *extra]) == rc


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_every_step_is_timed(result):
    steps = result["json"]["step"]
    assert set(steps) == {"sgd", "fg_st", "fg_pio4", "geoopt_sphere"}
    for name, s in steps.items():
        assert _positive(s["median_ms"]), name
        assert _positive(s["first_ms"]), name
        assert _positive(s["ratio_to_sgd"]), name
        assert _positive(s["min_ratio_to_sgd"]), name
        assert s["min_ms"] <= s["median_ms"], name
    assert len(steps["sgd"]["samples_ms"]) == 2
    assert len(steps["geoopt_sphere"]["samples_ms"]) == 1
    assert steps["sgd"]["ratio_to_sgd"] == 1.0


def test_train_memory_wrap_and_launches_are_reported(result):
    res = result["json"]
    assert set(res["train"]) == {"sgd", "fg_pio4"}
    assert all(_positive(s["median_ms"]) for s in res["train"].values())
    mem = res["memory"]
    assert mem["sgd"]["collection_bytes"] == 0
    for preset in ("st", "pio4"):
        assert mem[f"fg_{preset}"]["state_bytes"] >= mem["sgd"]["state_bytes"] > 0
        assert mem[f"fg_{preset}"]["collection_bytes"] > 0
    assert _positive(res["wrap_large"]["seconds"])
    la = res["launches"]
    assert la["pio4_more_poms"]["poms"] > la["pio4"]["poms"]
    assert la["pio4"]["layers"] == la["pio4_more_poms"]["layers"] > 0
    assert isinstance(la["independent_of_poms"], bool)
    assert res["wrap_impl"] == "fgo_geoopt.wrap"


def test_checks_and_table_cover_every_target(result):
    res, table = result["json"], result["table"]
    whats = {c["what"] for c in res["checks"]}
    assert {"step fg_st", "step fg_pio4", "state memory fg_pio4", "train step fg_pio4",
            "wrap(test_resnet, pio4)", "launches independent of POMs"} <= whats  # fmt: skip
    assert all(isinstance(c["pass"], bool) for c in res["checks"])
    for what in whats:
        assert what in table
    for key in ("torch", "numba", "cpu", "date"):
        assert res["machine"][key]
    assert "first-step (compile) time" in table
    assert "ratios of the fastest steps" in table
    assert "minor page faults per timed step" in table
    assert "--malloc default" in table
    for case in [*res["step"].values(), *res["train"].values()]:
        assert case["page_faults"] >= 0


_FAULTS_SCRIPT = """
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("bench", sys.argv[1])
bench = importlib.util.module_from_spec(spec)
sys.modules["bench"] = bench
spec.loader.exec_module(bench)
print(bench.set_malloc(sys.argv[2]))
counts = []
for _ in range(6):  # 64 MiB allocated, written and freed, six times
    f0 = bench._faults()
    t = torch.ones(16 << 20)
    del t
    counts.append(bench._faults() - f0)
print(" ".join(map(str, counts)))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc allocator settings")
def test_malloc_keep_stops_freed_memory_from_faulting_back_in(bench):
    """``--malloc keep``: memory freed stays with the process, so allocating it again costs no
    page faults once the heap has grown to hold it (a block may land on fresh pages once or
    twice while small objects settle around it); glibc's defaults hand a 64 MiB block back and
    fault it in every time."""
    import platform
    import subprocess

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")

    def child(mode: str) -> tuple[str, list[int]]:
        out = subprocess.run(
            [sys.executable, "-c", _FAULTS_SCRIPT, str(_PATH), mode],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("\n")
        return out[0], [int(n) for n in out[1].split()]

    faults, said = {}, {}
    for mode in ("default", "keep"):
        said[mode], faults[mode] = child(mode)
    # Once in a CI run the keep child faulted every 64 MiB block in again, as if its heap
    # could not grow in place (glibc then serves the block with mmap, whatever the threshold):
    # a property of that process's address space, so up to two more fresh children are asked.
    for _ in range(2):
        if min(faults["keep"][1:]) < min(faults["default"]) / 10:
            break
        said["keep"], faults["keep"] = child("keep")
    assert said["keep"] == "glibc, trim and mmap thresholds 1 GiB"
    # 64 MiB in 4 KiB pages is 16,384 faults (fewer with huge pages)
    assert min(faults["default"]) > 500
    later = faults["keep"][1:]
    assert min(later) < min(faults["default"]) / 10
    assert sum(later) <= sum(faults["default"][1:]) / 2
    with pytest.raises(ValueError, match="keep"):
        bench.set_malloc("never")


def test_sgd_state_bytes_are_the_momentum_buffers(bench):
    model = bench.make_model("test_resnet", 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    mem = bench.optimizer_state_bytes(opt)
    expected = sum(p.numel() * p.element_size() for p in model.parameters())
    assert mem == {
        "state_bytes": expected,
        "collection_bytes": 0,
        "total_bytes": expected,
        "collection_detail": {},
    }


def test_collection_bytes_include_index_tensors(bench):
    import fgo_geoopt

    model = fgo_geoopt.wrap(bench.make_model("test_resnet", 0), "pio4", seed=0)
    colls = [p.manifold for p in model.parameters() if hasattr(p, "manifold")]
    floor = sum(
        t.untyped_storage().nbytes()
        for c in colls
        for t in (c.pom_type, c.pom_ptr, c.pom_kernels)
        if t is not None
    )
    assert bench.collection_bytes(colls) >= floor > 0
    detail = bench.collection_detail(colls)
    assert detail["pom_type"] == sum(c.pom_type.untyped_storage().nbytes() for c in colls)


def test_shared_memory_is_counted_once(bench):
    t = torch.zeros(100, dtype=torch.float32)
    holder = {"a": t, "b": t[10:20], "c": [t.numpy(), t.numpy()[5:]], "d": np.zeros(3)}
    spans: list[tuple[str, int, int]] = []
    bench._spans(holder, spans, set())
    assert bench._union_bytes(spans) == 400 + 24
    # The same address on two devices is two allocations.
    assert bench._union_bytes([("cpu", 0, 10), ("cuda:0", 0, 10), ("cpu", 5, 15)]) == 25


def test_geoopt_baseline_has_a_sphere_per_filter(bench):
    model = bench.make_model("test_resnet", 0)
    params = bench.geoopt_sphere_params(model)
    named = dict(model.named_parameters())
    assert set(params) == set(named)
    for name, p in params.items():
        assert p.numel() == named[name].numel()
        if named[name].ndim == 4:
            assert p.shape == (named[name].shape[0], named[name][0].numel())
            torch.testing.assert_close(p.norm(dim=1), torch.ones(p.shape[0]))
