"""Predicted vs measured backward FLOPs, per architecture and selection (does a predicted saving become real?).

For tiny OPT, BLOOM, GPT-2, LLaMA and T5 models on real CPU tensors (SDPA's CPU kernel included) and OPT-2.7B on
the ``meta`` device, each selection is made trainable and one backward pass is counted by FlopCounterMode.

Usage: ``python benchmarks/bench_profile_accuracy.py [--skip-large]`` (prints a markdown table of predicted /
measured; 1.000 is exact, above 1 over-predicts, which only wastes budget, below 1 would break it).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import tiny_batch, tiny_model

from peft_greentrainer.engine.profile import dummy_batch, measure_flops, profile_model
from peft_greentrainer.engine.units import tensor_units

PATTERNS = {  # last block, one tensor type across layers, LM head / tied embedding
    "llama": (r"layers\.2\.", r"v_proj\.weight", r"^lm_head"),
    "opt": (r"layers\.2\.", r"v_proj\.weight", r"embed_tokens"),
    "bloom": (r"\.h\.2\.", r"dense_4h_to_h\.weight", r"word_embeddings\.weight"),
    "gpt2": (r"\.h\.2\.", r"c_attn\.weight", r"wte"),
    "t5": (r"decoder\.block\.1\.", r"SelfAttention\.v\.weight", r"^shared"),
    "opt-2.7b (meta)": (r"layers\.3[01]\.", r"fc1\.weight", r"embed_tokens"),
}
COLUMNS = ["last block", "one tensor type", "LM head", "random 30%", "all (full FT)"]


def ratios(model, batch, patterns) -> list[float]:
    costs = profile_model(model, batch).unit_costs(tensor_units(model))
    names = [u.name for u in costs.units]
    rng = np.random.default_rng(0)
    masks = [np.array([bool(re.search(p, n)) for n in names]) for p in patterns]
    masks += [rng.random(len(names)) < 0.3, np.ones(len(names), bool)]
    out = []
    for mask in masks:
        trainable = [p for u, s in zip(costs.units, mask, strict=True) if s for p in u.param_names]
        _, measured = measure_flops(model, batch, trainable)
        out.append(costs.predicted_backward(mask) / measured)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-large", action="store_true", help="no OPT-2.7B on meta")
    args = parser.parse_args()
    print("| model | " + " | ".join(COLUMNS) + " |")
    print("|---|" + "---|" * len(COLUMNS))
    for arch, patterns in PATTERNS.items():
        if arch.startswith("opt-2.7b"):
            if args.skip_large:
                continue
            config = transformers.OPTConfig(
                hidden_size=2560, ffn_dim=10240, num_hidden_layers=32, num_attention_heads=32, word_embed_proj_dim=2560
            )
            with torch.device("meta"):
                model = transformers.OPTForCausalLM(config)
            model.train()
            batch = dummy_batch(config, 4, 512)
        else:
            model = tiny_model(arch)
            batch = tiny_batch(model)
        print(f"| {arch} | " + " | ".join(f"{r:.3f}" for r in ratios(model, batch, patterns)) + " |")


if __name__ == "__main__":
    main()
