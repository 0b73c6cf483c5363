"""What every method of a comparison shares: the base model factory, the tokenizer and the tokenized data.

Two workloads: the embedded SmolLM2-135M-Instruct on ACLSum (real model, real data, offline), and a tiny config-built
LLaMA with a word-level tokenizer on synthetic data (``--quick``: seconds, for tests and smoke runs).
"""

from __future__ import annotations

import copy
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from torch import nn

from peft_greentrainer.cli.data import ACLSUM_QUESTIONS, PAPER_TEMPLATE, Example, aclsum_examples, tokenize_causal
from peft_greentrainer.engine.costs import UnitCosts
from peft_greentrainer.engine.profile import CostProfile, profile_model
from peft_greentrainer.engine.units import tensor_units


@dataclass
class DataSizes:
    """How many examples of each role a workload holds (``None``: the whole split)."""

    train: int | None
    generate: int  # held-out pairs scored by ROUGE after greedy decoding
    heldout: dict[str, int | None] = field(default_factory=dict)  # split -> pairs scored by teacher-forced loss
    max_source_tokens: int = 160
    max_target_tokens: int = 48


@dataclass
class Workload:
    """The base model factory, the tokenizer, and the tokenized data of one comparison."""

    label: str
    data_label: str
    new_model: Callable[[], nn.Module]
    tokenizer: Any
    train_columns: dict[str, torch.Tensor]
    eval_examples: list[Example]  # scored by ROUGE after generation
    template: str
    batch_size: int
    heldout: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # split -> tokenized pairs
    _base_profile: CostProfile | None = None

    @property
    def example(self) -> dict[str, torch.Tensor]:
        """The batch shape every step has (sequences are padded to one length): the one the profiles are made for."""
        return {k: v[: self.batch_size] for k, v in self.train_columns.items()}

    @property
    def train_size(self) -> int:
        return len(self.train_columns["input_ids"])

    def base_costs(self, model: nn.Module) -> UnitCosts:
        """Cost profile of the base model (all tensors units), made once: full FT, FT-top-k, LISA and BAdam."""
        if self._base_profile is None:
            self._base_profile = profile_model(model, self.example)
        return self._base_profile.unit_costs(tensor_units(model))


def question_last(abstract: str, question: str) -> str:
    """The benchmarks' ACLSum source: the abstract, then the aspect question, cut from the end to the source limit, so
    that a prompt keeps the question only where it fits (135 of the 300 training pairs at 160 tokens).

    The CLI now puts the question first (``aclsum_source``); the benchmarks keep the format every stored result
    (protocol, compare) was made with, because a protocol result file is keyed by method, learning rate, seed and
    protocol settings, not by the prompts: runs on other prompts would join the stored ones in one report.
    """
    return f"{abstract}\n{question}"


def aclsum_validation() -> list[Example]:
    """ACLSum's validation split (50 papers x 3 aspects), aspect-major like the CLI's train and test loaders.

    The CLI's ``aclsum_examples`` offers "train" and "eval" (the test split) only; choosing learning rates on the test
    split would leak, hence this loader.
    """
    import datasets

    from peft_greentrainer.cli.embedded import aclsum_dir

    papers = datasets.load_dataset("json", data_files=str(aclsum_dir() / "val.jsonl"), split="train")
    return [
        Example(question_last(" ".join(paper["sentences"]["abstract"]), question), paper["summary"][aspect])
        for aspect, question in ACLSUM_QUESTIONS.items()
        for paper in papers
    ]


def interleave_aspects(examples: list[Example], limit: int | None) -> list[Example]:
    """The first ``limit`` pairs after interleaving the three aspect-major thirds, so a prefix covers all aspects."""
    per = len(examples) // 3
    mixed = [examples[a * per + i] for i in range(per) for a in range(3)]
    return mixed[:limit] if limit else mixed


def real_workload(sizes: DataSizes, batch_size: int, seed: int) -> Workload:
    """The embedded SmolLM2-135M-Instruct (fp32) on ACLSum; splits "val" and "test" can be held out for loss."""
    from peft_greentrainer.cli.embedded import EMBEDDED_MODEL, embedded_model_path

    print("Preparing the embedded model (converted once, then cached)...", file=sys.stderr)
    path = str(embedded_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    splits = {
        "train": lambda: aclsum_examples("train", sizes.train, source=question_last),
        "val": aclsum_validation,
        "test": lambda: aclsum_examples("eval", source=question_last),
    }
    evals = aclsum_examples("eval", sizes.generate, source=question_last)

    def new_model() -> nn.Module:
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    def tokenize(examples: list[Example]) -> dict[str, torch.Tensor]:
        return tokenize_causal(tokenizer, examples, PAPER_TEMPLATE, sizes.max_source_tokens, sizes.max_target_tokens)

    heldout = {split: tokenize(interleave_aspects(splits[split](), limit)) for split, limit in sizes.heldout.items()}
    return Workload(
        EMBEDDED_MODEL,
        "aclsum",
        new_model,
        tokenizer,
        tokenize(splits["train"]()),
        evals,
        PAPER_TEMPLATE,
        batch_size,
        heldout,
    )


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


def quick_workload(sizes: DataSizes, batch_size: int, seed: int) -> Workload:
    """A tiny random-init LLaMA (hidden 64, 3 layers) learning to copy the first three words of 12."""
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
    torch.manual_seed(seed)
    template_model = transformers.LlamaForCausalLM(config)
    heldout_sizes = {split: limit or sizes.generate for split, limit in sizes.heldout.items()}
    examples = quick_examples(sizes.train + sizes.generate + sum(heldout_sizes.values()), seed)
    train, rest = examples[: sizes.train], examples[sizes.train :]
    evals, rest = rest[: sizes.generate], rest[sizes.generate :]

    def tokenize(examples: list[Example]) -> dict[str, torch.Tensor]:
        return tokenize_causal(tokenizer, examples, PAPER_TEMPLATE, sizes.max_source_tokens, sizes.max_target_tokens)

    heldout = {}
    for split, limit in heldout_sizes.items():
        part, rest = rest[:limit], rest[limit:]
        heldout[split] = tokenize(part)
    return Workload(
        "tiny LlamaForCausalLM (hidden 64, 3 layers, untied head)",
        "synthetic (target = first 3 words)",
        lambda: copy.deepcopy(template_model),
        tokenizer,
        tokenize(train),
        evals,
        PAPER_TEMPLATE,
        batch_size,
        heldout,
    )
