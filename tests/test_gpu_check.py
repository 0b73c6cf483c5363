"""The prepared GPU check runs every step on the CPU (``--cpu-dry-run``), through its one-line shell entry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_prints_the_table_and_writes_results(tmp_path):
    # the script runs `python3`, as on the GPU machine: this interpreter's, with its packages, whatever PATH says
    env = {**os.environ, "OUT": str(tmp_path), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    completed = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--cpu-dry-run", "--steps", "2", "--warmup", "1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    table = completed.stdout.strip().splitlines()[-6:]
    assert table[0].startswith("| model | configuration | step ms | wall ratio")
    assert len(table) == 6  # header, rule, full FT and the three GreenTrainer configurations
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert "deselected" in results["tests"]["summary"] or "skipped" in results["tests"]["summary"]
    rows = {r["config"]: r for r in results["results"]}
    assert rows["full FT"]["wall_ratio"] == 1.0
    for name in ("GT tensors rho 0.5", "GT tensors rho 0.7", "GT-LoRA rho 0.5"):
        rho = float(name.rsplit(" ", 1)[1])
        assert rows[name]["predicted_ratio"] <= rho
        # FlopCounterMode's count of the step that ran stays within the budget, and the prediction within 2%
        assert rows[name]["measured_ratio"] <= rho * 1.02
        assert rows[name]["measured_ratio"] / rows[name]["predicted_ratio"] == pytest.approx(1.0, abs=0.02)
        assert rows[name]["selection_steps"] > 0
    assert (tmp_path / "log.txt").exists()
