"""What the processes of a ``torch.distributed`` job agree on: who is who, which rows each evaluates, averaged values.

Plain collectives with no knowledge of the tuner or the Trainer; the tuner (``model.py``) and the DDP integration
(``distributed.py``) both build on them. Outside a multi-process job every function is the identity.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .engine.targets import labelled_counts
from .engine.units import requires_grad_kept


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world_size() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group; ``(0, 1)`` outside a multi-process job."""
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def importance_shard(global_batch: int, rank: int, world_size: int) -> slice:
    """The rows of a global importance batch that ``rank`` evaluates: consecutive, as equal in number as possible.

    The Trainer's data-parallel sampler gives rank ``r`` the ``r``-th part of each global batch the same way. The
    averaged gradient is exactly the global batch's when the parts are equal (the batch size divides evenly).
    """
    return slice(global_batch * rank // world_size, global_batch * (rank + 1) // world_size)


def weighted_by_target_share(loss_fn: Callable[[nn.Module, Any], torch.Tensor | None]) -> Callable:
    """``loss_fn`` times this rank's share of the global batch's loss targets, times the world size.

    Averaging the ranks' gradients of a mean-over-targets loss weights each rank's targets by its own count; with the
    loss weighted so, the average is the gradient of the global batch's mean over its targets, which is what the
    Trainer trains (``average_tokens_across_devices``) when ranks hold different numbers of labelled tokens. Every
    rank must call it as often, in the same order (one all-reduce per call); the identity outside a multi-process job.
    """
    if not is_distributed():
        return loss_fn
    world_size = dist.get_world_size()

    def weighted(model: nn.Module, batch: Any) -> torch.Tensor | None:
        loss = loss_fn(model, batch)
        encoder_decoder = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
        counts = labelled_counts(batch, shifts=not encoder_decoder)  # the targets the Trainer counts too
        if loss is None or counts is None:  # the same on every rank: same model, same collator
            return loss
        local = counts.sum().to(device=loss.device, dtype=torch.float32)
        total = local.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return loss * (local * world_size / total).to(loss.dtype) if float(total) > 0 else loss

    return weighted


@contextmanager
def gradients_averaged_across_ranks(params: Iterable[nn.Parameter]) -> Iterator[None]:
    """While active, every gradient computed for ``params`` is replaced by its mean over all ranks.

    Importance is a non-linear function of the gradient (Adam's update divides by its magnitude), so averaging
    per-rank importances is not the importance of the global batch; averaging the gradients is. The hooks are tensor
    hooks, so they also act on ``torch.autograd.grad`` (which the importance uses). Every rank computes the same
    gradients in the same order (same model, same selection, same batch shapes), so the collectives match. Outside a
    multi-process job this does nothing.
    """
    if not is_distributed():
        yield
        return
    world_size = dist.get_world_size()

    def average(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad.div_(world_size)

    unique = list({id(p): p for p in params}.values())
    handles = []
    with requires_grad_kept(unique):
        for param in unique:
            param.requires_grad_(True)  # a hook can only be registered on a tensor that requires grad
            handles.append(param.register_hook(average))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def average_across_ranks(values: np.ndarray) -> np.ndarray:
    """Mean over all processes of a torch.distributed job (identity otherwise).

    Every rank must make the same selection at the same step; averaging the importances (each rank saw other
    batches) before the deterministic DP guarantees it, and uses every rank's data.
    """
    if not is_distributed():
        return values
    tensor = torch.as_tensor(values, dtype=torch.float64, device=collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return (tensor / dist.get_world_size()).cpu().numpy()


def any_across_ranks(flag: bool) -> bool:
    """Whether ``flag`` is True on any rank (``flag`` itself outside a multi-process job); every rank must call it."""
    if not is_distributed():
        return flag
    tensor = torch.tensor([int(flag)], device=collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where a collective of ``group`` takes its tensors: the CPU where the group has a backend for it (gloo, alone or
    beside NCCL as in ``"cpu:gloo,cuda:nccl"``), else this rank's GPU (``"nccl"``, ``"cuda:nccl"``)."""
    if "gloo" in str(dist.get_backend(group)) or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def gather(value: Any) -> list[Any]:
    """Every rank's ``value`` (any picklable object), in rank order; ``[value]`` outside a multi-process job."""
    if not is_distributed():
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def check_agreement(value: Any, what: str) -> None:
    """Raise if ``value`` (picklable, comparable with ``==``) differs between ranks; every rank must call it.

    Decisions that must be identical on all ranks are made so by construction (same inputs, deterministic code);
    this checks it, so that a divergence fails loudly at the decision instead of as a hang or drift later.
    """
    values = gather(value)
    if any(v != values[0] for v in values[1:]):
        differing = [r for r, v in enumerate(values) if v != values[0]]
        raise RuntimeError(
            f"GreenTrainer's ranks disagree on {what} (ranks {differing} differ from rank 0); they would train "
            "different units. Please report this with your data collator and model."
        )
