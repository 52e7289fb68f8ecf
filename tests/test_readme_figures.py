"""README's Results table is what the recipe prints: the seed-0 column, rerun as README says.

README.md's "Results" section names the command of the offline default and the thread count
its figures hold for (they are exact for a given ``torch.get_num_threads()``), and gives a
table with a ``seed 0`` column. This test reads all three from README.md (no figure is written
here), runs that command in a subprocess with that thread count, writing into ``tmp_path``, and
compares the table the recipe prints and writes (``table.md``; ``results.csv`` behind it) with
README's column, cell by cell, to the printed precision. It trains two models for 8 epochs:
minutes on two cores.
"""

from __future__ import annotations

import csv
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SEED_COLUMN = "seed 0"


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _first_table(text: str) -> tuple[list[str], list[list[str]]]:
    """Header and body rows of the first markdown table in ``text``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    block = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        block.append(line)
    return _cells(block[0]), [_cells(line) for line in block[2:]]


def readme_claim() -> tuple[str, int, dict[str, str]]:
    """The command, the thread count and ``{row label: seed-0 cell}`` of README's Results."""
    text = README.read_text(encoding="utf-8")
    match = re.search(r"^## Results\n(.*?)^## ", text, re.DOTALL | re.MULTILINE)
    assert match, "README.md has no '## Results' section"
    section = match.group(1)
    intro = section.split("\n|", 1)[0]  # the paragraph that introduces the table
    command = re.search(r"\(`(python [^`]+)`", intro)
    threads = re.search(r"(\d+) threads", intro)
    assert command and threads, f"README's Results paragraph names no command or threads:\n{intro}"
    header, rows = _first_table(section)
    column = [i for i, title in enumerate(header) if title.endswith(SEED_COLUMN)]
    assert len(column) == 1, f"no single '{SEED_COLUMN}' column in README's Results: {header}"
    return command.group(1), int(threads.group(1)), {row[0]: row[column[0]] for row in rows}


def _recipe_label(readme_label: str, labels: list[str]) -> str:
    """The recipe's row label that README's row label begins with (README adds a gloss:
    ``Euc. (SGD, momentum 0.9)`` is the recipe's ``Euc.``)."""
    found = [
        label
        for label in labels
        if readme_label == label or re.match(re.escape(label) + r"[ ,]", readme_label)
    ]
    assert found, f"README row {readme_label!r} is none of the recipe's rows {labels}"
    return max(found, key=len)


@pytest.mark.slow
def test_readme_results_seed0_column_is_what_the_recipe_prints(tmp_path):
    command, threads, claimed = readme_claim()
    argv = shlex.split(command)
    assert argv[0] == "python", command
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    probe = [sys.executable, "-c", "import torch; print(torch.get_num_threads())"]
    used = subprocess.run(probe, env=env, capture_output=True, text=True, check=True).stdout
    assert int(used) == threads, f"OMP_NUM_THREADS={threads} gave torch {used.strip()} threads"

    # README's command as it stands, from the repository root; only the output folder moves.
    cmd = [sys.executable, *argv[1:], "--output", str(tmp_path), "--experiment", "readme"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    ran = f"OMP_NUM_THREADS={threads} {shlex.join(argv)} --output {tmp_path} --experiment readme"
    assert proc.returncode == 0, f"{ran} failed:\n{proc.stderr[-3000:]}"

    exp = tmp_path / "readme"
    table = (exp / "table.md").read_text(encoding="utf-8").strip()
    assert table in proc.stdout, "the printed table differs from table.md"
    header, rows = _first_table(table)
    assert len(header) == 2 and "top-1 err. %" in header[1], header
    printed = {row[0]: row[1] for row in rows}
    with (exp / "results.csv").open(newline="") as handle:
        results = list(csv.DictReader(handle))
    assert {r["seed"] for r in results} == {"0"}
    for r in results:  # the table's cell is 100 - top-1 of the single seed-0 run of the row
        assert printed[r["label"]] == f"{100.0 - float(r['eval_top1']):.2f}", r

    matched = {_recipe_label(label, list(printed)): label for label in claimed}
    assert sorted(matched) == sorted(printed), (
        f"README's rows {sorted(claimed)} are not the recipe's rows {sorted(printed)}"
    )
    got = {matched[label]: printed[label] for label in printed}
    assert got == claimed, (
        f"README's Results, column '{SEED_COLUMN}', against `{ran}`:\n"
        f"README:  {claimed}\nprinted: {got}\n{table}"
    )
