"""The experiment script of docs/results.md, in its smoke mode (tiny model, a few steps, CPU)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .conftest import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]


def test_table_c_smoke_runs_and_writes_its_table(tmp_path):
    script = str(ROOT / "experiments" / "run_tables.py")
    command = [sys.executable, script, "--table", "C", "--smoke", "--data", str(SHARED_DATA),
               "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "runs")]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    table = (tmp_path / "runs" / "table_C.md").read_text().splitlines()
    labels = [line.split(" | ")[0] for line in table]
    assert any("freeze_old" in x for x in labels) and any("full" in x for x in labels)
    # one row per dataset: two before the addition, three after each addition and for the retrained model
    assert len(table) == 2 + 3 + 3 + 3
    assert all(line.startswith("| ") and line.endswith("** |") for line in table)
