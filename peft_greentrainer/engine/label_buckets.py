"""Label-count buckets: how a step whose LM head projects only labelled positions is priced.

Such a head costs a fixed amount per labelled position, so a batch's step FLOPs depend on its labels through their
count. Profiling every count would cost a profile per batch; a bucket of counts is priced once, on a row re-labelled
to the bucket's ends, which bounds every batch in it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .targets import IGNORE_INDEX, aligned_targets

__all__ = ["LABEL_BUCKETS", "LabelBucket", "label_bucket"]


LABEL_BUCKETS = 16  # label counts priced per sequence length: a profile per bucket, not per count


@dataclass
class LabelBucket:
    """The label-count bucket of a batch's mean, and one of its rows re-labelled at both ends (:func:`label_bucket`),
    built only when asked for: a step at a bucket already priced needs the bounds alone."""

    bottom: int  # the bucket is [bottom, top] next-token targets per sequence
    top: int
    row: dict[str, Any]
    mask: torch.Tensor  # the row's targets, by the position scored against them
    name: str  # the labels entry the targets are read from ("labels" or "shift_labels")
    offset: int  # position t's target is labels[t + offset] (1: a causal LM's next token; 0: shift_labels, in place)

    @functools.cached_property
    def widened(self) -> dict[str, Any]:
        """The row with every sequence at ``top`` targets: what a step costs at most."""
        return {**self.row, self.name: _with_targets(self.row[self.name], self.mask, self.top, self.offset)}

    @functools.cached_property
    def narrowed(self) -> dict[str, Any]:
        """The row with every sequence at ``bottom`` targets: what full fine-tuning costs at least."""
        return {**self.row, self.name: _with_targets(self.row[self.name], self.mask, self.bottom, self.offset)}


def label_bucket(row: Mapping[str, Any], mean: float, *, shifts: bool = True) -> LabelBucket | None:
    """The bucket, one of ``LABEL_BUCKETS`` per sequence length, of ``mean``: a batch's mean count of next-token
    targets per sequence, with ``row`` (one of the batch's rows) to re-label to the bucket's ends. None without 2-D
    labels with values.

    A head that projects only labelled positions costs a fixed amount per labelled position, in a step and in full
    fine-tuning alike, so a batch's costs, and their ratio, depend on its labels only through their mean count, and
    the ratio can move either way with it. Pricing a step on the row widened to the bucket's top, against full
    fine-tuning of the row narrowed to its bottom, bounds the ratio of every batch whose mean is in the bucket from
    above, and bounds how many profiles varying prompt lengths cost. Which positions are labelled, and with which
    tokens, changes no FLOP count: targets are added as token 0 at the first unlabelled positions, and removed from
    the last labelled ones. ``shifts=False`` where each label is scored where it stands (a masked LM's own sparse
    head, ``targets.own_head_follows_labels``).
    """
    labels = row.get("labels")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2 or labels.device.type == "meta":
        return None
    shifted = row.get("shift_labels") if isinstance(row.get("shift_labels"), torch.Tensor) else None
    name = "shift_labels" if shifted is not None else "labels"
    # as next_token_targets, without gathering the targets
    mask = aligned_targets(labels, shifted, shifts=shifts) != IGNORE_INDEX
    length = mask.shape[-1]
    step = max(1, math.ceil(length / LABEL_BUCKETS))
    index = math.ceil(mean / step)  # the bucket ((index - 1) * step, index * step]: its fewest whole count is one more
    below = max(0, (index - 1) * step)
    offset = 1 if shifted is None and shifts else 0  # position t's target is labels[t + offset]
    usable = length - offset  # next-token targets from labels: the last position has none
    bottom, top = below + 1 if mean >= below + 1 else below, min(usable, index * step)
    return LabelBucket(bottom, top, dict(row), mask, name, offset)


def _with_targets(labels: torch.Tensor, mask: torch.Tensor, count: int, offset: int) -> torch.Tensor:
    """``labels`` with exactly ``count`` targets per sequence (position t's at ``labels[t + offset]``): the real ones
    first, then added ones."""
    usable = mask.shape[-1] - offset  # next-token targets from labels: the last position has none
    labels = labels.clone()
    for seq in range(mask.shape[0]):
        real = mask[seq].nonzero().flatten()
        labels[seq, real[count:] + offset] = IGNORE_INDEX
        free = (~mask[seq, :usable]).nonzero().flatten()[: max(0, count - real.numel())]
        labels[seq, free + offset] = 0
    return labels
