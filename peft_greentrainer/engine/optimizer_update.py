"""The update an optimizer would apply at its next step, predicted from a read-only view of its state.

GreenTrainer's importance of a unit is ``-sum(g * delta_w)``, ``delta_w`` the optimizer's next update. Calling
``optimizer.step()`` to read it would advance step counters and fold the probe gradient into moments and momentum
buffers, so training afterwards would run on corrupted state. Each supported optimizer's rule is instead mirrored
here on copies, from its hyper-parameters and state: exact (to float rounding) for the optimizers fine-tuning recipes
use, a first-order ``-lr * g`` with a warning naming the optimizer for any other.
"""

from __future__ import annotations

import logging
import math
import numbers
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .bnb_update import KERNEL_NAMES, bnb_config, bnb_lr_override, bnb_update
from .optimizer_params import per_parameter_optimizers, unwrap_optimizer

logger = logging.getLogger(__name__)

__all__ = [
    "as_work",
    "base_learning_rates",
    "checked_group_lrs",
    "optimizer_update",
    "param_slots",
    "plain_gradient_step",
    "predicted_update",
    "work_dtype",
]

_MIRRORED = (
    f"torch Adam/AdamW/SGD/RMSprop/Adagrad/Muon and subclasses, bitsandbytes' {KERNEL_NAMES} (8-bit, 32-bit, paged), "
    "transformers Adafactor"
)


@dataclass(frozen=True)
class _Slot:
    """Where a parameter sits: the optimizer that steps it (the one given, or one of a layer-wise optimizer's
    per-parameter optimizers, whose groups ``group_lrs`` does not list) and its place there (bitsandbytes looks its
    per-parameter config up by position)."""

    optimizer: torch.optim.Optimizer
    group_index: int
    param_index: int
    group: dict[str, Any]
    per_parameter: bool


def work_dtype(tensor: torch.Tensor) -> torch.dtype:
    """At least float32: half-precision tensors are upcast, float64 stays float64."""
    return torch.promote_types(tensor.dtype, torch.float32)


def param_slots(optimizer: torch.optim.Optimizer) -> dict[int, _Slot]:
    """Every parameter ``optimizer`` steps (with its per-parameter optimizers' ones), by ``id``."""
    slots: dict[int, _Slot] = {}
    for owner in [optimizer, *per_parameter_optimizers(optimizer)]:
        for g, group in enumerate(owner.param_groups):
            for i, p in enumerate(group["params"]):
                slots.setdefault(id(p), _Slot(owner, g, i, group, owner is not optimizer))
    return slots


def _read_state(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> Mapping[str, Any]:
    # ``optimizer.state`` is a defaultdict: ``state[param]`` would insert an empty entry, ``.get`` does not.
    state = optimizer.state.get(param)
    return state if state is not None else {}


def as_work(tensor: torch.Tensor, dtype: torch.dtype, device: torch.device, copy: bool = False) -> torch.Tensor:
    """A detached view (a copy if ``copy`` or if the dtype/device differ) in the computation dtype, as real numbers
    (complex tensors viewed as pairs). Only copies may be updated in place: a view would write into optimizer state."""
    if tensor.is_complex() and not dtype.is_complex:  # a complex state read for a real work dtype keeps its pairs
        dtype = torch.promote_types(tensor.dtype, dtype)
    out = tensor.detach().to(device=device, dtype=dtype, copy=copy)
    return torch.view_as_real(out) if out.is_complex() else out


def _state_or_zeros(state: Mapping[str, Any], key: str, shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
    """A work-dtype copy of ``state[key]`` (safe to update in place), or the zeros the optimizer starts it at."""
    value = state.get(key)
    if value is None:
        if tuple(shape) == tuple(like.shape):
            return torch.zeros_like(like)  # keeps a sharded (DTensor) gradient's layout under FSDP2
        return torch.zeros(shape, dtype=like.dtype, device=like.device)
    return as_work(value, like.dtype, like.device, copy=True)


def _lr_value(value: Any, what: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{what} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be finite and >= 0, got {value}")
    return value


def checked_group_lrs(
    optimizer: torch.optim.Optimizer | None, group_lrs: Sequence[float | None] | None
) -> list[float | None] | None:
    """``group_lrs`` as floats (None kept), one per param group of ``optimizer``; a clear error otherwise."""
    if group_lrs is None:
        return None
    if optimizer is None:
        raise ValueError("group_lrs overrides the learning rates of the optimizer's param groups: pass the optimizer")
    values = list(group_lrs)
    if len(values) != len(optimizer.param_groups):
        raise ValueError(
            f"group_lrs has {len(values)} entries but {type(optimizer).__name__} has "
            f"{len(optimizer.param_groups)} param groups: give one learning rate (or None) per param group"
        )
    return [None if v is None else _lr_value(v, f"group_lrs[{i}]") for i, v in enumerate(values)]


def base_learning_rates(optimizer: torch.optim.Optimizer) -> list[float | None]:
    """The learning rate each param group's schedule is based on, for ``group_lrs``.

    torch's LR schedulers store it as ``initial_lr`` in every group (a Trainer's warmup/cosine/linear schedules
    included); groups without one give their current ``lr``. Under warmup the current lr is 0 at step 0, which would
    predict no update and make every importance 0; the base lr ranks units as the steps to come will move them.
    """
    optimizer = unwrap_optimizer(optimizer)
    if optimizer is None:
        raise ValueError("base_learning_rates needs an optimizer")
    out: list[float | None] = []
    for group in optimizer.param_groups:
        value = _base_lr(group)
        out.append(None if value is None else float(value))
    return out


def plain_gradient_step(optimizer: torch.optim.Optimizer) -> torch.optim.SGD:
    """An optimizer over the same param groups whose next update is ``-lr * g``, ``lr`` each group's base learning
    rate (:func:`base_learning_rates`): the importance it gives is ``lr * |g|^2``, the loss reduction of a plain
    gradient step, whatever ``optimizer``'s kind and state. A stand-in that holds no state and is only read. If no
    group has a learning rate (Adafactor's relative step), all count 1.0; if only some lack one, it is an error."""
    optimizer = unwrap_optimizer(optimizer)
    if optimizer is None:
        raise ValueError("plain_gradient_step needs an optimizer")
    owners = per_parameter_optimizers(optimizer) or [optimizer]  # a layer-wise optimizer's groups hold a dummy
    groups = [group for owner in owners for group in owner.param_groups]
    lrs = [_base_lr(group) for group in groups]
    if None in lrs:
        if any(lr is not None for lr in lrs):
            raise ValueError(
                f"importance_update='gradient' weighs each param group by its learning rate, but group "
                f"{lrs.index(None)} of {type(optimizer).__name__} has none (Adafactor's relative step?): give every "
                "group a learning rate, or use importance_update='optimizer'."
            )
        lrs = [1.0] * len(lrs)  # one scale for all (e.g. Adafactor's relative step): the ranking is |g|^2's
    return torch.optim.SGD(
        [{"params": list(group["params"]), "lr": float(lr)} for group, lr in zip(groups, lrs, strict=True)], lr=0.0
    )


def _adam_update(
    w: torch.Tensor, g: torch.Tensor, group: Mapping[str, Any], state: Mapping[str, Any], decoupled: bool, lr: float
) -> torch.Tensor:
    """Mirror of ``torch.optim.adam._single_tensor_adam`` on copies; ``w`` and ``g`` are already in work dtype."""
    beta1, beta2 = (float(b) for b in group["betas"])
    eps = float(group["eps"])
    weight_decay = float(group["weight_decay"])

    if group.get("maximize", False):
        g = -g
    decay = None
    if weight_decay != 0:
        if decoupled:
            decay = w * (-lr * weight_decay)  # torch: param.mul_(1 - lr * weight_decay)
        else:
            g = g.add(w, alpha=weight_decay)  # L2 penalty folded into the gradient

    step = (float(state["step"]) if "step" in state else 0.0) + 1.0  # the step count the NEXT step will have

    exp_avg = torch.lerp(_state_or_zeros(state, "exp_avg", g.shape, g), g, 1 - beta1)
    exp_avg_sq = _state_or_zeros(state, "exp_avg_sq", g.shape, g).mul_(beta2).addcmul_(g, g, value=1 - beta2)
    if group.get("amsgrad", False):
        second = torch.maximum(_state_or_zeros(state, "max_exp_avg_sq", g.shape, g), exp_avg_sq)
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


def _folded_gradient(w: torch.Tensor, g: torch.Tensor, group: Mapping[str, Any]) -> torch.Tensor:
    """The gradient torch's SGD, RMSprop and Adagrad step on: negated under ``maximize``, plus the L2 penalty's
    ``weight_decay * w``."""
    if group.get("maximize", False):
        g = -g
    weight_decay = float(group.get("weight_decay", 0.0))
    return g.add(w, alpha=weight_decay) if weight_decay != 0 else g


def _sgd_update(
    w: torch.Tensor, g: torch.Tensor, group: Mapping[str, Any], state: Mapping[str, Any], lr: float
) -> torch.Tensor:
    """Mirror of ``torch.optim.sgd._single_tensor_sgd`` on copies."""
    momentum = float(group.get("momentum", 0.0))
    dampening = float(group.get("dampening", 0.0))
    g = _folded_gradient(w, g, group)
    if momentum != 0:
        buf = state.get("momentum_buffer")
        # First step: torch initialises the buffer with the gradient itself (no dampening).
        buf = g.clone() if buf is None else as_work(buf, w.dtype, w.device).mul(momentum).add_(g, alpha=1 - dampening)
        g = g.add(buf, alpha=momentum) if group.get("nesterov", False) else buf
    return g.mul(-lr)


def _rmsprop_update(
    w: torch.Tensor, g: torch.Tensor, group: Mapping[str, Any], state: Mapping[str, Any], lr: float
) -> torch.Tensor:
    """Mirror of ``torch.optim.rmsprop._single_tensor_rmsprop`` on copies (``optim="rmsprop"``)."""
    alpha = float(group["alpha"])
    eps = float(group["eps"])
    momentum = float(group.get("momentum", 0.0))
    g = _folded_gradient(w, g, group)
    square_avg = _state_or_zeros(state, "square_avg", g.shape, g).mul_(alpha).addcmul_(g, g, value=1 - alpha)
    if group.get("centered", False):
        grad_avg = torch.lerp(_state_or_zeros(state, "grad_avg", g.shape, g), g, 1 - alpha)
        avg = square_avg.addcmul_(grad_avg, grad_avg, value=-1).sqrt_()
    else:
        avg = square_avg.sqrt_()
    step = torch.div(g, avg.add_(eps))
    if momentum > 0:
        step = _state_or_zeros(state, "momentum_buffer", g.shape, g).mul_(momentum).add_(step)
    return step.mul_(-lr)


def _muon_update(
    w: torch.Tensor, g: torch.Tensor, group: Mapping[str, Any], state: Mapping[str, Any], lr: float
) -> torch.Tensor | None:
    """Mirror of ``torch.optim._muon._single_tensor_muon`` (torch >= 2.9; 2-D tensors such as LoRA's A and B) on
    copies, with torch's own Newton-Schulz orthogonalisation and lr adjustment; None if this torch lacks them."""
    try:
        from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz
    except ImportError:
        return None
    momentum = float(group["momentum"])
    buffer = torch.lerp(_state_or_zeros(state, "momentum_buffer", g.shape, g), g, 1 - momentum)
    update = torch.lerp(g, buffer, momentum) if group["nesterov"] else buffer
    update = _zeropower_via_newtonschulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"])
    delta = update.to(g.dtype).mul_(-_adjust_lr(lr, group["adjust_lr_fn"], w.shape))
    return delta.add_(w, alpha=-lr * float(group["weight_decay"]))


def _adagrad_update(
    w: torch.Tensor, g: torch.Tensor, group: Mapping[str, Any], state: Mapping[str, Any], lr: float
) -> torch.Tensor:
    """Mirror of ``torch.optim.adagrad._single_tensor_adagrad`` on copies (``optim="adagrad"``; dense gradients)."""
    step = (float(state["step"]) if "step" in state else 0.0) + 1.0
    g = _folded_gradient(w, g, group)
    if "sum" in state:
        total = as_work(state["sum"], g.dtype, g.device, copy=True)
    else:  # torch creates it in __init__; a state dict loaded without it starts where torch would
        total = torch.full_like(g, float(group.get("initial_accumulator_value", 0.0)))
    total.addcmul_(g, g)
    decayed_lr = lr / (1 + (step - 1) * float(group.get("lr_decay", 0.0)))
    return torch.div(g, total.sqrt_().add_(float(group["eps"]))).mul_(-decayed_lr)


def _is_adafactor(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` is transformers' Adafactor (looked up in ``sys.modules``: only then can one exist)."""
    module = sys.modules.get("transformers.optimization")
    adafactor = getattr(module, "Adafactor", None) if module is not None else None
    return adafactor is not None and isinstance(optimizer, adafactor)


def _rms(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.norm(2) / (tensor.numel() ** 0.5)


def _adafactor_update(
    w: torch.Tensor, g: torch.Tensor, group: Mapping[str, Any], state: Mapping[str, Any], lr: float | None
) -> torch.Tensor:
    """Mirror of ``transformers.optimization.Adafactor.step`` on copies, with its own normalisation.

    Factored second moments (row and column averages) for tensors of rank >= 2, a full one otherwise; the update is
    clipped to RMS ``clip_threshold``; the step size is the group's lr (``lr`` if overridden) or, with
    ``relative_step``, ``min(1e-2, 1/sqrt(step))`` (``warmup_init``: ``min(1e-6 * step, ...)``), times the weight
    RMS with ``scale_parameter``; optional first moment (``beta1``) and weight decay ``-wd * lr * w``.
    """
    step = float(state.get("step", 0)) + 1.0
    eps_squared, eps_scale = (float(e) for e in group["eps"])
    if group["relative_step"]:
        min_step = 1e-6 * step if group["warmup_init"] else 1e-2
        relative = min(min_step, 1.0 / math.sqrt(step))
    else:
        relative = float(lr) if lr is not None else 0.0
    scale = max(eps_scale, float(_rms(w))) if group["scale_parameter"] else 1.0
    step_lr = scale * relative

    beta2t = 1.0 - math.pow(step, float(group["decay_rate"]))
    squared = g * g + eps_squared
    if g.ndim >= 2:
        row = _state_or_zeros(state, "exp_avg_sq_row", g.shape[:-1], g)
        col = _state_or_zeros(state, "exp_avg_sq_col", g.shape[:-2] + g.shape[-1:], g)
        row = row.mul_(beta2t).add_(squared.mean(dim=-1), alpha=1.0 - beta2t)
        col = col.mul_(beta2t).add_(squared.mean(dim=-2), alpha=1.0 - beta2t)
        row_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
        update = torch.mul(row_factor, col.unsqueeze(-2).rsqrt()).mul_(g)
    else:
        second = _state_or_zeros(state, "exp_avg_sq", g.shape, g).mul_(beta2t).add_(squared, alpha=1.0 - beta2t)
        update = second.rsqrt().mul_(g)
    update = update.div_((_rms(update) / float(group["clip_threshold"])).clamp_(min=1.0)).mul_(step_lr)
    if group["beta1"] is not None:
        beta1 = float(group["beta1"])
        update = _state_or_zeros(state, "exp_avg", g.shape, g).mul_(beta1).add_(update, alpha=1.0 - beta1)
    delta = update.neg_()
    weight_decay = float(group["weight_decay"])
    if weight_decay != 0:
        delta = delta.add_(w, alpha=-weight_decay * step_lr)
    return delta


def _mirrored_update(
    slot: _Slot,
    param: torch.Tensor,
    w: torch.Tensor,
    g: torch.Tensor,
    lr: float | None,
) -> torch.Tensor | None:
    """delta_w by the rule of the kind of the optimizer stepping ``param`` (subclasses are assumed to keep it), or
    None if it is not mirrored. ``lr`` is None only for a relative-step Adafactor group."""
    optimizer, group = slot.optimizer, slot.group
    state = _read_state(optimizer, param)
    if isinstance(optimizer, torch.optim.Adam):  # AdamW subclasses Adam in torch >= 2.6
        decoupled = bool(group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW)))
        return _adam_update(w, g, group, state, decoupled, float(lr))
    if isinstance(optimizer, torch.optim.AdamW):  # older torch: AdamW is not an Adam subclass
        return _adam_update(w, g, group, state, True, float(lr))
    if isinstance(optimizer, torch.optim.SGD):
        return _sgd_update(w, g, group, state, float(lr))
    if isinstance(optimizer, torch.optim.RMSprop):
        return _rmsprop_update(w, g, group, state, float(lr))
    if isinstance(optimizer, torch.optim.Adagrad):
        return _adagrad_update(w, g, group, state, float(lr))
    muon = getattr(torch.optim, "Muon", None)  # torch >= 2.9
    if muon is not None and isinstance(optimizer, muon):
        return _muon_update(w, g, group, state, float(lr))
    if _is_adafactor(optimizer):
        return _adafactor_update(w, g, group, state, lr)
    config = bnb_config(optimizer, slot.group_index, slot.param_index, group, state)
    return bnb_update(w, g, config, state, float(lr)) if config is not None else None


def _base_lr(group: Mapping[str, Any]) -> Any:
    """The lr a param group's schedule is based on: torch's LR schedulers store it as ``initial_lr`` (a Trainer's
    warmup/cosine/linear schedules included); a group without one gives its current ``lr``."""
    return group.get("initial_lr", group.get("lr"))


def _step_lr(slot: _Slot, group_lrs: Sequence[float | None] | None, own_lr: float | None) -> float | None:
    """The lr the tensor at ``slot`` is predicted to step at: its group's, or the one ``group_lrs`` gives the group
    (a per-parameter optimizer's group, which ``group_lrs`` does not list: its own base lr); ``own_lr``, one its
    bitsandbytes manager sets for it alone, replaces either, as in the step. None: a relative-step Adafactor group."""
    override = own_lr
    if override is None and group_lrs is not None:
        override = _base_lr(slot.group) if slot.per_parameter else group_lrs[slot.group_index]
    lr = override if override is not None else slot.group.get("lr")
    return float(lr) if lr is not None else None


def predicted_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    optimizer: torch.optim.Optimizer | None,
    slot: _Slot | None,
    lr: float | None,
    group_lrs: Sequence[float | None] | None,
) -> tuple[torch.Tensor, list[str]]:
    """delta_w in work dtype (same shape/dtype kind as ``param`` upcast), plus notes on approximations."""
    dtype = work_dtype(param)
    device = param.device
    w = as_work(param, dtype, device)
    g = as_work(grad, dtype, device)
    if w.shape != g.shape:
        raise ValueError(f"gradient shape {tuple(grad.shape)} does not match parameter shape {tuple(param.shape)}")

    notes: list[str] = []
    if optimizer is None:
        if lr is None:
            raise ValueError(
                "optimizer is None, so the update is approximated as delta_w = -lr * grad: pass `lr` "
                "(the learning rate that training will use)."
            )
        delta = g.mul(-float(lr))
    elif slot is None:
        step_lr = float(lr) if lr is not None else _first_group_lr(optimizer)
        delta = g.mul(-step_lr)
        notes.append(
            f"some parameters are not in the {type(optimizer).__name__} optimizer; their update is approximated "
            f"as -lr * grad with lr={step_lr:g}"
        )
    else:
        group = slot.group
        optimizer = slot.optimizer
        own_lr = bnb_lr_override(optimizer, slot.group_index, slot.param_index)
        step_lr = _step_lr(slot, group_lrs, own_lr)
        delta = _mirrored_update(slot, param, w, g, step_lr)
        if delta is None:
            if step_lr is None:  # any constant scale ranks units alike
                step_lr = float(lr) if lr is not None else 1.0
            delta = g.mul(-step_lr)
            notes.append(
                f"{type(optimizer).__name__} is not mirrored (mirrored: {_MIRRORED}); its update is approximated "
                f"to first order as -lr * grad with the param group's lr"
            )
        elif group.get("relative_step") and _is_adafactor(optimizer):
            step_lr = None  # the lr comes from the step count; overrides and the zero-lr check do not apply
        if step_lr == 0.0 and own_lr is None:  # (an lr of 0 set for this tensor alone is not its group's)
            notes.append(
                f"param group {slot.group_index} of {type(optimizer).__name__} has lr 0 (e.g. step 0 of a warmup "
                "schedule), so its tensors' predicted update and importance are 0; pass "
                "group_lrs=base_learning_rates(optimizer) to rank them with the schedule's base lr"
            )

    if param.is_complex():
        delta = torch.view_as_complex(delta)
    return delta, notes


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
    group_lrs: Sequence[float | None] | None = None,
) -> torch.Tensor:
    """delta_w the optimizer would apply to `param` for gradient `grad`, computed without touching its state.

    The result is what ``param`` would change by if ``param.grad`` were ``grad`` and ``optimizer.step()`` ran now,
    but neither the parameter nor the optimizer state is modified.

    * ``torch.optim.Adam`` / ``torch.optim.AdamW`` and subclasses (assumed to keep the rule): exact, including weight
      decay (L2 added to the gradient for Adam, decoupled ``-lr * wd * w`` for AdamW), ``amsgrad``, ``maximize`` and
      bias correction with the step count the next step will have (state step + 1). Empty state (before the first
      step) behaves as torch does: zero moments.
    * ``torch.optim.SGD`` and subclasses: exact, including momentum, dampening, Nesterov, weight decay and
      ``maximize``; an empty momentum buffer is initialised with the gradient, as torch does.
    * ``torch.optim.RMSprop`` (``optim="rmsprop"``; centered, momentum, weight decay, ``maximize``) and
      ``torch.optim.Adagrad`` (``optim="adagrad"``; ``lr_decay``, ``initial_accumulator_value``) and subclasses:
      exact. ``torch.optim.Muon`` (2-D tensors, e.g. LoRA's): exact, with torch's own orthogonalisation.
    * bitsandbytes' Adam, AdEMAMix (with its alpha / beta3 warmup), Lion, RMSprop, Adagrad and SGD, 8-bit or 32-bit,
      paged or not (every bitsandbytes ``optim=`` name: ``"adamw_bnb_8bit"``, ``"paged_adamw_8bit"``,
      ``"lion_8bit"``, ``"paged_ademamix_8bit"``, ``"rmsprop_bnb"``, ...): exact up to float rounding, from the
      moments as the step itself reads them (8-bit ones dequantised blockwise with their ``qmap``/``absmax``), with
      per-parameter overrides of bitsandbytes' ``GlobalOptimManager`` (:mod:`.bnb_update`).
    * ``transformers.optimization.Adafactor`` (``optim="adafactor"``): its own update, with factored second moments,
      RMS clipping, relative step and parameter scaling as configured.
    * Any other optimizer: first-order approximation ``delta_w = -lr * grad`` with ``lr`` from the parameter's param
      group, and a logged warning naming the optimizer.
    * ``param`` not held by ``optimizer``: the same approximation with ``lr`` (or the first group's lr).
    * ``optimizer`` is None: ``delta_w = -lr * grad``; ``lr`` is then required.

    Hyper-parameters (``lr``, ``betas``, ...) come from the param group holding ``param`` (matched by identity) and
    may be tensors. Wrappers exposing the real optimizer as ``.optimizer`` (accelerate) are unwrapped.

    Args:
        group_lrs: One learning rate (or None: keep the group's own) per param group of ``optimizer``, used in place
            of the group's current ``lr``; e.g. :func:`base_learning_rates`, since under warmup the current lr is 0
            at step 0. Relative-step Adafactor groups compute their lr from the step count and ignore it.

    Returns:
        A new tensor shaped like ``param``, in at least float32 (bf16/fp16 are upcast, float64 is kept).
    """
    optimizer = unwrap_optimizer(optimizer)
    group_lrs = checked_group_lrs(optimizer, group_lrs)
    slot = param_slots(optimizer).get(id(param)) if optimizer is not None else None
    delta, notes = predicted_update(param, grad, optimizer, slot, lr, group_lrs)
    if notes:
        logger.warning("importance: %s.", "; ".join(sorted(set(notes))))
    return delta
