"""FLOPs of training steps at sequence lengths other than the one the first selection saw, as a fraction of full
fine-tuning at that length, measured by FlopCounterMode.

Attention grows quadratically with the length, so each unit's share of a step moves with it: a selection made for
short batches can overspend on long ones. One selection on batches of the first length, then one AdamW step at each
length (the tuner checks each new shape before its step runs), each measured with the flags it trained with.

Usage: ``python benchmarks/bench_shapes.py [--rho 0.7] [--lengths 64 256 1024]`` (a LLaMA-shaped model, hidden 256,
4 layers, batch 2, on the CPU; about a minute).
"""

from __future__ import annotations

import argparse
import logging

import torch
import transformers
from peft import get_peft_model

from peft_greentrainer import GreenTrainerConfig
from peft_greentrainer.engine.profile import measure_flops


def batch(length: int, rows: int = 2) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 1000, (rows, length), generator=torch.Generator().manual_seed(length))
    return {"input_ids": ids, "labels": ids.clone()}


def full_reference(model, inputs) -> float:
    """Full fine-tuning of the base model on ``inputs`` (LoRA layers off)."""
    base = model.base_model.model
    names = [n for n, _ in base.named_parameters() if "lora_" not in n]
    if model.base_model.peft_config["default"].units == "lora":
        with model.disable_adapter():
            return sum(measure_flops(base, inputs, names))
    return sum(measure_flops(base, inputs, names))


def run(units: str, rho: float, lengths: list[int]) -> list[float]:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        vocab_size=1000,
        max_position_embeddings=max(lengths),
    )
    lora = {"target_modules": ["q_proj", "v_proj", "up_proj"], "r": 8} if units == "lora" else {}
    model = get_peft_model(transformers.LlamaForCausalLM(config), GreenTrainerConfig(rho=rho, units=units, **lora))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.base_model.select_units([batch(lengths[0])], optimizer)
    ratios = []
    for length in lengths:
        inputs = batch(length)
        model(**inputs).loss.backward()  # the step at this length (checked before it runs)
        optimizer.step()
        optimizer.zero_grad()
        step = sum(measure_flops(model.base_model.model, inputs))  # with the flags that step trained with
        ratios.append(step / full_reference(model, inputs))
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rho", type=float, default=0.7)
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024])
    args = parser.parse_args()
    logging.getLogger("peft_greentrainer").setLevel(logging.ERROR)
    torch.set_num_threads(2)
    print(f"| units | rho | {' | '.join(f'{n} tokens' for n in args.lengths)} |")
    print(f"|---|---|{'---|' * len(args.lengths)}")
    for units in ("tensors", "lora"):
        ratios = run(units, args.rho, args.lengths)
        print(f"| {units} | {args.rho} | {' | '.join(f'{r:.3f}' for r in ratios)} |", flush=True)


if __name__ == "__main__":
    main()
