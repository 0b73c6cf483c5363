"""Importance of each unit: how much the loss would drop if that unit alone took the optimizer's next step.

GreenTrainer (arXiv 2309.13192) decides which units (parameter tensors, or LoRA adapters) to train by weighing the
loss reduction each one buys against the backward FLOPs it costs. The loss reduction of unit ``u`` is estimated to
first order from the gradient ``g_u`` at the current weights and the update ``delta_w_u`` the optimizer would apply
at its next step given that gradient::

    I_u = L(w) - L(w + delta_w_u) ~= -sum(g_u * delta_w_u)

summed over every element of every tensor of the unit. For plain gradient descent (``delta_w = -lr * g``) this is
``lr * ||g_u||^2``; for Adam/AdamW it weighs each coordinate by the optimizer's adaptive step size and includes the
weight-decay term, so the estimate matches the step that training will really take. The same holds for the
optimizers QLoRA-style recipes use: bitsandbytes' 8-bit and paged Adam (moments dequantised as the step reads them)
and Adafactor (its factored, clipped update); anything else falls back to ``-lr * g`` with a warning.

The reference implementation obtains ``delta_w`` by calling ``optimizer.step()`` and reading the parameter change.
That step is real: it advances Adam's step counter and folds the probe gradient into its first and second moments
(and SGD's momentum buffer), so the actual training run afterwards uses corrupted optimizer state. Here the update
is instead recomputed from the optimizer's hyper-parameters and a read-only view of its state
(:func:`optimizer_update`), so importance evaluation leaves parameters, gradients, optimizer state and the RNG
exactly as it found them.
"""

from __future__ import annotations

import logging
import math
import numbers
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .profile import LossFn, default_loss
from .rng import fork_rng
from .units import Unit, inputs_device, is_trainable_storage, requires_grad_kept

logger = logging.getLogger(__name__)

__all__ = ["base_learning_rates", "compute_importance", "optimizer_update", "plain_gradient_step", "unwrap_optimizer"]


# bitsandbytes' ``Optimizer2State.init_state`` quantises 8-bit moments in blocks of this many elements.
_BNB_BLOCKSIZE = 256

_MIRRORED = (
    "torch Adam/AdamW/SGD and subclasses, bitsandbytes Adam-family (8-bit, 32-bit, paged), transformers Adafactor"
)


@dataclass(frozen=True)
class _Slot:
    """Where a parameter sits in its optimizer (bitsandbytes looks its per-parameter config up by position)."""

    group_index: int
    param_index: int
    group: dict[str, Any]


# ----------------------------------------------------------------------------------------------------------------
# Optimizer updates
# ----------------------------------------------------------------------------------------------------------------


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """At least float32: half-precision tensors are upcast, float64 stays float64."""
    return torch.promote_types(tensor.dtype, torch.float32)


def unwrap_optimizer(optimizer: torch.optim.Optimizer | None) -> torch.optim.Optimizer | None:
    """Return the real optimizer inside wrappers such as accelerate's ``AcceleratedOptimizer`` (``.optimizer``)."""
    seen = set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer = inner
    return optimizer


def _slot_map(optimizer: torch.optim.Optimizer) -> dict[int, _Slot]:
    return {
        id(p): _Slot(g, i, group)
        for g, group in enumerate(optimizer.param_groups)
        for i, p in enumerate(group["params"])
    }


def _read_state(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> Mapping[str, Any]:
    # ``optimizer.state`` is a defaultdict: ``state[param]`` would insert an empty entry, ``.get`` does not.
    state = optimizer.state.get(param)
    return state if state is not None else {}


def _as_work(tensor: torch.Tensor, dtype: torch.dtype, device: torch.device, copy: bool = False) -> torch.Tensor:
    """A detached view (a copy if ``copy`` or if the dtype/device differ) in the computation dtype, as real numbers
    (complex tensors viewed as pairs). Only copies may be updated in place: a view would write into optimizer state."""
    out = tensor.detach().to(device=device, dtype=dtype, copy=copy)
    return torch.view_as_real(out) if out.is_complex() else out


def _state_or_zeros(state: Mapping[str, Any], key: str, shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
    """A work-dtype copy of ``state[key]`` (safe to update in place), or the zeros the optimizer starts it at."""
    value = state.get(key)
    if value is None:
        if tuple(shape) == tuple(like.shape):
            return torch.zeros_like(like)  # keeps a sharded (DTensor) gradient's layout under FSDP2
        return torch.zeros(shape, dtype=like.dtype, device=like.device)
    return _as_work(value, like.dtype, like.device, copy=True)


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


def _check_group_lrs(
    optimizer: torch.optim.Optimizer | None, group_lrs: Sequence[float | None] | None
) -> list[float | None] | None:
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
        value = group.get("initial_lr", group.get("lr"))
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
    lrs = base_learning_rates(optimizer)
    if None in lrs:
        if any(lr is not None for lr in lrs):
            raise ValueError(
                f"importance_update='gradient' weighs each param group by its learning rate, but group "
                f"{lrs.index(None)} of {type(optimizer).__name__} has none (Adafactor's relative step?): give every "
                "group a learning rate, or use importance_update='optimizer'."
            )
        lrs = [1.0] * len(lrs)  # one scale for all (e.g. Adafactor's relative step): the ranking is |g|^2's
    groups = [
        {"params": list(group["params"]), "lr": lr} for group, lr in zip(optimizer.param_groups, lrs, strict=True)
    ]
    return torch.optim.SGD(groups, lr=0.0)


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


def _sgd_update(
    w: torch.Tensor, g: torch.Tensor, group: Mapping[str, Any], state: Mapping[str, Any], lr: float
) -> torch.Tensor:
    """Mirror of ``torch.optim.sgd._single_tensor_sgd`` on copies."""
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


def _bnb_adam_config(optimizer: torch.optim.Optimizer, slot: _Slot, param: torch.Tensor) -> dict[str, Any] | None:
    """The per-parameter config of a bitsandbytes Adam-family optimizer whose step is mirrored, else None.

    ``bnb.optim.Adam``/``AdamW`` and their ``8bit``/``32bit``/``Paged`` variants are all ``Optimizer2State`` running
    the "adam" kernel. Looked up in ``sys.modules``: an instance exists only if bitsandbytes is already imported.
    Not mirrored: update-norm clipping (``max_unorm > 0``) and a state layout this code does not know.
    """
    module = sys.modules.get("bitsandbytes.optim.optimizer")
    if module is None or not isinstance(optimizer, module.Optimizer2State):
        return None
    if getattr(optimizer, "optimizer_name", None) != "adam":
        return None
    config = optimizer.get_config(slot.group_index, slot.param_index, slot.group)  # builds a new dict; reads only
    if float(config.get("max_unorm", 0.0)) > 0:
        return None
    state = _read_state(optimizer, param)
    for index in (1, 2):
        moment = state.get(f"state{index}")
        if moment is None:
            continue
        if moment.dtype == torch.uint8:
            absmax = state.get(f"absmax{index}")
            if (
                absmax is None
                or state.get(f"qmap{index}") is None
                or absmax.numel() != -(-moment.numel() // _BNB_BLOCKSIZE)
            ):
                return None
        elif not moment.is_floating_point() or moment.shape != param.shape:
            return None
    return config


def _bnb_moment(state: Mapping[str, Any], index: int, like: torch.Tensor) -> torch.Tensor:
    """A work-dtype copy of bitsandbytes moment ``state{index}``, dequantised blockwise if stored in 8 bits."""
    moment = state.get(f"state{index}")
    if moment is None:
        return torch.zeros_like(like)
    if moment.dtype == torch.uint8:
        from bitsandbytes.functional import dequantize_blockwise  # imported only when a bnb optimizer exists

        moment = dequantize_blockwise(
            moment, absmax=state[f"absmax{index}"], code=state[f"qmap{index}"], blocksize=_BNB_BLOCKSIZE
        )
    return _as_work(moment, like.dtype, like.device, copy=True).reshape(like.shape)


def _bnb_adam_update(
    w: torch.Tensor, g: torch.Tensor, config: Mapping[str, Any], state: Mapping[str, Any], lr: float
) -> torch.Tensor:
    """Mirror of bitsandbytes 0.50's "adam" update (``backends/cpu/ops.py``; the CUDA kernels compute the same).

    Adam and AdamW alike decay weights decoupled (``p *= 1 - lr * wd``). The moments are dequantised exactly as the
    step dequantises them before updating, so the mirrored update differs from the real one only by float rounding.
    The 8-bit kernel forms ``m / c1 / (sqrt(v) / c2 + eps)``, the 32-bit one ``m * c2 / c1 / (sqrt(v) + eps * c2)``.
    """
    beta1, beta2 = float(config["betas"][0]), float(config["betas"][1])
    eps = float(config["eps"])
    weight_decay = float(config["weight_decay"])
    step = float(state.get("step", 0)) + 1.0

    exp_avg = _bnb_moment(state, 1, g).mul_(beta1).add_(g, alpha=1.0 - beta1)
    exp_avg_sq = _bnb_moment(state, 2, g).mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    correction1 = 1.0 - beta1**step
    correction2 = math.sqrt(1.0 - beta2**step)
    moment = state.get("state1")
    if moment is not None and moment.dtype == torch.uint8:
        delta = torch.div(exp_avg, (exp_avg_sq.sqrt() / correction2).add_(eps)).mul_(-lr / correction1)
    else:
        delta = torch.div(exp_avg, exp_avg_sq.sqrt().add_(eps * correction2)).mul_(-lr * correction2 / correction1)
    if weight_decay > 0:
        delta = delta.add_(w, alpha=-lr * weight_decay)
    return delta


def _adafactor_class() -> type | None:
    module = sys.modules.get("transformers.optimization")
    return getattr(module, "Adafactor", None) if module is not None else None


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


def _update(
    param: torch.Tensor,
    grad: torch.Tensor,
    optimizer: torch.optim.Optimizer | None,
    slot: _Slot | None,
    lr: float | None,
    group_lrs: Sequence[float | None] | None,
) -> tuple[torch.Tensor, list[str]]:
    """delta_w in work dtype (same shape/dtype kind as ``param`` upcast), plus notes on approximations."""
    dtype = _compute_dtype(param)
    device = param.device
    w = _as_work(param, dtype, device)
    g = _as_work(grad, dtype, device)
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
        override = group_lrs[slot.group_index] if group_lrs is not None else None
        group_lr = override if override is not None else group.get("lr")  # None: relative-step Adafactor
        step_lr = float(group_lr) if group_lr is not None else None
        state = _read_state(optimizer, param)
        adafactor = _adafactor_class()
        bnb_config = None
        if isinstance(optimizer, torch.optim.Adam):  # AdamW subclasses Adam in torch >= 2.6
            decoupled = bool(group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW)))
            delta = _adam_update(w, g, group, state, decoupled, float(step_lr))
        elif isinstance(optimizer, torch.optim.AdamW):  # older torch: AdamW is not an Adam subclass
            delta = _adam_update(w, g, group, state, True, float(step_lr))
        elif isinstance(optimizer, torch.optim.SGD):
            delta = _sgd_update(w, g, group, state, float(step_lr))
        elif adafactor is not None and isinstance(optimizer, adafactor):
            delta = _adafactor_update(w, g, group, state, step_lr)
            if group.get("relative_step"):
                step_lr = None  # the lr comes from the step count; overrides and the zero-lr check do not apply
        elif (bnb_config := _bnb_adam_config(optimizer, slot, param)) is not None:
            delta = _bnb_adam_update(w, g, bnb_config, state, float(step_lr))
        else:
            if step_lr is None:  # any constant scale ranks units alike
                step_lr = float(lr) if lr is not None else 1.0
            delta = g.mul(-step_lr)
            notes.append(
                f"{type(optimizer).__name__} is not mirrored (mirrored: {_MIRRORED}); its update is approximated "
                f"to first order as -lr * grad with the param group's lr"
            )
        if step_lr == 0.0:
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
    * bitsandbytes Adam-family optimizers (``bnb.optim.Adam``/``AdamW`` and their ``8bit``, ``32bit`` and ``Paged``
      variants, i.e. ``optim="adamw_bnb_8bit"``, ``"paged_adamw_8bit"``, ``"paged_adamw_32bit"``): exact up to float
      rounding, from the moments as the step itself reads them (8-bit ones dequantised blockwise with their
      ``qmap``/``absmax``), with per-parameter overrides of bitsandbytes' ``GlobalOptimManager``.
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
    group_lrs = _check_group_lrs(optimizer, group_lrs)
    slot = _slot_map(optimizer).get(id(param)) if optimizer is not None else None
    delta, notes = _update(param, grad, optimizer, slot, lr, group_lrs)
    if notes:
        logger.warning("importance: %s.", "; ".join(sorted(set(notes))))
    return delta


# ----------------------------------------------------------------------------------------------------------------
# Importance
# ----------------------------------------------------------------------------------------------------------------


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
    ``optimizer`` would apply for that gradient (:func:`optimizer_update`: mirrored for torch Adam/AdamW/SGD,
    bitsandbytes' Adam family and transformers' Adafactor, ``-lr * g`` with one warning naming the optimizer otherwise,
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
    group_lrs = _check_group_lrs(optimizer, group_lrs)
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

    slots = _slot_map(optimizer) if optimizer is not None else {}
    notes: set[str] = set()
    for u, indices in enumerate(unit_tensors):
        total = 0.0
        for i in indices:
            param, grad = tensors[i], grads[i]
            stepped = grad if clip == 1.0 else grad.mul(clip)
            delta, param_notes = _update(param, stepped, optimizer, slots.get(id(param)), lr, group_lrs)
            notes.update(param_notes)
            g = _as_work(grad, delta.dtype, delta.device)  # complex tensors: real inner product of (re, im) pairs
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
    sums = [torch.zeros(t.shape, dtype=_compute_dtype(t), device=t.device) for t in tensors]
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
