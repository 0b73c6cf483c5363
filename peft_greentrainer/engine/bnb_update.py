"""The next update of a bitsandbytes optimizer, predicted from a read-only view of its (8-bit or 32-bit) state.

QLoRA-style recipes train with bitsandbytes' optimizers (``TrainingArguments(optim="paged_adamw_8bit")``,
``"lion_8bit"``, ``"paged_ademamix_8bit"``, ``"rmsprop_bnb"``, ...). Each is an ``Optimizer1State`` or
``Optimizer2State`` whose ``optimizer_name`` picks the update kernel; the rules below are those of bitsandbytes 0.50's
CPU kernels (``backends/cpu/ops.py``), which its CUDA, Triton and default kernels compute too. 8-bit moments are
dequantised blockwise with their own ``qmap``/``absmax``, as the step dequantises them before updating, so a mirrored
update differs from the real one only by float rounding. Not mirrored (``None``: the caller falls back): LAMB and
LARS, whose trust ratio (``max_unorm``) depends on the update's norm, and any state layout this module does not know.
bitsandbytes is only looked up in ``sys.modules``: an instance of its optimizers exists only once it is imported.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["KERNEL_NAMES", "bnb_config", "bnb_lr_override", "bnb_update"]

# bitsandbytes' ``init_state`` quantises 8-bit moments in blocks of this many elements.
_BLOCKSIZE = 256

# ``optimizer_name``s whose update is mirrored, and the optimizers they are.
_KERNELS = ("adam", "ademamix", "lion", "rmsprop", "adagrad", "momentum")
KERNEL_NAMES = "Adam, AdEMAMix, Lion, RMSprop, Adagrad and SGD"


def _moment_parts(kernel: str, index: int) -> int:
    """How many moments ``state{index}`` stacks: AdEMAMix keeps its fast and slow EMAs in one double buffer."""
    return 2 if kernel == "ademamix" and index == 1 else 1


def _mirrored_kernel(optimizer: torch.optim.Optimizer) -> str | None:
    """The kernel of a bitsandbytes optimizer whose update is mirrored, else None (bitsandbytes is looked up in
    ``sys.modules``: an instance of its optimizers exists only once it is imported)."""
    module = sys.modules.get("bitsandbytes.optim.optimizer")
    if module is None or not isinstance(optimizer, module.Optimizer1State | module.Optimizer2State):
        return None
    kernel = getattr(optimizer, "optimizer_name", None)
    return kernel if kernel in _KERNELS else None


def _overrides_in_force(optimizer: torch.optim.Optimizer, group_index: int, param_index: int) -> dict[str, Any]:
    """The settings the ``GlobalOptimManager`` holds for this tensor now: by position, then by tensor."""
    manager = optimizer.mng
    param = optimizer.param_groups[group_index]["params"][param_index]
    return {**manager.index2config.get((group_index, param_index), {}), **manager.pid2config.get(id(param), {})}


def _pending_override(optimizer: torch.optim.Optimizer, group_index: int, param_index: int) -> dict[str, Any] | None:
    """A module override naming this tensor (``register_module_override``) that the optimizer's first step will
    apply (``check_overrides``), replacing the settings in force; None once that step ran, or if there is none."""
    if optimizer.initialized:
        return None
    param = optimizer.param_groups[group_index]["params"][param_index]
    triples = optimizer.mng.module_weight_config_triple
    pending = [config for module, name, config in triples if getattr(module, name) is param]
    return dict(pending[-1]) if pending else None


def bnb_lr_override(optimizer: torch.optim.Optimizer, group_index: int, param_index: int) -> float | None:
    """The lr bitsandbytes steps this tensor at in place of its group's (schedule and all), if its manager sets one."""
    if _mirrored_kernel(optimizer) is None:
        return None
    pending = _pending_override(optimizer, group_index, param_index)
    lr = (pending if pending is not None else _overrides_in_force(optimizer, group_index, param_index)).get("lr")
    return None if lr is None else float(lr)


def _known_layout(kernel: str, numel: int, state: Mapping[str, Any]) -> bool:
    """Whether the moments in ``state`` are laid out as the kernel keeps them for a tensor of ``numel`` elements
    (GaLore's 8-bit AdamW runs the "adam" kernel on moments of a projected, smaller gradient)."""
    for index in (1, 2):
        moment = state.get(f"state{index}")
        if moment is None:
            continue
        parts = _moment_parts(kernel, index)
        if moment.numel() != parts * numel:
            return False
        if moment.dtype == torch.uint8:
            absmax = state.get(f"absmax{index}")
            if absmax is None or state.get(f"qmap{index}") is None or absmax.numel() != parts * -(-numel // _BLOCKSIZE):
                return False
        elif not moment.is_floating_point():
            return False
    return True


def bnb_config(
    optimizer: torch.optim.Optimizer, group_index: int, param_index: int, group: Mapping[str, Any], state: Mapping
) -> dict[str, Any] | None:
    """The settings (with ``"kernel"``) bitsandbytes' next step of this tensor runs with, if its update is mirrored:
    a kernel mirrored, no update-norm clipping (LAMB's and LARS's trust ratio, ``max_unorm``), a known state
    layout; else None."""
    kernel = _mirrored_kernel(optimizer)
    if kernel is None or not _known_layout(kernel, group["params"][param_index].numel(), state):
        return None
    config = optimizer.get_config(group_index, param_index, group)  # builds a new dict; reads only
    pending = _pending_override(optimizer, group_index, param_index)
    if pending is not None:  # the settings in force go back to the group's and the optimizer's, then it applies
        for key in _overrides_in_force(optimizer, group_index, param_index):
            config[key] = group.get(key, getattr(optimizer.args, key, None))
        config.update(pending)
    if float(config.get("max_unorm", 0.0)) > 0:
        return None
    return {**config, "kernel": kernel}


def _moment(state: Mapping[str, Any], index: int, like: torch.Tensor, parts: int) -> torch.Tensor:
    """A work-dtype copy of moment ``state{index}`` shaped ``like`` (``(parts, *like.shape)`` when it stacks
    several), dequantised blockwise, part by part, if stored in 8 bits; zeros before the first step."""
    shape = like.shape if parts == 1 else (parts, *like.shape)
    moment = state.get(f"state{index}")
    if moment is None:
        return torch.zeros(shape, dtype=like.dtype, device=like.device)
    if moment.dtype == torch.uint8:
        from bitsandbytes.functional import dequantize_blockwise  # imported only when a bnb optimizer exists

        absmax, code = state[f"absmax{index}"], state[f"qmap{index}"]
        moment = torch.stack(
            [
                dequantize_blockwise(part, absmax=scales, code=code, blocksize=_BLOCKSIZE)
                for part, scales in zip(moment.reshape(parts, -1), absmax.reshape(parts, -1), strict=True)
            ]
        )
    return moment.detach().to(device=like.device, dtype=like.dtype, copy=True).reshape(shape)


def _ademamix_schedule(config: Mapping[str, Any], step: float) -> tuple[float, float]:
    """AdEMAMix's ``(alpha, beta3)`` at ``step``: warmed up over ``t_alpha`` / ``t_beta3`` steps when those are set."""
    beta1, beta3 = float(config["betas"][0]), float(config["betas"][2])
    alpha = float(config.get("alpha", 0.0))
    t_alpha, t_beta3 = config.get("t_alpha"), config.get("t_beta3")
    if not t_alpha and not t_beta3:
        return alpha, beta3
    if t_alpha:
        alpha = min(step * alpha / t_alpha, alpha)
    if t_beta3:
        ln_beta1, ln_beta3 = math.log(beta1), math.log(beta3)
        scale = step / t_beta3
        beta3 = min(math.exp(ln_beta1 * ln_beta3 / ((1 - scale) * ln_beta3 + scale * ln_beta1)), beta3)
    return alpha, beta3


def bnb_update(
    w: torch.Tensor, g: torch.Tensor, config: Mapping[str, Any], state: Mapping[str, Any], lr: float
) -> torch.Tensor:
    """delta_w of the next step of the kernel ``config["kernel"]``; ``w`` and ``g`` already in work dtype.

    Adam, AdEMAMix and Lion decay weights decoupled (``p *= 1 - lr * wd``); RMSprop, Adagrad and momentum fold the
    decay into the gradient.
    """
    kernel = config["kernel"]
    beta1, beta2 = float(config["betas"][0]), float(config["betas"][1])
    eps = float(config["eps"])
    weight_decay = float(config["weight_decay"])
    step = float(state.get("step", 0)) + 1.0
    first = _moment(state, 1, g, _moment_parts(kernel, 1))
    decoupled = kernel in ("adam", "ademamix", "lion")
    if not decoupled and weight_decay > 0:
        g = g.add(w, alpha=weight_decay)

    if kernel == "adam":
        exp_avg = first.mul_(beta1).add_(g, alpha=1.0 - beta1)
        exp_avg_sq = _moment(state, 2, g, 1).mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        correction1 = 1.0 - beta1**step
        correction2 = math.sqrt(1.0 - beta2**step)
        # The 8-bit kernel forms m / c1 / (sqrt(v) / c2 + eps), the 32-bit one m * c2 / c1 / (sqrt(v) + eps * c2).
        if state.get("state1") is not None and state["state1"].dtype == torch.uint8:
            delta = torch.div(exp_avg, (exp_avg_sq.sqrt() / correction2).add_(eps)).mul_(-lr / correction1)
        else:
            delta = torch.div(exp_avg, exp_avg_sq.sqrt().add_(eps * correction2)).mul_(-lr * correction2 / correction1)
    elif kernel == "ademamix":
        alpha, beta3 = _ademamix_schedule(config, step)
        fast = first[0].mul_(beta1).add_(g, alpha=1.0 - beta1)
        slow = first[1].mul_(beta3).add_(g, alpha=1.0 - beta3)
        nu = _moment(state, 2, g, 1).mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        mixed = fast.div_(1.0 - beta1**step).add_(slow, alpha=alpha)
        delta = mixed.div_((nu.sqrt() / math.sqrt(1.0 - beta2**step)).add_(eps)).mul_(-lr)
    elif kernel == "lion":
        delta = first.mul_(beta1).add_(g, alpha=1.0 - beta1).sign_().mul_(-lr)
    elif kernel == "rmsprop":
        square_avg = first.mul_(beta1).addcmul_(g, g, value=1.0 - beta1)
        delta = torch.div(g, square_avg.sqrt_().add_(eps)).mul_(-lr)
    elif kernel == "adagrad":
        total = first.addcmul_(g, g)
        delta = torch.div(g, total.sqrt_().add_(eps)).mul_(-lr)
    else:  # "momentum": the first step's buffer is the gradient itself
        buffer = g.clone() if step == 1 else first.mul_(beta1).add_(g)
        delta = buffer.mul_(-lr)
    if decoupled and weight_decay > 0:
        delta = delta.add_(w, alpha=-lr * weight_decay)
    return delta
