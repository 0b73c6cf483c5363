"""Training data for the CLI: load source/target pairs with ``datasets`` and tokenize them for causal or seq2seq LMs.

Rows are tokenized right-padded to the longest the token limits allow; with ``--padding longest`` (the default for
decoder-only models) ``TrimToLongest`` then cuts each batch to its longest row, as transformers' and TRL's collators
pad, so a batch of short texts does not pay for the longest the limits admit. GreenTrainer prices each new batch
length before its step.
"""

from __future__ import annotations

import codecs
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..engine.targets import IGNORE_INDEX
from .embedded import EMBEDDED_DATASET, aclsum_dir

logger = logging.getLogger(__name__)

PAPER_TEMPLATE = "{input} TL;DR:"  # the paper's prompt for SciTLDR
ACLSUM_QUESTIONS = {
    "challenge": "What problem does the paper address?",
    "approach": "What do the authors propose?",
    "outcome": "What did they find?",
}
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


class DataError(ValueError):
    """The dataset cannot be used as given; the message says why and what to pass instead."""


@dataclass(frozen=True)
class Example:
    source: str
    target: str


def _read_file(path: Path, builder: str):
    """The rows of a local data file, or a DataError that says what is wrong with it."""
    import datasets

    formats = {"json": "JSON lines (one object per line) or a JSON array", "csv": "CSV with a header row"}
    expected = f"it must be UTF-8 {formats.get(builder, builder)}"
    if path.stat().st_size == 0:
        raise DataError(f"dataset file {path} is empty")
    if builder in formats:
        _check_utf8(path, builder, expected)
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its builders log a failed read with a traceback
    try:
        # CSV cells are text: the builder's type guess made answers 42 read as 42.0 (a blank cell elsewhere in the
        # column), zip codes lose their leading zero and "3.10" become 3.1
        # ("None", "NA" or "n/a" stay text too; an empty cell is an empty text, skipped as such)
        as_text = {"features": _csv_text_features(path), "keep_default_na": False} if builder == "csv" else {}
        rows = datasets.load_dataset(builder, data_files=str(path), split="train", **as_text)
    except (datasets.exceptions.DatasetGenerationError, UnicodeDecodeError, ValueError, RuntimeError) as error:
        cause = error.__cause__ or error.__context__ or error
        raise DataError(f"cannot read {path} as {builder} ({type(cause).__name__}: {cause}); {expected}") from error
    finally:
        datasets.logging.set_verbosity(verbosity)
    if len(rows) == 0:
        raise DataError(f"dataset file {path} holds no rows; {expected}")
    return rows


def _csv_text_features(path: Path):
    """Every column of a CSV file read as text, its names as the csv builder's pandas reads them."""
    import datasets
    import pandas

    columns = pandas.read_csv(path, nrows=0, keep_default_na=False).columns
    return datasets.Features({str(name): datasets.Value("string") for name in columns})


def _check_utf8(path: Path, builder: str, expected: str) -> None:
    """Refuse a text file that is not UTF-8 before reading it: the json builder loads other bytes without a word, and
    they failed later, while rows were read, with a bare codec message naming no file."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    read = 0
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(1 << 20)
            start = read - len(decoder.getstate()[0])  # where the decoder's input begins: a split character's bytes
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as error:
                raise DataError(
                    f"cannot read {path} as {builder} (UnicodeDecodeError: byte {start + error.start} is not UTF-8, "
                    f"{error.reason}); {expected}"
                ) from error
            if not chunk:
                return
            read += len(chunk)


def load_examples(
    dataset: str | None,
    split: str,
    *,
    input_field: str = "input",
    target_field: str = "target",
    limit: int | None = None,
    seed: int = 0,
) -> list[Example]:
    """Source/target pairs of ``split`` ("train" or "eval").

    ``dataset`` is ``None``/"aclsum" (the embedded ACLSum), a local json/jsonl/csv/parquet file (its last 20% is
    the eval split), or a hub dataset name (needs network; uses its "validation" or "test" split for eval).
    """
    import datasets

    if dataset in (None, EMBEDDED_DATASET):
        return aclsum_examples(split, limit)
    path = Path(dataset)
    suffix = path.suffix.lower()  # data.JSONL as data.jsonl
    if suffix in FILE_BUILDERS or path.exists():
        if path.is_dir():
            raise DataError(f"dataset {dataset} is a directory; pass one json/jsonl/csv/parquet file in it")
        if not path.is_file():
            raise DataError(f"dataset file {dataset} does not exist")
        builder = FILE_BUILDERS.get(suffix)
        if builder is None:
            raise DataError(f"unsupported dataset file type {path.suffix!r}; use one of {sorted(FILE_BUILDERS)}")
        rows = _read_file(path, builder)
        rows = rows.shuffle(seed=seed)
        cut = max(1, int(len(rows) * 0.8)) if len(rows) > 1 else len(rows)
        # a one-row file holds out nothing; `or []`: datasets takes an empty range past its end for an index error
        rows = rows.select(range(cut)) if split == "train" else rows.select(range(cut, len(rows)) or [])
    else:
        try:
            loaded = datasets.load_dataset(dataset)
        except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as error:
            raise DataError(
                f"dataset {dataset!r} is neither a local json/jsonl/csv/parquet file nor a dataset that could be "
                f"loaded from the Hugging Face Hub ({type(error).__name__}); pass a file path, or check the name and "
                "the network"
            ) from error
        names = ["train"] if split == "train" else [s for s in ("validation", "test") if s in loaded]
        if not names or names[0] not in loaded:
            raise DataError(f"dataset {dataset} has no {split} split (has {sorted(loaded)})")
        rows = loaded[names[0]]
    missing = [f for f in (input_field, target_field) if f not in rows.column_names]
    if missing:
        raise DataError(
            f"dataset {dataset} has no field {', '.join(map(repr, missing))}; its fields are "
            f"{rows.column_names}: pass --input-field and --target-field"
        )
    complete, null, empty = [], 0, 0
    for row in rows:
        values = [row[input_field], row[target_field]]
        for field, value in zip((input_field, target_field), values, strict=True):
            if isinstance(value, (list, dict)):  # str() would train on its Python repr
                raise DataError(
                    f"field {field!r} of dataset {dataset} holds {type(value).__name__}s, not text: --input-field and "
                    "--target-field must name columns of text (a chat 'messages' column is not one)"
                )
        if any(value is None for value in values):
            null += 1
        elif any(not str(value).strip() for value in values):
            empty += 1
        else:
            complete.append(row)
    if len(rows) and not complete:  # an empty split (a one-row file's eval split) is the caller's to refuse
        raise DataError(
            f"every {split} row of {dataset} lacks {input_field!r} or {target_field!r} (null, missing or empty)"
        )
    if null or empty:  # a null would otherwise be trained on as the text "None", an empty text on nothing
        logger.warning(
            "Skipped %d of %d %s rows of %s without %r or %r (%d null or missing, %d empty).",
            null + empty,
            len(rows),
            split,
            dataset,
            input_field,
            target_field,
            null,
            empty,
        )
    examples = [Example(str(r[input_field]), str(r[target_field])) for r in complete]
    return examples[:limit] if limit else examples


def aclsum_source(abstract: str, question: str) -> str:
    """The aspect question, then the abstract: a source cut to ``--max-source-tokens`` loses the abstract's end, never
    the question (after the abstract, it was cut from about half the prompts at 160 tokens, which then showed one
    abstract with the targets of several aspects)."""
    return f"{question}\n{abstract}"


def aclsum_examples(
    split: str, limit: int | None = None, source: Callable[[str, str], str] = aclsum_source
) -> list[Example]:
    """ACLSum's "train" or "eval" (its test split) pairs, the source made by ``source(abstract, question)``."""
    import datasets

    file = aclsum_dir() / ("train.jsonl" if split == "train" else "test.jsonl")
    papers = datasets.load_dataset("json", data_files=str(file), split="train")
    examples = []
    for aspect, question in ACLSUM_QUESTIONS.items():  # aspect-major: a prefix of the list covers all papers
        for paper in papers:
            abstract = " ".join(paper["sentences"]["abstract"])
            examples.append(Example(source(abstract, question), paper["summary"][aspect]))
    if limit:
        # interleave aspects so a small limit still sees all three
        per = len(papers)
        examples = [examples[a * per + i] for i in range(per) for a in range(3)]
        examples = examples[:limit]
    return examples


def _fit(ids: list[int], length: int) -> list[int]:
    return ids[: max(length, 0)]


def tokenize_causal(
    tokenizer,
    examples: Sequence[Example],
    template: str,
    max_source_tokens: int,
    max_target_tokens: int,
) -> dict[str, torch.Tensor]:
    """Prompt + target + EOS, the prompt masked out of the labels, right-padded to one fixed length."""
    prefix, _, suffix = template.partition("{input}")
    prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else []
    suffix_ids = tokenizer(suffix, add_special_tokens=False)["input_ids"] if suffix else []
    room = max_source_tokens - len(prefix_ids) - len(suffix_ids)
    if room < 1:
        raise DataError(f"the template takes {max_source_tokens - room} tokens; raise --max-source-tokens")
    length = max_source_tokens + max_target_tokens + 1
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
    for example in examples:
        source = _fit(tokenizer(example.source, add_special_tokens=False)["input_ids"], room)
        prompt = prefix_ids + source + suffix_ids
        target = _fit(tokenizer(" " + example.target, add_special_tokens=False)["input_ids"], max_target_tokens)
        ids = prompt + target + [tokenizer.eos_token_id]
        labels = [IGNORE_INDEX] * len(prompt) + target + [tokenizer.eos_token_id]
        padding = length - len(ids)
        rows["input_ids"].append(ids + [pad] * padding)
        rows["attention_mask"].append([1] * len(ids) + [0] * padding)
        rows["labels"].append(labels + [IGNORE_INDEX] * padding)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in rows.items()}


def tokenize_seq2seq(
    tokenizer,
    examples: Sequence[Example],
    template: str,
    max_source_tokens: int,
    max_target_tokens: int,
) -> dict[str, torch.Tensor]:
    """Encoder input = the filled template, labels = the target, both padded to fixed lengths."""
    prefix, _, suffix = template.partition("{input}")  # as tokenize_causal and the evaluation prompt do
    # padded on the right whatever the tokenizer's own side: batches are cut from the right (TrimToLongest)
    sources = tokenizer(
        [prefix + e.source + suffix for e in examples],
        max_length=max_source_tokens,
        truncation=True,
        padding="max_length",
        padding_side="right",
        return_tensors="pt",
    )
    targets = tokenizer(
        [e.target for e in examples],
        max_length=max_target_tokens,
        truncation=True,
        padding="max_length",
        padding_side="right",
        return_tensors="pt",
    )
    labels = targets["input_ids"].masked_fill(targets["attention_mask"] == 0, IGNORE_INDEX)
    return {"input_ids": sources["input_ids"], "attention_mask": sources["attention_mask"], "labels": labels}


def count_cuts(
    tokenizer,
    examples: Sequence[Example],
    template: str,
    max_source_tokens: int,
    max_target_tokens: int,
    encoder_decoder: bool,
) -> dict[str, int]:
    """How many sources and targets the limits cut, as ``tokenize_causal`` / ``tokenize_seq2seq`` cut them, and the
    most tokens cut from one; for evaluation examples, a target "cut" is a reference longer than what is generated."""
    prefix, _, suffix = template.partition("{input}")
    if not examples:
        sources, targets, room = [], [], max_source_tokens
    elif encoder_decoder:  # with the special tokens the tokenizer adds, as tokenize_seq2seq counts them
        sources = tokenizer([prefix + e.source + suffix for e in examples])["input_ids"]
        targets = tokenizer([e.target for e in examples])["input_ids"]
        room = max_source_tokens
    else:
        sources = tokenizer([e.source for e in examples], add_special_tokens=False)["input_ids"]
        targets = tokenizer([" " + e.target for e in examples], add_special_tokens=False)["input_ids"]
        around = [tokenizer(text, add_special_tokens=False)["input_ids"] if text else [] for text in (prefix, suffix)]
        room = max_source_tokens - sum(map(len, around))
    source_cuts = [len(ids) - room for ids in sources if len(ids) > room]
    target_cuts = [len(ids) - max_target_tokens for ids in targets if len(ids) > max_target_tokens]
    return {
        "examples": len(examples),
        "sources_cut": len(source_cuts),
        "source_tokens_cut_max": max(source_cuts, default=0),
        "targets_cut": len(target_cuts),
        "target_tokens_cut_max": max(target_cuts, default=0),
    }


@dataclass(frozen=True)
class TrimToLongest:
    """Collator: stack rows padded on the right to one length, then cut the columns every row pads.

    Causal rows cut ``input_ids``, ``attention_mask`` and ``labels`` (aligned with the inputs) to the longest row's
    length; encoder-decoder rows cut the source to the longest source and ``labels`` to the longest target, the
    decoder's length. The result equals padding each batch to its longest row in the first place.
    """

    encoder_decoder: bool

    def __call__(self, rows: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        batch = {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
        return self.trim(batch)

    def trim(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``batch`` cut to its longest row (see the class)."""
        source = int(batch["attention_mask"].sum(dim=1).max())
        trimmed = {key: batch[key][:, :source] for key in ("input_ids", "attention_mask")}
        labels = batch["labels"]
        if self.encoder_decoder:  # the target's padding is IGNORE_INDEX from its end back to the longest target
            labelled = (labels != IGNORE_INDEX).nonzero()
            target = int(labelled[:, 1].max()) + 1 if len(labelled) else 1
            trimmed["labels"] = labels[:, :target]
        else:
            trimmed["labels"] = labels[:, :source]
        return {**batch, **{key: value.contiguous() for key, value in trimmed.items()}}  # models view() inputs


class TensorDataset(torch.utils.data.Dataset):
    """Rows of a dict of equal-length tensors, as dicts (what the Trainer's default collator stacks)."""

    def __init__(self, columns: dict[str, torch.Tensor]):
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {k: v[index] for k, v in self.columns.items()}
