"""Multi-process training: every rank applies the same selection at the same step, and DDP reduces what is trained.

GreenTrainer freezes and unfreezes units between selections. ``DistributedDataParallel`` builds its gradient reducer
once, from the parameters that require a gradient when the model is wrapped, and then expects every one of them to
get a gradient in every backward pass:

* a parameter frozen later never fires its gradient hook, so (without ``find_unused_parameters=True``) its bucket is
  never reduced: that step silently uses per-rank gradients, and the next forward raises "Expected to have finished
  reduction in the prior iteration";
* ``static_graph=True`` records the unused parameters in the first iteration and raises as soon as the selection
  changes ("Your training graph has changed in this iteration");
* a parameter that was frozen when the model was wrapped is never registered: selected later, its gradient is
  silently never all-reduced and the ranks' weights drift apart.

:func:`prepare_ddp` fixes all three on an existing DDP wrapper: it rebuilds the reducer (the same internal path DDP
uses when it is unpickled) with ``find_unused_parameters=True``, no static graph, and every candidate unit registered.
It also registers a communication hook that all-reduces only the trained gradients (``ddp_comm.py``): DDP alone sends
every bucket whole, frozen units' zeros included. The :class:`~peft_greentrainer.GreenTrainerCallback` calls it at
``on_train_begin``, right after the Trainer wrapped the model (setting ``args.ddp_find_unused_parameters`` from a
callback would be too late: the Trainer turns it into accelerate's DDP arguments in ``__init__``, before
``on_init_end``). A plain PyTorch loop wraps with :func:`wrap_ddp`.

Importance is computed like the training step: each rank evaluates its own slice of the same global batches a
single process would draw (:func:`importance_shard`), and every gradient is averaged across ranks as it is computed
(:func:`gradients_averaged_across_ranks`), so the importances, and therefore the selections, are those of one process
training on the global batch, identical on all ranks. The budget holds per rank and step (each rank's backward is
what gets cheaper). With dynamic padding the ranks see different shapes: before each training step they exchange the
costs of shapes new to any of them (``model.py``), so all select against the same shapes, and the selection is
checked to agree (:func:`~peft_greentrainer.ranks.check_agreement`).

FSDP2 (``fully_shard``, FSDP version 2 in the Trainer or accelerate config) is supported by ``fsdp.py``. FSDP1 and
DeepSpeed are refused with an error that names FSDP2: their registered parameters are flat parameters or ZeRO
partitions while the forward runs on gathered copies, and their optimizers keep state in their own layouts, so the
cost profile, the importance and per-tensor freezing would miss what they measure.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Iterable
from typing import Any

import torch.distributed as dist
from torch import nn

from . import fsdp
from .ddp_comm import TrainedGradients, reduce_trained_gradients
from .engine.units import requires_grad_kept
from .model import GreenTrainerModel, find_tuner
from .ranks import gradients_averaged_across_ranks, importance_shard, is_distributed, rank_and_world_size

logger = logging.getLogger(__name__)

__all__ = [  # the rank helpers live in ranks.py; re-exported here for plain loops that import them from this module
    "candidate_parameters",
    "check_backend",
    "find_ddp",
    "find_ddp_around",
    "follow_selections",
    "gradients_averaged_across_ranks",
    "importance_shard",
    "is_distributed",
    "prepare_ddp",
    "rank_and_world_size",
    "reduces_any_selection",
    "registered_parameters",
    "send_trained_gradients_only",
    "trained_gradients_state",
    "wrap_ddp",
]

SUPPORTED = (
    "GreenTrainer supports multi-process training with DistributedDataParallel, which is what transformers.Trainer "
    "uses under `torchrun` / `accelerate launch` when neither FSDP nor DeepSpeed is configured, and with FSDP2, which "
    'shards parameters, gradients and optimizer state across processes (TrainingArguments(fsdp="full_shard", '
    'fsdp_config={"version": 2}) or `fsdp_version: 2` in the accelerate config).'
)


# ------------------------------------------------------------------------------------------- configuration
def unsupported_backend(args: Any = None) -> str | None:
    """``"FSDP1"`` / ``"DeepSpeed"`` when the job is configured for it (Trainer arguments or ``accelerate launch``)."""
    if args is not None and getattr(args, "deepspeed", None):
        return "DeepSpeed"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes"):
        return "DeepSpeed"
    if fsdp.configured_version(args) == 1:
        return "FSDP1"
    try:
        from accelerate.state import AcceleratorState
        from accelerate.utils import DistributedType
    except ImportError:  # pragma: no cover - accelerate is a dependency
        return None
    if AcceleratorState._shared_state:  # initialized (the Trainer creates its Accelerator in __init__)
        kind = getattr(AcceleratorState(), "distributed_type", None)
        if kind == DistributedType.DEEPSPEED:
            return "DeepSpeed"
    return None


def sharded_wrapper(model: nn.Module) -> str | None:
    """``"FSDP1"`` / ``"DeepSpeed"`` when ``model`` (or a module inside it) is already sharded by one of them."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    for module in model.modules():
        if isinstance(module, FullyShardedDataParallel):
            return "FSDP1"
    if any(hasattr(p, "ds_id") or hasattr(p, "ds_tensor") for p in model.parameters()):  # DeepSpeed ZeRO-3
        return "DeepSpeed"
    return None


def check_backend(args: Any = None, model: nn.Module | None = None) -> None:
    """Raise a clear error for FSDP1 and DeepSpeed, which GreenTrainer does not support (see the module docstring),
    and for a model FSDP2 cannot serve (``fsdp.check_model``); before any data is loaded."""
    backend = unsupported_backend(args) or (sharded_wrapper(model) if model is not None else None)
    if backend is None:
        if model is not None and (fsdp.configured_version(args) == 2 or fsdp.is_sharded(model)):
            fsdp.check_model(model)
        return
    if backend == "DeepSpeed":
        fix = (
            "remove `deepspeed=...` from TrainingArguments (or the DeepSpeed section of the accelerate config); to "
            'shard a model too large for one device, use FSDP2 instead: fsdp="full_shard", fsdp_config={"version": 2}'
        )
    else:
        fix = (
            'use FSDP2: fsdp_config={"version": 2} (or `fsdp_version: 2` in the accelerate config), or remove '
            "`fsdp=...` from TrainingArguments (or the FSDP section of the accelerate config) for DDP"
        )
    raise NotImplementedError(
        f"GreenTrainer does not support {backend}: its cost profile, importance and freezing work on whole parameter "
        f"tensors or FSDP2's per-tensor shards, and {backend} trains flattened or partitioned copies of them. "
        f"{SUPPORTED} To train with GreenTrainer, {fix}."
    )


# --------------------------------------------------------------------------------------------------- DDP
def find_ddp(model: nn.Module) -> nn.parallel.DistributedDataParallel | None:
    """The ``DistributedDataParallel`` wrapping ``model`` (``ddp.module is model``), if any.

    ``transformers.Trainer`` hands callbacks the unwrapped model; the wrapper holds it in its ``_modules``, so it is
    found a few referrer hops away from the model.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model
    seen = {id(model)}
    frontier: list[Any] = [model]
    for _ in range(3):  # model <- DDP._modules <- DDP.__dict__ <- DDP
        referrers = [r for r in gc.get_referrers(*frontier) if id(r) not in seen and r is not frontier]
        for referrer in referrers:
            if isinstance(referrer, nn.parallel.DistributedDataParallel) and referrer.module is model:
                return referrer
        frontier = [r for r in referrers if isinstance(r, dict)]
        seen.update(id(r) for r in referrers)
        if not frontier:
            break
    return None


def find_ddp_around(tuner: nn.Module) -> nn.parallel.DistributedDataParallel | None:
    """The ``DistributedDataParallel`` wrapping ``tuner`` or the ``PeftModel`` that holds it (``accelerator.prepare``
    and :func:`wrap_ddp` wrap the ``PeftModel``; the tuner is its ``base_model``), if any."""
    for module in (tuner, *_holders(tuner)):
        ddp = find_ddp(module)
        if ddp is not None:
            return ddp
    return None


def _holders(module: nn.Module) -> list[nn.Module]:
    """The modules that hold ``module`` as a child, found as :func:`find_ddp` finds a wrapper."""
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


def wrap_ddp(
    model: nn.Module,
    candidates: Iterable[nn.Parameter] | None = None,
    *,
    trained_gradients_only: bool = True,
    **kwargs: Any,
):
    """``DistributedDataParallel(model, find_unused_parameters=True, **kwargs)`` with every candidate unit registered.

    For plain PyTorch loops: wrap once, before or after selections, and call ``select_units`` on the unwrapped
    model on every rank, with the same number of batches of this rank's data, inside
    ``gradients_averaged_across_ranks(candidate_parameters(tuner))`` so that the importance is the global batch's.
    ``candidates`` default to those of the GreenTrainer model inside ``model``. With ``trained_gradients_only`` the
    wrapper all-reduces only the trained gradients (:func:`send_trained_gradients_only`); pass False to register a
    communication hook of your own (DDP takes one).
    """
    if kwargs.pop("static_graph", False):
        raise ValueError("static_graph=True cannot follow GreenTrainer's changing selections; leave it False.")
    if kwargs.get("find_unused_parameters") is False:
        raise ValueError("GreenTrainer freezes units between selections: DDP needs find_unused_parameters=True.")
    kwargs["find_unused_parameters"] = True
    if candidates is None:
        candidates = candidate_parameters(find_tuner(model))
    candidates = list(candidates)
    with requires_grad_kept(candidates):
        for param in candidates:
            param.requires_grad_(True)
        ddp = nn.parallel.DistributedDataParallel(model, **kwargs)
    if trained_gradients_only:
        send_trained_gradients_only(ddp)
    return ddp


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


def candidate_parameters(tuner: GreenTrainerModel) -> list[nn.Parameter]:
    """The distinct parameters of every candidate unit of a GreenTrainer model."""
    params = [p for unit in tuner.candidate_units() for p in unit.parameters(tuner.model)]
    return list({id(p): p for p in params}.values())
