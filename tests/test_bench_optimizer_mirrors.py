"""benchmarks/bench_optimizer_mirrors.py --quick: each optimizer's result file, resumed from what exists."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_optimizer_mirrors.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_optimizer_mirrors", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_one_file_per_optimizer_and_skips_those_done(tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    bench = _bench()
    argv = ["--quick", "--optimizers", "lion_8bit", "rmsprop", "--warm-steps", "1", "--output-dir", str(tmp_path)]
    bench.main(argv)
    results = {path.stem: json.loads(path.read_text()) for path in tmp_path.glob("*.json")}
    assert set(results) == {"lion_8bit", "rmsprop"}
    for result in results.values():
        # the mirror is the update the step takes: its first-order gains rank the units as the real ones do
        assert result["spearman_mirrored"] > 0.9 and 0.0 < result["captured_mirrored"] <= 1.0 + 1e-9
    assert "| lion_8bit |" in capsys.readouterr().out
    (tmp_path / "rmsprop.json").write_text(json.dumps({**results["rmsprop"], "lr": 123.0}))
    bench.main(argv)  # nothing left to run: the table is rebuilt from the files
    assert "| rmsprop | 123 |" in capsys.readouterr().out
