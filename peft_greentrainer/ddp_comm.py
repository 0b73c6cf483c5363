"""DDP communication that all-reduces only the gradients the step trains.

DDP builds its gradient buckets once, from every candidate unit (``distributed.prepare_ddp``), and by default
all-reduces each bucket whole: the slots of frozen units hold zeros, so a step at ``rho=0.5`` sends as much as full
fine-tuning. :func:`reduce_trained_gradients`, a DDP communication hook, sends only the slots of parameters trained
since the last reduction and leaves the rest of the bucket as it is (zeros; DDP then leaves the ``.grad`` of a
parameter no rank used untouched).

"Trained since the last reduction" is read from ``requires_grad`` alone, never from which gradients a rank happens to
hold, because every rank must send the same slices: the parameters that require a gradient now, and those that
required one at any forward with gradients on of the wrapped module since the last reduction (a selection made inside
a gradient-accumulation window freezes units that already hold the window's gradients, and those must be averaged).
The wrapped module's forwards are recorded, not the wrapper's: micro-batches may run through ``ddp.module`` (no
synchronisation) and only the last through the wrapper. Forwards without gradients train nothing and are not
recorded: an evaluation on one rank only would otherwise make the ranks send different slices. GreenTrainer's
selections set the same flags on every rank (``ranks.check_agreement``).

This module does not use ``from __future__ import annotations``: DDP checks the hook's annotations against the real
``dist.GradBucket`` and ``torch.futures.Future[torch.Tensor]`` objects, not their names.
"""

from typing import Any

import torch
import torch.distributed as dist
from torch import nn


class TrainedGradients:
    """State of :func:`reduce_trained_gradients`: the parameters trained since the last reduction, and what was sent.

    ``record_forward`` must run at every forward of the wrapped module (a forward pre-hook). ``elements_sent`` and
    ``elements_in_buckets`` count gradient elements over the run: all-reduced, and what DDP alone would all-reduce.
    """

    def __init__(self, process_group: dist.ProcessGroup | None = None) -> None:
        self.process_group = process_group
        self.trained_in_window: set[int] = set()
        self.reduced_since_forward = False
        self.elements_sent = 0
        self.elements_in_buckets = 0

    def record_forward(self, module: nn.Module, args: Any) -> None:
        """Note the parameters this forward may train; the first forward after a reduction starts a new window."""
        if not torch.is_grad_enabled():
            return
        if self.reduced_since_forward:
            self.trained_in_window.clear()
            self.reduced_since_forward = False
        self.trained_in_window.update(id(p) for p in module.parameters() if p.requires_grad)

    def is_trained(self, param: nn.Parameter) -> bool:
        return param.requires_grad or id(param) in self.trained_in_window


def reduce_trained_gradients(state: TrainedGradients, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average the bucket's trained gradients across ranks in one all-reduce; skip the bucket if none is trained."""
    buffer = bucket.buffer()
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    world_size = dist.get_world_size(group)
    state.reduced_since_forward = True
    state.elements_in_buckets += buffer.numel()
    params = bucket.parameters()
    trained = [grad for param, grad in zip(params, bucket.gradients(), strict=True) if state.is_trained(param)]
    if not trained:
        skipped: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        skipped.set_result(buffer)
        return skipped
    if len(trained) == len(params) or buffer.is_sparse:
        sent = buffer.div_(world_size)
    else:
        sent = torch.cat([grad.reshape(-1) for grad in trained]).div_(world_size)
    state.elements_sent += sent.numel()

    def write_back(future: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
        if sent is buffer:  # reduced in place
            return buffer
        reduced, offset = future.value()[0], 0
        for grad in trained:  # views into the bucket's buffer
            grad.copy_(reduced[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()
        return buffer

    return dist.all_reduce(sent, group=group, async_op=True).get_future().then(write_back)
