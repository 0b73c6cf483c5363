"""What batches padded per batch cost: profiles run, and step time against steps of one fixed shape.

Collators pad each batch to its own longest row (transformers' and TRL's default), so almost every step brings a new
length, and a length never priced costs a profile of one row (a few forward passes under a Python dispatch mode).
``engine/length_fit.py`` prices lengths between those profiled from the polynomial the profiled ones follow exactly.
This script trains the same steps twice in one process, with that prediction and without it, after a run at one
fixed shape, and reports profiles and the median time of a step in each (steps at a fixed shape are the reference).

The default model is 30 blocks deep but narrow (hidden 64): its steps are bound by Python and kernel launches, as a
small model's are on a GPU, where a profile weighs the most. ``--hidden 576 --heads 9 --kv-heads 3`` gives
SmolLM2-135M's shape (compute-bound on this CPU).

Usage: ``python benchmarks/bench_new_lengths.py [--steps 60] [--batch 8] [--min-length 32] [--max-length 256]``.
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import time
from contextlib import contextmanager

import torch
import transformers
from peft import get_peft_model

from peft_greentrainer import GreenTrainerConfig
from peft_greentrainer.engine.length_fit import LengthFit


def batches(count: int, size: int, lengths: tuple[int, int], vocab: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Rows of random lengths, padded to each batch's longest; the first half of each row is an unlabelled prompt."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        rows = [rng.randint(*lengths) for _ in range(size)]
        longest = max(rows)
        ids = torch.randint(3, vocab, (size, longest), generator=torch.Generator().manual_seed(rng.randrange(2**31)))
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for i, n in enumerate(rows):
            mask[i, :n] = 1
            labels[i, n // 2 : n] = ids[i, n // 2 : n]
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


@contextmanager
def prediction(enabled: bool):
    original = LengthFit.predict
    if not enabled:
        LengthFit.predict = lambda *args, **kwargs: None
    try:
        yield
    finally:
        LengthFit.predict = original


def run(args, units: str, data: list[dict], enabled: bool) -> tuple[int, list[float]]:
    """A fresh model selected on the first batch, then one step per batch: (profiles, step seconds)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.max_length,
    )
    lora = {"r": 8, "target_modules": ["q_proj", "v_proj"]} if units == "lora" else {}
    model = get_peft_model(transformers.LlamaForCausalLM(config), GreenTrainerConfig(rho=0.5, units=units, **lora))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    tuner = model.base_model
    profiles = []
    measure = tuner._measure
    tuner._measure = lambda *a, **k: profiles.append(1) or measure(*a, **k)
    with prediction(enabled):
        tuner.select_units([data[0]], optimizer)
        seconds = []
        for batch in data:
            start = time.perf_counter()
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            seconds.append(time.perf_counter() - start)
    return len(profiles), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--min-length", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=1024)
    args = parser.parse_args()
    logging.getLogger("peft_greentrainer").setLevel(logging.ERROR)
    torch.set_num_threads(2)
    varied = batches(args.steps, args.batch, (args.min_length, args.max_length), args.vocab, seed=0)
    longest = max(b["input_ids"].shape[1] for b in varied)
    fixed = batches(args.steps, args.batch, (longest, longest), args.vocab, seed=1)
    print("| units | batches | prediction | profiles | median step / fixed-shape step | mean step / fixed-shape step |")
    print("|---|---|---|---|---|---|")
    for units in ("tensors", "lora"):
        _, reference = run(args, units, fixed, True)
        base = statistics.median(reference[len(reference) // 2 :])
        for enabled in (False, True):
            profiles, seconds = run(args, units, varied, enabled)
            print(
                f"| {units} | padded per batch ({args.min_length}-{args.max_length} tokens) | "
                f"{'on' if enabled else 'off'} | {profiles} | {statistics.median(seconds) / base:.2f} | "
                f"{statistics.mean(seconds) / base:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
