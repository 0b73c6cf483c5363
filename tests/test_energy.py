"""The energy receipt: CodeCarbon offline (estimate mode on this machine), in the Trainer log, never a failure."""

from __future__ import annotations

import sys

import pytest
import torch
import transformers
from conftest import VOCAB, tiny_model
from peft import get_peft_model

from peft_greentrainer import EnergyCallback, GreenTrainerCallback, GreenTrainerConfig
from peft_greentrainer.energy import _components, country_intensity, world_average_intensity
from peft_greentrainer.model import find_tuner

ENERGY_KEYS = ("energy_kwh", "emissions_kg", "selection_energy_kwh", "full_finetuning_energy_kwh")


def _rows(count: int = 16) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(count):
        ids = torch.randint(3, VOCAB, (24,), generator=generator)
        labels = ids.clone()
        labels[:12] = -100
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def _train(
    tmp_path, callbacks, greentrainer: bool = True, resume: str | None = None, interval: int | None = None, **options
) -> transformers.Trainer:
    model = tiny_model("llama")
    if greentrainer:
        model = get_peft_model(model, GreenTrainerConfig(rho=0.6, selection_interval_steps=interval))
        callbacks = [GreenTrainerCallback(), *callbacks]
    settings = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=4,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    args = transformers.TrainingArguments(**{**settings, **options})
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=_rows(), eval_dataset=_rows(8), callbacks=callbacks
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_receipt_lands_in_the_trainer_log_with_a_labelled_full_finetuning_estimate(tmp_path):
    energy = EnergyCallback()
    trainer = _train(tmp_path, [energy])
    receipt = energy.receipt
    assert receipt.measured and receipt.error is None
    assert receipt.mode in ("estimated", "measured", "partly estimated") and "CPU" in receipt.components
    assert receipt.energy_kwh > 0
    assert receipt.carbon_intensity_g_per_kwh == world_average_intensity()  # the documented default
    assert receipt.emissions_kg == pytest.approx(receipt.energy_kwh * receipt.carbon_intensity_g_per_kwh / 1000)
    assert 0 < receipt.selection_kwh < receipt.energy_kwh  # the selection at step 0 is inside the measurement
    assert receipt.full_finetuning_basis == "FLOPs ratio"
    last_ratio = trainer.state.log_history[0]["greentrainer/flops_ratio"]
    assert receipt.cost_ratio == pytest.approx(last_ratio)  # one selection in force on every step
    assert receipt.full_finetuning_kwh == pytest.approx((receipt.energy_kwh - receipt.selection_kwh) / last_ratio)
    final = trainer.state.log_history[-1]
    assert "train_runtime" in final
    for key in ENERGY_KEYS:
        assert final[f"greentrainer/{key}"] > 0, key
    assert final["greentrainer/energy_kwh"] == receipt.energy_kwh


def test_measured_step_time_is_preferred_to_the_flops_ratio(tmp_path):
    energy = EnergyCallback(full_step_seconds=10.0)
    _train(tmp_path, [energy])
    assert energy.receipt.full_finetuning_basis == "measured step-time ratio"
    assert energy.receipt.cost_ratio < 1  # a tiny model's step takes far less than 10 s


def test_full_finetuning_run_gets_energy_only(tmp_path):
    energy = EnergyCallback(country_iso_code="fra")
    _train(tmp_path, [energy], greentrainer=False)
    receipt = energy.receipt
    assert receipt.measured and receipt.selection_kwh is None and receipt.full_finetuning_kwh is None
    assert receipt.carbon_intensity_g_per_kwh == country_intensity("FRA") != world_average_intensity()
    assert "FRA" in receipt.carbon_intensity_source


def test_configured_intensity_and_bad_configuration():
    assert EnergyCallback(carbon_intensity_g_per_kwh=0.0).carbon_intensity == 0.0
    with pytest.raises(ValueError, match="3-letter ISO"):
        EnergyCallback(country_iso_code="Atlantis")
    with pytest.raises(ValueError, match=">= 0"):
        EnergyCallback(carbon_intensity_g_per_kwh=-1)
    with pytest.raises(ValueError, match="tracking_mode"):
        EnergyCallback(tracking_mode="cluster")


def test_never_a_failure_without_codecarbon(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "codecarbon", None)  # import codecarbon -> ImportError
    energy = EnergyCallback()
    trainer = _train(tmp_path, [energy])
    assert trainer.state.global_step == 4
    assert not energy.receipt.measured and "pip install codecarbon" in energy.receipt.error
    assert not any(key.endswith("energy_kwh") for key in trainer.state.log_history[-1])


def test_never_a_failure_when_codecarbon_breaks(tmp_path, monkeypatch):
    import codecarbon

    def broken(self):
        raise RuntimeError("no power reading")

    monkeypatch.setattr(codecarbon.OfflineEmissionsTracker, "stop", broken)
    energy = EnergyCallback()
    trainer = _train(tmp_path, [energy])
    assert trainer.state.global_step == 4
    assert not energy.receipt.measured and "no power reading" in energy.receipt.error


class _Hardware:
    def __init__(self, mode=None):
        self._mode = mode


def test_receipt_says_which_mode_codecarbon_used():
    def mode(*hardware) -> str:
        tracker = type("Tracker", (), {"_hardware": list(hardware)})()
        return _components(tracker)[1]

    cpu, gpu, ram = (type(name, (_Hardware,), {}) for name in ("CPU", "GPU", "RAM"))
    assert mode(ram(), cpu("cpu_load")) == "estimated"  # this machine: no power counters
    assert mode(ram(), cpu("intel_rapl")) == "measured"
    assert mode(ram(), cpu("constant"), gpu()) == "partly estimated"


def test_a_resumed_run_is_charged_for_its_own_selections_only(tmp_path):
    """The checkpoint's selections, restored after this callback's train begin, were made and measured before."""
    _train(tmp_path / "full", [], interval=1, save_strategy="steps", save_steps=2)
    energy = EnergyCallback()
    trainer = _train(tmp_path / "resumed", [energy], interval=1, resume=str(tmp_path / "full" / "checkpoint-2"))
    history = find_tuner(trainer.model).greentrainer_state.history
    own = [record for record in history if record.step >= 2]
    assert len(own) == 2 and len(history) == 4
    assert energy.receipt.selection_seconds == pytest.approx(sum(record.seconds for record in own))


def test_a_run_that_raises_leaves_no_tracker_running(tmp_path):
    """The Trainer calls no callback when training raises: the next run of the callback stops the tracker left."""

    class Fails(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise RuntimeError("out of memory")

    energy = EnergyCallback()
    with pytest.raises(RuntimeError, match="out of memory"):
        _train(tmp_path, [energy, Fails()])
    left = energy._tracker
    stops = []
    original = left.stop
    left.stop = lambda: stops.append(original())
    assert energy.receipt.error == "training has not reached its end" and not energy.receipt.measured
    _train(tmp_path, [energy])
    assert len(stops) == 1 and energy.receipt.measured and energy.receipt.error is None


def test_evaluation_during_training_is_not_scaled_as_training(tmp_path):
    """Full fine-tuning would evaluate alike: only the training share of the energy is divided by the cost ratio."""
    energy = EnergyCallback()
    _train(tmp_path, [energy], eval_strategy="steps", eval_steps=1)
    receipt = energy.receipt
    assert 0 < receipt.evaluation_seconds < receipt.seconds
    evaluation_kwh = receipt.energy_kwh * receipt.evaluation_seconds / receipt.seconds
    training_kwh = receipt.energy_kwh - receipt.selection_kwh - evaluation_kwh
    assert receipt.full_finetuning_kwh == pytest.approx(training_kwh / receipt.cost_ratio + evaluation_kwh)


def test_a_resumed_second_stage_is_charged_for_its_own_selections_only(tmp_path):
    """Steps count from 0 in every train(): the checkpoint of a second stage holds the first stage's selections, at
    steps a resumed run reaches again, and tells how many there were."""
    model = get_peft_model(tiny_model("llama"), GreenTrainerConfig(rho=0.6, selection_interval_steps=1))
    settings = dict(per_device_train_batch_size=4, max_steps=4, report_to=[], use_cpu=True, disable_tqdm=True)

    def trainer(out, callbacks, model=model, **options):
        args = transformers.TrainingArguments(output_dir=str(tmp_path / out), **settings, **options)
        return transformers.Trainer(model=model, args=args, train_dataset=_rows(), callbacks=callbacks)

    trainer("first", [GreenTrainerCallback()], save_strategy="no").train()
    trainer("second", [GreenTrainerCallback()], save_strategy="steps", save_steps=2).train()
    energy = EnergyCallback()
    fresh = get_peft_model(tiny_model("llama"), GreenTrainerConfig(rho=0.6, selection_interval_steps=1))
    resumed = trainer("resumed", [GreenTrainerCallback(), energy], model=fresh, save_strategy="no")
    resumed.train(resume_from_checkpoint=str(tmp_path / "second" / "checkpoint-2"))
    history = fresh.base_model.greentrainer_state.history
    assert [record.step for record in history] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert energy.receipt.selection_seconds == pytest.approx(sum(record.seconds for record in history[-2:]))


def test_an_evaluation_at_the_start_is_not_charged_the_first_selection(tmp_path):
    """``eval_on_start`` evaluates after every callback's train begin, GreenTrainer's first selection included."""
    energy = EnergyCallback()
    _train(tmp_path, [energy], eval_strategy="steps", eval_steps=100, eval_on_start=True)
    receipt = energy.receipt
    assert 0 < receipt.evaluation_seconds < 0.5 * receipt.selection_seconds  # 8 rows of a tiny model, once


def test_the_first_selection_is_measured_whichever_order_the_callbacks_are_given_in(tmp_path):
    energy = EnergyCallback()
    model = get_peft_model(tiny_model("llama"), GreenTrainerConfig(rho=0.6))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no"
    )
    callbacks = [energy, GreenTrainerCallback()]  # GreenTrainer's moves itself ahead of the integrations too
    transformers.Trainer(model=model, args=args, train_dataset=_rows(), callbacks=callbacks).train()
    first = model.base_model.greentrainer_state.history[0]
    assert first.step == 0 and energy.receipt.selection_seconds == pytest.approx(first.seconds)
