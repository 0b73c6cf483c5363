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
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import math
import os
import platform
import random
import re
import resource
import shlex
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from torch import nn
from transformers import TrainerCallback

try:
    import peft_greentrainer  # registers the PEFT method and the FLOP formulas
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import peft_greentrainer  # noqa: F401

from peft import LoraConfig, get_peft_model

from peft_greentrainer import GreenTrainerCallback, GreenTrainerConfig
from peft_greentrainer.cli.data import PAPER_TEMPLATE, Example, TensorDataset, load_examples, tokenize_causal
from peft_greentrainer.cli.evaluation import generate, rouge
from peft_greentrainer.cli.main import training_arguments
from peft_greentrainer.cli.meter import StepMeter
from peft_greentrainer.cli.report import markdown_table
from peft_greentrainer.engine.profile import UnitCosts, profile_model
from peft_greentrainer.engine.selector import select_units
from peft_greentrainer.engine.units import lora_units, tensor_units

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
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
    "lr_tensors": 2e-5,  # the CLI's (and the paper's) default for full-model tensors
    "lr_lora": 2e-4,  # the CLI's default for LoRA adapters
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


# ------------------------------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compare.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny model, tiny tokenizer, synthetic data (< 3 min)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT, help="where compare.md/json/png go")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="subset to run")
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
    return args


# ------------------------------------------------------------------------------------------------- workload
@dataclass
class Workload:
    """What every method shares: the base model factory, the tokenizer, and the tokenized data."""

    label: str
    data_label: str
    new_model: Callable[[], nn.Module]
    tokenizer: Any
    train_columns: dict[str, torch.Tensor]
    eval_examples: list[Example]
    template: str
    batch_size: int
    _base_profile: Any = None

    @property
    def example(self) -> dict[str, torch.Tensor]:
        """The batch shape every step has (sequences are padded to one length): the one the profiles are made for."""
        return {k: v[: self.batch_size] for k, v in self.train_columns.items()}

    def base_costs(self, model: nn.Module) -> UnitCosts:
        """Cost profile of the base model (all tensors units), made once: full FT and FT-top-k predictions."""
        if self._base_profile is None:
            self._base_profile = profile_model(model, self.example)
        return self._base_profile.unit_costs(tensor_units(model))


def real_workload(args: argparse.Namespace) -> Workload:
    from peft_greentrainer.cli.embedded import EMBEDDED_MODEL, embedded_model_path

    print("Preparing the embedded model (converted once, then cached)...", file=sys.stderr)
    path = str(embedded_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    train = load_examples(None, "train", limit=args.train_examples, seed=args.seed)
    evals = load_examples(None, "eval", limit=args.eval_examples, seed=args.seed)

    def new_model() -> nn.Module:
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    columns = tokenize_causal(tokenizer, train, PAPER_TEMPLATE, args.max_source_tokens, args.max_target_tokens)
    return Workload(EMBEDDED_MODEL, "aclsum", new_model, tokenizer, columns, evals, PAPER_TEMPLATE, args.batch_size)


QUICK_WORDS = [
    *("model", "data", "train", "loss", "layer", "token", "weight", "graph", "paper", "method", "result", "task"),
    *("score", "text", "input", "output", "budget", "energy", "speed", "cost", "memory", "network", "attention"),
    *("vector", "matrix", "gradient", "update", "epoch", "batch", "sample", "label", "value", "error", "signal"),
]


def quick_tokenizer():
    """A word-level tokenizer built in-process (no download): whitespace split, one id per word."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["[PAD]", "[UNK]", "[EOS]"]
    vocab = {word: i for i, word in enumerate([*specials, "TL;DR:", *QUICK_WORDS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        eos_token="[EOS]",
        model_input_names=["input_ids", "attention_mask"],
    )


def quick_examples(count: int, seed: int) -> list[Example]:
    """Synthetic "summaries": the source is 12 random words, the target its first three."""
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        words = [rng.choice(QUICK_WORDS) for _ in range(12)]
        examples.append(Example(" ".join(words), " ".join(words[:3])))
    return examples


def quick_workload(args: argparse.Namespace) -> Workload:
    tokenizer = quick_tokenizer()
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(args.seed)
    template_model = transformers.LlamaForCausalLM(config)
    examples = quick_examples(args.train_examples + args.eval_examples, args.seed)
    train, evals = examples[: args.train_examples], examples[args.train_examples :]
    columns = tokenize_causal(tokenizer, train, PAPER_TEMPLATE, args.max_source_tokens, args.max_target_tokens)
    return Workload(
        "tiny LlamaForCausalLM (hidden 64, 3 layers, untied head)",
        "synthetic (target = first 3 words)",
        lambda: copy.deepcopy(template_model),
        tokenizer,
        columns,
        evals,
        PAPER_TEMPLATE,
        args.batch_size,
    )


# ------------------------------------------------------------------------------------------------- measurement
class FixedOrderSampler(torch.utils.data.Sampler):
    """Epoch ``e`` visits ``permutation(seed, e)``: the same batches in the same order for every method.

    Its own generator, so nothing a method does to the global RNG (LoRA init, importance passes) changes the order.
    """

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed
        self.orders: list[list[int]] = []

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        order = np.random.default_rng([self.seed, len(self.orders)]).permutation(self.size).tolist()
        self.orders.append(order)
        return iter(order)


class OrderedTrainer(transformers.Trainer):
    def __init__(self, *args, sampler: FixedOrderSampler, **kwargs):
        self.fixed_sampler = sampler
        super().__init__(*args, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        return self.fixed_sampler


class RssSampler:
    """Peak resident set size (MiB) while the block runs, sampled from /proc/self/status by a background thread.

    ``ru_maxrss`` would be the peak over the process lifetime (every earlier method included), hence the sampling.
    """

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.peak = 0.0
        self._stop = threading.Event()

    @staticmethod
    def current() -> float | None:
        try:
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current() or 0.0)
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        if self.current() is None:  # no /proc: fall back to the lifetime peak
            return self
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if hasattr(self, "_thread"):
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self.current() or 0.0)
        else:
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def release_memory() -> None:
    """Free the previous method's model and hand freed heap back to the OS, so the next RSS peak starts low."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# ------------------------------------------------------------------------------------------------- methods
@dataclass
class Method:
    """One configured method, ready for the Trainer.

    ``schedule()`` gives, after training, the (first step, predicted FLOPs per step) pairs in force during the run.
    """

    key: str
    name: str
    kind: str  # "tensors" or "lora": which learning rate it uses
    model: nn.Module
    callbacks: list = field(default_factory=list)
    schedule: Callable[[], list[tuple[int, float]]] = lambda: []
    selection_seconds: Callable[[], float] = lambda: 0.0
    notes: Callable[[], str] = lambda: ""
    selections: Callable[[], list[list[str]]] = lambda: []  # units chosen at each selection, if it selects


def block_index(name: str) -> int | None:
    """Index of the transformer block a parameter belongs to (``...layers.7.mlp...`` -> 7), None outside blocks."""
    match = re.search(r"\.(?:layers|h|blocks|layer)\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def setup_full(work: Workload) -> Method:
    model = work.new_model()
    for param in model.parameters():
        param.requires_grad_(True)
    full = work.base_costs(model).full_flops
    return Method("full", "full fine-tuning", "tensors", model, schedule=lambda: [(0, full)], notes=lambda: "all")


def setup_lora(work: Workload) -> Method:
    base = work.new_model()
    full = work.base_costs(base).full_flops
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    inner = model.base_model.model
    units = lora_units(inner, "default")
    costs = profile_model(inner, work.example).unit_costs(units, full_flops=full)
    predicted = costs.predicted_flops(np.ones(len(costs.units), bool))
    return Method(
        "lora",
        "LoRA r=8 (q,k,v,o)",
        "lora",
        model,
        schedule=lambda: [(0, predicted)],
        notes=lambda: f"{len(units)} adapters",
    )


def top_k_mask(costs: UnitCosts, k: int, num_blocks: int) -> np.ndarray:
    """Units of the last ``k`` blocks, plus the units above every block in backward order (final norm, untied head).

    A head tied to the input embedding is the deepest unit (it is the embedding), so it is never part of FT-top-k.
    """
    blocks = [block_index(u.name) for u in costs.units]
    first_block = next(i for i, b in enumerate(blocks) if b is not None)
    return np.array(
        [i < first_block or (b is not None and b >= num_blocks - k) for i, b in enumerate(blocks)], dtype=bool
    )


def setup_top_k(work: Workload, rho: float = BASELINE_RHO) -> Method:
    model = work.new_model()
    costs = work.base_costs(model)
    num_blocks = 1 + max(b for b in map(block_index, (u.name for u in costs.units)) if b is not None)
    budget = rho * costs.full_flops
    fitting = [k for k in range(num_blocks + 1) if costs.predicted_flops(top_k_mask(costs, k, num_blocks)) <= budget]
    if not fitting:
        raise SystemExit(f"FT-top-k: not even the final norm and head fit rho={rho}")
    k = max(fitting)
    mask = top_k_mask(costs, k, num_blocks)
    trained = {id(p) for unit, keep in zip(costs.units, mask, strict=True) if keep for p in unit.parameters(model)}
    for param in model.parameters():
        param.requires_grad_(id(param) in trained)
    predicted = costs.predicted_flops(mask)
    head = [u.name for u, keep in zip(costs.units, mask, strict=True) if keep and block_index(u.name) is None]
    return Method(
        "top_k",
        f"FT-top-k (k={k}, rho {rho})",
        "tensors",
        model,
        schedule=lambda: [(0, predicted)],
        notes=lambda: f"last {k} of {num_blocks} blocks + {', '.join(head) or 'nothing else'}",
    )


class RandomSelection(TrainerCallback):
    """Each epoch: random positive importances (seeded), the same exact DP as GreenTrainer, applied as flags."""

    def __init__(self, tuner, example: dict, rho: float, seed: int):
        self.tuner, self.example, self.rho = tuner, example, rho
        self.rng = np.random.default_rng(seed)
        self.records: list[tuple[int, float, list[str]]] = []  # (step, predicted FLOPs, units selected)
        self.seconds = 0.0

    def on_epoch_begin(self, args, state, control, **kwargs):
        start = time.perf_counter()
        costs = self.tuner.unit_costs(self.example)  # profile cached by the tuner
        importance = self.rng.uniform(0.01, 1.0, len(costs.units))
        resolution = self.tuner.greentrainer_config.dp_resolution
        selection = select_units(
            importance,
            costs.t_dw,
            costs.t_dy,
            costs.forward_flops,
            self.rho,
            full_flops=costs.full_flops,
            dy_head=costs.dy_head,
            resolution=resolution,
        )
        names = [u.name for u, keep in zip(costs.units, selection.mask, strict=True) if keep]
        self.tuner.restore_selection(names)
        self.seconds += time.perf_counter() - start
        self.records.append((state.global_step, selection.flops, names))


def setup_random(work: Workload, seed: int, rho: float = BASELINE_RHO) -> Method:
    model = get_peft_model(work.new_model(), GreenTrainerConfig(units="tensors", rho=rho, task_type="CAUSAL_LM"))
    tuner = model.base_model
    total = len(tuner.unit_costs(work.example).units)  # profiles now, outside the timed selection
    callback = RandomSelection(tuner, work.example, rho, seed)
    return Method(
        "random",
        f"random selection (rho {rho})",
        "tensors",
        model,
        callbacks=[callback],
        schedule=lambda: [(s, f) for s, f, _ in callback.records],
        selection_seconds=lambda: callback.seconds,
        notes=lambda: f"{'/'.join(str(len(n)) for _, _, n in callback.records)} of {total} tensors per epoch",
        selections=lambda: [names for _, _, names in callback.records],
    )


def setup_greentrainer(work: Workload, units: str, rho: float, importance_batches: int) -> Method:
    lora = {"r": 8, "lora_alpha": 16, "target_modules": LORA_TARGETS} if units == "lora" else {}
    config = GreenTrainerConfig(
        units=units, rho=rho, importance_batches=importance_batches, task_type="CAUSAL_LM", **lora
    )
    model = get_peft_model(work.new_model(), config)
    tuner = model.base_model
    floor = tuner.min_feasible_rho(work.example)  # also profiles now, outside the timed selection
    if rho < floor:
        raise SystemExit(f"GreenTrainer units={units}: rho={rho} is below this model's feasible floor {floor:.4f}")
    full = tuner.cost_profile(work.example)[1]
    total = len(tuner.unit_costs(work.example).units)
    kind = "adapters" if units == "lora" else "tensors"
    history = tuner.greentrainer_state.history
    return Method(
        f"gt_{units}_{rho}",
        f"GreenTrainer {units} rho {rho}",
        units,
        model,
        callbacks=[GreenTrainerCallback()],
        schedule=lambda: [(r.step, r.predicted_ratio * full) for r in history],
        selection_seconds=lambda: sum(r.seconds for r in history),
        notes=lambda: f"{'/'.join(str(len(r.selected)) for r in history)} of {total} {kind} per epoch",
        selections=lambda: [list(r.selected) for r in history],
    )


def setup(key: str, work: Workload, args: argparse.Namespace) -> Method:
    if key == "full":
        return setup_full(work)
    if key == "lora":
        return setup_lora(work)
    if key == "top_k":
        return setup_top_k(work)
    if key == "random":
        return setup_random(work, args.seed)
    _, units, rho = key.split("_")
    return setup_greentrainer(work, units, float(rho), args.importance_batches)


# ------------------------------------------------------------------------------------------------- running
def evaluate(model: nn.Module, work: Workload, args: argparse.Namespace) -> dict[str, float]:
    predictions = generate(
        model,
        work.tokenizer,
        work.eval_examples,
        work.template,
        max_source_tokens=args.max_source_tokens,
        max_new_tokens=args.max_new_tokens,
        progress=False,
    )
    return rouge(predictions, [e.target for e in work.eval_examples])


def train_method(method: Method, work: Workload, args: argparse.Namespace) -> dict:
    lr = args.lr_lora if method.kind == "lora" else args.lr_tensors
    sampler = FixedOrderSampler(len(work.train_columns["input_ids"]), args.seed)
    meter = StepMeter(every=args.measure_every)
    with tempfile.TemporaryDirectory() as scratch:
        training_args = training_arguments(
            scratch,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=lr,
            seed=args.seed,
            max_steps=args.max_steps or -1,
            quiet=True,
        )
        transformers.set_seed(args.seed)
        trainer = OrderedTrainer(
            model=method.model,
            args=training_args,
            train_dataset=TensorDataset(work.train_columns),
            callbacks=[*method.callbacks, meter],
            sampler=sampler,
        )
        trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
        release_memory()
        with RssSampler() as rss:
            start = time.perf_counter()
            trainer.train()
            train_seconds = time.perf_counter() - start
    steps = trainer.state.global_step
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    scores = evaluate(method.model, work, args)

    schedule = sorted(method.schedule())
    per_step = [next(f for s, f in reversed(schedule) if s <= step) for step in range(steps)]
    counted = [s for s in meter.to_list() if s["flops"] is not None]
    errors = [abs(s["flops"] - per_step[s["step"]]) / per_step[s["step"]] for s in counted if s["step"] < steps]
    uncounted = meter.uncounted_seconds()
    selection_seconds = method.selection_seconds()
    return {
        "key": method.key,
        "method": method.name,
        "kind": method.kind,
        "lr": lr,
        "trained": method.notes(),
        "steps": steps,
        "measured_flops_per_step": statistics.fmean(s["flops"] for s in counted) if counted else None,
        "counted_steps": [s["step"] for s in counted],
        "predicted_flops_per_step": statistics.fmean(per_step) if per_step else None,
        "predicted_total_flops": float(sum(per_step)),
        "measured_vs_predicted_max_rel_error": max(errors) if errors else None,
        "median_step_seconds": statistics.median(uncounted) if uncounted else None,
        "train_seconds": train_seconds,
        "selection_seconds": selection_seconds,
        "selection_overhead": selection_seconds / max(train_seconds, 1e-9),
        "peak_rss_mib": rss.peak,
        "train_loss_first": statistics.fmean(losses[:5]) if losses else None,
        "train_loss_last": statistics.fmean(losses[-5:]) if losses else None,
        "rouge": scores,
        "selections": method.selections(),
        "step_measurements": meter.to_list(),
        "batch_orders": sampler.orders,
    }


def add_ratios(rows: list[dict], reference_flops: float) -> None:
    """FLOPs and wall-clock ratios to full fine-tuning (measured in this process when it ran)."""
    full = next((r for r in rows if r["key"] == "full"), None)
    flops_ref = full["measured_flops_per_step"] if full and full["measured_flops_per_step"] else reference_flops
    time_ref = full["median_step_seconds"] if full else None
    for row in rows:
        measured = row["measured_flops_per_step"]
        row["flops_ratio"] = measured / flops_ref if measured is not None else None
        row["predicted_flops_ratio"] = row["predicted_flops_per_step"] / reference_flops
        seconds = row["median_step_seconds"]
        row["wall_ratio"] = seconds / time_ref if seconds is not None and time_ref else None


# ------------------------------------------------------------------------------------------------- output
def fmt(value: Any, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def table(rows: list[dict]) -> str:
    header = [
        "method",
        "lr",
        "measured FLOPs/step",
        "FLOPs ratio",
        "analytical total FLOPs",
        "wall ratio",
        "median step s",
        "peak RSS MiB",
        "ROUGE-1",
        "ROUGE-2",
        "ROUGE-L",
        "loss first→last",
        "selection overhead",
        "trained",
    ]
    body = [
        [
            r["method"],
            fmt(r["lr"], "g"),
            fmt(r["measured_flops_per_step"], ".3e"),
            fmt(r["flops_ratio"], ".3f"),
            fmt(r["predicted_total_flops"], ".3e"),
            fmt(r["wall_ratio"], ".2f"),
            fmt(r["median_step_seconds"], ".3f"),
            fmt(r["peak_rss_mib"], ".0f"),
            fmt(r["rouge"]["rouge1"], ".2f"),
            fmt(r["rouge"]["rouge2"], ".2f"),
            fmt(r["rouge"]["rougeL"], ".2f"),
            f"{fmt(r['train_loss_first'], '.3f')} → {fmt(r['train_loss_last'], '.3f')}",
            f"{fmt(100 * r['selection_overhead'], '.1f')}%" if r["selection_seconds"] else "-",
            r["trained"],
        ]
        for r in rows
    ]
    return markdown_table(header, body)


def plot(rows: list[dict], base_rouge_l: float, path: Path) -> None:
    """ROUGE-L against the measured FLOPs ratio: one numbered point per method, the names in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    points = [
        (row["flops_ratio"] if row["flops_ratio"] is not None else row["predicted_flops_ratio"], row["rouge"]["rougeL"])
        for row in rows
    ]
    y_span = max(1.0, max(y for _, y in points) - min(y for _, y in points), abs(base_rouge_l))
    for number, (row, (x, y)) in enumerate(zip(rows, points, strict=True), 1):
        star = row["key"].startswith("gt_")
        label = f"{number}. {row['method']}"
        ax.scatter([x], [y], s=90 if star else 45, marker="*" if star else "o", zorder=3, label=label)
        # the numbers of (nearly) coinciding points are stacked instead of drawn over each other
        near = sum(abs(x - px) < 0.04 and abs(y - py) < 0.05 * y_span for px, py in points[: number - 1])
        ax.annotate(str(number), (x, y), textcoords="offset points", xytext=(5, 4 + 9 * near), fontsize=8)
    ax.axhline(base_rouge_l, color="grey", linestyle="--", linewidth=1, label="base model, no fine-tuning")
    ax.set_xlabel("training FLOPs per step / full fine-tuning (measured)")
    ax.set_ylabel("ROUGE-L (held-out)")
    ax.set_xlim(0, 1.1)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    ax.set_title("Quality against training FLOPs")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def command_line(argv: Sequence[str]) -> str:
    return shlex.join(["python", "benchmarks/compare.py", *argv])


def write_outputs(result: dict, output_dir: Path) -> str:
    output_dir.mkdir(parents=True, exist_ok=True)
    setup_text = result["setup"]
    base = result["base_rouge"]
    lines = [
        "# GreenTrainer side-by-side benchmark",
        "",
        f"Command: `{result['command']}`  ",
        f"torch {result['versions']['torch']} with {result['torch_threads']} threads, transformers "
        f"{result['versions']['transformers']}, peft {result['versions']['peft']}, {result['cpu']}; total "
        f"{result['total_seconds'] / 60:.1f} min.",
        "",
        setup_text,
        "",
        f"Base model before fine-tuning: ROUGE-1/2/L {base['rouge1']:.2f} / {base['rouge2']:.2f} / "
        f"{base['rougeL']:.2f}. Same batches in the same order for every method: "
        f"{'yes' if result['same_batch_order'] else 'NO'}.",
        "",
        table(result["rows"]),
        "",
        "FLOPs ratio: mean FLOPs of the counted steps (FlopCounterMode, one step in "
        f"{result['config']['measure_every']}) over those of full fine-tuning. Analytical total: per-step FLOPs "
        "predicted by the cost profile, summed over the run. Wall ratio: median time of the uncounted steps over full "
        "fine-tuning's (same process). Peak RSS: sampled while that method trained. Selection overhead: importance + "
        "DP time as a share of that method's training time.",
        "",
        "![ROUGE-L against FLOPs ratio](compare.png)",
        "",
    ]
    text = "\n".join(lines)
    (output_dir / "compare.md").write_text(text)
    (output_dir / "compare.json").write_text(json.dumps(result, indent=2, default=float))
    plot(result["rows"], base["rougeL"], output_dir / "compare.png")
    return text


# ------------------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = resolve(build_parser().parse_args(argv))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()

    work = quick_workload(args) if args.quick else real_workload(args)
    n_train = len(work.train_columns["input_ids"])
    steps = (n_train // args.batch_size) * args.epochs
    if args.max_steps:
        steps = min(steps, args.max_steps)
    setup_text = (
        f"Model {work.label}, data {work.data_label}: {n_train} training examples, {args.epochs} epochs, batch "
        f"{args.batch_size} x {work.train_columns['input_ids'].shape[1]} tokens, {steps} steps per method; prompt "
        f"`{work.template}`; AdamW, constant lr {args.lr_tensors:g} for base tensors (full FT, FT-top-k, random, "
        f"GreenTrainer tensors) and {args.lr_lora:g} for LoRA adapters (LoRA, GreenTrainer lora)"
        f"{' (quick run: larger lrs, chosen for a random-init tiny model)' if args.quick else ' (the CLI defaults)'}; "
        f"evaluation: greedy, {len(work.eval_examples)} held-out examples, up to {args.max_new_tokens} new tokens; "
        f"seed {args.seed}; GreenTrainer importance from {args.importance_batches} batches per selection."
    )
    print(setup_text, file=sys.stderr)
    print(f"torch threads: {torch.get_num_threads()}; methods: {', '.join(args.methods)}", file=sys.stderr)

    transformers.set_seed(args.seed)
    base_model = work.new_model()
    reference_flops = work.base_costs(base_model).full_flops
    base_rouge = evaluate(base_model, work, args)
    del base_model
    print(f"base model ROUGE-L {base_rouge['rougeL']:.2f}", file=sys.stderr)

    rows = []
    for key in args.methods:
        release_memory()
        transformers.set_seed(args.seed)  # the same LoRA initialisation for LoRA and GreenTrainer lora
        method = setup(key, work, args)
        row = train_method(method, work, args)
        rows.append(row)
        seconds, rouge_l = row["train_seconds"], row["rouge"]["rougeL"]
        print(f"{row['method']}: {seconds:.0f} s, {row['steps']} steps, ROUGE-L {rouge_l:.2f}", file=sys.stderr)
        del method

    add_ratios(rows, reference_flops)
    orders = [row.pop("batch_orders") for row in rows]
    result = {
        "command": command_line(argv),
        "setup": setup_text,
        "torch_threads": torch.get_num_threads(),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": __import__("peft").__version__,
            "python": platform.python_version(),
        },
        "cpu": f"{os.cpu_count()} CPU cores, {'CUDA' if torch.cuda.is_available() else 'no GPU'}",
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
    text = write_outputs(result, args.output_dir)
    print(text)
    print(f"Wrote compare.md, compare.json and compare.png to {args.output_dir}/", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
