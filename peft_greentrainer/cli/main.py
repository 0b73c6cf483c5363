"""``greentrainer``: the command line.

* ``greentrainer train``: fine-tune a model with GreenTrainer through ``transformers.Trainer`` and write the adapter,
  a report, metrics and plots. With no arguments it runs the embedded default: the real pretrained SmolLM2-135M on
  the real ACLSum summarization data, offline, in about five minutes on a laptop CPU.
* ``greentrainer profile``: what GreenTrainer will cost and save on a model, from its ``config.json`` alone.

Bad input ends with one line on stderr and exit status 2, and never leaves a half-written output directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXIT_USAGE = 2


class CliError(Exception):
    """A problem the user can fix; printed as one line, no traceback."""


# ---------------------------------------------------------------------------------------------------- arguments
def _rho(text: str) -> float:
    try:
        value = float(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"rho must be a number in (0, 1], got {text!r}") from error
    if not (math.isfinite(value) and 0 < value <= 1):
        raise argparse.ArgumentTypeError(f"rho must be in (0, 1] (a fraction of full fine-tuning FLOPs), got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from error
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit status 2), like every other error of the CLI."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="greentrainer", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="fine-tune with GreenTrainer and write adapter + report")
    train.add_argument("--model", help="local path or hub id (default: the embedded SmolLM2-135M-Instruct)")
    train.add_argument("--dataset", help="local json/jsonl/csv/parquet file or hub name (default: embedded ACLSum)")
    train.add_argument("--input-field", default="input", help="field holding the source text (default: input)")
    train.add_argument("--target-field", default="target", help="field holding the target text (default: target)")
    train.add_argument("--template", default="{input} TL;DR:", help="prompt template with {input} (paper's default)")
    train.add_argument(
        "--task", choices=("summarization", "qa"), default="summarization", help="summarization: ROUGE; qa: exact match"
    )
    train.add_argument("--units", choices=("tensors", "lora"), default="tensors")
    train.add_argument("--rho", type=_rho, default=0.5, help="fraction of full fine-tuning FLOPs (default 0.5)")
    train.add_argument("--epochs", type=_positive_int, default=None, help="default: 5 (paper); 2 for the embedded run")
    train.add_argument("--selection-interval", type=_positive_int, default=1, help="epochs between selections")
    train.add_argument(
        "--selection-interval-steps",
        type=_positive_int,
        default=None,
        help="steps between selections (overrides --selection-interval)",
    )
    train.add_argument("--importance-batches", type=_positive_int, default=4)
    train.add_argument("--lr", type=float, default=None, help="default: 2e-5 for tensors (paper), 2e-4 for lora")
    train.add_argument("--batch-size", type=_positive_int, default=4)
    train.add_argument("--max-source-tokens", type=_positive_int, default=None, help="default 512 (160 embedded)")
    train.add_argument("--max-target-tokens", type=_positive_int, default=None, help="default 128 (48 embedded)")
    train.add_argument("--train-examples", type=_positive_int, default=None, help="default: all (120 embedded)")
    train.add_argument("--eval-examples", type=_positive_int, default=24)
    train.add_argument("--r", type=_positive_int, default=8, help="LoRA rank (units=lora)")
    train.add_argument("--target-modules", nargs="+", default=None, help="LoRA targets (default: PEFT's for the model)")
    quantize = train.add_mutually_exclusive_group()
    quantize.add_argument("--load-in-8bit", action="store_true")
    quantize.add_argument("--load-in-4bit", action="store_true")
    train.add_argument("--output-dir", default="greentrainer-output")
    train.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    train.add_argument("--seed", type=int, default=42)
    train.add_argument("--threads", type=_positive_int, default=None, help="torch threads (default: torch's choice)")
    train.add_argument("--measure-every", type=_positive_int, default=10, help="count FLOPs every N steps")
    train.add_argument("--quiet", action="store_true", help="no progress bars")

    profile = commands.add_parser("profile", help="predict GreenTrainer's cost and saving on a model, no weights")
    profile.add_argument("--model", required=True, help="model directory (or config.json) to build on meta")
    profile.add_argument("--batch-size", type=_positive_int, default=4)
    profile.add_argument("--seq-len", type=_positive_int, default=512)
    profile.add_argument("--target-len", type=_positive_int, default=128, help="decoder length (encoder-decoder)")
    profile.add_argument("--units", choices=("tensors", "lora"), default="tensors")
    profile.add_argument("--target-modules", nargs="+", default=None)
    profile.add_argument("--r", type=_positive_int, default=8)
    profile.add_argument("--rho", type=_rho, nargs="+", default=[0.3, 0.5, 0.7])
    profile.add_argument("--json", action="store_true", help="print JSON instead of a table")
    profile.add_argument("--plot", help="PNG file: cumulative backward cost by depth with the budget lines")
    return parser


# ---------------------------------------------------------------------------------------------------- train
EMBEDDED_DEFAULTS = {"epochs": 2, "max_source_tokens": 160, "max_target_tokens": 48, "train_examples": 120}
PAPER_DEFAULTS = {"epochs": 5, "max_source_tokens": 512, "max_target_tokens": 128, "train_examples": None}


def _check_output_dir(path: Path, overwrite: bool) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise CliError(f"output directory {path} exists and is not empty; pass --overwrite or choose another")


def _load_model(name: str, args: argparse.Namespace):
    import torch
    import transformers

    if not Path(name).exists() and (name.startswith((".", "/", "~")) or Path(name).suffix):
        raise CliError(f"model path {name} does not exist")
    try:
        config = transformers.AutoConfig.from_pretrained(name)
        tokenizer = transformers.AutoTokenizer.from_pretrained(name)
    except OSError as error:
        raise CliError(
            f"cannot load model {name!r} ({str(error).splitlines()[0]}); pass a local model directory"
        ) from error
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if args.load_in_8bit or args.load_in_4bit:
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_8bit=args.load_in_8bit, load_in_4bit=args.load_in_4bit
        )
    cls = transformers.AutoModelForSeq2SeqLM if config.is_encoder_decoder else transformers.AutoModelForCausalLM
    model = cls.from_pretrained(name, **kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _score(task: str, predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    from .evaluation import exact_match, rouge

    if task == "qa":
        return {"exact_match": exact_match(predictions, references)}
    return rouge(predictions, references)


def run_train(args: argparse.Namespace) -> dict:
    embedded = args.model is None and args.dataset is None
    defaults = EMBEDDED_DEFAULTS if embedded else PAPER_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.lr is None:
        args.lr = 2e-5 if args.units == "tensors" else 2e-4
    output_dir = Path(args.output_dir)
    _check_output_dir(output_dir, args.overwrite)

    from .data import DataError, load_examples
    from .embedded import EMBEDDED_DATASET, EMBEDDED_MODEL, MissingResourceError, embedded_model_path

    try:
        train_examples = load_examples(
            args.dataset,
            "train",
            input_field=args.input_field,
            target_field=args.target_field,
            limit=args.train_examples,
            seed=args.seed,
        )
        eval_examples = load_examples(
            args.dataset,
            "eval",
            input_field=args.input_field,
            target_field=args.target_field,
            limit=args.eval_examples,
            seed=args.seed,
        )
        if not train_examples or not eval_examples:
            raise CliError(
                f"dataset {args.dataset} gave {len(train_examples)} training and {len(eval_examples)} "
                "evaluation examples; it needs at least one of each"
            )
        model_name = args.model
        if model_name is None:
            print("Preparing the embedded model (converted once, then cached)...", file=sys.stderr)
            model_name = str(embedded_model_path())
    except (DataError, MissingResourceError) as error:
        what = "model" if isinstance(error, MissingResourceError) and "smollm2" in str(error) else "data"
        raise CliError(f"{what}: {error}") from error

    from ..saving import write_atomically

    result: dict = {}

    def produce(staging: str) -> None:
        result.update(
            _train_into(
                Path(staging),
                args,
                model_name,
                train_examples,
                eval_examples,
                args.model or EMBEDDED_MODEL,
                args.dataset or EMBEDDED_DATASET,
            )
        )

    if output_dir.exists() and args.overwrite and output_dir.is_file():
        output_dir.unlink()
    write_atomically(output_dir, produce)
    _print_summary(result, output_dir)
    return result


def _train_into(staging: Path, args, model_name, train_examples, eval_examples, model_label, data_label) -> dict:
    import numpy as np
    import torch
    import transformers
    from peft import get_peft_model

    from .. import GreenTrainerCallback, GreenTrainerConfig
    from .data import TensorDataset, tokenize_causal, tokenize_seq2seq
    from .evaluation import generate
    from .meter import StepMeter
    from .report import write_report

    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.set_seed(args.seed)
    model, tokenizer = _load_model(model_name, args)
    seq2seq = bool(model.config.is_encoder_decoder)
    tokenize = tokenize_seq2seq if seq2seq else tokenize_causal
    train_columns = tokenize(tokenizer, train_examples, args.template, args.max_source_tokens, args.max_target_tokens)
    references = [e.target for e in eval_examples]
    gen = {
        "max_source_tokens": args.max_source_tokens,
        "max_new_tokens": args.max_target_tokens,
        "progress": not args.quiet,
    }
    print(
        f"Training {model_label} on {len(train_examples)} examples of {data_label} "
        f"({args.epochs} epochs, batch {args.batch_size}, sequence {train_columns['input_ids'].shape[1]} tokens, "
        f"lr {args.lr}, units={args.units}, rho={args.rho}); evaluating on {len(eval_examples)} held-out examples.",
        file=sys.stderr,
    )

    lora = (
        {"r": args.r, "lora_alpha": 2 * args.r, "target_modules": args.target_modules} if args.units == "lora" else {}
    )
    config = GreenTrainerConfig(
        rho=args.rho,
        units=args.units,
        selection_interval=args.selection_interval,
        selection_interval_steps=args.selection_interval_steps,
        importance_batches=args.importance_batches,
        task_type="SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM",
        **lora,
    )
    peft_model = get_peft_model(model, config)
    tuner = peft_model.base_model
    example = {k: v[: args.batch_size] for k, v in train_columns.items()}
    floor = tuner.min_feasible_rho(example)
    if args.rho < floor:
        raise CliError(
            f"rho={args.rho} is below this model's feasible floor {math.ceil(floor * 1e4) / 1e4:.4f} "
            "(forward pass plus the cheapest unit); raise --rho"
        )
    full_flops = tuner.cost_profile(example)[1]
    # before training the adapter is the identity (LoRA B = 0; tensors untouched): this scores the base model
    before = _score(args.task, generate(peft_model, tokenizer, eval_examples, args.template, **gen), references)

    training_args = training_arguments(
        str(staging / "trainer"),
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        quiet=args.quiet,
    )
    meter = StepMeter(every=args.measure_every)
    trainer = transformers.Trainer(
        model=peft_model,
        args=training_args,
        train_dataset=TensorDataset(train_columns),
        callbacks=[GreenTrainerCallback(), meter],
    )
    _use_compact_progress(trainer, quiet=args.quiet)
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    predictions = generate(peft_model, tokenizer, eval_examples, args.template, **gen)
    after = _score(args.task, predictions, references)

    peft_model.save_pretrained(str(staging))
    tokenizer.save_pretrained(str(staging))
    _remove_tree(staging / "trainer")

    state = tuner.greentrainer_state
    history = state.history
    steps = meter.to_list()
    for step in steps:
        step["flops_ratio"] = step["flops"] / full_flops if step["flops"] is not None else None
    predicted_per_step = []
    for step in range(trainer.state.global_step):
        in_force = [r for r in history if r.step <= step]
        predicted_per_step.append(in_force[-1].predicted_ratio if in_force else 1.0)
    measured = [s["flops_ratio"] for s in steps if s["flops_ratio"] is not None]
    units_order = [u.name for u in tuner.unit_costs(example).units]
    selection_seconds = sum(r.seconds for r in history)
    metrics = {
        "model": model_label,
        "dataset": data_label,
        "units": args.units,
        "rho": args.rho,
        "epochs": args.epochs,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "train_examples": len(train_examples),
        "eval_examples": len(eval_examples),
        "sequence_tokens": int(train_columns["input_ids"].shape[1]),
        "before": before,
        "after": after,
        "predicted_flops_ratio": float(np.mean(predicted_per_step)) if predicted_per_step else None,
        "measured_flops_ratio": float(np.mean(measured)) if measured else None,
        "full_finetuning_flops_per_step": full_flops,
        "train_seconds": train_seconds,
        "selection_seconds": selection_seconds,
        "selection_overhead": selection_seconds / max(train_seconds, 1e-9),
        "steps": trainer.state.global_step,
        "units_total": len(units_order),
        "units_selected_last": len(history[-1].selected) if history else 0,
        "selections": [vars(r) for r in history],
        "step_measurements": steps,
        "final_loss": next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None),
        "torch_threads": torch.get_num_threads(),
        "examples_after": [
            {"source": e.source, "reference": e.target, "prediction": p}
            for e, p in zip(eval_examples, predictions, strict=True)
        ],
        "template": args.template,
        "max_source_tokens": args.max_source_tokens,
        "max_target_tokens": args.max_target_tokens,
    }
    metric_names = list(after)
    rows = [[f"{name} before / after", f"{before[name]:.2f} / {after[name]:.2f}"] for name in metric_names]
    rows += [
        ["FLOPs ratio predicted", f"{metrics['predicted_flops_ratio']:.3f}"],
        ["FLOPs ratio measured", f"{metrics['measured_flops_ratio']:.3f}" if measured else "not counted"],
        ["training wall time", f"{train_seconds:.0f} s ({trainer.state.global_step} steps)"],
        ["selection overhead", f"{100 * metrics['selection_overhead']:.1f}% of training time"],
        ["units selected (last)", f"{metrics['units_selected_last']} of {len(units_order)}"],
    ]
    metrics["summary_rows"] = rows
    write_report(
        staging,
        metrics,
        rows,
        units_order,
        [r.selected for r in history],
        steps,
        predicted_per_step,
        trainer.state.log_history,
    )
    return metrics


def training_arguments(
    output_dir: str, *, epochs: int, batch_size: int, lr: float, seed: int, max_steps: int = -1, quiet: bool = False
):
    """The paper's optimizer setting (AdamW, constant learning rate) with a log line per step and no checkpoints."""
    import torch
    import transformers

    return transformers.TrainingArguments(
        output_dir=output_dir,
        num_train_epochs=epochs,
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        learning_rate=lr,
        optim="adamw_torch",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=seed,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=quiet,
        dataloader_drop_last=True,
    )


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _use_compact_progress(trainer, quiet: bool) -> None:
    """Replace the Trainer's line-per-log progress output with one bar showing loss and the FLOPs ratio."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    if quiet:
        trainer.pop_callback(PrinterCallback)
        return

    class CompactProgress(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.training_bar is not None and logs:
                postfix = {}
                if "loss" in logs:
                    postfix["loss"] = f"{logs['loss']:.3f}"
                if "greentrainer/flops_ratio" in logs:
                    postfix["flops"] = f"{logs['greentrainer/flops_ratio']:.2f}"
                self.training_bar.set_postfix(postfix)

    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(CompactProgress())


def _print_summary(metrics: dict, output_dir: Path) -> None:
    from .report import markdown_table

    print(markdown_table(["GreenTrainer", "result"], metrics["summary_rows"]))
    print(f"Adapter, report.md, metrics.json and plots written to {output_dir}/")


# ---------------------------------------------------------------------------------------------------- profile
def run_profile(args: argparse.Namespace) -> dict:
    from .planning import plan, plot_plan

    try:
        result = plan(
            args.model,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            target_len=args.target_len,
            units=args.units,
            target_modules=args.target_modules,
            r=args.r,
            rhos=args.rho,
        )
    except (OSError, ValueError, KeyError) as error:
        raise CliError(f"cannot build {args.model} from its config: {str(error).splitlines()[0]}") from error
    if args.plot:
        plot_plan(result, args.plot)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "curve"}, indent=2))
    else:
        print(format_plan(result))
    return result


def format_plan(result: dict) -> str:
    from .report import markdown_table

    lines = [
        f"{result['model']} ({result['architecture']}, {result['parameters'] / 1e9:.2f} B parameters), batch "
        f"{result['batch_size']} x {result['seq_len']}, units={result['units']} ({result['num_units']} units)",
        f"forward {result['forward_flops']:.3e} FLOPs/step; full fine-tuning {result['full_flops']:.3e} FLOPs/step",
        f"smallest feasible rho: {result['min_rho']:.4f}",
        "",
        markdown_table(
            ["rho", "deepest reachable unit", "units reachable", "predicted FLOPs/step", "saving"],
            [
                [
                    r["rho"],
                    r["deepest_reachable"] or "-",
                    f"{100 * r['reachable_share']:.0f}%",
                    f"{r['predicted_flops']:.3e}" if r["predicted_flops"] else "infeasible",
                    f"{100 * r['saving']:.0f}%" if r["saving"] is not None else "-",
                ]
                for r in result["rhos"]
            ],
        ),
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- entry point
def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("GREENTRAINER_LOG", "WARNING"), format="%(levelname)s %(message)s")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    # bitsandbytes (imported by peft) warns on every start that an optional CPU kernel from a hub is missing
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            run_train(args)
        else:
            run_profile(args)
    except CliError as error:
        print(f"greentrainer: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as error:  # budget or configuration errors raised by the library say what to do
        print(f"greentrainer: error: {str(error).splitlines()[0]}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
