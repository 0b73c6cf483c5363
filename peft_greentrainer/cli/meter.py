"""Measured cost of real training steps: FLOPs counted by FlopCounterMode on sampled steps, and wall time.

This is the ground truth the predictions are held to (does a predicted saving become a real one?). Every
``every``-th optimizer step is counted whole (``flops``: GreenTrainer's own work inside it too, such as a new batch
shape's profile). With ``audit_steps``, the inputs and trainable tensors of each training forward of a counted step
are kept, and :meth:`StepMeter.audit`, after training, measures on them the step alone and counts full fine-tuning
of the base model as its profile does (with the run's LM head, rho's reference, and with a dense one): the ratio
the budget promises, without slowing training or adding to its energy. Counting slows the counted step, so every
step is timed, counted ones excluded from the timings.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import TrainerCallback

from ..engine.flops import register_flop_formulas
from ..engine.profile import autocast_in_force, measure_flops
from ..engine.step_loss import as_batch
from ..model import find_tuner
from ..sparse_head import attached_sparse_lm_head

logger = logging.getLogger(__name__)


@dataclass
class StepMeasurement:
    step: int
    seconds: float
    flops: float | None  # everything the step ran, counted; None when the step was not counted
    # filled in by StepMeter.audit, on the inputs of the step's own forwards:
    alone_flops: float | None = None  # the step alone, with the tensors it trained
    full_flops: float | None = None  # full fine-tuning, with the run's LM head (rho's reference)
    dense_full_flops: float | None = None  # full fine-tuning with a dense LM head (what one would otherwise run)
    flops_ratio: float | None = None  # alone_flops / full_flops
    # (inputs, trained tensors, autocast in force) of each forward
    forwards: list[tuple[dict[str, Any], list[str], tuple]] = field(default_factory=list, repr=False)


class StepMeter(TrainerCallback):
    """Times every optimizer step and counts the FLOPs of every ``every``-th one (module docstring)."""

    def __init__(self, every: int = 10, audit_steps: bool = False):
        self.every = max(1, every)
        self.audit_steps = audit_steps
        self.steps: list[StepMeasurement] = []
        self._counter: FlopCounterMode | None = None
        self._start = 0.0
        self._tuner: Any = None
        self._hooks: list = []
        self._forwards: list[tuple[dict[str, Any], list[str], tuple]] | None = None  # of the counted step under way
        self._depth = 0  # base model forwards under way (a profile run inside a step's forward: 2)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not self.audit_steps or self._hooks:
            return
        self._tuner = find_tuner(model)
        base = self._tuner.model
        self._hooks = [
            base.register_forward_pre_hook(self._forward_begins, with_kwargs=True, prepend=True),
            base.register_forward_hook(self._forward_ends, always_call=True),
        ]

    def _forward_begins(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self._depth += 1
        if self._forwards is not None and self._depth == 1 and module.training and torch.is_grad_enabled():
            batch = as_batch(args, kwargs)
            # kept on the CPU until the audit after training: on a GPU, every counted step's inputs would stay there
            inputs = {k: _Kept(v) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            self._forwards.append((inputs, [], autocast_in_force()))  # audited as it ran: kernels follow the dtype

    def _forward_ends(self, module: torch.nn.Module, *_: Any) -> None:
        """The tensors a training forward trained: read after it ran, once the budget check before it (which may
        select again) is done."""
        self._depth -= 1
        if self._forwards and self._depth == 0 and not self._forwards[-1][1]:
            self._forwards[-1][1].extend(n for n, p in module.named_parameters() if p.requires_grad)

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            register_flop_formulas()
            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()
            self._forwards = [] if self._tuner is not None else None
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        seconds = time.perf_counter() - self._start
        measurement = StepMeasurement(step=state.global_step - 1, seconds=seconds, flops=None)
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            measurement.flops = float(self._counter.get_total_flops())
            measurement.forwards, self._forwards = self._forwards or [], None
            self._counter = None
        self.steps.append(measurement)

    def on_train_end(self, args, state, control, **kwargs):
        if self._counter is not None:  # training stopped inside a counted step
            self._counter.__exit__(None, None, None)
            self._counter = None
        self._forwards = None
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def audit(self) -> None:
        """Measure each counted step alone and full fine-tuning on the inputs its forwards received (each micro-batch
        of an accumulation window), with the tensors each forward trained. Run after training: FLOPs depend on the
        shapes and the trained tensors, not on the weights' values."""
        if self._tuner is None:
            return
        with self._tuner.measuring():
            for measurement in self.steps:
                forwards, measurement.forwards = measurement.forwards, []
                if not forwards:
                    continue
                alone = full = dense = 0.0
                try:
                    for kept, trained, autocast in forwards:
                        inputs = {k: v.restored() if isinstance(v, _Kept) else v for k, v in kept.items()}
                        with ExitStack() as stack:
                            for kind, dtype in autocast:
                                stack.enter_context(torch.autocast(kind, dtype=dtype))
                            alone += sum(measure_flops(self._tuner.model, inputs, trained))
                            full += self._full_fine_tuning(inputs, dense_head=False)
                            dense += self._full_fine_tuning(inputs, dense_head=True)
                except torch.OutOfMemoryError:  # the step alone fitted in training; say so rather than lose the run
                    logger.warning("Step %d not audited: out of memory; its ratio is left out.", measurement.step)
                    continue
                measurement.alone_flops, measurement.full_flops, measurement.dense_full_flops = alone, full, dense
                measurement.flops_ratio = alone / full if full else None

    def _full_fine_tuning(self, batch: Mapping[str, Any], dense_head: bool) -> float:
        """FLOPs of a full fine-tuning step of the base model on ``batch`` (with the run's LM head, or a dense one), as
        its profile counts them: one forward under FlopCounterMode, each op's backward counted on its own, so no
        gradient of every tensor and no activation is held (full fine-tuning may not fit where training does). Equal
        to a measured full step (``tests/test_architectures.py``); for a quantized base, its float twin's."""
        tuner = self._tuner
        if dense_head and attached_sparse_lm_head(tuner.model) is not None:
            return tuner.dense_head_full_flops(batch)
        return tuner.cost_profile(batch)[1]

    def uncounted_seconds(self) -> list[float]:
        return [s.seconds for s in self.steps if s.flops is None]

    def to_list(self) -> list[dict]:
        return [{f.name: getattr(s, f.name) for f in fields(s) if f.name != "forwards"} for s in self.steps]


class _Kept:
    """A copy of a step's input tensor on the CPU that remembers the device it came from."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.device = tensor.device
        self.tensor = tensor.detach().to("cpu", copy=True)

    def restored(self) -> torch.Tensor:
        return self.tensor.to(self.device)
