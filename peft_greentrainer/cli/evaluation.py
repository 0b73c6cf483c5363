"""Generation quality before and after fine-tuning: ROUGE-1/2/L (``rouge-score``, any script) and exact match."""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from .data import Example


@torch.no_grad()
def generate(
    model,
    tokenizer,
    examples: Sequence[Example],
    template: str,
    *,
    max_source_tokens: int,
    max_new_tokens: int,
    batch_size: int = 8,
    progress: bool = True,
) -> list[str]:
    """Greedy continuations of the filled template (the first line of each, as a summary is one line)."""
    was_training = model.training
    model.eval()
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    tokenizer.padding_side = "right" if encoder_decoder else "left"  # decoder-only models continue on the right
    outputs: list[str] = []
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(examples), batch_size), desc="generating", disable=not progress, leave=False):
        chunk = examples[start : start + batch_size]
        prompts = [_prompt(tokenizer, template, e.source, max_source_tokens, encoder_decoder) for e in chunk]
        batch = tokenizer(
            prompts,
            return_tensors="pt",
            padding=True,
            add_special_tokens=encoder_decoder,
            # an encoder's input stays within the positions checked for training, however the text re-encodes
            truncation=encoder_decoder,
            max_length=max_source_tokens if encoder_decoder else None,
        ).to(device)
        generated = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
        new = generated if encoder_decoder else generated[:, batch["input_ids"].shape[1] :]
        for text in tokenizer.batch_decode(new, skip_special_tokens=True):
            outputs.append(text.strip().split("\n")[0].strip())
    model.train(was_training)
    return outputs


def _prompt(tokenizer, template: str, source: str, max_source_tokens: int, special_tokens: bool = False) -> str:
    """The template around the source, the source cut so that the prompt fits ``max_source_tokens`` (as in training),
    with the special tokens the tokenizer adds where ``special_tokens`` (an encoder-decoder's input has them)."""
    prefix, _, suffix = template.partition("{input}")
    room = max_source_tokens - len(tokenizer(prefix + suffix, add_special_tokens=special_tokens)["input_ids"])
    ids = tokenizer(source, add_special_tokens=False)["input_ids"][: max(room, 1)]
    return prefix + tokenizer.decode(ids) + suffix


# scripts written without spaces between words (CJK ideographs and kana, Thai, Lao, Myanmar, Khmer): a token a letter
UNSPACED = (
    (0x0E00, 0x0EFF),  # Thai, Lao
    (0x1000, 0x109F),  # Myanmar
    (0x1780, 0x17FF),  # Khmer
    (0x2E80, 0x9FFF),  # CJK radicals, kana, CJK ideographs (extension A and the unified block)
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0xFF66, 0xFF9F),  # halfwidth katakana
    (0x20000, 0x3FFFF),  # CJK ideograph extensions B and on
)


class AnyScriptTokenizer:
    """rouge-score's default tokens on ASCII text, with the words of every other script kept.

    The default keeps only runs of [a-z0-9] after lowercasing, so identical Chinese or Russian texts scored 0 and
    accented words lost letters. Here a token is a run of letters, digits and combining marks of any script, except
    in scripts written without spaces (``UNSPACED``), where each letter (with its marks) is one; words longer than 3
    characters are Porter-stemmed as rouge-score stems them. On ASCII text the tokens are exactly the default's.
    """

    def __init__(self, use_stemmer: bool = True):
        from nltk.stem import porter  # what rouge-score stems with

        self.stemmer = porter.PorterStemmer() if use_stemmer else None

    def tokenize(self, text: str) -> list[str]:
        tokens: list[str] = []
        word = ""  # the token being read
        for char in text.lower():
            kind = unicodedata.category(char)[0]  # L letter, N digit, M combining mark
            if word and (kind == "M" or (kind in "LN" and not (_unspaced(char) or _unspaced(word[0])))):
                word += char  # a mark belongs to the letter before it; a letter of a spaced script to its word
                continue
            if word:
                tokens.append(self._stem(word))
            word = char if kind in "LN" else ""  # a letter or digit begins a token; anything else separates
        if word:
            tokens.append(self._stem(word))
        return tokens

    def _stem(self, token: str) -> str:
        if self.stemmer is None or len(token) <= 3 or _unspaced(token[0]):
            return token
        return self.stemmer.stem(token)


def _unspaced(char: str) -> bool:
    code = ord(char)
    return any(low <= code <= high for low, high in UNSPACED)


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 (x100, as papers report), with stemming, on the words of any script."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=AnyScriptTokenizer(use_stemmer=True))
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score(reference, prediction)
        for key in totals:
            totals[key] += scores[key].fmeasure
    count = max(len(predictions), 1)
    return {key: 100 * value / count for key, value in totals.items()}


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share (x100) of predictions equal to the reference after case and whitespace normalisation."""
    matches = sum(
        " ".join(p.lower().split()) == " ".join(r.lower().split()) for p, r in zip(predictions, references, strict=True)
    )
    return 100 * matches / max(len(predictions), 1)
