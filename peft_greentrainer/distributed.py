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

import os
from collections.abc import Iterable
from typing import Any

from torch import nn

from . import fsdp
from .ddp import (
    find_ddp,
    find_ddp_around,
    follow_selections,
    prepare_ddp,
    reduces_any_selection,
    registered_parameters,
    send_trained_gradients_only,
    trained_gradients_state,
    warn_no_wrapper,
)
from .engine.units import requires_grad_kept
from .model import GreenTrainerModel, find_tuner
from .ranks import gradients_averaged_across_ranks, importance_shard, is_distributed, rank_and_world_size

__all__ = [  # the rank and DDP helpers live in ranks.py and ddp.py; re-exported here for plain loops
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
    "warn_no_wrapper",
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


def candidate_parameters(tuner: GreenTrainerModel) -> list[nn.Parameter]:
    """The distinct parameters of every candidate unit of a GreenTrainer model."""
    return tuner._candidate_parameters()
