"""Side by side: full fine-tuning, LoRA, FT-top-k, random selection and GreenTrainer on the same model, data and steps.

Usage: ``python benchmarks/compare.py [--quick] [--threads N] [--output-dir benchmarks/results]`` (``-h`` lists the
rest). Every method runs in this one process, one after the other, from a fresh copy of the same base model, with the
same seed, the same batches in the same order and the same number of steps, so wall-clock times are comparable as
ratios. Per method it reports training FLOPs per step measured by FlopCounterMode on sampled steps, the analytical
total over the run (predicted per-step FLOPs x steps, from the cost profile), the FLOPs and wall-clock ratios to full
fine-tuning, the peak RSS while training, ROUGE-1/2/L of greedy generations on held-out examples, and the time spent
selecting units. Writes ``compare.md``, ``compare.json`` and ``compare.png`` (ROUGE-L against FLOPs ratio).

Default: the embedded SmolLM2-135M-Instruct on ACLSum (sized for under 45 minutes on a 2-core CPU). ``--quick``: a
tiny config-built LLaMA with a word-level tokenizer on synthetic data (under 3 minutes), for tests and smoke runs.
The methods, the runner and the reporter are the shared harness's (``benchmarks/harness/``); this is the driver.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout: the harness and this checkout's package
    sys.path.insert(0, str(ROOT))

import transformers  # noqa: E402

from benchmarks.harness import methods, report, runner, workload  # noqa: E402
from peft_greentrainer.cli.train import EMBEDDED_LR, PAPER_LR  # noqa: E402

METHODS = ("full", "lora", "top_k", "random", "gt_tensors_0.4", "gt_tensors_0.5", "gt_tensors_0.7", "gt_lora_0.5")
BASELINE_RHO = 0.5  # budget of the FT-top-k and random-selection baselines
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results"

# Default run: the CLI's embedded sizes (120 training examples, 2 epochs, 160 + 48 tokens), i.e. 60 steps of batch 4.
DEFAULTS = {
    "train_examples": 120,
    "epochs": 2,
    "eval_examples": 24,
    "batch_size": 4,
    "max_source_tokens": 160,
    "max_target_tokens": 48,
    "max_new_tokens": 48,
    "measure_every": 10,
    # the paper's (the CLI's defaults for models other than its embedded one, which gets EMBEDDED_LR)
    "lr_tensors": PAPER_LR["tensors"],
    "lr_lora": PAPER_LR["lora"],
}
# --quick: a randomly initialised tiny model learns nothing at 2e-5 in 16 steps; one larger lr per kind instead.
QUICK = {
    "train_examples": 32,
    "epochs": 2,
    "eval_examples": 8,
    "batch_size": 4,
    "max_source_tokens": 16,
    "max_target_tokens": 4,
    "max_new_tokens": 6,
    "measure_every": 3,
    "lr_tensors": 1e-3,
    "lr_lora": 3e-3,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compare.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny model, tiny tokenizer, synthetic data (< 3 min)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="where compare.md/json/png go (default: benchmarks/results/, with --quick benchmarks/results/quick/, "
        "so that a smoke run never overwrites the recorded one)",
    )
    parser.add_argument(
        "--methods", nargs="+", choices=list(methods.REGISTRY), default=list(METHODS), help="which to run, in order"
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--max-steps", type=int, default=None, help="stop every method after this many steps")
    parser.add_argument("--importance-batches", type=int, default=4, help="GreenTrainer importance batches")
    for key in DEFAULTS:
        kind = float if key.startswith("lr_") else int
        parser.add_argument(f"--{key.replace('_', '-')}", type=kind, default=None, help=f"default {DEFAULTS[key]}")
    return parser


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    defaults = QUICK if args.quick else DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.output_dir is None:
        args.output_dir = DEFAULT_OUTPUT / "quick" if args.quick else DEFAULT_OUTPUT
    return args


def lr_source(args: argparse.Namespace) -> str:
    """Where the learning rates in use come from, for the setup text ("" where they were passed)."""
    lrs = {"tensors": args.lr_tensors, "lora": args.lr_lora}
    if args.quick and lrs == {"tensors": QUICK["lr_tensors"], "lora": QUICK["lr_lora"]}:
        return " (quick run: larger lrs, chosen for a random-init tiny model)"
    if lrs == PAPER_LR:
        return " (the paper's; the CLI's defaults for models other than its embedded one)"
    if lrs == EMBEDDED_LR:
        return " (the CLI's defaults on its embedded model and data)"
    return ""


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = resolve(build_parser().parse_args(argv))
    runner.prepare_process(args.threads)
    started = time.perf_counter()

    sizes = workload.DataSizes(
        train=args.train_examples,
        generate=args.eval_examples,
        max_source_tokens=args.max_source_tokens,
        max_target_tokens=args.max_target_tokens,
    )
    load = workload.quick_workload if args.quick else workload.real_workload
    work = load(sizes, args.batch_size, args.seed)
    settings = runner.TrainSettings(
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        measure_every=args.measure_every,
        max_new_tokens=args.max_new_tokens,
        max_source_tokens=args.max_source_tokens,
        max_steps=args.max_steps,
    )
    options = methods.MethodOptions(
        seed=args.seed,
        importance_batches=args.importance_batches,
        baseline_rho=BASELINE_RHO,
        total_steps=settings.steps(work),
    )
    setup_text = (
        f"Model {work.label}, data {work.data_label}: {work.train_size} training examples, {args.epochs} epochs, "
        f"batch {args.batch_size} x {work.train_columns['input_ids'].shape[1]} tokens, {settings.steps(work)} steps "
        f"per method; prompt `{work.template}`; AdamW, constant lr {args.lr_tensors:g} for base tensors (full FT, "
        f"FT-top-k, random, GreenTrainer tensors) and {args.lr_lora:g} for LoRA adapters (LoRA, GreenTrainer lora)"
        f"{lr_source(args)}; "
        f"evaluation: greedy, {len(work.eval_examples)} held-out examples, up to {args.max_new_tokens} new tokens; "
        f"seed {args.seed}; GreenTrainer importance from {args.importance_batches} batches per selection."
    )
    print(setup_text, file=sys.stderr)
    print(f"methods: {', '.join(args.methods)}", file=sys.stderr)

    transformers.set_seed(args.seed)
    base_model = work.new_model()
    reference_flops = work.base_costs(base_model).full_flops
    base_rouge = runner.evaluate_rouge(base_model, work, settings)
    del base_model
    print(f"base model ROUGE-L {base_rouge['rougeL']:.2f}", file=sys.stderr)

    rows = []
    for key in args.methods:
        runner.release_memory()
        transformers.set_seed(args.seed)  # the same LoRA initialisation for LoRA and GreenTrainer lora
        method = methods.build(key, work, options)
        lr = args.lr_lora if method.kind == "lora" else args.lr_tensors
        row = runner.train(method, work, settings, lr)
        rows.append(row)
        seconds, rouge_l = row["train_seconds"], row["rouge"]["rougeL"]
        print(f"{row['method']}: {seconds:.0f} s, {row['steps']} steps, ROUGE-L {rouge_l:.2f}", file=sys.stderr)
        del method

    report.add_ratios(rows, reference_flops)
    orders = [row.pop("batch_orders") for row in rows]
    result = {
        "command": shlex.join(["python", "benchmarks/compare.py", *argv]),
        "setup": setup_text,
        **runner.environment(),
        "config": {k: v for k, v in vars(args).items() if k != "output_dir"},
        "model": work.label,
        "dataset": work.data_label,
        "reference_full_flops_per_step_predicted": reference_flops,
        "base_rouge": base_rouge,
        "same_batch_order": all(o == orders[0] for o in orders),
        "epoch_orders": len(orders[0]) if orders else 0,
        "rows": rows,
    }
    result["total_seconds"] = time.perf_counter() - started
    text = report.write_compare(result, args.output_dir)
    print(text)
    print(f"Wrote compare.md, compare.json and compare.png to {args.output_dir}/", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
