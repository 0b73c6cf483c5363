"""Speed of the core engine: the selector (runs every selection, must stay cheap) and the profile (runs once).

Usage: ``python benchmarks/bench_core.py [--units 600] [--resolution 10000] [--runs 5] [--skip-profile]``.
Targets: ``select_units`` with N=600, T=10,000 under 0.5 s; a LLaMA-7B-shaped model (hidden 4096, 32 layers, ffn
11008) profiled on the ``meta`` device at batch 4 x 512 in under 30 s and under 2 GiB peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

try:
    from peft_greentrainer.engine.selector import select_units
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from peft_greentrainer.engine.selector import select_units


def realistic_costs(n_units: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Importance and costs shaped like a decoder-only LLM, in backward order (head first, embedding last).

    Each layer contributes seven matmul weights (o, v, k, q below attention; down, up, gate in the MLP) and two norm
    weights; matmuls cost ~2 * params * tokens for each of forward, dW and dY, norms almost nothing.
    """
    rng = np.random.default_rng(seed)
    tokens, hidden, vocab = 2048, 2048, 32_000
    per_layer = np.array([1, 1, 0.25, 0.25, 1, 0, 2.75, 2.75, 2.75, 0])[::-1] * hidden * hidden
    norm = np.array([0, 0, 0, 0, 0, 1, 0, 0, 0, 1])[::-1] * hidden
    params = np.resize(per_layer + norm, n_units - 1)
    params = np.concatenate((params, [vocab * hidden]))
    jitter = rng.uniform(0.9, 1.1, n_units)
    t_dw = 2.0 * params * tokens * jitter
    t_dy = 2.0 * params * tokens * rng.uniform(0.9, 1.1, n_units)
    t_dy[-1] = 0.0  # nothing below the embedding needs an activation gradient
    forward = float((2.0 * params * tokens).sum())
    importance = rng.exponential(1.0, n_units) * rng.choice([1.0, -0.1], n_units, p=[0.9, 0.1])
    return importance, t_dw, t_dy, forward


def bench_profile() -> None:
    """Profile a LLaMA-7B-shaped model on ``meta``: no weights exist, so this measures the profiler alone."""
    import torch
    import transformers

    from peft_greentrainer.engine.profile import dummy_batch, profile_model
    from peft_greentrainer.engine.units import tensor_units

    config = transformers.LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32_000
    )
    start = time.perf_counter()
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    built = time.perf_counter() - start
    profile = profile_model(model, dummy_batch(config, batch_size=4, seq_len=512))
    costs = profile.unit_costs(tensor_units(model))
    elapsed = time.perf_counter() - start
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux
    print(
        f"profile LLaMA-7B shape (meta, batch 4 x 512, {len(costs.units)} units, torch threads "
        f"{torch.get_num_threads()}): {elapsed:.2f} s including {built:.2f} s to build the model; "
        f"peak RSS {peak_gib:.2f} GiB; forward {profile.forward_flops:.3e} FLOPs, full backward "
        f"{profile.full_backward_flops:.3e} FLOPs"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=600)
    parser.add_argument("--resolution", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rho", type=float, default=0.95, help="high, so the knapsack table is nearly full")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-profile", action="store_true", help="time the selector only")
    args = parser.parse_args(argv)

    importance, t_dw, t_dy, forward = realistic_costs(args.units, args.seed)
    dy_head = 2.0 * 32_000 * 2048 * 2048
    select_units(importance, t_dw, t_dy, forward, args.rho, dy_head=dy_head, resolution=args.resolution)  # warm-up
    times = []
    for _ in range(args.runs):
        start = time.perf_counter()
        select_units(importance, t_dw, t_dy, forward, args.rho, dy_head=dy_head, resolution=args.resolution)
        times.append(time.perf_counter() - start)
    print(
        f"select_units N={args.units} T={args.resolution}: median {statistics.median(times):.3f} s "
        f"over {args.runs} runs (torch threads n/a)"
    )
    if not args.skip_profile:
        bench_profile()


if __name__ == "__main__":
    main()
