"""Host time of the tuner's check before every training step (``GreenTrainerModel._before_forward``).

The forward pre-hook keeps the budget promise for the step about to run: it reads the batch's shape key and the
module modes the step runs in. It runs on the host before every step, so on a GPU its time is time the GPU waits.
Its cost grows with the number of modules, not with their width: the hook is timed on Llama-3.2-1B's and SmolLM2's
module trees at their full depth with narrow widths (per 1,000 modules), and its share of a whole step (forward,
backward, optimizer step, hook included) on SmolLM2's widths with a few layers. Random weights, built on the CPU.

    python benchmarks/bench_step_hook.py                           # this checkout
    python benchmarks/bench_step_hook.py --against /tmp/base_code  # runs alternating with another checkout's code

With ``--against`` each case is timed in turn under both checkouts' code (child processes, ``--rounds`` times each,
the fastest kept) and the table gives this checkout's time over the other's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (name, layers, hidden, intermediate, heads, kv heads, vocab): the depths and vocabularies of the real models
SHAPES = {
    "llama-1b": (16, 2048, 8192, 32, 8, 128256),
    "smollm2": (30, 576, 1536, 9, 3, 49152),
}
HOOK_CASES = [  # (shape, units, attention): full depth, narrow widths
    ("llama-1b", "tensors", "sdpa"),
    ("llama-1b", "lora", "sdpa"),
    ("smollm2", "tensors", "sdpa"),
    ("smollm2", "lora", "sdpa"),
    ("smollm2", "tensors", "segmented"),  # attention that follows the values: two rows priced per step
]
STEP_CASES = [("smollm2", "tensors", "sdpa"), ("smollm2", "lora", "sdpa")]  # real widths, --step-layers layers


def build(shape: str, units: str, attention: str, *, layers: int | None, narrow: bool):
    """A GreenTrainer model of ``shape`` (random weights) with its first selection made, its optimizer and a batch."""
    import torch
    import transformers
    from peft import get_peft_model

    from peft_greentrainer import GreenTrainerConfig

    depth, hidden, intermediate, heads, kv_heads, vocab = SHAPES[shape]
    if attention == "segmented":  # the tests' CPU stand-in for flash attention's variable-length path
        sys.path.insert(0, str(ROOT / "tests"))
        import test_attention_spans

        attention = test_attention_spans.SEGMENTED
    if narrow:
        hidden, intermediate, heads, kv_heads, vocab = 64, 128, 4, 2, 256
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers or depth,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        attn_implementation=attention,
    )
    torch.manual_seed(0)
    rho = 0.5 if narrow else 0.75  # a few layers under a 49k vocabulary: the head alone takes most of a step
    gt = GreenTrainerConfig(units=units, rho=rho)
    if units == "lora":
        gt = GreenTrainerConfig(units=units, rho=rho, r=8, target_modules="all-linear")
    model = get_peft_model(transformers.LlamaForCausalLM(config), gt).train()
    ids = torch.randint(3, vocab, (4, 32 if narrow else 128), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, : ids.shape[1] // 4] = -100
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.select_units([batch], optimizer)
    return model, optimizer, batch


def hook_ms(model, batch: dict, calls: int) -> float:
    """Milliseconds per call of the pre-hook alone, as a training step calls it (fastest of three runs)."""
    tuner = model.base_model
    for _ in range(3):  # the first prices the batch's shape
        tuner._before_forward(tuner.model, (), dict(batch))
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(calls):
            tuner._before_forward(tuner.model, (), dict(batch))
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e3


def step_ms(model, optimizer, batch: dict, steps: int) -> float:
    """Milliseconds per training step: forward (the hook included), backward, optimizer step (fastest of three)."""
    best = float("inf")
    for run in range(4):
        start = time.perf_counter()
        for _ in range(steps if run else 1):  # the first run warms up
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if run:
            best = min(best, (time.perf_counter() - start) / steps)
    return best * 1e3


def child(args: argparse.Namespace) -> None:
    """Time every case under the code this process imports; one JSON line per case."""
    import logging

    import peft_greentrainer

    logging.getLogger("peft_greentrainer").setLevel(logging.ERROR)
    code = str(Path(peft_greentrainer.__file__).parents[1])
    for shape, units, attention in HOOK_CASES:
        model, _, batch = build(shape, units, attention, layers=None, narrow=True)
        modules = sum(1 for _ in model.base_model.model.modules())
        ms = hook_ms(model, batch, args.calls)
        row = {"case": f"hook {shape} {units} {attention}", "modules": modules, "hook_ms": ms, "code": code}
        print(json.dumps(row), flush=True)
    for shape, units, attention in STEP_CASES:
        model, optimizer, batch = build(shape, units, attention, layers=args.step_layers, narrow=False)
        modules = sum(1 for _ in model.base_model.model.modules())
        hook, step = hook_ms(model, batch, args.calls), step_ms(model, optimizer, batch, args.steps)
        case = f"step {shape}x{args.step_layers} {units} {attention}"
        print(json.dumps({"case": case, "modules": modules, "hook_ms": hook, "step_ms": step, "code": code}))


def run_child(code: Path, args: argparse.Namespace) -> list[dict]:
    command = [sys.executable, __file__, "--child", "--calls", str(args.calls), "--steps", str(args.steps)]
    command += ["--step-layers", str(args.step_layers)]
    env = {**os.environ, "PYTHONPATH": str(code)}
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def best_of(runs: list[list[dict]]) -> dict[str, dict]:
    """Per case, each figure's fastest over the rounds."""
    best: dict[str, dict] = {}
    for rows in runs:
        for row in rows:
            kept = best.setdefault(row["case"], dict(row))
            for key in ("hook_ms", "step_ms"):
                if key in row:
                    kept[key] = min(kept[key], row[key])
    return best


def describe(row: dict) -> str:
    text = f"{row['hook_ms']:.2f} ms ({1000 * row['hook_ms'] / row['modules']:.2f} per 1k modules)"
    if "step_ms" in row:
        text += f", step {row['step_ms']:.0f} ms, hook {100 * row['hook_ms'] / row['step_ms']:.2f}% of it"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", type=Path, help="another checkout's root, timed alternating with this one")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--calls", type=int, default=30, help="hook calls per timed run")
    parser.add_argument("--steps", type=int, default=3, help="training steps per timed run")
    parser.add_argument("--step-layers", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    codes = [ROOT] + ([args.against.resolve()] if args.against else [])
    runs: dict[Path, list[list[dict]]] = {code: [] for code in codes}
    for _ in range(args.rounds):
        for code in codes:
            runs[code].append(run_child(code, args))
    ours = best_of(runs[ROOT])
    other = best_of(runs[codes[-1]]) if args.against else None
    print(f"| case | modules | {ROOT.name} |" + (f" {args.against.name} | hook ratio | step ratio |" if other else ""))
    print("|---|---|---|" + ("---|---|---|" if other else ""))
    for case, row in ours.items():
        line = f"| {case} | {row['modules']} | {describe(row)} |"
        if other:
            base = other[case]
            steps = f"{row['step_ms'] / base['step_ms']:.2f}" if "step_ms" in row else ""
            line += f" {describe(base)} | {row['hook_ms'] / base['hook_ms']:.2f} | {steps} |"
        print(line)


if __name__ == "__main__":
    main()
