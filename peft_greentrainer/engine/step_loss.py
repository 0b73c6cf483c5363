"""What a training step backpropagates from, as far as the model's forward can tell.

Every step is priced before its forward runs, from the inputs the forward receives (a pre-hook sees nothing else):
the loss is computed later, by the trainer or the caller's ``loss_fn``. Full fine-tuning, rho's reference, costs the
backward from that loss, and the profile must not take it for more: an output the loss never reads (a head of
another task, returned next to the one trained) would make full fine-tuning look dearer, and every step's budget
with it. So a step is profiled as backpropagating from, in this order:

1. the outputs a caller's ``loss_fn`` was seen to read (``probe_loss``, run on the first selection's batches);
2. the loss the model returns (``outputs.loss``: what a Trainer backpropagates without a ``compute_loss_func``);
3. every output (a trainer's loss may use any).

Only the reference is concerned: units are charged for backpropagating from every output, a hook's captures and
tensors kept on modules as well (``profile._Roots``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import keystr, tree_flatten_with_path
from torch.utils.flop_counter import FlopCounterMode

from .profile import LossFn
from .rng import fork_rng

POSITIONAL = "__positional_"  # key prefix of a forward's positional inputs in a batch of forward inputs


def as_batch(args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """A forward's inputs as one batch: positional ones under ``POSITIONAL`` keys, in order."""
    return {**{f"{POSITIONAL}{i:03d}": a for i, a in enumerate(args)}, **kwargs}


def forward(model: nn.Module, batch: Mapping[str, Any]) -> Any:
    """The forward pass a training step runs on ``batch`` (an ``as_batch`` of its inputs)."""
    args = [batch[key] for key in sorted(k for k in batch if k.startswith(POSITIONAL))]
    return model(*args, **{k: v for k, v in batch.items() if not k.startswith(POSITIONAL)})


def step_loss(model: nn.Module, batch: Mapping[str, Any], reads: frozenset[str] | None = None) -> Any:
    """The forward on ``batch``, returning what the step backpropagates from (module docstring): the outputs at the
    paths in ``reads``, else the model's loss, else every output."""
    outputs = forward(model, batch)
    if reads:
        found = [leaf for path, leaf in tree_flatten_with_path(outputs)[0] if keystr(path) in reads]
        if found:
            return found
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else getattr(outputs, "loss", None)
    return loss if isinstance(loss, torch.Tensor) and loss.grad_fn is not None else outputs


class _Captured(Exception):
    """Raised by ``probe_loss``'s hook to end ``loss_fn`` once the forward's inputs are known."""


@dataclass
class LossProbe:
    """What a run of a caller's ``loss_fn`` shows of a training step (``probe_loss``)."""

    inputs: dict[str, Any]  # what the model's forward receives
    reads: frozenset[str] | None = None  # paths of the outputs the loss reads; None: not looked at
    forward_flops: float = 0.0  # FLOPs of the model's forwards (all of them), as FlopCounterMode counts them
    outside_flops: float = 0.0  # FLOPs ``loss_fn`` computed outside them: no price of a step covers those


def probe_loss(model: nn.Module, loss_fn: LossFn, batch: Mapping[str, Any], *, reads: bool = True) -> LossProbe:
    """The inputs ``loss_fn(model, batch)`` gives ``model``'s forward (the first forward with gradients on; its batch
    may hold more, such as targets the forward does not take), and with ``reads`` the outputs its loss reads and the
    FLOPs it computes outside the model (``loss_fn`` then runs to its end, without a backward; otherwise it is
    stopped before the forward runs). Random streams are forked. Raises ``LookupError`` if ``loss_fn`` runs no such
    forward."""
    seen: list[tuple[dict[str, Any], Any]] = []
    counter = FlopCounterMode(display=False) if reads else None
    forwards = {"depth": 0, "began": 0.0, "flops": 0.0}  # the model's forwards, with gradients or without
    without_grad = _FlopsWithoutGrad(counter, lambda: forwards["depth"] == 0) if counter is not None else None

    def before(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if counter is not None and forwards["depth"] == 0:
            forwards["began"] = float(counter.get_total_flops())
        forwards["depth"] += 1
        if not seen and torch.is_grad_enabled():
            seen.append((as_batch(args, kwargs), None))
            if not reads:
                raise _Captured

    def after(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        forwards["depth"] -= 1
        if counter is not None and forwards["depth"] == 0:
            forwards["flops"] += float(counter.get_total_flops()) - forwards["began"]
        if len(seen) == 1 and seen[0][1] is None:
            seen[0] = (seen[0][0], output)

    handles = [
        model.register_forward_pre_hook(before, with_kwargs=True, prepend=True),
        model.register_forward_hook(after, with_kwargs=True),
    ]
    try:
        with fork_rng(), torch.enable_grad(), counter or nullcontext(), without_grad or nullcontext():
            # a copy: a Trainer's compute_loss pops the labels from the batch it is given, which importance reads next
            loss = loss_fn(model, dict(batch))
    except _Captured:
        loss = None
    finally:
        for handle in handles:
            handle.remove()
    if not seen:
        raise LookupError("loss_fn ran no forward of the model with gradients on")
    found, output = seen[0]
    if counter is None:
        return LossProbe(found)
    # the model's forwards are priced, and work without gradients outside them (a reference model's, DPO's) is no
    # part of the step's backward: what is left is work the loss does on its own
    outside = float(counter.get_total_flops()) - forwards["flops"] - without_grad.flops
    return LossProbe(found, outputs_read(loss, output), forwards["flops"], outside)


class _FlopsWithoutGrad(TorchDispatchMode):
    """Counts what ``counter`` (entered before it) counts of ops run with gradients off while ``counting()``."""

    def __init__(self, counter: FlopCounterMode, counting: Callable[[], bool]) -> None:
        super().__init__()
        self.counter = counter
        self.counting = counting
        self.flops = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if torch.is_grad_enabled() or not self.counting():
            return func(*args, **(kwargs or {}))
        before = self.counter.get_total_flops()
        out = func(*args, **(kwargs or {}))
        self.flops += float(self.counter.get_total_flops() - before)
        return out


def outputs_read(loss: Any, outputs: Any) -> frozenset[str]:
    """Paths (``keystr``) of the tensors in ``outputs`` whose autograd node the graph of ``loss`` reaches."""
    if not isinstance(loss, torch.Tensor) or loss.grad_fn is None:
        return frozenset()
    reached: set[torch.autograd.graph.Node] = set()
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in reached:
            reached.add(node)
            stack.extend(next_node for next_node, _ in node.next_functions)
    found = tree_flatten_with_path(outputs)[0]
    return frozenset(keystr(p) for p, leaf in found if isinstance(leaf, torch.Tensor) and leaf.grad_fn in reached)
