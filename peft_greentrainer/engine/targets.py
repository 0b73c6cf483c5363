"""The targets a language-model loss counts: the one place the next-token shift rule lives.

A causal LM's position ``t`` is scored against ``labels[t + 1]``, so its loss counts ``labels[:, 1:]`` and the last
position never counts; ``shift_labels`` (already shifted, as context-parallel training passes them) are used as
given; an encoder-decoder scores every label where it stands. ``-100`` marks a label no loss counts. The cost of a
sparse LM head, the bucketing of label counts and the token weighting across ranks all read targets through here,
so they cannot disagree on which positions count.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

IGNORE_INDEX = -100


def aligned_targets(
    labels: torch.Tensor, shift_labels: torch.Tensor | None = None, *, shifts: bool = True
) -> torch.Tensor:
    """Per position, the label the loss scores that position's logits against (``-100``: none), shaped as ``labels``.

    ``shifts=False`` for models that do not shift (encoder-decoders)."""
    if shift_labels is not None:
        return shift_labels
    if not shifts:
        return labels
    return nn.functional.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)


def batch_targets(batch: Mapping[str, Any], *, shifts: bool = True) -> torch.Tensor | None:
    """:func:`aligned_targets` of a batch's ``labels`` / ``shift_labels``; None without 2-D labels with values (on
    the meta device labels have none)."""
    shifted = batch.get("shift_labels")
    shifted = shifted if isinstance(shifted, torch.Tensor) else None
    labels = batch.get("labels")
    reference = shifted if shifted is not None else labels
    if not isinstance(reference, torch.Tensor) or reference.dim() != 2 or reference.device.type == "meta":
        return None
    return aligned_targets(labels, shifted, shifts=shifts)


def labelled_counts(batch: Mapping[str, Any], *, shifts: bool = True) -> torch.Tensor | None:
    """Per row, the number of targets the loss counts (what a sparse LM head's cost grows with); None without 2-D
    labels with values."""
    targets = batch_targets(batch, shifts=shifts)
    return None if targets is None else (targets != IGNORE_INDEX).sum(dim=1)


def own_head_follows_labels(model: nn.Module) -> bool:
    """Whether ``model``'s own head projects only the labelled positions, each scored where it stands: ModernBERT's
    masked-LM head with ``sparse_prediction=True`` (a flag the model keeps when built). Its cost follows the number of
    masked tokens, which the data sets, not the batch shape."""
    return model.__dict__.get("sparse_prediction") is True
