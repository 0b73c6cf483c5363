"""Which tensors an optimizer holds, and which it has stepped: what a selection may train, and what it has trained.

An optimizer holds the tensors of its param groups. A layer-wise optimizer (transformers' ``LayerWiseDummyOptimizer``,
built for ``optim="galore_adamw_layerwise"``, ``"apollo_adamw_layerwise"``, ...) holds only a dummy tensor: it steps
each parameter with an optimizer of its own, from a hook that runs as the parameter's gradient is ready.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["held_parameters", "per_parameter_optimizers", "stepped_parameters", "unwrap_optimizer"]


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


def per_parameter_optimizers(optimizer: torch.optim.Optimizer) -> list[torch.optim.Optimizer]:
    """The optimizers a layer-wise optimizer steps each parameter with, from a hook as its gradient is ready.

    transformers' ``LayerWiseDummyOptimizer`` (``optim="galore_adamw_layerwise"``, ``"apollo_adamw_layerwise"``, ...)
    keeps them in ``optimizer_dict`` and holds only a dummy tensor itself."""
    inner = getattr(optimizer, "optimizer_dict", None)
    if not isinstance(inner, Mapping):
        return []
    return list({id(o): o for o in inner.values() if isinstance(o, torch.optim.Optimizer)}.values())


def held_parameters(optimizer: torch.optim.Optimizer) -> set[int]:
    """``id`` of every parameter ``optimizer`` steps: those of its param groups, and those of its per-parameter
    optimizers that a hook steps as their gradient is ready. (transformers puts every parameter in a layer-wise
    optimizer's ``optimizer_dict`` but hooks only those trainable when it is built: the others are never stepped.)"""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for owner in per_parameter_optimizers(optimizer):
        held.update(
            id(p)
            for group in owner.param_groups
            for p in group["params"]
            if getattr(p, "_post_accumulate_grad_hooks", None)
        )
    return held


def stepped_parameters(optimizer: torch.optim.Optimizer) -> set[int]:
    """``id`` of every parameter ``optimizer`` (or one of its per-parameter optimizers) has stepped: its state counts
    more than 0 steps, or, for a state that counts none (SGD's momentum buffer), exists. (Adagrad makes its state, at
    step 0, when it is built.)"""
    stepped = set()
    for owner in [optimizer, *per_parameter_optimizers(optimizer)]:
        for param, state in owner.state.items():
            if state and ("step" not in state or float(state["step"]) > 0):
                stepped.add(id(param))
    return stepped
