"""benchmarks/compare.py --quick: every method runs, the table is complete and the FLOPs budgets hold when measured."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compare.py"


def _compare_module():
    spec = importlib.util.spec_from_file_location("benchmark_compare", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_compare_runs_every_method_within_budget(tmp_path):
    compare = _compare_module()
    result = compare.main(["--quick", "--threads", "1", "--output-dir", str(tmp_path)])

    markdown = (tmp_path / "compare.md").read_text()
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert (tmp_path / "compare.png").stat().st_size > 0
    assert "python benchmarks/compare.py --quick" in markdown
    assert f"with {saved['torch_threads']} threads" in markdown
    assert saved["same_batch_order"]

    rows = {row["key"]: row for row in saved["rows"]}
    assert set(rows) == set(compare.METHODS)
    assert [r["key"] for r in result["rows"]] == list(compare.METHODS)
    for row in rows.values():
        assert f"| {row['method']} |" in markdown
        assert math.isfinite(row["flops_ratio"]) and row["flops_ratio"] > 0
        assert row["steps"] == rows["full"]["steps"] > 0
        assert all(math.isfinite(row["rouge"][k]) for k in ("rouge1", "rouge2", "rougeL"))
        # the cost profile predicts every counted step exactly
        assert row["measured_vs_predicted_max_rel_error"] < 1e-6

    assert rows["full"]["flops_ratio"] == 1.0
    assert rows["full"]["wall_ratio"] == 1.0
    for key in ("gt_tensors_0.4", "gt_tensors_0.5", "gt_tensors_0.7", "gt_lora_0.5"):
        rho = float(key.rsplit("_", 1)[1])
        assert rows[key]["flops_ratio"] <= rho + 1e-6, key
        assert rows[key]["selection_seconds"] > 0
        assert len(rows[key]["selections"]) == saved["config"]["epochs"]
    for key in ("random", "top_k"):
        assert rows[key]["flops_ratio"] <= compare.BASELINE_RHO + 1e-6, key
    assert len(rows["random"]["selections"]) == saved["config"]["epochs"]
    assert rows["lora"]["flops_ratio"] < 1.0


@pytest.mark.parametrize(
    ("argv", "source"),
    [
        ([], "(the paper's; the CLI's defaults for models other than its embedded one)"),
        (["--lr-tensors", "3e-4", "--lr-lora", "1e-3"], "(the CLI's defaults on its embedded model and data)"),
        (["--quick"], "(quick run: larger lrs, chosen for a random-init tiny model)"),
        (["--lr-tensors", "1e-4"], ""),
    ],
)
def test_setup_text_says_truly_where_the_learning_rates_come_from(argv, source):
    from peft_greentrainer.cli.train import EMBEDDED_LR, PAPER_LR

    compare = _compare_module()
    args = compare.resolve(compare.build_parser().parse_args(argv))
    assert compare.lr_source(args) == (f" {source}" if source else "")
    lrs = {"tensors": args.lr_tensors, "lora": args.lr_lora}
    assert (lrs == PAPER_LR) == ("paper's" in source) and (lrs == EMBEDDED_LR) == ("embedded model" in source)


def test_a_quick_run_never_writes_over_the_recorded_results():
    compare = _compare_module()
    recorded = compare.resolve(compare.build_parser().parse_args([])).output_dir
    quick = compare.resolve(compare.build_parser().parse_args(["--quick"])).output_dir
    chosen = compare.resolve(compare.build_parser().parse_args(["--quick", "--output-dir", "elsewhere"])).output_dir
    assert recorded == compare.DEFAULT_OUTPUT and (recorded / "compare.md").exists()
    assert quick != recorded and quick.parent == recorded
    assert chosen == Path("elsewhere")
