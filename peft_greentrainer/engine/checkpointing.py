"""What activation checkpointing recomputes in backward, read off torch's and transformers' own calls.

A checkpointed forward keeps few activations and runs again, in part, when the gradient has to enter it: its FLOPs are
paid twice by any unit below it. Where that recompute stops depends on how it was asked for: transformers' checkpointed
layers (``gradient_checkpointing_enable``, with the keywords bound into ``_gradient_checkpointing_func``), a model's
own ``torch.utils.checkpoint`` calls (followed as they begin and end: :func:`checkpoint_calls_followed`), torch's
early stop (non-reentrant checkpointing stops recomputing once every saved tensor is saved again) and selective
activation checkpointing (a ``context_fn`` policy that saves some ops). The profile (``profile.py``) prices what this
module reads.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from .flops import is_attention_op
from .module_tree import checkpointing_layer_class

logger = logging.getLogger(__name__)


def is_checkpointed(module: nn.Module) -> bool:
    """Whether this module checkpoints its forward: transformers' checkpointed layers, while training."""
    layer = checkpointing_layer_class()
    return layer is not None and isinstance(module, layer) and module.gradient_checkpointing and module.training


# Ops whose backward needs no saved tensor (only shapes and dtypes), and matmuls, which save their inputs before
# their kernel runs: what decides where non-reentrant checkpointing's early stop ends a block's recompute.
SAVES_NOTHING = frozenset(
    {
        *("add", "sub", "view", "_unsafe_view", "reshape", "transpose", "t", "permute", "expand", "slice"),
        *("select", "unsqueeze", "squeeze", "split", "split_with_sizes", "clone", "_to_copy", "copy_", "cat"),
        *("detach", "alias", "as_strided", "add_", "sub_"),
    }
)
SAVES_INPUTS_FIRST = frozenset({"mm", "addmm", "bmm", "baddbmm"})


def stops_early(module: nn.Module) -> bool:
    """Whether ``module``'s checkpoint stops recomputing once every saved tensor is saved again (torch's default
    ``early_stop`` for non-reentrant checkpointing; reentrant checkpointing reruns the whole forward)."""
    keywords = _checkpoint_keywords(module)
    if keywords.get("use_reentrant") is not False:
        return False
    forced = torch.utils.checkpoint._enable_checkpoint_early_stop  # set_checkpoint_early_stop(...), if in effect
    return bool(keywords.get("early_stop", True) if forced is None else forced)


@dataclass
class CheckpointCall:
    """A non-reentrant ``torch.utils.checkpoint`` call under way, known by the pack hook it pushed."""

    pack: Callable
    first: int  # its first op
    flops_before: float
    holds_calls: bool = False  # another call ran inside it
    layer: bool = False  # a transformers checkpointed layer's own call

    @property
    def stops_early(self) -> bool:
        return _checkpoint_stops_early(self.pack)

    @property
    def selective(self) -> bool:
        return _checkpoint_is_selective(self.pack)


# The generator every non-reentrant checkpoint call runs, by torch version: torch 2.15 calls the first (the second is
# kept there as a shim over it, for callers outside torch), torch 2.14 and before the second.
_GENERATOR_NAMES = ("_checkpoint_without_reentrant_generator_impl", "_checkpoint_without_reentrant_generator")


@functools.cache
def _warn_calls_not_followed() -> None:
    logger.warning(
        "GreenTrainer: this torch (%s) runs non-reentrant checkpointing through none of %s, so a model's own "
        "torch.utils.checkpoint calls are not followed and what they recompute is not priced (transformers' "
        "checkpointed layers still are). Use a torch this package is tested with (2.13-2.15), or checkpoint through "
        "gradient_checkpointing_enable().",
        torch.__version__,
        ", ".join(_GENERATOR_NAMES),
    )


@contextmanager
def checkpoint_calls_followed(
    begin: Callable[[], CheckpointCall | None], end: Callable[[CheckpointCall | None], None]
) -> Iterator[None]:
    """While active, every non-reentrant ``torch.utils.checkpoint`` call calls ``begin`` when its forward begins (its
    saved-tensor hooks in place) and ``end`` with what ``begin`` returned when it ends, nested calls too
    (``checkpoint`` looks its generator up at each call, however it was imported)."""
    # torch's composable checkpoint (used beside FSDP2's fully_shard) imports the generator by name
    modules = [torch.utils.checkpoint, sys.modules.get("torch.distributed._composable.checkpoint_activation")]
    name = next((n for n in _GENERATOR_NAMES if hasattr(torch.utils.checkpoint, n)), None)
    if name is None:  # a torch we do not know: the model's own calls would go unpriced
        _warn_calls_not_followed()
        yield
        return
    original = getattr(torch.utils.checkpoint, name)
    modules = [m for m in modules if m is not None and getattr(m, name, None) is original]

    def followed(*args: Any, **kwargs: Any) -> Iterator[Any]:
        inner = original(*args, **kwargs)
        value = next(inner)  # the call's saved-tensor hooks are in place now
        call = begin()
        try:
            while True:
                try:
                    sent = yield value
                except GeneratorExit:
                    inner.close()
                    raise
                except BaseException as error:  # the checkpointed function raised: checkpoint throws it in
                    value = inner.throw(error)
                else:
                    value = inner.send(sent)
        except StopIteration:
            return
        finally:
            end(call)

    for module in modules:
        setattr(module, name, followed)
    try:
        yield
    finally:
        for module in modules:
            setattr(module, name, original)


def checkpoints_selectively(module: nn.Module) -> bool:
    """Whether ``module``'s checkpoint is given a ``context_fn`` (selective activation checkpointing: a policy saves
    some ops, which its recompute then skips)."""
    noop = torch.utils.checkpoint.noop_context_fn
    return _checkpoint_keywords(module).get("context_fn", noop) is not noop


def non_reentrant_keywords(module: nn.Module) -> dict[str, Any]:
    """The ``torch.utils.checkpoint`` keywords ``module``'s checkpointed layer was given, made non-reentrant, with
    TRL's ``selective`` flag turned into the policy it asks for.

    TRL's SFTTrainer asks for selective activation checkpointing with ``gradient_checkpointing_kwargs={"selective":
    True}`` and applies it by wrapping ``gradient_checkpointing_enable``, which transformers 5's Trainer no longer
    calls (it calls ``activation_checkpointing_enable``): the flag reaches the layers' keywords unapplied, and
    non-reentrant checkpointing hands it on to the layer's forward, which ignores it, so every layer recomputed in
    full. A twin priced in a model's place is given its layers' keywords too: a twin that recomputed in full where
    the model saves attention would price full fine-tuning above what it costs (2.6% on a tiny 8-bit Llama, a budget
    that much too large)."""
    keywords = dict(_checkpoint_keywords(module))
    keywords["use_reentrant"] = False
    if keywords.pop("selective", False) and "context_fn" not in keywords:
        keywords["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _keep_attention)
    return keywords


def saves_attention_only(module: nn.Module) -> bool:
    """Whether ``module``'s checkpoint runs the policy TRL's ``selective`` asks for (:func:`non_reentrant_keywords`):
    its recompute is then known, the block's forward less its attention kernels (measured equal on a tiny Llama),
    where another policy's is priced as anything from none to all of it."""
    context = _checkpoint_keywords(module).get("context_fn")
    return isinstance(context, functools.partial) and context.args[:1] == (_keep_attention,)


def _keep_attention(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """The policy TRL's ``selective`` asks for: attention kernels' outputs are saved (their recompute is the costly
    part at long context), everything else is recomputed."""
    return CheckpointPolicy.MUST_SAVE if is_attention_op(op) else CheckpointPolicy.PREFER_RECOMPUTE


def _checkpoint_keywords(module: nn.Module) -> dict[str, Any]:
    """The keywords transformers bound into a checkpointed layer's checkpoint function
    (``gradient_checkpointing_kwargs``)."""
    function = getattr(module, "_gradient_checkpointing_func", None)
    return function.keywords if isinstance(function, functools.partial) else {}


def _closure_values(function: Any) -> list[Any]:
    values = []
    for cell in getattr(function, "__closure__", None) or ():
        try:
            values.append(cell.cell_contents)
        except ValueError:  # an empty cell
            continue
    return values


def _checkpoint_is_selective(pack_hook: Callable) -> bool:
    """Whether the ``torch.utils.checkpoint`` call that pushed ``pack_hook`` recomputes under a dispatch mode (its
    ``context_fn``'s: selective activation checkpointing, whose policy saves some ops)."""
    frames = [v for v in _closure_values(pack_hook) if hasattr(v, "recompute_fn")]
    recompute = _closure_values(frames[0].recompute_fn) if frames else []
    return any(isinstance(v, TorchDispatchMode) for v in recompute)


def _checkpoint_stops_early(pack_hook: Callable) -> bool:
    """Whether the ``torch.utils.checkpoint`` call that pushed ``pack_hook`` stops recomputing early (its frame's
    ``early_stop``, which ``set_checkpoint_early_stop`` overrides; torch's default, True, if it cannot be read)."""
    for value in _closure_values(pack_hook):
        found = getattr(value, "early_stop", None)
        if isinstance(found, bool):
            return found
    return True
