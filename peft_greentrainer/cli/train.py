"""``greentrainer train``: load data -> load model -> wrap with GreenTrainer -> train -> evaluate -> report.

Each step is one function below, in that order. Everything is written into a staging directory that replaces the
output directory only when the run succeeded, so a failed run never leaves half an output behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CliError

if TYPE_CHECKING:
    from .data import TrimToLongest

logger = logging.getLogger(__name__)

EMBEDDED_DEFAULTS = {"epochs": 2, "max_source_tokens": 160, "max_target_tokens": 48, "train_examples": 120}
PAPER_DEFAULTS = {"epochs": 5, "max_source_tokens": 512, "max_target_tokens": 128, "train_examples": None}
# learning rate by unit kind. The embedded run's rates are the quality protocol's choices for GreenTrainer at rho 0.5
# on this model and data (benchmarks/results/protocol): tensors 3e-4 of 3e-5..1e-3; LoRA units 1e-3 of 1e-4..3e-3,
# measured with r 16 on all linear layers at the same alpha / r as the CLI's. Every other model's are the paper's,
# tuned for 2.7B models
EMBEDDED_LR = {"tensors": 3e-4, "lora": 1e-3}
PAPER_LR = {"tensors": 2e-5, "lora": 2e-4}
# written into the output beside the adapter: the names of the files the run wrote (JSON), what --overwrite replaces
RUN_MARKER = ".greentrainer-train.json"


@dataclass
class RunData:
    """What the run trains and evaluates on, and the labels the report uses for them."""

    train: list
    eval: list
    model_path: str
    model_label: str
    data_label: str


class FailedAfterTraining(Exception):
    """The evaluation or report after training raised, or was interrupted (its ``__cause__``): the trained adapter is
    in the staging directory."""


def _keep_trained_adapter(staging: Path, output_dir: Path) -> Path:
    """Move what ``staging`` holds (the trained adapter and tokenizer) into a new sibling of ``output_dir``, written
    atomically, so that a failed evaluation does not discard hours of training nor leave half an output."""
    from ..saving import _NEW_CONTENT, write_atomically

    kept = output_dir.with_name(f"{output_dir.name}-unevaluated")
    number = 1
    while kept.exists() or kept.is_symlink():
        number += 1
        kept = output_dir.with_name(f"{output_dir.name}-unevaluated-{number}")

    def write(directory: str) -> None:
        for entry in os.listdir(staging):
            if entry != _NEW_CONTENT:
                os.replace(staging / entry, Path(directory) / entry)
        _mark_run_output(Path(directory))

    write_atomically(kept, write)
    return kept


@dataclass
class TrainedRun:
    """What training leaves behind for the report: the Trainer's state and the measured steps."""

    trainer: Any
    meter: Any
    seconds: float
    energy: Any  # EnergyReceipt, or None with --no-energy


def run_train(args: argparse.Namespace) -> dict:
    """The whole ``train`` command: resolve defaults, load data, train into the output directory, print a summary."""
    from ..saving import write_atomically

    _apply_defaults(args)
    output_dir = Path(args.output_dir)
    if output_dir.is_symlink():  # write where it points (a bigger disk, say), not over the link itself
        try:
            output_dir = output_dir.resolve()
        except RuntimeError as error:  # a loop of links
            raise CliError(f"--output-dir {output_dir}: {error}") from error
    _check_output_dir(output_dir, args)
    data = load_data(args)
    result: dict = {}

    def write(staging: str) -> None:
        try:
            result.update(train_into(Path(staging), args, data))
        except FailedAfterTraining as failure:
            kept = _keep_trained_adapter(Path(staging), output_dir)
            cause = failure.__cause__
            what = "was interrupted" if isinstance(cause, KeyboardInterrupt) else "failed"
            detail = (str(cause) or "-").splitlines()[0]
            message = (
                f"the evaluation or report after training {what} ({type(cause).__name__}: {detail}); the trained "
                f"adapter and tokenizer are saved in {kept}/ (no complete report)"
            )
            if isinstance(cause, KeyboardInterrupt):  # still an interrupt to the caller (a shell loop stops)
                print(f"greentrainer: {message}", file=sys.stderr)
                raise cause from None
            raise CliError(message) from cause

    write_atomically(output_dir, write)
    _print_summary(result, output_dir)
    return result


def train_into(staging: Path, args: argparse.Namespace, data: RunData) -> dict:
    """The pipeline, writing adapter, tokenizer, metrics and report into ``staging``; returns the metrics."""
    import torch
    import transformers

    from .data import TrimToLongest

    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.set_seed(args.seed)
    model, tokenizer = load_model(data.model_path, args)
    columns = tokenize(model, tokenizer, data.train, args)
    _check_token_ids(model, tokenizer, columns, data.eval, data.model_path)
    truncation = count_truncation(model, tokenizer, data, args)
    if args.padding == "auto":  # an encoder-decoder's two lengths make a profile of every pair a batch can have
        args.padding = "max-length" if model.config.is_encoder_decoder else "longest"
    _announce(args, data, columns, model.config.is_encoder_decoder)
    peft_model = wrap(model, args)
    trimmer = TrimToLongest(model.config.is_encoder_decoder) if args.padding == "longest" else None
    example = {k: v[: args.batch_size] for k, v in columns.items()}  # the first batch, as the Trainer pads it
    example = trimmer.trim(example) if trimmer else example
    _check_rho_floor(peft_model.base_model, columns, args.batch_size, args.rho, trimmer)
    references = flops_references(peft_model, example)
    # before training the adapter is the identity (LoRA B = 0; tensors untouched): this scores the base model
    before = evaluate(peft_model, tokenizer, data.eval, args)
    run = train(peft_model, columns, staging, args, trimmer)
    peft_model.save_pretrained(str(staging))  # before the evaluation, whose failure keeps it (run_train)
    tokenizer.save_pretrained(str(staging))
    try:  # Ctrl-C during a slow evaluation too: the trained adapter must survive it
        after = evaluate(peft_model, tokenizer, data.eval, args)
        metrics = collect_metrics(args, data, peft_model.base_model, example, references, run, before.scores, after)
        metrics["truncation"] = truncation
        write_run_report(staging, metrics, peft_model.base_model, example, run)
    except BaseException as error:
        raise FailedAfterTraining() from error
    _mark_run_output(staging)
    return metrics


# ---------------------------------------------------------------------------------------------------- data
def _apply_defaults(args: argparse.Namespace) -> None:
    """The embedded run's small defaults, or the paper's; the learning rate by unit kind; a wrong --country, or a
    quantization flag without bitsandbytes, now."""
    embedded = args.model is None and args.dataset is None
    for key, value in (EMBEDDED_DEFAULTS if embedded else PAPER_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.lr is None:
        args.lr = (EMBEDDED_LR if embedded else PAPER_LR)[args.units]
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda: no CUDA device is visible; pass --device cpu (or auto)")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.load_in_8bit or args.load_in_4bit:
        from transformers.utils import is_bitsandbytes_available

        if not is_bitsandbytes_available():  # not installed, or older than transformers takes
            raise CliError(f"{_quantize_flag(args)} needs bitsandbytes: pip install -U bitsandbytes, or drop the flag")
    if args.country and args.carbon_intensity is None and not args.no_energy:
        from ..energy import country_intensity

        try:
            country_intensity(args.country)
        except ValueError as error:
            raise CliError(f"--country: {error}") from error
        except ImportError as error:
            raise CliError("--country needs codecarbon (pip install codecarbon), or pass --no-energy") from error


def _quantize_flag(args: argparse.Namespace) -> str:
    return "--load-in-8bit" if args.load_in_8bit else "--load-in-4bit"


def _check_output_dir(path: Path, args: argparse.Namespace) -> None:
    """Refuse, before any work, an output directory the run could not write or must not replace.

    The run replaces the whole directory, so --overwrite takes only the output of an earlier run (its marker lists
    what that run wrote), and no run takes the working directory or one holding the model or the data: --overwrite
    once deleted whatever --output-dir named, ``.`` included.
    """
    target = Path(os.path.abspath(path))  # as the write sees it: "gone/../model" is model, though gone is missing
    if target.exists():
        _check_replaceable(path, target, args)
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise CliError(f"cannot create output directory {path}: {parent} is a file; choose another --output-dir")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CliError(f"cannot write output directory {path}: {parent} is not writable; choose another --output-dir")


def _check_replaceable(path: Path, target: Path, args: argparse.Namespace) -> None:
    """An existing ``target`` (``path`` made absolute) is replaced only when it is empty, or the output of an earlier
    run and --overwrite."""
    resolved = target.resolve()
    inputs = [("the current directory", Path.cwd())]
    named = (("model", args.model), ("dataset", args.dataset))
    inputs += [(f"the {what} {name}", Path(name)) for what, name in named if name is not None]
    for what, input_path in inputs:
        if input_path.exists() and (resolved == input_path.resolve() or resolved in input_path.resolve().parents):
            relation = "is" if resolved == input_path.resolve() else "holds"
            raise CliError(
                f"output directory {path} {relation} {what}, which the run would replace; choose a new or empty "
                "--output-dir"
            )
    if target.is_file():
        raise CliError(f"output directory {path} is a file, which the run would replace; choose another --output-dir")
    entries = sorted(entry.name for entry in target.iterdir())
    if not entries:
        return
    written = _earlier_run_files(target)
    if written is None:
        raise CliError(
            f"output directory {path} exists and is not empty, and is not the output of an earlier greentrainer train "
            f"run (--overwrite replaces only those); choose a new or empty --output-dir"
        )
    others = [entry for entry in entries if entry not in written and entry != RUN_MARKER]
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise CliError(
            f"output directory {path} holds an earlier greentrainer train run and files that run did not write "
            f"({shown}), which replacing it would delete; move them, or choose a new or empty --output-dir"
        )
    if not args.overwrite:
        raise CliError(
            f"output directory {path} holds an earlier greentrainer train run; pass --overwrite to replace it, or "
            "choose a new --output-dir"
        )


def _earlier_run_files(path: Path) -> set[str] | None:
    """The files an earlier run wrote into ``path`` (those its marker names; an output written before the marker
    existed is recognised by its metrics.json, report.md and adapter config), or None where no run wrote it."""
    marker = path / RUN_MARKER
    if marker.is_file():
        try:
            return set(json.loads(marker.read_text())["files"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
    if all((path / name).is_file() for name in ("metrics.json", "report.md", "adapter_config.json")):
        return {entry.name for entry in path.iterdir() if entry.is_file() and entry.name in _OLDER_RUN_FILES}
    return None


# What a run without a marker wrote: its report and plots, the adapter (and GreenTrainer's fields beside a LoRA one),
# and the tokenizer files transformers saves. Exact names: the rest (a user's notes, checkpoint folders, a copy of an
# adapter under another name, such as "adapter_model_best.safetensors") is the user's, which --overwrite must not
# delete.
_OLDER_RUN_FILES = frozenset(
    {
        *("metrics.json", "report.md", "README.md", "selections.png", "flops.png", "loss.png", "energy.png"),
        *("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "greentrainer_config.json"),
        *("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json"),
        *("vocab.txt", "merges.txt", "spiece.model", "tokenizer.model", "sentencepiece.bpe.model", "source.spm"),
        *("target.spm", "chat_template.jinja", "chat_template.json"),
    }
)


def _mark_run_output(directory: Path) -> None:
    """Name the files of a run's output in its marker, so that --overwrite can replace it, and only it, later."""
    from ..saving import _NEW_CONTENT

    files = sorted(entry for entry in os.listdir(directory) if entry not in (RUN_MARKER, _NEW_CONTENT))
    (directory / RUN_MARKER).write_text(json.dumps({"command": "greentrainer train", "files": files}, indent=1))


def load_data(args: argparse.Namespace) -> RunData:
    """Training and evaluation examples, and the model to load (the embedded one converted on first use)."""
    from .data import DataError, load_examples
    from .embedded import EMBEDDED_DATASET, EMBEDDED_MODEL, MissingResourceError, embedded_model_path

    try:
        train_examples, eval_examples = (
            load_examples(
                args.dataset,
                split,
                input_field=args.input_field,
                target_field=args.target_field,
                limit=limit,
                seed=args.seed,
            )
            for split, limit in (("train", args.train_examples), ("eval", args.eval_examples))
        )
        if not train_examples or not eval_examples:
            raise CliError(
                f"dataset {args.dataset} gave {len(train_examples)} training and {len(eval_examples)} "
                "evaluation examples; it needs at least one of each (a data file's last 20% is held out for evaluation)"
            )
        if len(train_examples) < args.batch_size:  # whole batches only: fewer rows than one would train nothing
            raise CliError(
                f"dataset {args.dataset} gave {len(train_examples)} training examples, fewer than one batch of "
                f"{args.batch_size}: lower --batch-size or add examples"
            )
        model_path = args.model
        if model_path is None:
            print("Preparing the embedded model (converted once, then cached)...", file=sys.stderr)
            model_path = str(embedded_model_path())
    except (DataError, MissingResourceError) as error:
        what = "model" if isinstance(error, MissingResourceError) and "smollm2" in str(error) else "data"
        raise CliError(f"{what}: {error}") from error
    return RunData(
        train_examples, eval_examples, model_path, args.model or EMBEDDED_MODEL, args.dataset or EMBEDDED_DATASET
    )


def tokenize(model, tokenizer, examples: Sequence, args: argparse.Namespace) -> dict:
    """Fixed-length token columns, causal or seq2seq as the model is."""
    from .data import tokenize_causal, tokenize_seq2seq

    tokenize_examples = tokenize_seq2seq if model.config.is_encoder_decoder else tokenize_causal
    columns = tokenize_examples(tokenizer, examples, args.template, args.max_source_tokens, args.max_target_tokens)
    limit = _learned_position_limit(model)
    if limit is None:
        return columns
    if model.config.is_encoder_decoder:  # the encoder reads the source, the decoder the target: each has the limit
        lengths = {
            "--max-source-tokens": columns["input_ids"].shape[1],
            "--max-target-tokens": columns["labels"].shape[1],
        }
        too_long = [f"{flag} {length}" for flag, length in lengths.items() if length > limit]
        if too_long:
            raise CliError(
                f"{' and '.join(too_long)}: more than the {limit} positions this model's encoder and decoder each "
                f"have; lower {'them' if len(too_long) > 1 else 'it'}"
            )
        return columns
    length = columns["input_ids"].shape[1]
    if length > limit:
        raise CliError(
            f"sequences of {length} tokens (--max-source-tokens {args.max_source_tokens} + --max-target-tokens "
            f"{args.max_target_tokens} + end of text) exceed the {limit} positions this model has; lower them"
        )
    return columns


def count_truncation(model, tokenizer, data: RunData, args: argparse.Namespace) -> dict:
    """What the token limits cut from the training and evaluation examples, said in a warning (cut silently, a
    2,000-token source trained as its first 512 without a word)."""
    from .data import count_cuts
    from .report import describe_cuts

    limits = args.template, args.max_source_tokens, args.max_target_tokens, model.config.is_encoder_decoder
    truncation = {
        split: count_cuts(tokenizer, examples, *limits)
        for split, examples in (("train", data.train), ("eval", data.eval))
    }
    if any(cuts["sources_cut"] or cuts["targets_cut"] for cuts in truncation.values()):
        logger.warning("%s Raise the limits to keep more of the text.", describe_cuts(truncation, *limits[1:3]))
    return truncation


def _learned_position_limit(model) -> int | None:
    """The positions a model with a table of position embeddings has, learned (GPT-2, OPT, BART) or fixed sinusoids
    (Marian, Pegasus): an index error beyond them. None where positions are computed (RoPE, ALiBi, T5's relative
    buckets: longer inputs run, scaled or not)."""
    import torch

    learned = any(
        isinstance(module, torch.nn.Embedding) and ("pos" in name.rsplit(".", 1)[-1] or name.endswith("wpe"))
        for name, module in model.named_modules()
    )
    if not learned:
        return None
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(model.config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _announce(args: argparse.Namespace, data: RunData, columns: dict, encoder_decoder: bool) -> None:
    longest = str(columns["input_ids"].shape[1])
    if encoder_decoder:  # two lengths
        longest = f"{longest} source and {columns['labels'].shape[1]} target"
    padding = f"padded to the longest row, at most {longest}" if args.padding == "longest" else f"padded to {longest}"
    print(
        f"Training {data.model_label} on {len(data.train)} examples of {data.data_label} "
        f"({args.epochs} epochs, batch {args.batch_size}, sequences {padding} tokens, "
        f"lr {args.lr}, units={args.units}, rho={args.rho}); evaluating on {len(data.eval)} held-out examples.",
        file=sys.stderr,
    )


# ---------------------------------------------------------------------------------------------------- model
def load_model(name: str, args: argparse.Namespace):
    """Model (fp32, or 8/4-bit when asked) and tokenizer from a local directory or hub id; a pad token if missing."""
    import torch
    import transformers

    if not Path(name).exists() and (name.startswith((".", "/", "~")) or Path(name).suffix):
        raise CliError(f"model path {name} does not exist")
    try:
        config = transformers.AutoConfig.from_pretrained(name)
        tokenizer = _load_tokenizer(name)
    except OSError as error:
        raise CliError(
            f"cannot load model {name!r} ({str(error).splitlines()[0]}); pass a local model directory"
        ) from error
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if args.device == "cuda":  # on the GPU from the start (quantized weights are made there), evaluation included
        kwargs["device_map"] = {"": "cuda"}
    if args.load_in_8bit or args.load_in_4bit:
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_8bit=args.load_in_8bit, load_in_4bit=args.load_in_4bit
        )
    cls = transformers.AutoModelForSeq2SeqLM if config.is_encoder_decoder else transformers.AutoModelForCausalLM
    try:
        model = cls.from_pretrained(name, **kwargs)
    except OSError as error:  # a config and tokenizer without weights: all that `greentrainer profile` reads
        raise CliError(
            f"cannot load the weights of model {name!r} ({str(error).splitlines()[0]}); training needs them "
            "(model.safetensors or pytorch_model.bin beside config.json): only greentrainer profile works without"
        ) from error
    except ImportError as error:  # what else transformers' quantizer needs (accelerate, a newer bitsandbytes)
        if "quantization_config" not in kwargs:
            raise
        raise CliError(f"{_quantize_flag(args)}: {str(error).splitlines()[0]}; or drop the flag") from error
    rows = model.get_input_embeddings().num_embeddings
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    if pad is not None and pad >= rows and eos is not None and eos < rows:
        # a pad token the tokenizer class supplies by default, which this vocabulary lacks (Qwen2's <|endoftext|>)
        logger.warning(
            "The pad token %r (id %d) is beyond the model's embeddings; padding with eos.", tokenizer.pad_token, pad
        )
        pad = None
    if pad is None and eos is None:
        raise CliError(f"the tokenizer of model {name} has neither a pad nor an end-of-text token; set its eos_token")
    if pad is None:
        tokenizer.pad_token = tokenizer.eos_token
    _check_vocabulary(model, tokenizer, name)
    return model, tokenizer


def _load_tokenizer(name: str):
    """The model's tokenizer, refused where it cannot tokenize: for a folder without tokenizer files (a Trainer's
    checkpoint-N/) transformers builds an empty one (one token, every text to nothing) or none, and the run failed
    in generation with an IndexError."""
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(name)
    except ValueError as error:  # no files to build the one this model type needs from
        reason = str(error).splitlines()[0]
    else:
        if len(tokenizer) > 1:  # a narrow vocabulary (digits and operators) is a tokenizer too
            return tokenizer
        reason = f"{len(tokenizer)} token: every text tokenizes to nothing"
    raise CliError(
        f"model {name} has no usable tokenizer ({reason}); a folder without tokenizer files, such as a Trainer's "
        f"checkpoint-N/, needs them: copy the tokenizer files (tokenizer.json, tokenizer_config.json, ...) of the "
        f"model it was trained from into {name}"
    )


def _check_vocabulary(model, tokenizer, name: str) -> None:
    """Refuse a tokenizer with ids the model's input embeddings lack: they failed with an IndexError mid-run, in
    the evaluation after training or wherever a batch first held one (the pad token of Qwen2's tokenizer class is
    one id beyond a small model's vocabulary)."""
    rows = model.get_input_embeddings().num_embeddings
    special = {"pad": tokenizer.pad_token_id, "eos": tokenizer.eos_token_id, "bos": tokenizer.bos_token_id}
    beyond = [f"its {what} token is id {i}" for what, i in special.items() if i is not None and i >= rows]
    if beyond:
        raise CliError(
            f"the tokenizer of model {name} has ids beyond the {rows} rows of the model's input embeddings "
            f"({', '.join(beyond)}): {_VOCABULARY_ADVICE}"
        )


_VOCABULARY_ADVICE = (
    "pass the tokenizer the model was trained with, or resize the model's embeddings to it "
    "(model.resize_token_embeddings(len(tokenizer))) and save the model"
)


def _check_token_ids(model, tokenizer, columns: dict, held_out: Sequence, name: str) -> None:
    """Refuse texts holding a token (one the tokenizer added) the model's embeddings lack, before any work: it
    failed with an IndexError wherever a batch first held one."""
    rows = model.get_input_embeddings().num_embeddings
    largest = max(int(columns[key].max()) for key in ("input_ids", "labels") if key in columns)
    texts = [text for example in held_out for text in (example.source, example.target)]
    largest_held_out = max((max(ids, default=-1) for ids in tokenizer(texts)["input_ids"]), default=-1)
    for which, found in (("training", largest), ("evaluation", largest_held_out)):
        if found >= rows:
            raise CliError(
                f"the {which} texts tokenize to id {found}, beyond the {rows} rows of the input embeddings of model "
                f"{name}: {_VOCABULARY_ADVICE}"
            )


def wrap(model, args: argparse.Namespace):
    """``get_peft_model`` with the GreenTrainer configuration the arguments describe."""
    from peft import get_peft_model

    from ..config import GreenTrainerConfig

    lora = (
        {"r": args.r, "lora_alpha": 2 * args.r, "target_modules": args.target_modules} if args.units == "lora" else {}
    )
    config = GreenTrainerConfig(
        rho=args.rho,
        units=args.units,
        selection_interval=args.selection_interval,
        selection_interval_steps=args.selection_interval_steps,
        importance_batches=args.importance_batches,
        importance_update=args.importance_update,
        sparse_lm_head=not args.dense_lm_head,
        task_type="SEQ_2_SEQ_LM" if model.config.is_encoder_decoder else "CAUSAL_LM",
        **lora,
    )
    return get_peft_model(model, config)


MAX_LENGTH_PAIRS = 256  # an encoder-decoder padded per batch: one profile per pair of lengths, before training


def _check_rho_floor(tuner, columns: dict, batch_size: int, rho: float, trimmer: TrimToLongest | None) -> None:
    """Fail before any training when no selection can fit the budget on the batches the run may draw.

    A selection must fit every batch shape trained on at once (GreenTrainer bounds them by their envelope), so the
    floor is that of the envelope of the prices of the batches that bound every batch of the data
    (``_bounding_batches``): the largest floor of one batch can be lower, and a run accepted on it failed at a later
    epoch's selection. Their one-row profiles are the ones training would run, kept for it. It is the worst batch
    the data can make, which a shuffle may never draw: where padding to the limits has a lower floor, the refusal
    names it.
    """
    from ..engine.selector import rounded_up_rho

    floor = _floor(tuner, _bounding_batches(columns, batch_size, trimmer))
    if rho < floor:
        other = ""
        if trimmer is not None and (fixed := _floor(tuner, _bounding_batches(columns, batch_size))) < floor:
            other = f", or pad every row to the limits (--padding max-length: floor {rounded_up_rho(fixed):.4f})"
        raise CliError(
            f"rho={rho} is below this model's feasible floor {rounded_up_rho(floor):.4f} on the batches this data can "
            f"make (forward pass plus the cheapest unit, on the worst of them); raise --rho{other}"
        )


def _floor(tuner, batches: list[dict]) -> float:
    """The smallest rho a selection fitting every one of ``batches`` at once can have."""
    from ..engine.costs import cost_envelope

    return cost_envelope([price for batch in batches for price in tuner.step_prices(batch)]).min_feasible_rho()


def _bounding_batches(columns: dict, batch_size: int, trimmer: TrimToLongest | None = None) -> list[dict]:
    """Batches whose prices bound those of every batch of ``batch_size`` rows the shuffled data can make.

    Padded to one length, every batch has that length, and its price follows its labels alone (``_label_bounds``).
    Padded per batch (``trimmer``), a batch is as long as its longest row, and its price follows the length and the
    labels together (the share of a step the LM head and attention take, which no two lengths bound): so a batch of
    every length a batch can have, each on the rows a batch of that length can hold (at the two ends alone, a middle
    length with many labels was missed). An encoder-decoder's batch has two lengths, its longest source and its
    longest target: every pair a batch can have (at the ends alone, middle target lengths were missed), each priced
    by a profile of its own, so more than ``MAX_LENGTH_PAIRS`` are refused. Its LM head is dense: labels do not
    change its price.
    """
    from ..engine.targets import IGNORE_INDEX

    rows = len(next(iter(columns.values())))
    size = min(batch_size, rows)
    if trimmer is None:
        return _label_bounds(columns, size)
    sources = columns["attention_mask"].sum(dim=1)
    targets = (columns["labels"] != IGNORE_INDEX).sum(dim=1) if trimmer.encoder_decoder else sources
    pairs = _batch_lengths(sources, targets, size, trimmer.encoder_decoder)
    if trimmer.encoder_decoder and len(pairs) > MAX_LENGTH_PAIRS:
        raise CliError(
            f"--padding longest: batches of this data can have {len(pairs)} pairs of source and target lengths, and "
            f"an encoder-decoder's steps are priced by a profile of each pair (more than {MAX_LENGTH_PAIRS} would "
            "take long before training starts); use --padding max-length (the default for encoder-decoders)"
        )
    batches = []
    for source, target in pairs:
        fits = (sources <= source) & (targets <= target)
        fitting = _cut({k: v[fits] for k, v in columns.items()}, source, target)
        if trimmer.encoder_decoder:
            batches.append({k: v[:size] for k, v in fitting.items()})
        else:
            batches += _label_bounds(fitting, size)
    return batches


def _batch_lengths(sources, targets, size: int, encoder_decoder: bool) -> list[tuple[int, int]]:
    """The (source, target) lengths a batch of ``size`` rows padded to its longest row can have (a causal LM's are
    one length), the two ends first: a length between two profiled ones is priced from their polynomial."""
    shortest = sorted(sources.tolist())[size - 1]
    if not encoder_decoder:
        lengths = sorted(n for n in set(sources.tolist()) if n >= shortest)
        return [(n, n) for n in dict.fromkeys([lengths[0], lengths[-1], *lengths])]
    pairs = []
    for source in sorted(set(sources.tolist())):
        for target in sorted(set(targets.tolist())):
            fits = (sources <= source) & (targets <= target)
            # as long as its longest source and its longest target: a row of each, and enough rows
            if int(fits.sum()) >= size and (sources[fits] == source).any() and (targets[fits] == target).any():
                pairs.append((source, target))
    return pairs


def _cut(batch: dict, source: int, target: int) -> dict:
    """``batch`` padded to ``source`` positions (its ``labels`` to ``target``), as a batch whose longest row has
    that length is."""
    return {k: v[:, : target if k == "labels" else source].contiguous() for k, v in batch.items()}


def _label_bounds(columns: dict, size: int) -> list[dict]:
    """Batches of ``size`` rows of ``columns``' width whose floors bound those of every batch of their rows.

    With a head that projects only labelled positions, a step is priced by its batch's mean label count alone: at its
    label bucket's top against full fine-tuning at the bucket's bottom, which is one label lower for a mean just above
    the bucket's lower edge (``label_buckets``). So one batch per bucket a batch's mean can fall in, whole counts
    between the fewest and the most labels a batch can average (a row re-labelled to that count) and, for batches of
    several rows, means between two whole counts (a row a label higher beside it). Without labels to count, the first
    batch: every batch costs the same then.
    """
    import math

    import torch

    from ..engine.label_buckets import label_bucket
    from ..engine.targets import labelled_counts

    counts = labelled_counts(columns)
    if counts is None:
        return [{k: v[:size] for k, v in columns.items()}]
    ordered = sorted(counts.tolist())
    fewest, most = sum(ordered[:size]) / size, sum(ordered[-size:]) / size
    richest = int(counts.argmax())
    row = {k: v[richest : richest + 1] for k, v in columns.items()}
    means = [count for count in range(math.floor(fewest), math.ceil(most) + 1) if fewest <= count <= most]
    if size > 1:  # a mean between count and count + 1
        means += [count + 0.5 for count in range(math.floor(fewest), math.ceil(most)) if fewest < count + 1]
    batches, priced = [], set()
    for mean in sorted(means):
        bucket = label_bucket(row, mean)
        alike = None if bucket is None else (bucket.bottom, bucket.top, mean == int(mean))  # a row, or two
        if alike in priced:  # priced alike: the same floor
            continue
        priced.add(alike)
        if mean == int(mean):
            batches.append(_with_label_count(row, int(mean)))
        else:
            pair = (_with_label_count(row, int(mean)), _with_label_count(row, int(mean) + 1))
            batches.append({k: torch.cat([one[k] for one in pair]) for k in row})
    return batches


def _with_label_count(row: dict, count: int) -> dict:
    """``row`` (one row, ``labels`` aligned with ``input_ids``) with its first next-token targets unlabelled, so that
    ``count`` remain."""
    from ..engine.targets import IGNORE_INDEX

    labels = row["labels"].clone()
    targets = (labels[0, 1:] != IGNORE_INDEX).nonzero().flatten() + 1  # position t is scored against labels[t + 1]
    labels[0, targets[: max(len(targets) - count, 0)]] = IGNORE_INDEX
    return {**row, "labels": labels}


def flops_references(peft_model, example: dict) -> dict[str, Any]:
    """Full fine-tuning FLOPs of one step of this shape: with the run's LM head (``rho``'s reference) and dense.

    The dense figure is what a user would otherwise run; the same-head one isolates GreenTrainer's own saving.
    """
    from ..sparse_head import attached_sparse_lm_head, unsupported_reason

    tuner = peft_model.base_model
    same_head = tuner.cost_profile(example)[1]
    if attached_sparse_lm_head(tuner.model) is None:
        reason = unsupported_reason(tuner.model) or "--dense-lm-head"
        return {"lm_head": f"dense ({reason})", "full_flops_same_head": same_head, "full_flops_dense_head": same_head}
    dense = tuner.dense_head_full_flops(example)
    return {"lm_head": "sparse", "full_flops_same_head": same_head, "full_flops_dense_head": dense}


# ---------------------------------------------------------------------------------------------------- train
def training_arguments(
    output_dir: str,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    max_steps: int = -1,
    quiet: bool = False,
    device: str | None = None,
    bf16: bool = False,
):
    """The paper's optimizer setting (AdamW, constant learning rate) with a log line per step and no checkpoints.

    ``device`` is "cpu" or "cuda" (default: cuda where visible); ``bf16`` turns on bf16 autocast as the Trainer does.
    """
    import torch
    import transformers

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")

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
        use_cpu=device == "cpu",
        bf16=bf16,
        disable_tqdm=quiet,
        dataloader_drop_last=True,
    )


def train(
    peft_model, columns: dict, staging: Path, args: argparse.Namespace, trimmer: TrimToLongest | None = None
) -> TrainedRun:
    """``transformers.Trainer`` with the GreenTrainer callback and the step meter, batches cut to their longest row
    by ``trimmer`` (else as tokenized); its scratch folder removed."""
    import transformers

    from ..callback import GreenTrainerCallback
    from ..energy import EnergyCallback
    from .data import TensorDataset
    from .meter import StepMeter

    scratch = staging / "trainer"
    meter = StepMeter(every=args.measure_every, audit_steps=True)
    energy = None if args.no_energy else EnergyCallback(args.country, args.carbon_intensity)
    trainer = transformers.Trainer(
        model=peft_model,
        args=training_arguments(
            str(scratch),
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            quiet=args.quiet,
            device=args.device,
            bf16=args.bf16,
        ),
        train_dataset=TensorDataset(columns),
        data_collator=trimmer,
        callbacks=[GreenTrainerCallback(), meter, *([energy] if energy else [])],
    )
    _use_compact_progress(trainer, quiet=args.quiet)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    meter.audit()  # after training: no part of its time or energy
    shutil.rmtree(scratch, ignore_errors=True)
    return TrainedRun(trainer, meter, seconds, energy.receipt if energy else None)


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


# ---------------------------------------------------------------------------------------------------- evaluate
@dataclass
class Evaluation:
    scores: dict[str, float]
    predictions: list[str]


def evaluate(peft_model, tokenizer, examples: Sequence, args: argparse.Namespace) -> Evaluation:
    """Greedy generations on the held-out examples and their scores (ROUGE, or exact match for QA)."""
    from .evaluation import exact_match, generate, rouge

    predictions = generate(
        peft_model,
        tokenizer,
        examples,
        args.template,
        max_source_tokens=args.max_source_tokens,
        max_new_tokens=args.max_target_tokens,
        progress=not args.quiet,
    )
    references = [e.target for e in examples]
    if args.task == "qa":
        return Evaluation({"exact_match": exact_match(predictions, references)}, predictions)
    return Evaluation(rouge(predictions, references), predictions)


# ---------------------------------------------------------------------------------------------------- report
def collect_metrics(
    args: argparse.Namespace,
    data: RunData,
    tuner,
    example: dict,
    references: dict,
    run: TrainedRun,
    before: dict,
    after: Evaluation,
) -> dict:
    """Everything the report shows, JSON-ready: settings, scores, FLOPs predicted and measured, time, selections,
    the LM head and the energy receipt; ``summary_rows`` is its short table."""
    from .report import summary_rows

    metrics = {
        **_settings(args, data, example),
        "before": before,
        "after": after.scores,
        **_flops_metrics(tuner, example, references, run),
        "examples_after": [
            {"source": e.source, "reference": e.target, "prediction": p}
            for e, p in zip(data.eval, after.predictions, strict=True)
        ],
    }
    metrics["summary_rows"] = summary_rows(metrics)
    return metrics


def _settings(args: argparse.Namespace, data: RunData, example: dict) -> dict:
    import torch

    return {
        "model": data.model_label,
        "dataset": data.data_label,
        "units": args.units,
        "rho": args.rho,
        "epochs": args.epochs,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "train_examples": len(data.train),
        "eval_examples": len(data.eval),
        "padding": args.padding,
        "sequence_tokens": int(example["input_ids"].shape[1]),  # the first batch's (an encoder-decoder's source)
        "target_tokens": int(example["labels"].shape[1]),  # the first batch's labels
        "torch_threads": torch.get_num_threads(),
        "template": args.template,
        "max_source_tokens": args.max_source_tokens,
        "max_target_tokens": args.max_target_tokens,
    }


def _flops_metrics(tuner, example: dict, references: dict, run: TrainedRun) -> dict:
    """FLOPs per step, predicted and counted, as fractions of full fine-tuning with the run's LM head and with a
    dense one; time, selections and the energy receipt beside them."""
    import numpy as np

    history = tuner.greentrainer_state.history
    steps = run.meter.to_list()
    predicted = predicted_ratio_per_step(history, run.trainer.state.global_step)
    predicted_ratio = float(np.mean(predicted)) if predicted else None
    # each counted step alone over full fine-tuning on its own inputs (StepMeter.audit)
    audited = [s for s in steps if s["flops_ratio"] is not None]
    if audited:  # full fine-tuning per step on the counted steps' inputs (batches padded per batch differ)
        full_flops, dense_full = (float(np.mean([s[k] for s in audited])) for k in ("full_flops", "dense_full_flops"))
    else:  # the first batch's
        full_flops, dense_full = references["full_flops_same_head"], references["full_flops_dense_head"]
    measured = [s["flops_ratio"] for s in audited]
    vs_dense = sum(s["alone_flops"] for s in audited) / sum(s["dense_full_flops"] for s in audited) if audited else None
    log = run.trainer.state.log_history
    kept = [h["greentrainer/lm_head_kept_share"] for h in log if "greentrainer/lm_head_kept_share" in h]
    selection_seconds = sum(r.seconds for r in history)
    return {
        "predicted_flops_ratio": predicted_ratio,
        "measured_flops_ratio": float(np.mean(measured)) if measured else None,
        "measured_flops_ratio_max": max(measured) if measured else None,
        "full_finetuning_flops_per_step": full_flops,
        "train_seconds": run.seconds,
        "selection_seconds": selection_seconds,
        "selection_overhead": selection_seconds / max(run.seconds, 1e-9),
        "steps": run.trainer.state.global_step,
        "units_total": len(tuner.unit_costs(example).units),
        "units_selected_last": len(history[-1].selected) if history else 0,
        "selections": [vars(r) for r in history],
        "step_measurements": steps,
        "final_loss": next((h["loss"] for h in reversed(log) if "loss" in h), None),
        "lm_head": references["lm_head"],
        "lm_head_kept_share": float(np.mean(kept)) if kept else None,
        "full_finetuning_dense_head_flops_per_step": dense_full,
        "predicted_flops_ratio_vs_dense_full": predicted_ratio * full_flops / dense_full if predicted else None,
        "measured_flops_ratio_vs_dense_full": vs_dense,
        "energy": energy_metrics(run.energy, same_head_to_dense=dense_full / full_flops),
    }


def energy_metrics(receipt, same_head_to_dense: float) -> dict | None:
    """The receipt, plus full fine-tuning with a dense LM head (the same-head estimate scaled by the FLOPs ratio)."""
    if receipt is None:
        return None
    energy = receipt.to_dict()
    energy["full_finetuning_dense_head_kwh"] = None
    if receipt.full_finetuning_kwh is not None and same_head_to_dense != 1.0:
        energy["full_finetuning_dense_head_kwh"] = receipt.full_finetuning_kwh * same_head_to_dense
    return energy


def predicted_ratio_per_step(history: Sequence, steps: int) -> list[float]:
    """The predicted FLOPs ratio of the selection in force at each step (1.0 before the first selection)."""
    predicted = []
    for step in range(steps):
        in_force = [r for r in history if r.step <= step]
        predicted.append(in_force[-1].predicted_ratio if in_force else 1.0)
    return predicted


def write_run_report(staging: Path, metrics: dict, tuner, example: dict, run: TrainedRun) -> None:
    """metrics.json, the three plots and report.md."""
    from .report import write_report

    history = tuner.greentrainer_state.history
    write_report(
        staging,
        metrics,
        metrics["summary_rows"],
        [u.name for u in tuner.unit_costs(example).units],
        [r.selected for r in history],
        metrics["step_measurements"],
        predicted_ratio_per_step(history, metrics["steps"]),
        run.trainer.state.log_history,
    )


def _print_summary(metrics: dict, output_dir: Path) -> None:
    from .report import markdown_table

    print(markdown_table(["GreenTrainer", "result"], metrics["summary_rows"]))
    print(f"Adapter, report.md, metrics.json and plots written to {output_dir}/")
