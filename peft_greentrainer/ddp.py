"""The ``DistributedDataParallel`` wrapper around a GreenTrainer model: find it, make its reducer follow selections,
and register the hook that all-reduces only the trained gradients (``ddp_comm.py``).

DDP builds its gradient reducer once, from the parameters that require a gradient when it wraps the model, and then
expects every one of them to get a gradient in every backward pass. The consequences, and why :func:`prepare_ddp`
rebuilds the reducer, are in ``distributed.py``'s docstring; this module holds the mechanics, which the tuner
(``select_units``, ``restore_selection``) and the callback both use.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterable
from typing import Any

import torch.distributed as dist
from torch import nn

from . import ranks
from .ddp_comm import TrainedGradients, reduce_trained_gradients
from .engine.units import requires_grad_kept

logger = logging.getLogger(__name__)


def find_ddp(model: nn.Module) -> nn.parallel.DistributedDataParallel | None:
    """The ``DistributedDataParallel`` wrapping ``model`` (``ddp.module is model``), if any.

    ``transformers.Trainer`` hands callbacks the unwrapped model; the wrapper holds it in its ``_modules``, so it is
    found a few referrer hops away from the model (:func:`_holders`).
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model
    return _first_ddp(_holders(model))


def find_ddp_around(tuner: nn.Module) -> nn.parallel.DistributedDataParallel | None:
    """The ``DistributedDataParallel`` wrapping ``tuner`` or the ``PeftModel`` that holds it (``accelerator.prepare``
    and :func:`wrap_ddp` wrap the ``PeftModel``; the tuner is its ``base_model``), if any."""
    holders = _holders(tuner)
    wrapper = _first_ddp(holders)
    if wrapper is None:  # (map is lazy: the walk stops at the first wrapper found)
        wrapper = next((ddp for ddp in map(find_ddp, holders) if ddp is not None), None)
    return wrapper


def _first_ddp(modules: list[nn.Module]) -> nn.parallel.DistributedDataParallel | None:
    return next((m for m in modules if isinstance(m, nn.parallel.DistributedDataParallel)), None)


def _holders(module: nn.Module) -> list[nn.Module]:
    """The modules that hold ``module`` as a child: each walk of the referrers scans every object, so it stops at the
    hop where they are."""
    seen = {id(module)}
    frontier: list[Any] = [module]
    for _ in range(3):  # module <- holder._modules <- holder.__dict__ <- holder
        referrers = [r for r in gc.get_referrers(*frontier) if id(r) not in seen and r is not frontier]
        holders = [
            r for r in referrers if isinstance(r, nn.Module) and any(child is module for child in r._modules.values())
        ]
        if holders:
            return holders
        frontier = [r for r in referrers if isinstance(r, dict)]
        seen.update(id(r) for r in referrers)
        if not frontier:
            break
    return []


def reduces_any_selection(ddp: nn.parallel.DistributedDataParallel, candidates: Iterable[nn.Parameter]) -> bool:
    """Whether ``ddp`` reduces the gradients of any subset of ``candidates`` being trained, as it is."""
    registered = registered_parameters(ddp)
    every = all(id(p) in registered for p in candidates)
    return every and ddp.find_unused_parameters and not ddp.static_graph


def registered_parameters(ddp: nn.parallel.DistributedDataParallel) -> set[int]:
    """``id`` of every parameter DDP's reducer all-reduces (those that required a gradient when it was built)."""
    return {id(p) for bucket in ddp.reducer._get_zeros_like_grad_buckets() for p in bucket.parameters()}


def prepare_ddp(ddp: nn.parallel.DistributedDataParallel, candidates: Iterable[nn.Parameter]) -> bool:
    """Make ``ddp`` reduce the gradients of whichever candidates are trained; True if its reducer had to be rebuilt.

    The reducer is made to follow the selections (:func:`follow_selections`), and, unless the wrapper already has a
    communication hook, it all-reduces only the trained gradients (:func:`send_trained_gradients_only`). Every rank
    must call it (same model, same flags: the decisions are the same).
    """
    rebuilt = follow_selections(ddp, candidates)
    send_trained_gradients_only(ddp)
    return rebuilt


def follow_selections(ddp: nn.parallel.DistributedDataParallel, candidates: Iterable[nn.Parameter]) -> bool:
    """Make ``ddp``'s reducer accept any subset of the candidates being trainable; True if it had to be rebuilt.

    Needed: ``find_unused_parameters=True`` (frozen units fire no gradient hook), no static graph (the set of frozen
    units changes), and every candidate registered with the reducer. If any is missing, the reducer is rebuilt from
    the candidates plus whatever else requires a gradient, as DDP itself rebuilds it when unpickled; ``requires_grad``
    flags are left as they were.
    """
    candidates = list({id(p): p for p in candidates}.values())
    if reduces_any_selection(ddp, candidates):
        return False
    missing = [p for p in candidates if id(p) not in registered_parameters(ddp)]
    if ddp.mixed_precision is not None or getattr(ddp, "_use_python_reducer", False):
        raise NotImplementedError(
            "GreenTrainer needs DistributedDataParallel(find_unused_parameters=True, static_graph=False) with every "
            "candidate unit trainable when the model is wrapped; this DDP wrapper (DDP-native mixed precision or "
            "compiled autograd) cannot be rebuilt that way. Wrap the model with "
            "peft_greentrainer.distributed.wrap_ddp(model, ...) before the first selection."
        )
    builtin_hook = (ddp._get_ddp_logging_data() or {}).get("comm_hook")
    if builtin_hook and not ddp._comm_hooks:
        raise NotImplementedError(
            f"DDP has a built-in communication hook ({builtin_hook}) that GreenTrainer cannot carry over when it "
            "rebuilds the reducer with find_unused_parameters=True; register a Python comm hook instead, or wrap the "
            "model with peft_greentrainer.distributed.wrap_ddp(model, ...) before the first selection."
        )
    reasons = []
    if not ddp.find_unused_parameters:
        reasons.append("find_unused_parameters=True (frozen units produce no gradient)")
    if ddp.static_graph:
        reasons.append("static_graph=False (the set of trained units changes between selections)")
    if missing:
        reasons.append(f"{len(missing)} candidate tensors registered (they were frozen when DDP wrapped the model)")
    logger.info("GreenTrainer rebuilt the DDP gradient reducer: %s.", "; ".join(reasons))

    with requires_grad_kept(candidates):
        for param in candidates:
            param.requires_grad_(True)
        ddp.reducer._remove_autograd_hooks()  # the old reducer must not see the next backward
        ddp.find_unused_parameters = True
        ddp.static_graph = False
        params, expect_sparse = ddp._build_params_for_reducer()
        names = ddp._build_debug_param_to_name_mapping(params)
        ddp._ddp_init_helper(params, expect_sparse, names, False)
        for hook, state in ddp._comm_hooks:
            dist._register_comm_hook(ddp.reducer, state, hook)
    return True


def send_trained_gradients_only(ddp: nn.parallel.DistributedDataParallel) -> TrainedGradients | None:
    """Register :func:`~peft_greentrainer.ddp_comm.reduce_trained_gradients` on ``ddp``; its state, or None if the
    wrapper already has a communication hook (the user's is kept, and every bucket is then sent whole)."""
    hooked = trained_gradients_state(ddp)
    if hooked is not None:
        return hooked
    if ddp._comm_hooks or (ddp._get_ddp_logging_data() or {}).get("comm_hook"):
        logger.info(
            "DDP already has a communication hook: GreenTrainer keeps it, and frozen units' zero gradients are "
            "all-reduced with the trained ones."
        )
        return None
    state = TrainedGradients(ddp.process_group)
    ddp.module.register_forward_pre_hook(state.record_forward)
    ddp.register_comm_hook(state, reduce_trained_gradients)
    return state


def trained_gradients_state(ddp: nn.parallel.DistributedDataParallel) -> TrainedGradients | None:
    """The state of the trained-gradients hook registered on ``ddp`` (what it sent so far), if any."""
    return next((state for hook, state in ddp._comm_hooks if hook is reduce_trained_gradients), None)


def warn_no_wrapper() -> None:
    """Say that a multi-process job trains without a DDP wrapper GreenTrainer could find."""
    logger.warning(
        "GreenTrainer runs on %d processes but found no DistributedDataParallel wrapper around the model: make sure "
        "gradients are averaged across ranks, or the ranks' weights will drift apart.",
        ranks.rank_and_world_size()[1],
    )
