"""Sparse LM head: a causal LM's logits and loss computed only at positions whose next-token label counts.

In supervised fine-tuning the prompt (and the padding) is labelled ``-100``, yet a causal LM projects every position
onto the vocabulary, forward and backward. With large vocabularies that head is a fifth to a half of a training
step. Transformers 5 causal LMs take ``logits_to_keep`` as a boolean ``(batch, seq)`` mask and project only the kept
positions (``transformers.modeling_utils.slice_logits_to_keep``); the loss over those positions, computed by the
model's own ``ForCausalLMLoss``, is the dense loss exactly: the ignored positions contribute nothing to it, forward
or backward.

Two ways in, one computation:

* :func:`sparse_lm_loss` is a ``Trainer.compute_loss`` replacement and a ``loss_fn(model, batch)`` (for full
  fine-tuning, LoRA, or GreenTrainer's importance);
* :func:`enable_sparse_lm_head` attaches it to a model's forward (a pre/post hook pair), so a plain ``Trainer``,
  ``model(**batch).loss``, and the FLOP profile all run it. ``GreenTrainerConfig(sparse_lm_head=True)`` (the default)
  does this for the tuner's base model, so the cost profile, the budget, the rho floor and the importance all see
  the saving.

Only in training mode (``model.training``): in evaluation the outputs keep their dense ``(batch, seq, vocab)``
logits, which metric code expects. In training the returned ``logits`` are the kept rows, ``(n_kept, vocab)``;
the first read of them by name logs a warning saying so, for code written for dense logits.
The loss is normalised as transformers does it: by ``num_items_in_batch`` when the Trainer passes it (gradient
accumulation), else the mean over the kept targets. Packed (padding-free) batches need nothing special: their
sequence boundaries are ``-100`` labels, which the mask drops like any other.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
import math
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily
from transformers.loss.loss_utils import ForCausalLMLoss

from .engine.profile import returns_dict
from .engine.targets import IGNORE_INDEX, aligned_targets

logger = logging.getLogger(__name__)


def next_token_targets(
    labels: torch.Tensor, shift_labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask, targets)``: positions whose next-token label is not ``-100``, and those labels (flattened).

    Position ``t`` predicts ``labels[t + 1]``, so the last position never counts; ``shift_labels`` are used as given
    (:func:`~peft_greentrainer.engine.targets.aligned_targets`).
    """
    targets = aligned_targets(labels, shift_labels)
    mask = targets != IGNORE_INDEX
    return mask, targets[mask]


def language_model(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP / PEFT wrappers (the module whose forward takes ``logits_to_keep``)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP
            model = model.module
        elif hasattr(model, "get_base_model"):  # PeftModel
            model = model.get_base_model()
        else:
            return model


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the sparse head cannot be exact for ``model``, or ``None`` when it can."""
    lm = language_model(model)
    config = getattr(lm, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return "it is not a decoder-only causal LM"
    if getattr(lm, "loss_function", None) is not ForCausalLMLoss:
        return "its loss is not transformers' ForCausalLMLoss"
    return _forward_reason(type(lm))


@functools.cache
def _forward_reason(cls: type) -> str | None:
    forward = inspect.unwrap(cls.forward)
    if "logits_to_keep" not in inspect.signature(forward).parameters:
        return "its forward takes no logits_to_keep"
    # a boolean mask is understood by transformers' slice_logits_to_keep; a few models slice by hand
    if "slice_logits_to_keep" not in forward.__code__.co_names:
        return "its forward slices logits_to_keep by hand (no boolean masks)"
    return None


@dataclass
class _Targets:
    """What the loss needs after the forward: the kept labels, and the normaliser the Trainer passed."""

    targets: torch.Tensor
    num_items_in_batch: Any


def _sparse_kwargs(lm: nn.Module, kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], _Targets] | None:
    """Forward kwargs without labels and with ``logits_to_keep`` set, or ``None`` to run the forward unchanged."""
    labels = kwargs.get("labels")
    if labels is None or not lm.training or not _is_default(kwargs.get("logits_to_keep", 0)):
        return None
    if kwargs.get("fused_lm_head"):
        return None  # TRL's SFTTrainer computes the head and the loss itself (chunked), from the labels
    if not returns_dict(lm, kwargs):
        return None  # tuple outputs have no named slot for the loss
    if labels.device.type == "meta":
        return None  # no values, so no mask: the dense forward is the only honest cost
    kwargs = dict(kwargs)
    kwargs.pop("labels")
    inputs = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
    # a plan on meta, or a twin of fake weights (whose input ids may be real: vision-language models count their
    # image tokens by value); a real model's weights may be on meta, offloaded by accelerate between forwards
    weight = next(lm.parameters(), None)
    shapes_only = inputs is not None and (inputs.device.type == "meta" or isinstance(inputs, FakeTensor))
    shapes_only = shapes_only or isinstance(weight, FakeTensor)
    with unset_fake_temporarily() if shapes_only else contextlib.nullcontext():  # labels with values: real ones
        mask, targets = next_token_targets(labels, kwargs.pop("shift_labels", None))
        per_row = math.ceil(int(mask.sum()) / mask.shape[0]) if shapes_only else 0  # no device sync in training
    if shapes_only:
        # profiling a twin on meta or fake tensors (labels given with values): as many head rows, rounded up per
        # sequence, as a positional index (a boolean mask would need the values the inputs lack)
        kwargs["logits_to_keep"] = torch.arange(per_row, device=inputs.device)
    else:
        kwargs["logits_to_keep"] = mask.to(inputs.device if inputs is not None else labels.device)
    return kwargs, _Targets(targets, kwargs.get("num_items_in_batch"))


def _is_default(logits_to_keep: Any) -> bool:
    return isinstance(logits_to_keep, int) and logits_to_keep == 0


def _loss(logits: torch.Tensor, kept: _Targets) -> torch.Tensor:
    """transformers' causal-LM loss over the kept rows (already shifted, so passed as ``shift_labels``).

    The vocabulary is the logits' own: a vision-language model's config has none at its top (LLaVA, Qwen2-VL), or
    one that ``resize_token_embeddings`` left behind (PaliGemma's, beside its text config's)."""
    rows = logits.reshape(-1, logits.shape[-1])[: kept.targets.numel()]
    return ForCausalLMLoss(
        rows,
        None,
        vocab_size=rows.shape[-1],
        num_items_in_batch=kept.num_items_in_batch,
        shift_labels=kept.targets.to(rows.device),
    )


def _with_loss(outputs, kept: _Targets):
    """The model's output with the loss in its first slot, where ``outputs[0]`` and ``to_tuple()`` expect it."""
    return dataclasses.replace(outputs, loss=_loss(outputs.logits, kept))


_said_logits_are_kept_rows = False  # once per process


def _announcing_kept_rows(outputs):
    """``outputs`` as its type's subclass whose ``logits``, read by name, first say that they are the kept rows.

    Code written for ``(batch, seq, vocab)`` logits (a ``compute_loss`` that shifts them, distillation, a token
    metric) otherwise fails with a shape error that names neither this head nor the option, or broadcasts silently.
    Positional reads (``outputs[0]``, ``to_tuple()``) and pytree flattening (DDP) say nothing; whatever reads every
    field (``repr``, ``dict(outputs)``) says it too, once. A compiled forward returns the plain type (no warning),
    as does every forward once it has been said: there is nothing left to say.
    """
    if _said_logits_are_kept_rows or torch.compiler.is_compiling():
        return outputs
    if not dataclasses.is_dataclass(outputs) or not isinstance(outputs, Mapping):
        return outputs
    return _kept_rows_type(type(outputs))(**dict(outputs.items()))


@functools.cache
def _kept_rows_type(cls: type) -> type:
    """A subclass of the output type ``cls`` (made once per type, so ``isinstance`` and the fields stay the model's)
    that watches reads of ``logits``."""

    def __getattribute__(self, name: str):
        value = cls.__getattribute__(self, name)
        if name == "logits":
            _say_logits_are_kept_rows(value)
        return value

    def __getitem__(self, key):
        value = cls.__getitem__(self, key)
        if key == "logits":
            _say_logits_are_kept_rows(value)
        return value

    def get(self, key, default=None):
        return self[key] if key in self.keys() else default

    def to_tuple(self) -> tuple:
        return tuple(self.values())

    def __reduce__(self):  # pickled (torch.save, all_gather_object, a queue) as the plain type, which is importable
        return cls(**dict(self.items())).__reduce__()

    members = {"__getattribute__": __getattribute__, "__getitem__": __getitem__, "get": get, "to_tuple": to_tuple}
    members.update(__reduce__=__reduce__, __module__=__name__, __qualname__=cls.__qualname__)
    # a name of its own, as transformers registers every ModelOutput type under "module.name" for pytree serialisation
    return type(f"KeptRows_{cls.__module__}_{cls.__qualname__}".replace(".", "_"), (cls,), members)


def _say_logits_are_kept_rows(logits: Any) -> None:
    global _said_logits_are_kept_rows
    if _said_logits_are_kept_rows or not isinstance(logits, torch.Tensor):
        return
    _said_logits_are_kept_rows = True
    logger.warning(
        "These logits are GreenTrainer's sparse LM head's (a training forward given labels): only the %d positions "
        "whose next-token label is not -100, shape %s, not (batch, seq, vocab); outputs.loss equals the dense head's. "
        "Code that reads the logits per position (a compute_loss that shifts them, distillation, a token metric) "
        "needs GreenTrainerConfig(sparse_lm_head=False), or the labels taken out of the inputs before the forward "
        "(the logits are then dense). Said once; nothing is wrong where the code expects these rows.",
        logits.shape[0],
        tuple(logits.shape),
    )


def sparse_lm_loss(
    model: nn.Module,
    inputs: Mapping[str, Any],
    return_outputs: bool = False,
    num_items_in_batch: torch.Tensor | int | None = None,
):
    """The causal-LM loss with logits only where labels count; ``Trainer.compute_loss``'s signature without ``self``.

    Use it as GreenTrainer's ``loss_fn(model, batch)``, or in a Trainer for full fine-tuning or LoRA::

        class SparseHeadTrainer(Trainer):
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                return sparse_lm_loss(model, inputs, return_outputs, num_items_in_batch)

    Models it cannot be exact for (see :func:`unsupported_reason`), evaluation mode and batches without labels get
    the model's own dense loss.
    """
    lm = language_model(model)
    inputs = dict(inputs)
    if num_items_in_batch is not None:
        inputs["num_items_in_batch"] = num_items_in_batch
    prepared = _sparse_kwargs(lm, inputs) if unsupported_reason(lm) is None else None
    if prepared is None:
        outputs = model(**inputs)
    else:
        kwargs, kept = prepared
        outputs = _with_loss(model(**kwargs), kept)
    return (outputs["loss"], outputs) if return_outputs else outputs["loss"]


class SparseLMHead:
    """The sparse head attached to a model's forward: a pre-hook rewrites the call, a post-hook adds the loss.

    Made by :func:`enable_sparse_lm_head`; ``remove()`` detaches it, ``disabled()`` suspends it (dense reference).
    ``kept_share`` is the share of positions the head ran on in the last training forward (``None`` if that forward
    was dense).
    """

    def __init__(self, lm: nn.Module):
        self.lm = lm
        self.enabled = True
        self.attached_by_tuner = False  # GreenTrainer's tuner attached it (config.sparse_lm_head): unloading removes it
        self._last_kept: torch.Tensor | None = None  # the last training forward's positions mask
        self._pending: list[_Targets | None] = []
        self._handles = [
            lm.register_forward_pre_hook(self._before, with_kwargs=True),
            lm.register_forward_hook(self._after, with_kwargs=True, always_call=True),
        ]

    def _before(self, module: nn.Module, args: tuple, kwargs: dict):
        prepared = _sparse_kwargs(module, kwargs) if self.enabled and not args else None
        if prepared is None:
            if self.enabled and module.training and torch.is_grad_enabled():
                # a dense training forward (a Trainer with label smoothing takes the labels out first): the head ran
                # on every position, so the last sparse forward's share no longer says what training does
                self._last_kept = None
            self._pending.append(None)
            return None
        kwargs, kept = prepared
        positions = kwargs["logits_to_keep"]
        if positions.dtype == torch.bool:
            self._last_kept = positions
        self._pending.append(kept)
        return args, kwargs

    @property
    def kept_share(self) -> float | None:
        """The share of positions the head ran on in the last training forward, read when asked (a log), not in
        every forward: on a GPU, reading it waits for the device."""
        kept = self._last_kept
        if kept is None:
            return None
        return float(kept.float().mean()) if kept.numel() else 0.0

    def _after(self, module: nn.Module, args: tuple, kwargs: dict, output):
        kept = self._pending.pop() if self._pending else None
        if kept is None or output is None:
            return None
        return _announcing_kept_rows(_with_loss(output, kept))

    @contextmanager
    def disabled(self):
        """The dense head for the duration (e.g. to measure the dense reference)."""
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.lm.__dict__.pop("_sparse_lm_head", None)


def enable_sparse_lm_head(model: nn.Module) -> SparseLMHead | None:
    """Attach the sparse head to ``model`` (a transformers causal LM, possibly PEFT/DDP-wrapped).

    Returns ``None``, with one log line saying why, for models it cannot be exact for: their forward then stays
    dense. Attaching twice returns the head already there.
    """
    lm = language_model(model)
    reason = unsupported_reason(lm)
    if reason is not None:
        logger.info("LM head stays dense for %s: %s.", type(lm).__name__, reason)
        return None
    existing = lm.__dict__.get("_sparse_lm_head")
    if existing is None:
        existing = lm.__dict__["_sparse_lm_head"] = SparseLMHead(lm)
    return existing


def attached_sparse_lm_head(model: nn.Module) -> SparseLMHead | None:
    """The sparse head attached to ``model``'s language model, if any."""
    return language_model(model).__dict__.get("_sparse_lm_head")
