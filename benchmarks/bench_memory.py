"""Peak memory of a training step: full fine-tuning, LoRA, and GreenTrainer at rho 0.5 (both unit kinds).

Each configuration runs in its own process (peak RSS is a process-lifetime maximum), on the same ~134M-parameter
LLaMA-shaped model built from a config, batch 4 x 256, AdamW, three optimizer steps after the first selection.
GreenTrainer saves memory in two ways that this measures: the optimizer keeps state only for units ever selected,
and autograd keeps no activations below the deepest selected unit.

Usage: ``python benchmarks/bench_memory.py [--threads 2]`` (prints a markdown table).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout: the harness and this checkout's package
    sys.path.insert(0, str(ROOT))

CONFIGS = ["full", "lora", "greentrainer-tensors", "greentrainer-lora"]


def run_one(name: str, threads: int) -> dict:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    from benchmarks.harness.runner import RssSampler
    from peft_greentrainer import GreenTrainerConfig

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12, vocab_size=32000
    )
    model = transformers.LlamaForCausalLM(config)
    targets = ["q_proj", "v_proj"]
    if name == "lora":
        model = get_peft_model(model, LoraConfig(r=8, target_modules=targets))
    elif name.startswith("greentrainer"):
        units = name.split("-")[1]
        lora = {"r": 8, "target_modules": targets} if units == "lora" else {}
        model = get_peft_model(model, GreenTrainerConfig(rho=0.5, units=units, importance_batches=1, **lora))
    model.train()
    ids = torch.randint(0, config.vocab_size, (4, 256), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    if name.startswith("greentrainer"):
        model.select_units([batch], optimizer)
    baseline = RssSampler.current()
    for _ in range(3):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    state_tensors = sum(len(s) for s in optimizer.state.values())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "config": name,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_steps_mib": baseline,
        "trainable_params": trainable,
        "params_with_optimizer_state": sum(1 for s in optimizer.state.values() if s),
        "optimizer_state_tensors": state_tensors,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", choices=CONFIGS, help=argparse.SUPPRESS)  # internal: run one config, print JSON
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one, args.threads)))
        return
    rows = []
    for name in CONFIGS:
        output = subprocess.run(
            [sys.executable, __file__, "--one", name, "--threads", str(args.threads)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        rows.append(json.loads(output.strip().splitlines()[-1]))
    full = rows[0]["peak_rss_mib"]
    print(f"Peak RSS of a training step, LLaMA-shaped 134M model, batch 4 x 256, AdamW, {args.threads} threads")
    print("(`python benchmarks/bench_memory.py`)\n")
    print("| configuration | peak RSS (MiB) | vs full FT | trainable params | params with AdamW state |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['config']} | {row['peak_rss_mib']:.0f} | {row['peak_rss_mib'] / full:.2f} | "
            f"{row['trainable_params'] / 1e6:.1f}M | {row['params_with_optimizer_state']} |"
        )


if __name__ == "__main__":
    main()
