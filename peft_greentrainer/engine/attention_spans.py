"""Attention spans: how a step is priced where attention runs only within the sequences the inputs' values delimit.

Flash attention (``attn_implementation="flash_attention_2"``, kernels-hub builds) and attention functions registered
with transformers' ``AttentionInterface`` may attend only among the tokens of one sequence: the unpadded tokens of
each row (``attention_mask``), or the sequences packed into one row (``position_ids`` that restart, or
``cu_seq_lens_q`` / ``cu_seq_lens_k`` from ``DataCollatorWithFlattening``). Their FLOPs then follow the sum of the
squared sequence lengths, which changes from batch to batch at one shape (TRL's packing and padding-free batches).
Every other op costs the same whatever the values.

So at one shape a step's cost and full fine-tuning's are both affine in that sum, and their ratio is monotonic in it:
a selection within rho with the row attended as one sequence and as sequences of a single token is within rho at
every batch of the shape. Eager attention and SDPA attend over every position whatever the mask (masked scores are
computed, then discarded), so their cost follows shapes alone and needs no spans.

An encoder-decoder model has no such single sum: its cross-attention costs the product of the two sides' lengths (and
under flash attention reads both from the encoder's mask), so two priced rows do not bound its steps. The tuner
refuses it under such attention (:func:`encoder_decoder_error`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .module_tree import ModuleTree

__all__ = ["SPAN_INPUTS", "attention_extremes", "attention_follows_values", "encoder_decoder_error"]

# the inputs whose values delimit the sequences that flash-style attention attends within
_MASKS = ("attention_mask", "decoder_attention_mask")
_POSITIONS = ("position_ids", "decoder_position_ids")
_OFFSETS = ("cu_seq_lens_q", "cu_seq_lens_k")
SPAN_INPUTS = (*_MASKS, *_POSITIONS, *_OFFSETS)
_DENSE_IMPLEMENTATIONS = {None, "eager", "sdpa"}  # attend over every position: cost follows shapes


def attention_follows_values(model: nn.Module, tree: ModuleTree | None = None) -> bool:
    """Whether some attention of ``model`` may attend only within sequences read from input values: any
    implementation but eager and SDPA (flash attention, kernels-hub and custom registered functions, flex).
    ``tree``: ``model``'s modules, listed before (read at every step: the implementation can be switched)."""
    return bool(_value_following_implementations(model, tree))


def encoder_decoder_error(model: nn.Module) -> str:
    """What to tell a user whose encoder-decoder ``model`` trains on padded or packed rows under attention whose cost
    follows the values (see the module docstring)."""
    named = ", ".join(sorted(_value_following_implementations(model)))
    return (
        f"GreenTrainer cannot bound the FLOPs of an encoder-decoder model under {named} attention on batches with an "
        "attention mask or positions (padded or packed rows): that attention costs the encoder's and the decoder's "
        "sequence lengths together, which the batch shape does not show, so the budget could not be kept. Load the "
        "model with attn_implementation='sdpa' (or 'eager'), whose cost follows the batch shape."
    )


def _value_following_implementations(model: nn.Module, tree: ModuleTree | None = None) -> set[str]:
    """The attention implementations of ``model``'s modules (and sub-models' configs) other than eager and SDPA."""
    holders = (tree or ModuleTree(model)).config_holders
    configs = {id(c): c for c in (getattr(m, "config", None) for m in holders)}  # layers share their model's
    implementations = {getattr(c, "_attn_implementation", None) for c in configs.values()}
    return {str(i) for i in implementations - _DENSE_IMPLEMENTATIONS}


def attention_extremes(row: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]] | None:
    """``row`` (one row of a batch) with its attention spanning the whole row as one sequence, and cut into sequences
    of one token, each named; None if no input of it delimits sequences (it is then attended as a whole).

    A 2-D ``attention_mask`` (``decoder_attention_mask``) becomes all ones, and a single attended token;
    ``position_ids`` (``decoder_position_ids``) one count from the row's first position, and every token at that
    position (flash attention's packed-sequence test then cuts every token apart); ``cu_seq_lens_q`` / ``_k`` one
    sequence of all tokens, and one per token, with ``max_length_q`` / ``_k`` to match. Nothing else changes: shapes,
    labels and every other input stay the row's.
    """
    if not any(_delimits(name, row.get(name)) for name in SPAN_INPUTS):
        return None
    whole, single = dict(row), dict(row)
    for name in _MASKS:
        if _delimits(name, mask := row.get(name)):
            whole[name] = torch.ones_like(mask)
            single[name] = torch.zeros_like(mask)
            single[name][..., 0] = 1
    for name in _POSITIONS:
        if _delimits(name, positions := row.get(name)):
            first = positions.min()
            counting = torch.arange(positions.shape[-1], device=positions.device, dtype=positions.dtype)
            whole[name] = (counting + first).expand_as(positions).clone()
            single[name] = torch.full_like(positions, int(first))
    for name in _OFFSETS:
        if _delimits(name, offsets := row.get(name)):
            tokens, longest = int(offsets[-1]), name.replace("cu_seq_lens", "max_length")
            whole[name] = torch.tensor([0, tokens], dtype=offsets.dtype, device=offsets.device)
            single[name] = torch.arange(tokens + 1, dtype=offsets.dtype, device=offsets.device)
            if longest in row:
                whole[longest], single[longest] = tokens, 1
    return [("one sequence", whole), ("one token per sequence", single)]


def _delimits(name: str, value: Any) -> bool:
    """Whether input ``name`` holds values that delimit sequences (a 4-D mask is the user's own, and ``meta`` tensors
    hold no values: both are left as they are)."""
    if not isinstance(value, torch.Tensor) or value.numel() == 0 or value.device.type == "meta":
        return False
    return value.dim() == 2 if name in _MASKS else True
