"""The targets of the step benchmark, their pass / fail checks and the text report of a run.

Targets apply to CPU runs: ratios to the SGD step unless said otherwise.
"""

from __future__ import annotations

from typing import Any

from benchmarks._bench_config import Config

__all__ = [
    "MEMORY_TARGET",
    "STEP_TARGETS",
    "TRAIN_TARGET",
    "WRAP_TARGET_S",
    "check_targets",
    "format_report",
]

#: CPU targets of the performance issue: ratios to the SGD step unless said otherwise.
STEP_TARGETS = {"st": 3.0, "poms_st": 3.0, "pio4": 2.5}
TRAIN_TARGET = 1.05
MEMORY_TARGET = 1.1
WRAP_TARGET_S = 2.0


def _check(what: str, value: float, target: str, ok: bool) -> dict[str, Any]:
    return {"what": what, "value": value, "target": target, "pass": bool(ok)}


def check_targets(result: dict[str, Any], cfg: Config) -> list[dict[str, Any]]:
    """Every target of the issue, keyed by the row it belongs to (``what``)."""
    steps = result["step"]
    geo = steps["geoopt_sphere"]["ratio_to_sgd"]
    checks = []
    for preset in cfg.presets:
        ratio = steps[f"fg_{preset}"]["ratio_to_sgd"]
        limit = STEP_TARGETS.get(preset)
        text = f"< geoopt {geo:.2f}x" if limit is None else f"<= {limit:g}x, < geoopt"
        ok = ratio < geo and (limit is None or ratio <= limit)
        checks.append(_check(f"step fg_{preset}", ratio, text, ok))
    for preset in cfg.presets:
        ratio = result["memory"][f"fg_{preset}"]["ratio_to_sgd"]
        checks.append(
            _check(
                f"state memory fg_{preset}", ratio, f"<= {MEMORY_TARGET:g}x", ratio <= MEMORY_TARGET
            )
        )
    if "train" in result:
        ratio = result["train"][f"fg_{cfg.train_preset}"]["ratio_to_sgd"]
        checks.append(
            _check(
                f"train step fg_{cfg.train_preset}",
                ratio,
                f"<= {TRAIN_TARGET:g}x",
                ratio <= TRAIN_TARGET,
            )
        )
    if "wrap_large" in result:
        sec = result["wrap_large"]["seconds"]
        checks.append(
            _check(
                f"wrap({result['wrap_large']['model']}, pio4)",
                sec,
                f"<= {WRAP_TARGET_S:g} s",
                sec <= WRAP_TARGET_S,
            )
        )
    if "launches" in result:
        same = result["launches"]["independent_of_poms"]
        checks.append(_check("launches independent of POMs", float(same), "equal counts", same))
    return checks


def _fmt(x: float | None) -> str:
    return "?" if x is None else f"{x:.1f}"


def format_report(result: dict[str, Any]) -> str:
    """A readable table of the result of :func:`run`."""
    m, cfg = result["machine"], result["config"]
    lines = [
        f"# FG-SGD step benchmark  {m['date']}",
        f"# machine: {m['cpu']}, {m['cores']} cores"
        + (f", {m['gpu']}" if "gpu" in m else "")
        + f"; 1-min load average {_fmt(m['loadavg_start'])} at start, "
        f"{_fmt(m['loadavg_end'])} at end",
        f"# torch {m['torch']}, numba {m['numba']}, geoopt {m['geoopt']}, timm {m['timm']}, "
        f"fgo_geoopt {m['fgo_geoopt']}; threads {m['threads']}",
        f"# model {cfg['model']} ({result['model']['params']:,} params), device {cfg['device']}, "
        f"backend {cfg['backend']}, wrap: {result['wrap_impl']}",
        f"# medians of {cfg['repeats']} interleaved rounds after {cfg['warmup']} warm-up "
        f"(geoopt: {min(cfg['geoopt_repeats'], cfg['repeats'])}); targets are CPU targets",
        f"# memory allocator: --malloc {cfg['malloc']} ({m['allocator']})",
    ]
    load = max(x or 0.0 for x in (m["loadavg_start"], m["loadavg_end"]))
    if load > (m["cores"] or 1):
        lines.append(
            f"# WARNING: the machine was busy (load average {load:.1f} on {m['cores']} cores): "
            "times are unreliable; compare the ratios of the fastest steps below"
        )
    lines.append("")
    checks = {c["what"]: c for c in result["checks"]}

    def row(what: str, value: str, ratio: str, spread: str = "-") -> str:
        c = checks.get(what)
        target = "-" if c is None else c["target"]
        status = "-" if c is None else ("ok" if c["pass"] else "FAIL")
        return f"{what:<30} {value:>12} {spread:>17} {ratio:>9}  {target:<20} {status}"

    def spread(s: dict[str, Any]) -> str:
        return f"{min(s['samples_ms']):.0f}-{max(s['samples_ms']):.0f} ms"

    lines.append(f"{'what':<30} {'median':>12} {'min-max':>17} {'vs SGD':>9}  {'target':<20} pass")
    lines.append("-" * 98)
    for name, s in result["step"].items():
        lines.append(
            row(f"step {name}", f"{s['median_ms']:.1f} ms", f"{s['ratio_to_sgd']:.2f}x", spread(s))
        )
    for name, s in result.get("train", {}).items():
        lines.append(
            row(
                f"train step {name}",
                f"{s['median_ms']:.1f} ms",
                f"{s['ratio_to_sgd']:.3f}x",
                spread(s),
            )
        )
    for name, s in result["memory"].items():
        lines.append(
            row(
                f"state memory {name}",
                f"{s['total_bytes'] / 2**20:.1f} MiB",
                f"{s['ratio_to_sgd']:.3f}x",
            )
        )
    if "wrap_large" in result:
        w = result["wrap_large"]
        lines.append(row(f"wrap({w['model']}, pio4)", f"{w['seconds']:.2f} s", "-"))
    if "launches" in result:
        la = result["launches"]
        lines.append(
            row(
                "launches independent of POMs",
                f"{la['pio4'][la['metric']]}/{la['pio4_more_poms'][la['metric']]}",
                "-",
            )
        )
    lines.append("")
    fastest = [(f"step {k}", v) for k, v in result["step"].items()]
    fastest += [(f"train {k}", v) for k, v in result.get("train", {}).items()]
    lines.append(
        "ratios of the fastest steps to SGD's: "
        + ", ".join(f"{k} {v['min_ratio_to_sgd']:.2f}x" for k, v in fastest)
    )
    lines.append(
        "minor page faults per timed step (median): "
        + ", ".join(f"{k} {v['page_faults']:.0f}" for k, v in fastest)
    )
    lines.append(
        "first-step (compile) time, ms: "
        + ", ".join(f"{k} {v['first_ms']:.0f}" for k, v in result["step"].items())
    )
    lines.append(
        "wrap time of the benchmarked model, s: "
        + ", ".join(f"{k} {v:.2f}" for k, v in result["wrap_s"].items())
    )
    lines.append(
        "state memory detail, MiB (state + collections): "
        + ", ".join(
            f"{k} {v['state_bytes'] / 2**20:.1f} + {v['collection_bytes'] / 2**20:.2f}"
            for k, v in result["memory"].items()
        )
    )
    for k, v in result["memory"].items():
        if v["collection_detail"]:
            parts = ", ".join(f"{p} {n / 2**20:.2f}" for p, n in v["collection_detail"].items())
            lines.append(f"  {k} collections, MiB: {parts}")
    if "launches" in result:
        la = result["launches"]
        key = la["metric"]
        lines.append(
            f"{key} per step: sgd {la['sgd'][key]}; "
            + "; ".join(
                f"{k} {la[k][key]} ({la[k]['poms']:,} POMs, {la[k]['layers']} layers, "
                f"{la[k]['layers_x_types']} layers x types)"
                for k in ("pio4", "pio4_more_poms")
            )
            + f"; independent of POM count: {la['independent_of_poms']}"
        )
    failed = [c["what"] for c in result["checks"] if not c["pass"]]
    lines.append(
        f"checks: {len(result['checks']) - len(failed)} passed, {len(failed)} failed"
        + (f" ({'; '.join(failed)})" if failed else "")
    )
    lines.append(f"total benchmark time: {result['elapsed_s']:.1f} s")
    return "\n".join(lines)
