"""How much of its budget a selection spends under flash-style attention on packed batches.

Such attention costs the sum of the squared lengths of the packed sequences, so the tuner prices a packed shape at
both extremes (one sequence, one-token sequences) and keeps rho at both (``engine/attention_spans.py``). This measures
what that costs in selected units against pricing the one packing trained on alone (which would not bound other
packings). The model is SmolLM2-135M's shape (random weights, ``--layers`` of its 30 blocks), the attention the
tests' CPU stand-in for flash attention's variable-length path, the packing SFT-like examples of 100-600 tokens.

    python benchmarks/bench_attention_spans.py --tokens 1024 --layers 30
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from peft import get_peft_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the CPU stand-in for flash attention

import test_attention_spans as spans  # noqa: E402

from peft_greentrainer import GreenTrainerConfig  # noqa: E402
from peft_greentrainer.engine.profile import measure_flops  # noqa: E402


def smollm2_shape(layers: int) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        attn_implementation=spans.SEGMENTED,
    )


def sft_packing(tokens: int, seed: int) -> list[int]:
    """Lengths of SFT-like examples (100-600 tokens) packed into one row of ``tokens``."""
    rng, lengths = random.Random(seed), []
    while (left := tokens - sum(lengths)) > 0:
        lengths.append(min(left, rng.randint(100, 600)))
    return lengths


def tuner_for(config: transformers.LlamaConfig, rho: float):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    return get_peft_model(model, GreenTrainerConfig(rho=rho, units="tensors", sparse_lm_head=False)).base_model.train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--rhos", type=float, nargs="+", default=[0.6, 0.75])
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = smollm2_shape(args.layers)
    lengths = sft_packing(args.tokens, seed=0)
    batch = spans._packed(lengths, "position_ids", config.vocab_size)
    print(f"{args.layers} blocks, one row of {args.tokens} tokens packing {len(lengths)} sequences {lengths}")
    print("| rho | both extremes: tensors | measured FLOPs ratio | this packing alone: tensors | its ratio |")
    print("|---|---|---|---|---|")
    for rho in args.rhos:
        tuner = tuner_for(config, rho)
        tuner.select_units([batch], torch.optim.AdamW([p for p in tuner.model.parameters() if p.requires_grad]))
        every = [name for name, _ in tuner.model.named_parameters()]
        trained = [name for name, p in tuner.model.named_parameters() if p.requires_grad]
        measured = sum(measure_flops(tuner.model, batch, trained)) / sum(measure_flops(tuner.model, batch, every))
        # the same importances through the DP on this packing's own costs (a bound for this packing only)
        costs = tuner_for(config, rho).unit_costs(batch)
        importance = np.array([tuner.greentrainer_state.importance.get(u.name, 0.0) for u in costs.units])
        alone = costs.select(np.maximum(importance, 0.0), rho)
        print(
            f"| {rho} | {len(trained)} | {measured:.3f} | {int(alone.mask.sum())} | "
            f"{alone.flops / costs.full_flops:.3f} |"
        )


if __name__ == "__main__":
    main()
