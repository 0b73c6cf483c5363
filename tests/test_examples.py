"""Every example runs offline on its tiny default model (a few steps each), as a user would launch it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("trainer_tensors.py", "tensors at"),
        ("trainer_lora.py", "x plain LoRA"),
        ("plain_loop.py", "epoch 2: loss"),
        ("qlora_4bit.py", "4-bit backbone: trained"),
    ],
)
def test_example_runs(script, expected, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--max-steps", "2"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert expected in result.stdout
    if script == "trainer_lora.py":
        assert (tmp_path / "greentrainer-example" / "lora-export" / "adapter_model.safetensors").is_file()
    if script == "qlora_4bit.py":
        assert "forced input-gradient hook" in result.stderr  # GreenTrainer said what it changed
