"""PEFT's own custom-model test suite passes with GreenTrainer swapped into its LoRA cases (the CI subset).

The full set: ``python tests/peft_suite/run_peft_suite.py`` (see that file and ``greentrainer_peft_suite.py``).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from run_peft_suite import SuiteUnavailable, fetch_suite

RUNNER = fetch_suite.__globals__["__file__"]


@pytest.mark.slow
def test_peft_custom_model_suite_ci_subset(tmp_path):
    try:
        fetch_suite()
    except SuiteUnavailable as error:
        pytest.skip(f"PEFT's test suite could not be fetched from PyPI: {error}")
    report = tmp_path / "report.json"
    command = [sys.executable, RUNNER, "--subset", "ci", "--report", str(report)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]

    summary = json.loads(report.read_text())
    counts = summary["counts"]
    assert not any(key.endswith("failed") for key in counts), counts
    assert counts.get("lora passed", 0) > 0 and counts.get("tensors passed", 0) > 0, counts
    assert all(reason.strip() for reason in summary["skip_reasons"]), summary["skip_reasons"]
    # a second adapter on the same model: these all failed while GreenTrainer allowed one adapter per model
    multi_adapter = [
        "test_load_multiple_adapters",
        "test_active_adapter",
        "test_delete_adapter",
        "test_save_pretrained_adapter_name_substring",
        "test_multiple_active_adapters_forward",
        "test_mixed_adapter_batches_mlp",
    ]
    assert all(summary["by_test"][name].get("passed", 0) > 0 for name in multi_adapter), summary["by_test"]
