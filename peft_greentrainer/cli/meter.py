"""Measured cost of real training steps: FLOPs counted by FlopCounterMode on sampled steps, and wall time.

This is the ground truth the predictions are held to (does a predicted saving become a real one?). Counting slows
the counted step, so only every ``every``-th step is counted; every step is timed, counted ones excluded.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from torch.utils.flop_counter import FlopCounterMode
from transformers import TrainerCallback

from ..engine.flops import register_flop_formulas


@dataclass
class StepMeasurement:
    step: int
    seconds: float
    flops: float | None  # None when the step was not counted


class StepMeter(TrainerCallback):
    """Times every optimizer step and counts the FLOPs of every ``every``-th one (forward + backward)."""

    def __init__(self, every: int = 10):
        self.every = max(1, every)
        self.steps: list[StepMeasurement] = []
        self._counter: FlopCounterMode | None = None
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            register_flop_formulas()
            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        seconds = time.perf_counter() - self._start
        flops = None
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            flops = float(self._counter.get_total_flops())
            self._counter = None
        self.steps.append(StepMeasurement(step=state.global_step - 1, seconds=seconds, flops=flops))

    def on_train_end(self, args, state, control, **kwargs):
        if self._counter is not None:  # training stopped inside a counted step
            self._counter.__exit__(None, None, None)
            self._counter = None

    def uncounted_seconds(self) -> list[float]:
        return [s.seconds for s in self.steps if s.flops is None]

    def to_list(self) -> list[dict]:
        return [asdict(s) for s in self.steps]
