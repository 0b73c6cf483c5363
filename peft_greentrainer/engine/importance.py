"""Importance of each unit: how much the loss would drop if that unit alone took the optimizer's next step.

GreenTrainer (arXiv 2309.13192) decides which units (parameter tensors, or LoRA adapters) to train by weighing the
loss reduction each one buys against the backward FLOPs it costs. The loss reduction of unit ``u`` is estimated to
first order from the gradient ``g_u`` at the current weights and the update ``delta_w_u`` the optimizer would apply
at its next step given that gradient::

    I_u = L(w) - L(w + delta_w_u) ~= -sum(g_u * delta_w_u)

summed over every element of every tensor of the unit. For plain gradient descent (``delta_w = -lr * g``) this is
``lr * ||g_u||^2``; for Adam/AdamW it weighs each coordinate by the optimizer's adaptive step size and includes the
weight-decay term, so the estimate matches the step that training will really take. The same holds for the
optimizers other recipes use (RMSprop, Adagrad, Adafactor's factored and clipped update, bitsandbytes' 8-bit and
paged Adam, Lion and AdEMAMix, their moments dequantised as the step reads them); anything else falls back to
``-lr * g`` with a warning.

The reference implementation obtains ``delta_w`` by calling ``optimizer.step()`` and reading the parameter change.
That step is real: it advances Adam's step counter and folds the probe gradient into its first and second moments
(and SGD's momentum buffer), so the actual training run afterwards uses corrupted optimizer state. Here the update
is instead recomputed from the optimizer's hyper-parameters and a read-only view of its state
(:func:`optimizer_update`), so importance evaluation leaves parameters, gradients, optimizer state and the RNG
exactly as it found them. The updates are predicted in :mod:`.optimizer_update`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .optimizer_params import unwrap_optimizer
from .optimizer_update import as_work, checked_group_lrs, param_slots, predicted_update, work_dtype
from .profile import LossFn, default_loss
from .rng import fork_rng
from .units import Unit, inputs_device, is_trainable_storage, requires_grad_kept

logger = logging.getLogger(__name__)

__all__ = ["clip_coefficient", "compute_importance", "squared_norm"]


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        key: value.to(device) if isinstance(value, torch.Tensor) and value.device != device else value
        for key, value in batch.items()
    }


def _candidate_mask(candidates: np.ndarray | Sequence[bool] | None, n: int) -> np.ndarray:
    if candidates is None:
        return np.ones(n, dtype=bool)
    mask = np.asarray(candidates, dtype=bool).reshape(-1)
    if mask.shape != (n,):
        raise ValueError(f"candidates has {mask.size} entries but there are {n} units")
    return mask


def compute_importance(
    model: nn.Module,
    units: Sequence[Unit],
    batches: Iterable[Mapping[str, Any]],
    optimizer: torch.optim.Optimizer | None = None,
    *,
    loss_fn: LossFn | None = None,
    candidates: np.ndarray | Sequence[bool] | None = None,
    lr: float | None = None,
    group_lrs: Sequence[float | None] | None = None,
    max_grad_norm: float | None = None,
) -> np.ndarray:
    """First-order loss reduction ``I_u = -sum(g_u * delta_w_u)`` of letting each unit take the next optimizer step.

    ``g_u`` is the gradient of the loss at the current weights, averaged over ``batches``; ``delta_w_u`` is the update
    ``optimizer`` would apply for that gradient (:func:`.optimizer_update.optimizer_update`: mirrored for the
    torch, bitsandbytes and transformers optimizers ``TrainingArguments(optim=...)`` builds, GaLore, APOLLO and LOMO
    aside, ``-lr * g`` with one warning naming the optimizer otherwise,
    and ``-lr * g`` with the ``lr`` argument when ``optimizer`` is None). A unit's tensors are counted once
    even if it lists a (tied) tensor several times; units are assumed to share no tensors.

    Only units marked in ``candidates`` (default: all) are evaluated; the others, e.g. units that cannot fit the
    FLOPs budget anyway, get 0.0. During the evaluation ``requires_grad`` is True exactly on the candidates' tensors
    and False on every other parameter of the model, so autograd records no graph and saves no activations for
    weight gradients that are not needed, and backpropagation stops at the deepest candidate unit. This is where
    GreenTrainer's saving in importance evaluation comes from: backprop only goes as deep as the deepest unit that
    can still fit the budget.

    Side-effect free: gradients come from ``torch.autograd.grad`` (``.grad`` is never touched), the optimizer is only
    read, every parameter's ``requires_grad`` is restored (also on error), the model's train/eval mode is left as
    is (dropout stays active in train mode) and the CPU/accelerator RNG is forked around the forward passes.

    Args:
        model: The model; batch tensors are moved to the device of its first parameter.
        units: Units to score (``Unit.param_names`` resolved with ``model.get_parameter``).
        batches: Dicts of model inputs; the gradient is averaged over them.
        optimizer: The optimizer that will train the units (its state is read, never changed).
        loss_fn: ``loss_fn(model, batch) -> scalar loss``; default ``model(**batch).loss``.
        candidates: One bool per unit; False skips the unit (importance 0.0, no gradient computed for it).
        lr: Learning rate for the ``-lr * g`` approximation when ``optimizer`` is None (required then) or for
            tensors the optimizer does not hold.
        group_lrs: One learning rate (or None: the group's own) per param group of ``optimizer``, used in place of
            the group's current ``lr`` when predicting the update. Under LR warmup the current lr is 0 at step 0,
            which predicts no update and makes every importance 0 (a warning says so); pass
            :func:`base_learning_rates` to rank units by the schedule's base lr. Only the update's scale depends on
            the lr, so for a single param group this changes importances by a common factor, not their ranking.
        max_grad_norm: The norm training clips gradients to (``TrainingArguments.max_grad_norm``; None or 0: no
            clipping). The optimizer steps on the clipped gradient, so ``delta_w`` is predicted from it too: scaled
            as ``torch.nn.utils.clip_grad_norm_`` would scale the candidates' gradients (the step that trains them
            all; training clips over the units it trains).

    Returns:
        float64 array with one importance per unit.
    """
    units = list(units)
    mask = _candidate_mask(candidates, len(units))
    importance = np.zeros(len(units), dtype=np.float64)
    optimizer = unwrap_optimizer(optimizer)
    group_lrs = checked_group_lrs(optimizer, group_lrs)
    if optimizer is None and lr is None:
        raise ValueError(
            "compute_importance needs either an optimizer or `lr` (for the delta_w = -lr * grad approximation)"
        )
    loss_fn = loss_fn or default_loss

    # Distinct trainable tensors of the candidate units, in first-seen order.
    unit_tensors: list[list[int]] = [[] for _ in units]  # indices into `tensors`
    tensors: list[torch.Tensor] = []
    index_of: dict[int, int] = {}
    for u, unit in enumerate(units):
        if not mask[u]:
            continue
        for param in unit.parameters(model):
            if not is_trainable_storage(param):
                continue
            if id(param) not in index_of:
                index_of[id(param)] = len(tensors)
                tensors.append(param)
            if index_of[id(param)] not in unit_tensors[u]:
                unit_tensors[u].append(index_of[id(param)])
    if not tensors:
        return importance

    grads = _average_gradients(model, tensors, batches, loss_fn)
    clip = clip_coefficient(squared_norm(grads), max_grad_norm)

    slots = param_slots(optimizer) if optimizer is not None else {}
    notes: set[str] = set()
    for u, indices in enumerate(unit_tensors):
        total = 0.0
        for i in indices:
            param, grad = tensors[i], grads[i]
            stepped = grad if clip == 1.0 else grad.mul(clip)
            delta, param_notes = predicted_update(param, stepped, optimizer, slots.get(id(param)), lr, group_lrs)
            notes.update(param_notes)
            g = as_work(grad, delta.dtype, delta.device)  # complex tensors: real inner product of (re, im) pairs
            d = torch.view_as_real(delta) if delta.is_complex() else delta
            total -= float(torch.dot(g.reshape(-1), d.reshape(-1)))
        importance[u] = total
    if notes:
        logger.warning("importance: %s.", "; ".join(sorted(notes)))
    return importance


def squared_norm(grads: Iterable[torch.Tensor]) -> float:
    """Sum of squares of every entry of ``grads`` (local tensors, in their work dtype)."""
    return float(sum(float(torch.linalg.vector_norm(g)) ** 2 for g in grads))


def clip_coefficient(squared_grad_norm: float, max_grad_norm: float | None) -> float:
    """What ``torch.nn.utils.clip_grad_norm_(params, max_grad_norm)`` multiplies gradients of this squared norm by."""
    if max_grad_norm is None or not max_grad_norm > 0:
        return 1.0
    return min(1.0, float(max_grad_norm) / (math.sqrt(squared_grad_norm) + 1e-6))


NO_LOSS = (
    "model(**batch) returned no loss, which importance differentiates: include `labels` in the batches, or pass the "
    "loss training optimizes as `loss_fn` (GreenTrainerCallback(loss_fn=...); for preference or reward trainers, whose "
    "batches hold no labels, a function of (model, batch) computing it)."
)

REENTRANT_CHECKPOINTING = (
    "the model checkpoints activations with reentrant checkpointing (torch.utils.checkpoint.checkpoint(..., "
    "use_reentrant=True)), whose backward torch.autograd.grad cannot run, and importance needs it: checkpoint with "
    "use_reentrant=False (GreenTrainer switches transformers' checkpointed layers to it itself)."
)


# GradScaler's first scale: gradients of a loss scaled by it survive float16 activations; halved while one overflows
_INITIAL_LOSS_SCALE = 2.0**16


def _half_precision_autocast(device: torch.device) -> bool:
    """Whether float16 autocast is on for ``device``: its activations' gradients underflow without loss scaling."""
    return torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) == torch.float16


def _gradients(
    loss: torch.Tensor | None, tensors: list[torch.Tensor], scale: float
) -> tuple[torch.Tensor | None, ...] | None:
    """d (loss x scale) / d tensors; None if no tensor influences ``loss``."""
    if loss is None:
        raise ValueError(NO_LOSS)
    if loss.numel() != 1:
        raise ValueError(f"loss must be a scalar, got shape {tuple(loss.shape)}")
    if not loss.requires_grad:
        return None
    try:
        loss = loss.reshape(()) if scale == 1.0 else loss.reshape(()) * scale
        return torch.autograd.grad(loss, tensors, allow_unused=True)
    except RuntimeError as error:
        if "checkpoint" in str(error).lower() and ".grad()" in str(error):  # its wording varies
            raise RuntimeError(REENTRANT_CHECKPOINTING) from error
        raise


class _LossScale:
    """The loss scale of the importance's backward passes: 1, or under float16 autocast one that ``torch.amp.
    GradScaler`` would use, so that small activation gradients do not flush to zero in float16 (the importance would
    then be that of too few units). Halved, and the batch's forward and backward run again, while a gradient
    overflows; kept for the next batches, as a scaler keeps its scale. (The Trainer's ``fp16=True`` steps are scaled
    so, and its callbacks are not given its scaler. The graph is not kept for the retry: a region under selective
    activation checkpointing can be backpropagated only once.)"""

    def __init__(self, device: torch.device) -> None:
        self.value = _INITIAL_LOSS_SCALE if _half_precision_autocast(device) else 1.0

    def retry(self, grads: tuple[torch.Tensor | None, ...]) -> bool:
        """Whether ``grads`` (of the loss times ``value``) overflowed at a scale that can still be halved (halved)."""
        present = [g for g in grads if g is not None]
        if self.value <= 1.0 or not present or bool(torch.stack([g.isfinite().all() for g in present]).all()):
            return False
        self.value /= 2
        return True


def _average_gradients(
    model: nn.Module, tensors: list[torch.Tensor], batches: Iterable[Mapping[str, Any]], loss_fn: LossFn
) -> list[torch.Tensor]:
    """Mean over ``batches`` of d loss / d tensor (work dtype), with ``requires_grad`` only on ``tensors``."""
    device = inputs_device(model)
    params = list(model.parameters())
    sums = [torch.zeros(t.shape, dtype=work_dtype(t), device=t.device) for t in tensors]
    count = 0
    scale = _LossScale(device)
    with requires_grad_kept(params):
        for p in params:
            p.requires_grad_(False)
        for t in tensors:
            t.requires_grad_(True)
        with fork_rng(), torch.enable_grad():
            for batch in batches:
                batch = _to_device(batch, device)
                count += 1
                while True:  # a copy each time: a loss_fn may pop from it (Trainer.compute_loss pops the labels)
                    batch_grads = _gradients(loss_fn(model, dict(batch)), tensors, scale.value)
                    if batch_grads is None or not scale.retry(batch_grads):
                        break
                if batch_grads is None:  # no candidate tensor influences this loss
                    continue
                for acc, grad in zip(sums, batch_grads, strict=True):
                    if grad is not None:
                        acc.add_(grad.detach().to(acc.dtype), alpha=1.0 / scale.value)
                del batch_grads
    if count == 0:
        raise ValueError("batches is empty: at least one batch is needed to estimate gradients")
    if count > 1:
        for acc in sums:
            acc.div_(count)
    return sums
