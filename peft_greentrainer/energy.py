"""Energy receipt of a training run: kWh and kg CO2-eq measured with CodeCarbon, offline, never failing the run.

``EnergyCallback`` measures ``Trainer.train`` with CodeCarbon's offline tracker (nothing is fetched: the carbon
intensity is CodeCarbon's bundled world average unless a country or an intensity is configured). Where the machine
exposes no power counters (most containers, this project's CI) CodeCarbon estimates power from the CPU model's TDP
and the process's CPU load, and RAM from its size; the receipt says which (``mode``).

With GreenTrainer the receipt also gives

* the selections' share (importance + DP), attributed by their share of the wall time;
* what full fine-tuning would have spent on the same steps, an estimate labelled by its basis: the measured step-time
  ratio when a full fine-tuning step time is given, else the FLOPs ratio of the selections in force (vs full
  fine-tuning with the same LM head; see ``sparse_head.py``).

The figures are added to the Trainer's final log (``greentrainer/energy_kwh``, ...), so TensorBoard, W&B and
``trainer.state.log_history`` receive them. If CodeCarbon is missing or cannot measure, training goes on and the
receipt says why (``error``).
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
import weakref
from dataclasses import asdict, dataclass, field
from typing import Any

from transformers import TrainerCallback

from .callback import LOG_PREFIX, GreenTrainerCallback
from .model import GreenTrainerModel, find_tuner

logger = logging.getLogger(__name__)

# CodeCarbon's CPU modes that read power counters; the others ("cpu_load", "constant") estimate from the TDP
_COUNTER_MODES = {"intel_rapl", "intel_power_gadget", "windows_emi", "apple_powermetrics"}


@dataclass
class EnergyReceipt:
    """What a run used, and what full fine-tuning would have used on the same steps (an estimate)."""

    measured: bool = False
    mode: str = "not measured"  # "measured" (power counters), "estimated" (CodeCarbon's TDP/RAM models)
    components: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0
    energy_kwh: float | None = None
    emissions_kg: float | None = None
    carbon_intensity_g_per_kwh: float | None = None
    carbon_intensity_source: str = ""
    selection_seconds: float = 0.0
    selection_kwh: float | None = None
    evaluation_seconds: float = 0.0  # evaluations during training: full fine-tuning would run them alike
    full_finetuning_kwh: float | None = None
    full_finetuning_kg: float | None = None
    full_finetuning_basis: str | None = None  # "measured step-time ratio" or "FLOPs ratio"
    cost_ratio: float | None = None  # this run's steps / full fine-tuning's, on that basis

    def log_figures(self) -> dict[str, float]:
        """The numeric figures, prefixed for the Trainer log (integrations drop non-numbers)."""
        names = {
            "energy_kwh": self.energy_kwh,
            "emissions_kg": self.emissions_kg,
            "selection_energy_kwh": self.selection_kwh,
            "full_finetuning_energy_kwh": self.full_finetuning_kwh,
            "full_finetuning_emissions_kg": self.full_finetuning_kg,
        }
        return {f"{LOG_PREFIX}{name}": value for name, value in names.items() if value is not None}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def world_average_intensity() -> float:
    """CodeCarbon's bundled world-average grid carbon intensity, gCO2-eq/kWh (475 in CodeCarbon 3.3, IEA 2019)."""
    from codecarbon.input import DataSource

    return float(DataSource().get_carbon_intensity_per_source_data()["world_average"])


def country_intensity(country_iso_code: str) -> float:
    """CodeCarbon's bundled carbon intensity of a country's grid (ISO 3166-1 alpha-3), gCO2-eq/kWh."""
    from codecarbon.input import DataSource

    mix = DataSource().get_global_energy_mix_data()
    code = country_iso_code.upper()
    if code not in mix:
        raise ValueError(
            f"unknown country ISO code {country_iso_code!r}: use a 3-letter ISO 3166-1 code such as USA, FRA or DEU "
            f"({len(mix)} are known), or give the carbon intensity itself"
        )
    return float(mix[code]["carbon_intensity"])


class EnergyCallback(TrainerCallback):
    """Measures a ``Trainer.train`` run with CodeCarbon (offline) and adds the receipt to the final log.

    Args:
        country_iso_code: Grid of this country (CodeCarbon's offline data). Default: the world average.
        carbon_intensity_g_per_kwh: Grid carbon intensity to use instead, gCO2-eq/kWh.
        full_step_seconds: Measured wall time of one full fine-tuning step on this machine and batch shape; when
            given, the full fine-tuning estimate uses the step-time ratio instead of the FLOPs ratio.
        tracking_mode: CodeCarbon's ``"process"`` (this process's share of the machine; default, right on shared
            machines) or ``"machine"``.

    Measured on the main process only (the machine it runs on). The receipt is ``callback.receipt`` after training.
    """

    measures_selections = True  # GreenTrainer's callback stays behind it: its first selection is measured

    def __init__(
        self,
        country_iso_code: str | None = None,
        carbon_intensity_g_per_kwh: float | None = None,
        full_step_seconds: float | None = None,
        tracking_mode: str = "process",
    ):
        if carbon_intensity_g_per_kwh is not None and not carbon_intensity_g_per_kwh >= 0:
            raise ValueError(f"carbon intensity must be >= 0 gCO2-eq/kWh, got {carbon_intensity_g_per_kwh}")
        if full_step_seconds is not None and not full_step_seconds > 0:
            raise ValueError(f"full_step_seconds must be > 0, got {full_step_seconds}")
        if tracking_mode not in ("process", "machine"):
            raise ValueError(f"tracking_mode must be 'process' or 'machine', got {tracking_mode!r}")
        if country_iso_code and carbon_intensity_g_per_kwh is None:
            with contextlib.suppress(ImportError):  # no codecarbon: the receipt will say so
                country_intensity(country_iso_code)  # a wrong code is the user's to fix now, not a silent default
        self.country_iso_code = country_iso_code
        self.carbon_intensity = carbon_intensity_g_per_kwh
        self.full_step_seconds = full_step_seconds
        self.tracking_mode = tracking_mode
        self.receipt = EnergyReceipt()
        self._tracker = None
        self._start = 0.0
        self._step_start = 0.0
        self._step_seconds: list[float] = []
        self._flops_ratios: list[float] = []
        self._selections_before = 0
        self._step_end = 0.0  # when the last step ended (or training began): evaluations follow it
        self._selections_at_step_end = 0
        self._evaluation_seconds = 0.0
        self._stop_left_tracker: weakref.finalize | None = None

    # ------------------------------------------------------------------ events
    def on_init_end(self, args, state, control, **kwargs):
        # ahead of the reporting integrations (the final log reaches TensorBoard / W&B) and of GreenTrainer's
        # callback (its first selection, at train begin, falls inside the measurement)
        GreenTrainerCallback._report_before_integrations(self)

    def on_train_begin(self, args, state, control, **kwargs):
        GreenTrainerCallback._report_before_integrations(self)  # also when added after the Trainer was built
        self._stop_tracker()  # a run that raised ends without on_train_end: its tracker would sample on for good
        self.receipt = EnergyReceipt(error="training has not reached its end")
        self._step_seconds, self._flops_ratios = [], []
        self._evaluation_seconds = 0.0
        tuner = _tuner(kwargs.get("model"))
        self._selections_before = self._selections_so_far(state, tuner)
        self._start = self._step_end = time.perf_counter()
        self._selections_at_step_end = self._selections_before
        if not state.is_world_process_zero:
            self.receipt.error = "measured on the main process only"
        else:
            self._tracker = self._start_tracker()
            if self._tracker is not None:  # stopped if this callback is dropped with its run unfinished
                self._stop_left_tracker = weakref.finalize(self, _stop_quietly, self._tracker)

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._step_end = time.perf_counter()
        self._step_seconds.append(self._step_end - self._step_start)
        tuner = _tuner(kwargs.get("model"))
        self._selections_at_step_end = len(tuner.greentrainer_state.history) if tuner is not None else 0
        record = tuner.greentrainer_state.last if tuner is not None else None
        if record is not None:
            self._flops_ratios.append(record.predicted_ratio)

    def on_evaluate(self, args, state, control, **kwargs):
        # the Trainer evaluates right after a step ends (and its log), or at train begin (eval_on_start), after the
        # first selection: the time since, less any selection made meanwhile
        tuner = _tuner(kwargs.get("model"))
        since = tuner.greentrainer_state.history[self._selections_at_step_end :] if tuner is not None else []
        now = time.perf_counter()
        self._evaluation_seconds += max(0.0, now - self._step_end - sum(record.seconds for record in since))
        self._step_end, self._selections_at_step_end = now, self._selections_at_step_end + len(since)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "train_runtime" not in logs or self._tracker is None:
            return  # only the Trainer's final summary log carries the receipt
        self._finish(_tuner(kwargs.get("model")))
        figures = self.receipt.log_figures()
        logs.update(figures)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(figures)

    def on_train_end(self, args, state, control, **kwargs):
        if self._tracker is not None:  # training ended without the summary log (interrupted)
            self._finish(_tuner(kwargs.get("model")))

    @staticmethod
    def _selections_so_far(state, tuner: GreenTrainerModel | None) -> int:
        """Selection records made before this run: a resumed run's checkpoint holds them (GreenTrainer's callback
        restores them at its train begin, which may come after this one's), else the model's history holds them."""
        saved = GreenTrainerCallback.checkpoint_state(state) if state.global_step > 0 else None
        history = ((saved or {}).get("state") or {}).get("history")
        if history is not None:
            return len(history)
        return len(tuner.greentrainer_state.history) if tuner is not None else 0

    # ------------------------------------------------------------------ measurement
    def _start_tracker(self):
        try:
            from codecarbon import OfflineEmissionsTracker
        except ImportError:
            self.receipt.error = "codecarbon is not installed (pip install codecarbon)"
            return None
        try:
            if self.carbon_intensity is not None:
                intensity, source = self.carbon_intensity, "configured"
            elif self.country_iso_code:
                intensity = country_intensity(self.country_iso_code)
                source = f"{self.country_iso_code.upper()} grid (CodeCarbon offline data)"
            else:
                intensity, source = world_average_intensity(), "world average (CodeCarbon offline data)"
            self.receipt.carbon_intensity_g_per_kwh = intensity
            self.receipt.carbon_intensity_source = source
            logging.getLogger("codecarbon").setLevel(logging.ERROR)  # its per-measurement INFO lines
            tracker = OfflineEmissionsTracker(
                force_carbon_intensity_g_co2e_kwh=intensity,
                output_methods=[],
                log_level="error",
                tracking_mode=self.tracking_mode,
                allow_multiple_runs=True,
            )
            tracker.start()
            return tracker
        except Exception as error:  # a receipt is never worth a failed run
            self.receipt.error = f"CodeCarbon could not start: {error}"
            logger.warning("Energy receipt unavailable: %s", self.receipt.error)
            return None

    def _stop_tracker(self) -> None:
        """Stop a tracker a run left running (it raised before its end); its receipt says so."""
        if self._stop_left_tracker is not None:
            self._stop_left_tracker()  # stops the tracker, once
            self._stop_left_tracker = None
        if self._tracker is not None:
            self._tracker = None
            self.receipt.error = "training did not reach its end: not measured"

    def _finish(self, tuner: GreenTrainerModel | None) -> None:
        tracker, self._tracker = self._tracker, None
        if self._stop_left_tracker is not None:  # stopped below, where its figures are read
            self._stop_left_tracker.detach()
            self._stop_left_tracker = None
        receipt = self.receipt
        receipt.error = None
        receipt.seconds = time.perf_counter() - self._start
        receipt.evaluation_seconds = self._evaluation_seconds
        try:
            tracker.stop()
            data = tracker.final_emissions_data
            receipt.energy_kwh = float(data.energy_consumed)
            receipt.emissions_kg = float(data.emissions)
            receipt.components, receipt.mode = _components(tracker)
            receipt.measured = True
        except Exception as error:
            receipt.error = f"CodeCarbon could not measure: {error}"
            logger.warning("Energy receipt unavailable: %s", receipt.error)
            return
        if tuner is not None:  # the selections inside the measurement
            measured = tuner.greentrainer_state.history[self._selections_before :]
            receipt.selection_seconds = sum(r.seconds for r in measured)
            share = min(1.0, receipt.selection_seconds / max(receipt.seconds, 1e-9))
            receipt.selection_kwh = receipt.energy_kwh * share
        self._estimate_full_finetuning()

    def _estimate_full_finetuning(self) -> None:
        receipt = self.receipt
        if self.full_step_seconds is not None and self._step_seconds:
            receipt.cost_ratio = statistics.median(self._step_seconds) / self.full_step_seconds
            receipt.full_finetuning_basis = "measured step-time ratio"
        elif self._flops_ratios:
            receipt.cost_ratio = statistics.fmean(self._flops_ratios)
            receipt.full_finetuning_basis = "FLOPs ratio"
        else:
            return  # not GreenTrainer and no full fine-tuning step time: nothing to compare with
        evaluation_kwh = receipt.energy_kwh * min(1.0, receipt.evaluation_seconds / max(receipt.seconds, 1e-9))
        training_kwh = max(0.0, receipt.energy_kwh - (receipt.selection_kwh or 0.0) - evaluation_kwh)
        receipt.full_finetuning_kwh = training_kwh / max(receipt.cost_ratio, 1e-9) + evaluation_kwh
        receipt.full_finetuning_kg = receipt.full_finetuning_kwh * receipt.carbon_intensity_g_per_kwh / 1000


def _stop_quietly(tracker) -> None:
    with contextlib.suppress(Exception):
        tracker.stop()


def _tuner(model) -> GreenTrainerModel | None:
    if model is None:
        return None
    try:
        return find_tuner(model)
    except TypeError:  # full fine-tuning or another PEFT method: energy only
        return None


def _components(tracker) -> tuple[dict[str, str], str]:
    """How CodeCarbon got each component's power, and the run's mode.

    "measured" when every processor (CPU, GPU) was read from power counters, "estimated" when none was, else
    "partly estimated". RAM power is always CodeCarbon's estimate from its size.
    """
    components, read = {}, []
    for hardware in getattr(tracker, "_hardware", []):
        kind = type(hardware).__name__
        mode = getattr(hardware, "_mode", None)
        if kind == "CPU":
            read.append(mode in _COUNTER_MODES)
            components[kind] = f"{mode}: " + ("power counters" if read[-1] else "estimated from its TDP and the load")
        elif kind == "GPU":
            read.append(True)
            components[kind] = "NVML power counters"
        else:
            components[kind] = "estimated from its size"
    mode = "measured" if read and all(read) else "estimated" if not any(read) else "partly estimated"
    return components, mode
