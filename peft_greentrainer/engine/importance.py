"""Importance of each unit: how much the loss would drop if that unit alone took the optimizer's next step.

GreenTrainer (arXiv 2309.13192) decides which units (parameter tensors, or LoRA adapters) to train by weighing the
loss reduction each one buys against the backward FLOPs it costs. The loss reduction of unit ``u`` is estimated to
first order from the gradient ``g_u`` at the current weights and the update ``delta_w_u`` the optimizer would apply
at its next step given that gradient::

    I_u = L(w) - L(w + delta_w_u) ~= -sum(g_u * delta_w_u)

summed over every element of every tensor of the unit. For plain gradient descent (``delta_w = -lr * g``) this is
``lr * ||g_u||^2``; for Adam/AdamW it weighs each coordinate by the optimizer's adaptive step size and includes the
weight-decay term, so the estimate matches the step that training will really take.

The reference implementation obtains ``delta_w`` by calling ``optimizer.step()`` and reading the parameter change.
That step is real: it advances Adam's step counter and folds the probe gradient into its first and second moments
(and SGD's momentum buffer), so the actual training run afterwards uses corrupted optimizer state. Here the update
is instead recomputed from the optimizer's hyper-parameters and a read-only view of its state
(:func:`optimizer_update`), so importance evaluation leaves parameters, gradients, optimizer state and the RNG
exactly as it found them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .units import Unit, is_trainable_dtype

logger = logging.getLogger(__name__)

__all__ = ["compute_importance", "optimizer_update"]

LossFn = Callable[[nn.Module, Mapping[str, Any]], torch.Tensor]

# Optimizers whose update rule is reproduced exactly. Matched by exact type: a subclass may change the rule, so it
# gets the documented first-order approximation (with a warning) rather than a silently wrong "exact" update.
_ADAM_TYPES = (torch.optim.Adam, torch.optim.AdamW)
_SGD_TYPES = (torch.optim.SGD,)


# ----------------------------------------------------------------------------------------------------------------
# Optimizer updates
# ----------------------------------------------------------------------------------------------------------------


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """At least float32: half-precision tensors are upcast, float64 stays float64."""
    return torch.promote_types(tensor.dtype, torch.float32)


def _unwrap_optimizer(optimizer: torch.optim.Optimizer | None) -> torch.optim.Optimizer | None:
    """Return the real optimizer inside wrappers such as accelerate's ``AcceleratedOptimizer`` (``.optimizer``)."""
    seen = set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer = inner
    return optimizer


def _group_of(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> dict[str, Any] | None:
    """The param_group holding ``param`` (matched by identity), or None."""
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return group
    return None


def _group_map(optimizer: torch.optim.Optimizer) -> dict[int, dict[str, Any]]:
    return {id(p): group for group in optimizer.param_groups for p in group["params"]}


def _read_state(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> Mapping[str, Any]:
    # ``optimizer.state`` is a defaultdict: ``state[param]`` would insert an empty entry, ``.get`` does not.
    state = optimizer.state.get(param)
    return state if state is not None else {}


def _as_work(tensor: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A detached copy-or-view in the computation dtype, as real numbers (complex tensors viewed as pairs)."""
    out = tensor.detach().to(device=device, dtype=dtype)
    return torch.view_as_real(out) if out.is_complex() else out


def _adam_update(
    w: torch.Tensor, g: torch.Tensor, group: Mapping[str, Any], state: Mapping[str, Any], decoupled: bool
) -> torch.Tensor:
    """Mirror of ``torch.optim.adam._single_tensor_adam`` on copies; ``w`` and ``g`` are already in work dtype."""
    lr = float(group["lr"])
    beta1, beta2 = (float(b) for b in group["betas"])
    eps = float(group["eps"])
    weight_decay = float(group["weight_decay"])
    dtype, device = w.dtype, w.device

    if group.get("maximize", False):
        g = -g
    decay = None
    if weight_decay != 0:
        if decoupled:
            decay = w * (-lr * weight_decay)  # torch: param.mul_(1 - lr * weight_decay)
        else:
            g = g.add(w, alpha=weight_decay)  # L2 penalty folded into the gradient

    step = (float(state["step"]) if "step" in state else 0.0) + 1.0  # the step count the NEXT step will have

    exp_avg = state.get("exp_avg")
    exp_avg = torch.zeros_like(g) if exp_avg is None else _as_work(exp_avg, dtype, device)
    exp_avg = torch.lerp(exp_avg, g, 1 - beta1)

    exp_avg_sq = state.get("exp_avg_sq")
    exp_avg_sq = torch.zeros_like(g) if exp_avg_sq is None else _as_work(exp_avg_sq, dtype, device)
    exp_avg_sq = exp_avg_sq.mul(beta2).addcmul_(g, g, value=1 - beta2)

    if group.get("amsgrad", False):
        max_sq = state.get("max_exp_avg_sq")
        max_sq = torch.zeros_like(g) if max_sq is None else _as_work(max_sq, dtype, device)
        second = torch.maximum(max_sq, exp_avg_sq)
    else:
        second = exp_avg_sq

    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    denom = (second.sqrt() / bias_correction2**0.5).add_(eps)
    delta = torch.addcdiv(torch.zeros_like(g), exp_avg, denom, value=-step_size)
    if decay is not None:
        delta = delta.add_(decay)
    return delta


def _sgd_update(w: torch.Tensor, g: torch.Tensor, group: Mapping[str, Any], state: Mapping[str, Any]) -> torch.Tensor:
    """Mirror of ``torch.optim.sgd._single_tensor_sgd`` on copies."""
    lr = float(group["lr"])
    momentum = float(group.get("momentum", 0.0))
    dampening = float(group.get("dampening", 0.0))
    weight_decay = float(group.get("weight_decay", 0.0))

    if group.get("maximize", False):
        g = -g
    if weight_decay != 0:
        g = g.add(w, alpha=weight_decay)
    if momentum != 0:
        buf = state.get("momentum_buffer")
        # First step: torch initialises the buffer with the gradient itself (no dampening).
        buf = g.clone() if buf is None else _as_work(buf, w.dtype, w.device).mul(momentum).add_(g, alpha=1 - dampening)
        g = g.add(buf, alpha=momentum) if group.get("nesterov", False) else buf
    return g.mul(-lr)


def _update(
    param: torch.Tensor,
    grad: torch.Tensor,
    optimizer: torch.optim.Optimizer | None,
    group: Mapping[str, Any] | None,
    lr: float | None,
) -> tuple[torch.Tensor, str | None]:
    """delta_w in work dtype (same shape/dtype kind as ``param`` upcast), plus a note when it is an approximation."""
    dtype = _compute_dtype(param)
    device = param.device
    w = _as_work(param, dtype, device)
    g = _as_work(grad, dtype, device)
    if w.shape != g.shape:
        raise ValueError(f"gradient shape {tuple(grad.shape)} does not match parameter shape {tuple(param.shape)}")

    note = None
    if optimizer is None:
        if lr is None:
            raise ValueError(
                "optimizer is None, so the update is approximated as delta_w = -lr * grad: pass `lr` "
                "(the learning rate that training will use)."
            )
        delta = g.mul(-float(lr))
    elif group is None:
        step_lr = float(lr) if lr is not None else _first_group_lr(optimizer)
        delta = g.mul(-step_lr)
        note = (
            f"some parameters are not in the {type(optimizer).__name__} optimizer; their update is approximated "
            f"as -lr * grad with lr={step_lr:g}"
        )
    elif type(optimizer) in _ADAM_TYPES:
        decoupled = bool(group.get("decoupled_weight_decay", type(optimizer) is torch.optim.AdamW))
        delta = _adam_update(w, g, group, _read_state(optimizer, param), decoupled)
    elif type(optimizer) in _SGD_TYPES:
        delta = _sgd_update(w, g, group, _read_state(optimizer, param))
    else:
        group_lr = group.get("lr")  # None for e.g. relative-step Adafactor: any constant scale ranks units alike
        step_lr = float(group_lr) if group_lr is not None else (float(lr) if lr is not None else 1.0)
        delta = g.mul(-step_lr)
        note = (
            f"{type(optimizer).__name__} is not reproduced exactly (supported: Adam, AdamW, SGD); its update is "
            f"approximated to first order as -lr * grad with the param group's lr"
        )

    if param.is_complex():
        delta = torch.view_as_complex(delta)
    return delta, note


def _first_group_lr(optimizer: torch.optim.Optimizer) -> float:
    for group in optimizer.param_groups:
        if group.get("lr") is not None:
            return float(group["lr"])
    raise ValueError(f"cannot find a learning rate in the {type(optimizer).__name__} param groups: pass `lr`")


def optimizer_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    optimizer: torch.optim.Optimizer | None,
    *,
    lr: float | None = None,
) -> torch.Tensor:
    """delta_w the optimizer would apply to `param` for gradient `grad`, computed without touching its state.

    The result is what ``param`` would change by if ``param.grad`` were ``grad`` and ``optimizer.step()`` ran now,
    but neither the parameter nor the optimizer state is modified.

    * ``torch.optim.Adam`` / ``torch.optim.AdamW``: exact, including weight decay (L2 added to the gradient for Adam,
      decoupled ``-lr * wd * w`` for AdamW), ``amsgrad``, ``maximize`` and bias correction with the step count the
      next step will have (state step + 1). Empty state (before the first step) behaves as torch does: zero moments.
    * ``torch.optim.SGD``: exact, including momentum, dampening, Nesterov, weight decay and ``maximize``; an empty
      momentum buffer is initialised with the gradient, as torch does.
    * Any other optimizer (including subclasses of the above, which may change the rule): first-order approximation
      ``delta_w = -lr * grad`` with ``lr`` from the parameter's param group, and a logged warning.
    * ``param`` not held by ``optimizer``: the same approximation with ``lr`` (or the first group's lr).
    * ``optimizer`` is None: ``delta_w = -lr * grad``; ``lr`` is then required.

    Hyper-parameters (``lr``, ``betas``, ...) come from the param group holding ``param`` (matched by identity) and
    may be tensors. Wrappers exposing the real optimizer as ``.optimizer`` (accelerate) are unwrapped.

    Returns:
        A new tensor shaped like ``param``, in at least float32 (bf16/fp16 are upcast, float64 is kept).
    """
    optimizer = _unwrap_optimizer(optimizer)
    group = _group_of(optimizer, param) if optimizer is not None else None
    delta, note = _update(param, grad, optimizer, group, lr)
    if note is not None:
        logger.warning("importance: %s.", note)
    return delta


# ----------------------------------------------------------------------------------------------------------------
# Importance
# ----------------------------------------------------------------------------------------------------------------


def _default_loss(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    outputs = model(**batch)
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else getattr(outputs, "loss", None)
    if loss is None:
        raise ValueError("model(**batch) returned no loss: include `labels` in the batches or pass `loss_fn`")
    return loss


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        key: value.to(device) if isinstance(value, torch.Tensor) and value.device != device else value
        for key, value in batch.items()
    }


def _fork_rng() -> Any:
    """Fork the CPU RNG and the RNG of every device of the current accelerator (if any)."""
    accelerator = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
    if accelerator is None:
        return torch.random.fork_rng(devices=[])
    module = torch.get_device_module(accelerator.type)
    return torch.random.fork_rng(devices=list(range(module.device_count())), device_type=accelerator.type)


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
) -> np.ndarray:
    """First-order loss reduction ``I_u = -sum(g_u * delta_w_u)`` of letting each unit take the next optimizer step.

    ``g_u`` is the gradient of the loss at the current weights, averaged over ``batches``; ``delta_w_u`` is the update
    ``optimizer`` would apply for that gradient (:func:`optimizer_update`: exact for Adam, AdamW and SGD, ``-lr * g``
    otherwise, and ``-lr * g`` with the ``lr`` argument when ``optimizer`` is None). A unit's tensors are counted once
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

    Returns:
        float64 array with one importance per unit.
    """
    units = list(units)
    mask = _candidate_mask(candidates, len(units))
    importance = np.zeros(len(units), dtype=np.float64)
    optimizer = _unwrap_optimizer(optimizer)
    if optimizer is None and lr is None:
        raise ValueError(
            "compute_importance needs either an optimizer or `lr` (for the delta_w = -lr * grad approximation)"
        )
    loss_fn = loss_fn or _default_loss

    # Distinct trainable tensors of the candidate units, in first-seen order.
    unit_tensors: list[list[int]] = [[] for _ in units]  # indices into `tensors`
    tensors: list[torch.Tensor] = []
    index_of: dict[int, int] = {}
    for u, unit in enumerate(units):
        if not mask[u]:
            continue
        for param in unit.parameters(model):
            if not is_trainable_dtype(param):
                continue
            if id(param) not in index_of:
                index_of[id(param)] = len(tensors)
                tensors.append(param)
            if index_of[id(param)] not in unit_tensors[u]:
                unit_tensors[u].append(index_of[id(param)])
    if not tensors:
        return importance

    grads = _average_gradients(model, tensors, batches, loss_fn)

    groups = _group_map(optimizer) if optimizer is not None else {}
    notes: set[str] = set()
    for u, indices in enumerate(unit_tensors):
        total = 0.0
        for i in indices:
            param, grad = tensors[i], grads[i]
            delta, note = _update(param, grad, optimizer, groups.get(id(param)), lr)
            if note is not None:
                notes.add(note)
            g = _as_work(grad, delta.dtype, delta.device)  # complex tensors: real inner product of (re, im) pairs
            d = torch.view_as_real(delta) if delta.is_complex() else delta
            total -= float(torch.dot(g.reshape(-1), d.reshape(-1)))
        importance[u] = total
    if notes:
        logger.warning("importance: %s.", "; ".join(sorted(notes)))
    return importance


def _average_gradients(
    model: nn.Module, tensors: list[torch.Tensor], batches: Iterable[Mapping[str, Any]], loss_fn: LossFn
) -> list[torch.Tensor]:
    """Mean over ``batches`` of d loss / d tensor (work dtype), with ``requires_grad`` only on ``tensors``."""
    try:
        device = next(model.parameters()).device
    except StopIteration:
        raise ValueError("model has no parameters") from None

    params = list(model.parameters())
    saved_flags = [(p, p.requires_grad) for p in params]
    sums = [torch.zeros(t.shape, dtype=_compute_dtype(t), device=t.device) for t in tensors]
    count = 0
    try:
        for p in params:
            p.requires_grad_(False)
        for t in tensors:
            t.requires_grad_(True)
        with _fork_rng(), torch.enable_grad():
            for batch in batches:
                loss = loss_fn(model, _to_device(batch, device))
                if loss.numel() != 1:
                    raise ValueError(f"loss must be a scalar, got shape {tuple(loss.shape)}")
                count += 1
                if not loss.requires_grad:  # no candidate tensor influences this loss
                    continue
                batch_grads = torch.autograd.grad(loss.reshape(()), tensors, allow_unused=True)
                for acc, grad in zip(sums, batch_grads, strict=True):
                    if grad is not None:
                        acc.add_(grad.detach().to(acc.dtype))
                del loss, batch_grads
    finally:
        for p, flag in saved_flags:
            p.requires_grad_(flag)
    if count == 0:
        raise ValueError("batches is empty: at least one batch is needed to estimate gradients")
    if count > 1:
        for acc in sums:
            acc.div_(count)
    return sums
