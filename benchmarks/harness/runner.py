"""One runner that trains a configured method with the Trainer and measures it.

Measured per run: FLOPs counted by FlopCounterMode on every ``measure_every``-th step, FLOPs predicted for every
step from the method's cost profile and its trainable set at that step start (checked against every counted step),
the seconds of every step, the seconds and FLOPs of selection (outside the steps), peak RSS while training, the
training loss, optionally a held-out loss curve during training, and after training the held-out losses and ROUGE.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import resource
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import transformers
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import TrainerCallback

from peft_greentrainer.cli.data import TensorDataset
from peft_greentrainer.cli.evaluation import generate, rouge
from peft_greentrainer.cli.meter import StepMeter
from peft_greentrainer.cli.train import training_arguments
from peft_greentrainer.engine.flops import register_flop_formulas

from .methods import Method
from .workload import Workload


@dataclass
class TrainSettings:
    epochs: int
    batch_size: int
    seed: int
    measure_every: int
    max_new_tokens: int
    max_source_tokens: int
    max_steps: int | None = None
    lr_scheduler: str = "constant"  # the paper's; the quality protocol uses "linear" (decay to 0, no warmup)
    curve_split: str | None = None  # held-out split whose loss is traced during training
    curve_rows: int | None = None  # its first rows only (the curve costs evaluations during training)
    curve_points: int = 0  # evaluations of the curve after step 0, evenly spaced
    progress_every: int = 0  # a progress line on stderr every this many steps (0: none)

    def steps(self, work: Workload) -> int:
        per_epoch = work.train_size // self.batch_size
        steps = per_epoch * self.epochs
        return min(steps, self.max_steps) if self.max_steps else steps


class FixedOrderSampler(torch.utils.data.Sampler):
    """Epoch ``e`` visits ``permutation(seed, e)``: the same batches in the same order for every method.

    Its own generator, so nothing a method does to the global RNG (LoRA init, importance passes) changes the order.
    """

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed
        self.orders: list[list[int]] = []

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        order = np.random.default_rng([self.seed, len(self.orders)]).permutation(self.size).tolist()
        self.orders.append(order)
        return iter(order)


class OrderedTrainer(transformers.Trainer):
    def __init__(self, *args, sampler: FixedOrderSampler, **kwargs):
        self.fixed_sampler = sampler
        super().__init__(*args, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        return self.fixed_sampler


class RssSampler:
    """Peak resident set size (MiB) while the block runs, sampled from /proc/self/status by a background thread.

    ``ru_maxrss`` would be the peak over the process lifetime (every earlier method included), hence the sampling.
    """

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.peak = 0.0
        self._stop = threading.Event()

    @staticmethod
    def current() -> float | None:
        try:
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current() or 0.0)
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        if self.current() is None:  # no /proc: fall back to the lifetime peak
            return self
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if hasattr(self, "_thread"):
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self.current() or 0.0)
        else:
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def release_memory() -> None:
    """Free the previous method's model and hand freed heap back to the OS, so the next RSS peak starts low."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class Metered(TrainerCallback):
    """Forwards every event to ``inner`` and charges the seconds and FLOPs of its selection hooks to selection.

    Selection runs outside the optimizer step (train/epoch/step begin), so the step meter never sees it; this does.
    """

    SELECTION_EVENTS = ("on_train_begin", "on_epoch_begin", "on_step_begin")

    def __init__(self, inner: TrainerCallback):
        self.inner = inner
        self.events: list[tuple[int, float, float]] = []  # (global step, seconds, FLOPs) of each hook that did work

    def _metered(self, event: str, args, state, control, **kwargs):
        register_flop_formulas()
        start = time.perf_counter()
        with FlopCounterMode(display=False) as counter:
            result = getattr(self.inner, event)(args, state, control, **kwargs)
        seconds, flops = time.perf_counter() - start, float(counter.get_total_flops())
        if flops or seconds > 1e-3:
            self.events.append((state.global_step, seconds, flops))
        return result


def _forwarder(event: str):
    if event in Metered.SELECTION_EVENTS:

        def forward(self, args, state, control, **kwargs):
            return self._metered(event, args, state, control, **kwargs)

    else:

        def forward(self, args, state, control, **kwargs):
            return getattr(self.inner, event)(args, state, control, **kwargs)

    forward.__name__ = event
    return forward


for _event in [name for name in vars(TrainerCallback) if name.startswith("on_")]:
    setattr(Metered, _event, _forwarder(_event))


class TrainedUnits(TrainerCallback):
    """At each step start, the predicted FLOPs of the units that are trainable now (recorded when they change).

    Runs after every callback that changes the trainable set; an optimizer that switches blocks inside its step
    (BAdam) is seen at the next step start, which is when its switch takes effect.
    """

    def __init__(self, method: Method):
        self.method = method
        self.changes: list[tuple[int, float]] = []  # (first step, predicted FLOPs per step)
        self._last: bytes | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        mask = self.method.trained_mask()
        if mask.tobytes() != self._last:
            self._last = mask.tobytes()
            self.changes.append((state.global_step, self.method.costs.predicted_flops(mask)))

    def per_step(self, steps: int) -> list[float]:
        return [next(f for s, f in reversed(self.changes) if s <= step) for step in range(steps)]


@torch.no_grad()
def heldout_loss(model: nn.Module, columns: dict[str, torch.Tensor], batch_size: int = 16) -> float:
    """Teacher-forced cross-entropy per target token over all of ``columns`` (prompts and padding are masked)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(columns["input_ids"]), batch_size):
        batch = {k: v[start : start + batch_size] for k, v in columns.items()}
        tokens = int((batch["labels"][:, 1:] != -100).sum())  # the model shifts labels by one
        total += float(model(**batch).loss) * tokens
        count += tokens
    model.train(was_training)
    return total / max(count, 1)


class HeldoutCurve(TrainerCallback):
    """Held-out loss at step 0 and at ``points`` evenly spaced steps; its own seconds are kept off the clock."""

    def __init__(self, columns: dict[str, torch.Tensor], total_steps: int, points: int):
        self.columns = columns
        self.at = {round(total_steps * (i + 1) / points) for i in range(points)} if points else set()
        self.points: list[tuple[int, float]] = []
        self.seconds = 0.0

    def _record(self, step: int, model: nn.Module) -> None:
        start = time.perf_counter()
        self.points.append((step, heldout_loss(model, self.columns)))
        self.seconds += time.perf_counter() - start

    def on_train_begin(self, args, state, control, **kwargs):
        self._record(0, kwargs["model"])

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.at:
            self._record(state.global_step, kwargs["model"])


class Progress(TrainerCallback):
    """A line on stderr every ``every`` steps: long CPU runs in the background stay observable."""

    def __init__(self, every: int):
        self.every, self.start = every, time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            minutes = (time.perf_counter() - self.start) / 60
            print(f"  step {state.global_step}/{state.max_steps}, {minutes:.1f} min", file=sys.stderr, flush=True)


def evaluate_rouge(model: nn.Module, work: Workload, settings: TrainSettings) -> dict[str, float]:
    predictions = generate(
        model,
        work.tokenizer,
        work.eval_examples,
        work.template,
        max_source_tokens=settings.max_source_tokens,
        max_new_tokens=settings.max_new_tokens,
        progress=False,
    )
    return rouge(predictions, [e.target for e in work.eval_examples])


def _trainer_arguments(directory: str, settings: TrainSettings, lr: float) -> transformers.TrainingArguments:
    arguments = training_arguments(
        directory,
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        lr=lr,
        seed=settings.seed,
        max_steps=settings.max_steps or -1,
        quiet=True,
    )
    if settings.lr_scheduler != "constant":
        arguments = dataclasses.replace(arguments, lr_scheduler_type=settings.lr_scheduler, warmup_steps=0)
    return arguments


def _cumulative(values: list[float]) -> list[float]:
    return np.concatenate([[0.0], np.cumsum(values)]).tolist()


def _new_trainer(
    method: Method,
    work: Workload,
    settings: TrainSettings,
    lr: float,
    scratch: str,
    callbacks: list[TrainerCallback],
    sampler: FixedOrderSampler,
) -> OrderedTrainer:
    transformers.set_seed(settings.seed)
    optimizers = (method.optimizer(method.model, lr), None) if method.optimizer else (None, None)
    trainer = OrderedTrainer(
        model=method.model,
        args=_trainer_arguments(scratch, settings, lr),
        train_dataset=TensorDataset(work.train_columns),
        callbacks=callbacks,
        sampler=sampler,
        optimizers=optimizers,
    )
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
    return trainer


def _curve_rows(
    points: list[tuple[int, float]],
    per_step: list[float],
    step_seconds: list[float],
    selection_events: list[tuple[int, float, float]],
) -> list[dict[str, float]]:
    """Each held-out loss point with the training FLOPs and seconds spent before it, selections included."""

    def before(step: int, index: int) -> float:
        return sum(event[index] for event in selection_events if event[0] < step)

    flops_so_far, seconds_so_far = _cumulative(per_step), _cumulative(step_seconds)
    return [
        {
            "step": step,
            "loss": loss,
            "flops": flops_so_far[step] + before(step, 2),
            "seconds": seconds_so_far[min(step, len(seconds_so_far) - 1)] + before(step, 1),
        }
        for step, loss in points
    ]


def train(method: Method, work: Workload, settings: TrainSettings, lr: float) -> dict[str, Any]:
    """Train ``method`` for the settings' steps at ``lr`` and return everything measured, as one JSON-able row."""
    cpu_start = time.process_time()
    sampler = FixedOrderSampler(work.train_size, settings.seed)
    meter = StepMeter(every=settings.measure_every)
    units = TrainedUnits(method)
    metered = Metered(method.selector) if method.selector is not None else None
    steps_planned = settings.steps(work)
    curve = (
        HeldoutCurve(
            {k: v[: settings.curve_rows] for k, v in work.heldout[settings.curve_split].items()},
            steps_planned,
            settings.curve_points,
        )
        if settings.curve_split
        else None
    )
    # order matters: selection changes the trainable set, then it is priced, then the step is counted
    progress = Progress(settings.progress_every) if settings.progress_every else None
    callbacks = [c for c in (metered, units, meter, curve, progress) if c is not None]
    with tempfile.TemporaryDirectory() as scratch:
        trainer = _new_trainer(method, work, settings, lr, scratch, callbacks, sampler)
        release_memory()
        with RssSampler() as rss:
            start = time.perf_counter()
            trainer.train()
            train_seconds = time.perf_counter() - start - (curve.seconds if curve else 0.0)
    steps = trainer.state.global_step
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    heldout = {split: heldout_loss(method.model, columns) for split, columns in work.heldout.items()}
    scores = evaluate_rouge(method.model, work, settings) if work.eval_examples else None

    per_step = units.per_step(steps)
    measurements = meter.to_list()
    counted = [s for s in measurements if s["flops"] is not None and s["step"] < steps]
    errors = [abs(s["flops"] - per_step[s["step"]]) / per_step[s["step"]] for s in counted]
    uncounted = meter.uncounted_seconds()
    median_step = statistics.median(uncounted) if uncounted else None
    step_seconds = [s["seconds"] if s["flops"] is None or median_step is None else median_step for s in measurements]
    selection_events = metered.events if metered else []
    selection_seconds = sum(s for _, s, _ in selection_events)
    curve_rows = _curve_rows(curve.points if curve else [], per_step, step_seconds, selection_events)
    return {
        "key": method.key,
        "method": method.name,
        "kind": method.kind,
        "lr": lr,
        "trained": method.describe(),
        "steps": steps,
        "measured_flops_per_step": statistics.fmean(s["flops"] for s in counted) if counted else None,
        "counted_steps": [s["step"] for s in counted],
        "predicted_flops_per_step": statistics.fmean(per_step) if per_step else None,
        "predicted_total_flops": float(sum(per_step)),
        "measured_vs_predicted_max_rel_error": max(errors) if errors else None,
        "median_step_seconds": median_step,
        "train_seconds": train_seconds,
        "selection_seconds": selection_seconds,
        "selection_flops": sum(f for _, _, f in selection_events),
        "selection_overhead": selection_seconds / max(train_seconds, 1e-9),
        "peak_rss_mib": rss.peak,
        "train_loss_first": statistics.fmean(losses[:5]) if losses else None,
        "train_loss_last": statistics.fmean(losses[-5:]) if losses else None,
        "heldout_loss": heldout,
        "curve": curve_rows,
        "rouge": scores,
        "selections": method.selections(),
        "step_measurements": measurements,
        "batch_orders": sampler.orders,
        "cpu_seconds": time.process_time() - cpu_start,
        "torch_threads": torch.get_num_threads(),
    }


def prepare_process(threads: int | None) -> None:
    """Quiet, deterministic-enough process settings every benchmark driver wants before loading models."""
    import os
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message="BAdam expect model to be loaded in fp16/bf16", category=UserWarning)
    if threads:
        torch.set_num_threads(threads)


def environment() -> dict[str, Any]:
    """Versions, threads and hardware, for the record next to every measurement."""
    import os
    import platform

    import peft

    return {
        "torch_threads": torch.get_num_threads(),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "python": platform.python_version(),
        },
        "cpu": f"{os.cpu_count()} CPU cores, {'CUDA' if torch.cuda.is_available() else 'no GPU'}",
    }
