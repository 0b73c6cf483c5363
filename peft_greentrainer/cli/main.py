"""``greentrainer``: the command line.

* ``greentrainer train``: fine-tune a model with GreenTrainer through ``transformers.Trainer`` and write the adapter,
  a report, metrics and plots. With no arguments it runs the embedded default: the real pretrained SmolLM2-135M on
  the real ACLSum summarization data, offline, in about five minutes on a laptop CPU.
* ``greentrainer profile``: what GreenTrainer will cost and save on a model, from its ``config.json`` alone.

Bad input ends with one line on stderr and exit status 2, and never leaves a half-written output directory.

This module is the parser and the dispatch; each command is its own module (``train``, ``profile_command``).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import warnings
from collections.abc import Sequence

from .errors import EXIT_USAGE, CliError

__all__ = ["build_parser", "main"]


# ---------------------------------------------------------------------------------------------------- arguments
def _rho(text: str) -> float:
    try:
        value = float(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"rho must be a number in (0, 1], got {text!r}") from error
    if not (math.isfinite(value) and 0 < value <= 1):
        raise argparse.ArgumentTypeError(f"rho must be in (0, 1] (a fraction of full fine-tuning FLOPs), got {text}")
    return value


def _template(value: str) -> str:
    if value.count("{input}") != 1:  # the text around it is used as written (no other placeholders, no escapes)
        raise argparse.ArgumentTypeError(f"{value!r} must hold {{input}} once, where the source text goes")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from error
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from error
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
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
    train.add_argument(
        "--template", type=_template, default="{input} TL;DR:", help="prompt template with {input} (paper's default)"
    )
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
    train.add_argument("--importance-batches", type=_positive_int, default=1, help="batches per importance probe")
    train.add_argument(
        "--importance-update",
        choices=("optimizer", "gradient"),
        default="optimizer",
        help="the update importance predicts: the optimizer's next step (the paper's) or a plain gradient step",
    )
    train.add_argument(
        "--lr",
        type=float,
        default=None,
        help="default: embedded run tensors 3e-4, lora 1e-3 (measured); else the paper's tensors 2e-5, lora 2e-4",
    )
    train.add_argument("--batch-size", type=_positive_int, default=4)
    train.add_argument("--max-source-tokens", type=_positive_int, default=None, help="default 512 (160 embedded)")
    train.add_argument("--max-target-tokens", type=_positive_int, default=None, help="default 128 (48 embedded)")
    train.add_argument(
        "--padding",
        choices=("auto", "longest", "max-length"),
        default="auto",
        help="pad each batch to its longest row, or every row to the token limits (one shape every step); auto "
        "(default): longest for decoder-only models, max-length for encoder-decoders (each pair of source and target "
        "lengths a batch can have costs them a profile)",
    )
    train.add_argument("--train-examples", type=_positive_int, default=None, help="default: all (120 embedded)")
    train.add_argument("--eval-examples", type=_positive_int, default=24)
    train.add_argument("--r", type=_positive_int, default=8, help="LoRA rank (units=lora)")
    train.add_argument(
        "--target-modules", nargs="+", action=_TargetModules, help="LoRA targets (default: PEFT's for the model)"
    )
    quantize = train.add_mutually_exclusive_group()
    quantize.add_argument("--load-in-8bit", action="store_true")
    quantize.add_argument("--load-in-4bit", action="store_true")
    train.add_argument("--output-dir", default="greentrainer-output")
    train.add_argument("--overwrite", action="store_true", help="replace the output of an earlier train run")
    train.add_argument("--seed", type=int, default=42)
    train.add_argument("--threads", type=_positive_int, default=None, help="torch threads (default: torch's choice)")
    train.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to train (default: cuda if visible)"
    )
    train.add_argument("--bf16", action="store_true", help="bf16 mixed precision, as TrainingArguments(bf16=True)")
    train.add_argument("--measure-every", type=_positive_int, default=10, help="count FLOPs every N steps")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.add_argument(
        "--dense-lm-head",
        action="store_true",
        help="project every position onto the vocabulary (default: only where the next-token label counts)",
    )
    energy = train.add_argument_group("energy receipt (CodeCarbon, offline)")
    energy.add_argument("--no-energy", action="store_true", help="do not measure energy and emissions")
    energy.add_argument(
        "--country", help="3-letter ISO code of the grid's country (default: CodeCarbon's world average)"
    )
    energy.add_argument(
        "--carbon-intensity", type=_non_negative, help="grid carbon intensity in gCO2-eq/kWh (overrides --country)"
    )

    profile = commands.add_parser("profile", help="predict GreenTrainer's cost and saving on a model, no weights")
    profile.add_argument("--model", required=True, help="model directory (or config.json) to build on meta")
    profile.add_argument("--batch-size", type=_positive_int, default=4)
    profile.add_argument("--seq-len", type=_positive_int, default=512)
    profile.add_argument("--target-len", type=_positive_int, default=128, help="decoder length (encoder-decoder)")
    profile.add_argument("--units", choices=("tensors", "lora"), default="tensors")
    profile.add_argument("--target-modules", nargs="+", action=_TargetModules)
    profile.add_argument("--r", type=_positive_int, default=8)
    profile.add_argument("--rho", type=_rho, nargs="+", default=[0.3, 0.5, 0.7])
    profile.add_argument("--json", action="store_true", help="print JSON instead of a table")
    profile.add_argument("--plot", help="PNG file: cumulative backward cost by depth with the budget lines")
    profile.add_argument(
        "--label-tokens",
        type=_positive_int,
        default=None,
        help="causal LMs: supervised tokens at the end of each sequence (default: all); the LM head runs only there",
    )
    profile.add_argument("--dense-lm-head", action="store_true", help="plan with the dense LM head")
    return parser


# ---------------------------------------------------------------------------------------------------- entry point
class _TargetModules(argparse.Action):
    """Module names, or PEFT's shorthand ``all-linear`` as the string PEFT takes (in a list it names a module none
    has, and PEFT fails)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if "all-linear" in values and len(values) > 1:
            parser.error("--target-modules all-linear names every linear layer: pass it alone, or module names")
        setattr(namespace, self.dest, "all-linear" if values == ["all-linear"] else values)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("GREENTRAINER_LOG", "WARNING"), format="%(levelname)s %(message)s")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    # bitsandbytes (imported by peft) warns on every start that an optional CPU kernel from a hub is missing
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            from .train import run_train

            run_train(args)
        else:
            from .profile_command import run_profile

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
