"""The PEFT tuner end to end: Trainer and plain-loop training, budgets, save/load, export, resume and bad input."""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import math
import os
import pickle
import random
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import transformers
from conftest import VOCAB, needs_sparse_head, row_scaling_rel, tiny_batch, tiny_config, tiny_model
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments

from peft_greentrainer import GreenTrainerCallback, GreenTrainerConfig, export_lora_adapter, save_adapter, saving
from peft_greentrainer.engine.profile import default_loss, measure_flops, profile_key
from peft_greentrainer.model import GreenTrainerState
from peft_greentrainer.sampling import importance_batches

ARCHS = ["llama", "opt", "gpt2", "t5"]
UNIT_KINDS = ["tensors", "lora"]
# Per architecture, the LoRA targets (PEFT's defaults need the model type; explicit is clearer in a test).
LORA_TARGETS = {"llama": ["q_proj", "v_proj"], "opt": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "t5": ["q", "v"]}
N_SAMPLES, BATCH_SIZE, SEQ_LEN = 16, 4, 16  # 4 optimizer steps per epoch


# ---------------------------------------------------------------------------------------------------------- helpers
def _config(arch: str, units: str, **kwargs) -> GreenTrainerConfig:
    kwargs.setdefault("rho", 0.5)
    if units == "lora":
        kwargs.setdefault("target_modules", LORA_TARGETS[arch])
        kwargs.setdefault("r", 4)
        kwargs.setdefault("fan_in_fan_out", arch == "gpt2")  # GPT-2's Conv1D stores weights transposed
    return GreenTrainerConfig(units=units, **kwargs)


def _peft_model(arch: str, units: str, seed: int = 0, **kwargs):
    return get_peft_model(tiny_model(arch, seed=seed), _config(arch, units, **kwargs))


def _dataset(arch: str, n: int = N_SAMPLES, seq_len: int = SEQ_LEN) -> datasets.Dataset:
    """Two counting sequences (each token the previous plus one), repeated: every batch is equally hard, so the
    logged loss falls steadily within a few steps instead of jumping with the batch drawn."""
    span = VOCAB - 3
    starts = [11 * (i % 2) for i in range(n)]
    ids = [[3 + (s + t) % span for t in range(seq_len)] for s in starts]
    if arch == "t5":  # seq2seq: the target is the continuation of the input, half as long
        labels = [[3 + (s + seq_len + t) % span for t in range(seq_len // 2)] for s in starts]
    else:
        labels = [list(row) for row in ids]
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": labels})


def _collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Stack equal-length rows (DataCollatorForSeq2Seq would need a tokenizer)."""
    return {key: torch.tensor([row[key] for row in rows]) for key in rows[0]}


def _batch(arch: str, start: int = 0, size: int = BATCH_SIZE) -> dict[str, torch.Tensor]:
    data = _dataset(arch)
    return _collate([data[i] for i in range(start, start + size)])


def _args(tmp_path, **kwargs) -> TrainingArguments:
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        learning_rate=1e-2,
        logging_steps=1,
        num_train_epochs=2,
        per_device_train_batch_size=BATCH_SIZE,
        seed=0,
        disable_tqdm=True,
    )
    defaults.update(kwargs)
    return TrainingArguments(**defaults)


def _trainer(model, tmp_path, callbacks, arch: str, **kwargs) -> Trainer:
    return Trainer(
        model=model,
        args=_args(tmp_path, **kwargs),
        train_dataset=_dataset(arch),
        data_collator=_collate,
        callbacks=callbacks,
    )


def _trainable_names(tuner) -> set[str]:
    return {name for name, p in tuner.model.named_parameters() if p.requires_grad}


def _selected_tensors(tuner) -> set[str]:
    selected = set(tuner.greentrainer_state.selected)
    return {name for unit in tuner.candidate_units() if unit.name in selected for name in unit.param_names}


def _losses(trainer: Trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


class SelectionProbe(TrainerCallback):
    """Placed after GreenTrainerCallback: right after each selection, record the flags and the measured FLOPs."""

    def __init__(self, batch: dict[str, torch.Tensor]):
        self.batch = batch
        self.seen = 0
        self.checks: list[dict] = []

    def _check(self, model) -> None:
        tuner = model.base_model
        history = tuner.greentrainer_state.history
        if len(history) == self.seen:
            return
        self.seen = len(history)
        forward, backward = measure_flops(model, self.batch)
        self.checks.append(
            {
                "trainable": _trainable_names(tuner),
                "chosen": _selected_tensors(tuner),
                "record": history[-1],
                "flops": forward + backward,
                "full": tuner.cost_profile(self.batch)[1],
            }
        )

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._check(model)

    def on_epoch_begin(self, args, state, control, model=None, **kwargs):
        self._check(model)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._check(model)


# ------------------------------------------------------------------------------------------ 1. training in a Trainer
@pytest.mark.parametrize("units", UNIT_KINDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_trainer_trains_within_budget(arch, units, tmp_path):
    rho = 0.5
    model = _peft_model(arch, units, rho=rho)
    probe = SelectionProbe(_batch(arch))
    trainer = _trainer(model, tmp_path, [GreenTrainerCallback(), probe], arch)
    trainer.train()

    losses = _losses(trainer)
    assert len(losses) == 8
    assert np.mean(losses[-2:]) < min(losses[0], np.mean(losses[:2])) - 0.03, losses
    assert [c["record"].epoch for c in probe.checks] == [0.0, 1.0]  # one selection per epoch, seen right after it
    for check in probe.checks:
        assert check["chosen"], "the budget affords at least one unit"
        assert check["trainable"] == check["chosen"]
        assert check["flops"] <= rho * check["full"], (check["flops"] / check["full"], check["record"])
        assert check["flops"] <= check["record"].predicted_ratio * check["full"] * (1 + 1e-9)
    # the figures reach the Trainer's logs
    assert all(0 < entry["greentrainer/flops_ratio"] <= rho for entry in trainer.state.log_history if "loss" in entry)


@pytest.mark.parametrize(("units", "precision"), [("tensors", "bf16"), ("lora", "bf16"), ("lora", "fp16")])
def test_selection_runs_under_the_autocast_the_trainer_trains_under(units, precision, tmp_path, monkeypatch):
    """accelerate enters autocast around the wrapped model's forward only; the selection, which calls the tuner's model
    directly, ran its importance in float32 (on a GPU slower than a step, with twice its activation memory). Under
    fp16 too, its loss scaled as the steps' are (``test_importance.py``)."""
    import peft_greentrainer.model as tuner_module

    seen = []
    importance = tuner_module.compute_importance

    def recording(*args, **kwargs):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return importance(*args, **kwargs)

    monkeypatch.setattr(tuner_module, "compute_importance", recording)
    rho = 0.5
    model = _peft_model("llama", units, rho=rho)
    _trainer(model, tmp_path, [GreenTrainerCallback()], "llama", **{precision: True}).train()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert seen == [dtype, dtype]  # one selection per epoch
    log = model.base_model.greentrainer_state.history
    assert len(log) == 2 and all(record.predicted_ratio <= rho for record in log)
    seen.clear()
    _trainer(model, tmp_path, [GreenTrainerCallback()], "llama", bf16=False).train()
    assert seen == [None, None]


def _task_dataset(task_type: str, n: int = N_SAMPLES) -> datasets.Dataset:
    """Counting sequences with the targets of a classification, token-classification or extractive-QA head."""
    ids = [[3 + (7 * i + t) % (VOCAB - 3) for t in range(SEQ_LEN)] for i in range(n)]
    columns = {"input_ids": ids, "attention_mask": [[1] * SEQ_LEN for _ in ids]}
    if task_type == "SEQ_CLS":
        columns["labels"] = [i % 3 for i in range(n)]
    elif task_type == "TOKEN_CLS":
        columns["labels"] = [[token % 3 for token in row] for row in ids]
    else:
        columns["start_positions"] = [i % 4 for i in range(n)]
        columns["end_positions"] = [4 + i % 4 for i in range(n)]
    return datasets.Dataset.from_dict(columns)


@pytest.mark.parametrize("units", UNIT_KINDS)
@pytest.mark.parametrize("task_type", ["SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS"])
def test_task_heads_train_within_budget(task_type, units, tmp_path):
    """PEFT's wrappers for these heads pass ``return_dict=True`` themselves: a step must find the shape its
    selection was priced at, not profile it again inside the step (which once cost the step 1.8x its budget)."""
    rho = 0.5
    heads = {
        "SEQ_CLS": transformers.AutoModelForSequenceClassification,
        "TOKEN_CLS": transformers.AutoModelForTokenClassification,
        "QUESTION_ANS": transformers.AutoModelForQuestionAnswering,
    }
    torch.manual_seed(0)
    base = heads[task_type].from_config(tiny_config("llama", num_labels=3, pad_token_id=0))
    model = get_peft_model(base, _config("llama", units, rho=rho, task_type=task_type))
    data = _task_dataset(task_type)
    probe = SelectionProbe(_collate([data[i] for i in range(BATCH_SIZE)]))
    trainer = Trainer(
        model=model,
        args=_args(tmp_path),
        train_dataset=data,
        data_collator=_collate,
        callbacks=[GreenTrainerCallback(), probe],
    )
    trainer.train()

    assert [c["record"].epoch for c in probe.checks] == [0.0, 1.0]
    for check in probe.checks:
        assert check["chosen"] and check["trainable"] == check["chosen"]
        assert check["flops"] <= rho * check["full"], (check["flops"] / check["full"], check["record"])
        assert check["flops"] <= check["record"].predicted_ratio * check["full"] * (1 + 1e-9)
    assert len(model.base_model._pricer.shape_costs) == 1  # every step of one shape, priced once
    assert all(0 < entry["greentrainer/flops_ratio"] <= rho for entry in trainer.state.log_history if "loss" in entry)


# ------------------------------------------------------------------------------------------ 2. save / load round trip
def _train_a_little(model, arch: str, steps: int = 2, lr: float = 1e-2) -> dict[str, torch.Tensor]:
    """One selection, then a few AdamW steps: the selected weights move away from their initial values."""
    batch = _batch(arch)
    # over every candidate (a later call finds some frozen by the previous selection), as a real loop would
    candidates = [p for unit in model.base_model.candidate_units() for p in unit.parameters(model.base_model.model)]
    optimizer = torch.optim.AdamW(candidates, lr=lr)
    model.base_model.select_units([batch], optimizer)
    for _ in range(steps):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return batch


def _assert_equal_state_dicts(expected: dict, actual: dict) -> None:
    assert set(expected) == set(actual)
    different = [key for key in expected if not torch.equal(expected[key], actual[key])]
    assert not different, different[:5]


def test_an_optimizer_that_makes_its_state_when_built_has_trained_nothing_yet(tmp_path):
    """torch's Adagrad (``optim="adagrad"``) makes every parameter's state, at step 0, when it is built: counted as
    stepped, every candidate was saved as trained, making the adapter a whole copy of the model."""
    model = _peft_model("llama", "tensors")
    tuner = model.base_model
    batch = _batch("llama")
    optimizer = torch.optim.Adagrad(model.parameters(), lr=1e-2)
    assert len(optimizer.state) == len(list(model.parameters()))  # before any step
    before = {n: p.detach().clone() for n, p in tuner.model.named_parameters()}
    tuner.select_units([batch], optimizer)
    for _ in range(2):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in tuner.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(tuner.greentrainer_state.trained_tensors)
    model.save_pretrained(tmp_path)
    saved = {k.removeprefix("base_model.model.") for k in load_file(tmp_path / "adapter_model.safetensors")}
    assert saved == changed and len(saved) < len(before)


@pytest.mark.parametrize("units", UNIT_KINDS)
@pytest.mark.parametrize("arch", ["llama", "opt", "t5"])  # opt and t5 tie their embeddings
def test_save_and_load_round_trip_is_bitwise(arch, units, tmp_path):
    model = _peft_model(arch, units)
    _train_a_little(model, arch)
    tuner = model.base_model
    model.save_pretrained(tmp_path)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path))

    saved = load_file(tmp_path / "adapter_model.safetensors")
    if units == "tensors":  # exactly the tensors ever trained, nothing of the untouched base
        assert {k.removeprefix("base_model.model.") for k in saved} == set(tuner.greentrainer_state.trained_tensors)
        assert 0 < len(saved) < len(list(tuner.model.parameters()))
    else:
        assert saved and all("lora_" in key for key in saved)

    config = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(config, GreenTrainerConfig)
    assert (config.rho, config.units) == (0.5, units)

    fresh = tiny_model(arch)  # the same base initialisation: tensor units saved only what training changed
    if units == "tensors":
        trained = tuner.greentrainer_state.trained_tensors
        assert all(not torch.equal(tuner.model.get_parameter(n), fresh.get_parameter(n)) for n in trained)
    torch.manual_seed(123)  # LoRA's own initialisation differs from the trained run's
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    assert isinstance(loaded.peft_config["default"], GreenTrainerConfig)
    _assert_equal_state_dicts(model.state_dict(), loaded.state_dict())
    if units == "tensors":
        trained = set(tuner.greentrainer_state.trained_tensors)
        assert set(loaded.base_model.greentrainer_state.trained_tensors) == trained
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference

    frozen = tiny_model(arch).requires_grad_(False)  # inference on a frozen base needs no trainable candidate
    _assert_equal_state_dicts(model.state_dict(), PeftModel.from_pretrained(frozen, tmp_path).state_dict())

    if units == "lora":  # LoRA weights do not depend on the base they are loaded onto
        other = tiny_model(arch, seed=7)
        expected = {f"base_model.model.{k}": v for k, v in other.state_dict().items()}
        lora = {k: v for k, v in model.state_dict().items() if "lora_" in k}
        onto_other = PeftModel.from_pretrained(other, tmp_path).state_dict()
        _assert_equal_state_dicts(lora, {k: v for k, v in onto_other.items() if "lora_" in k})
        base_weights = {k.replace(".base_layer", ""): v for k, v in onto_other.items() if "lora_" not in k}
        _assert_equal_state_dicts(expected, base_weights)


@pytest.mark.parametrize("units", UNIT_KINDS)
def test_peft_state_dict_helpers_and_trainable_parameter_count(units, capsys):
    arch = "opt"
    model = _peft_model(arch, units)
    _train_a_little(model, arch)
    state = get_peft_model_state_dict(model)
    if units == "tensors":
        expected = {f"base_model.model.{n}" for n in model.base_model.greentrainer_state.trained_tensors}
        assert set(state) == expected
    else:
        lora = [n.replace(".default.", ".") for n, _ in model.base_model.model.named_parameters() if "lora_" in n]
        assert set(state) == {f"base_model.model.{n}" for n in lora}

    base = tiny_model(arch)
    torch.manual_seed(99)  # other LoRA initial values
    other = get_peft_model(base, _config(arch, units))
    assert any(not torch.equal(v, other.state_dict()[k]) for k, v in model.state_dict().items())
    set_peft_model_state_dict(other, state)
    _assert_equal_state_dicts(model.state_dict(), other.state_dict())

    model.print_trainable_parameters()
    match = re.search(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+)", capsys.readouterr().out)
    assert match, "print_trainable_parameters printed no counts"
    trainable, total = (int(g.replace(",", "")) for g in match.groups())
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert total == sum(p.numel() for p in model.parameters())
    assert 0 < trainable < total


# ------------------------------------------------------------------------------------------------- 3. LoRA export
EXPORT_CHECK = textwrap.dedent(
    """
    import sys
    import peft, torch, transformers

    root = sys.argv[1]
    base = transformers.AutoModelForCausalLM.from_pretrained(root + "/base")
    model = peft.PeftModel.from_pretrained(base, root + "/lora")
    assert type(model.peft_config["default"]) is peft.LoraConfig, type(model.peft_config["default"])
    data = torch.load(root + "/expected.pt")
    model.eval()
    with torch.no_grad():
        logits = model(**data["batch"]).logits
    assert "peft_greentrainer" not in sys.modules
    torch.save(logits, root + "/loaded.pt")
    """
)


def test_lora_export_loads_with_plain_peft(tmp_path):
    arch = "llama"
    base = tiny_model(arch)
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, _config(arch, "lora"))
    batch = _train_a_little(model, arch)
    export_lora_adapter(model, tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and "rho" not in config
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    torch.save({"batch": batch, "logits": expected}, tmp_path / "expected.pt")

    result = subprocess.run(
        [sys.executable, "-c", EXPORT_CHECK, str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = torch.load(tmp_path / "loaded.pt")
    torch.testing.assert_close(loaded, expected, atol=1e-6, rtol=0)


def test_export_refuses_tensor_units(tmp_path):
    model = _peft_model("llama", "tensors")
    with pytest.raises(ValueError, match="units='lora'"):
        export_lora_adapter(model, tmp_path / "lora")
    assert not (tmp_path / "lora").exists()


# ------------------------------------------------------------------------------------- 4. merge, unload and disable
@pytest.mark.parametrize("units", UNIT_KINDS)
@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_merge_and_unload_returns_plain_model_with_same_logits(arch, units):
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = _peft_model(arch, units)
    batch = _train_a_little(model, arch)
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    merged = model.merge_and_unload()
    assert isinstance(merged, transformers.PreTrainedModel) and not isinstance(merged, PeftModel)
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    assert not hasattr(merged, "peft_config")
    with torch.no_grad():
        actual = merged(**batch).logits
    if units == "tensors":
        assert torch.equal(actual, expected)  # the trained weights are the model's own
    else:
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
        assert not torch.equal(expected, tiny_model(arch).eval()(**batch).logits)  # the adapters did change it


@needs_sparse_head
@pytest.mark.parametrize("unload", ["merge_and_unload", "unload"])
def test_unloading_takes_off_the_sparse_head_the_tuner_put_on(unload):
    """The model given back is a plain transformers model: its training-mode logits cover every position, as LoRA's
    unloaded model's do, not only the labelled ones. A head the user attached before get_peft_model stays."""
    from peft_greentrainer import enable_sparse_lm_head
    from peft_greentrainer.sparse_head import attached_sparse_lm_head

    model = _peft_model("llama", "lora")
    batch = _train_a_little(model, "llama")
    base = getattr(model, unload)().train()
    assert attached_sparse_lm_head(base) is None
    assert base(**batch).logits.shape == (*batch["input_ids"].shape, VOCAB)
    own = tiny_model("llama")
    enable_sparse_lm_head(own)
    model = get_peft_model(own, _config("llama", "lora"))
    _train_a_little(model, "llama")
    assert attached_sparse_lm_head(getattr(model, unload)()) is not None


def test_training_an_adapter_loaded_for_inference_says_to_load_it_trainable(tmp_path):
    model = _peft_model("llama", "lora")
    _train_a_little(model, "llama")
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path)  # is_trainable=False, PEFT's default
    optimizer = torch.optim.AdamW([p for p in loaded.parameters() if p.requires_grad] or [torch.zeros(1)])
    with pytest.raises(ValueError, match="is_trainable=True"):
        loaded.base_model.select_units([_batch("llama")], optimizer)


def test_tensor_units_cannot_disable_or_unload():
    model = _peft_model("llama", "tensors")
    batch = _train_a_little(model, "llama")
    with torch.no_grad():
        before = model(**batch).logits
    with pytest.raises(RuntimeError, match="units='tensors'"), model.disable_adapter():
        pass
    with pytest.raises(RuntimeError, match="units='tensors'"):
        model.unload()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before)  # the failed calls changed nothing


# ------------------------------------------------------------------------- 5. selection leaves the optimizer alone
def _snapshot(model, optimizer) -> dict:
    return {
        "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
        "flags": {n: p.requires_grad for n, p in model.named_parameters()},
        "optimizer": _clone(optimizer.state_dict()),
        "rng": torch.get_rng_state(),
    }


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    return value


def _assert_identical(expected, actual, path: str = "") -> None:
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and torch.equal(expected, actual), path
    elif isinstance(expected, dict):
        assert set(expected) == set(actual), path
        for key in expected:
            _assert_identical(expected[key], actual[key], f"{path}/{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(expected) == len(actual), path
        for i, (a, b) in enumerate(zip(expected, actual, strict=True)):
            _assert_identical(a, b, f"{path}/{i}")
    else:
        assert expected == actual, path


@pytest.mark.parametrize("units", UNIT_KINDS)
def test_importance_evaluation_leaves_weights_and_optimizer_state_untouched(units):
    """A run that selects at step k equals, bit for bit, a run that only applies the same flags at step k."""
    arch = "opt"  # dropout 0.1: the selection must not consume the training RNG either
    batches = [_batch(arch, start=4 * (i % 4)) for i in range(6)]
    select_at = 3

    def run(replay: list[str] | None):
        torch.manual_seed(0)
        model = _peft_model(arch, units)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
        for step, batch in enumerate(batches):
            if step == select_at:
                before = _snapshot(model, optimizer)
                if replay is None:
                    model.base_model.select_units(batches[:2], optimizer)
                else:
                    model.base_model.restore_selection(replay)
                after = _snapshot(model, optimizer)
                for key in ("weights", "optimizer", "rng"):
                    _assert_identical(before[key], after[key], key)
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return model, optimizer

    selecting, selecting_optimizer = run(None)
    selected = selecting.base_model.greentrainer_state.selected
    assert 0 < len(selected) < len(selecting.base_model.candidate_units())
    replaying, replaying_optimizer = run(selected)
    assert replaying.base_model.greentrainer_state.selected == selected
    _assert_identical(_snapshot(selecting, selecting_optimizer), _snapshot(replaying, replaying_optimizer))


# ------------------------------------------------------------------------------------------------------ 6. resume
def _run_with_checkpoints(arch: str, units: str, out, resume: str | None = None, callback=None, **kwargs):
    model = _peft_model(arch, units)
    trainer = _trainer(
        model, out, [callback or GreenTrainerCallback()], arch, save_strategy="steps", save_steps=3, **kwargs
    )
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


def _records(model) -> list[tuple]:
    return [(r.step, r.epoch, r.selected) for r in model.base_model.greentrainer_state.history]


@pytest.mark.parametrize("units", UNIT_KINDS)
def test_resume_from_checkpoint_matches_uninterrupted_run(units, tmp_path):
    arch = "opt"  # dropout: the resumed RNG must match too
    full, full_trainer = _run_with_checkpoints(arch, units, tmp_path / "full")
    assert len(full.base_model.greentrainer_state.history) == 2
    for step in (3, 6):  # mid-epoch 0 (before the second selection), mid-epoch 1 (after it)
        checkpoint = tmp_path / "full" / "out" / f"checkpoint-{step}"
        resumed, trainer = _run_with_checkpoints(arch, units, tmp_path / f"resumed{step}", resume=str(checkpoint))
        assert not trainer.args.restore_callback_states_from_checkpoint  # the user need not set it
        assert _losses(trainer) == _losses(full_trainer)  # the log restored from the checkpoint, then the same steps
        state, expected = resumed.base_model.greentrainer_state, full.base_model.greentrainer_state
        assert state.selected == expected.selected
        assert _records(resumed) == _records(full)
        assert state.trained_tensors == expected.trained_tensors
        _assert_equal_state_dicts(full.state_dict(), resumed.state_dict())


def test_resume_keeps_the_loss_fn_when_the_trainer_restores_callback_states(tmp_path):
    """restore_callback_states_from_checkpoint=True makes the Trainer rebuild callbacks from their saved state."""
    arch, calls = "llama", []

    def loss_fn(model, batch):
        calls.append(len(batch["input_ids"]))
        return model(**batch).loss

    _run_with_checkpoints(arch, "tensors", tmp_path / "full", callback=GreenTrainerCallback(loss_fn))
    calls.clear()
    resumed, trainer = _run_with_checkpoints(
        arch,
        "tensors",
        tmp_path / "resumed",
        resume=str(tmp_path / "full" / "out" / "checkpoint-3"),
        callback=GreenTrainerCallback(loss_fn),
        restore_callback_states_from_checkpoint=True,
    )
    assert len(resumed.base_model.greentrainer_state.history) == 2
    assert calls, "the epoch-1 selection of the resumed run used the default loss instead of loss_fn"
    assert sum(isinstance(c, GreenTrainerCallback) for c in trainer.callback_handler.callbacks) == 1


# ------------------------------------------------------------------------------------------------- 7. bad input
@pytest.mark.parametrize("rho", [0, -1, 1.5, float("nan"), float("inf"), True, "0.5"])
def test_rho_outside_unit_interval_is_rejected_at_config_creation(rho):
    with pytest.raises(ValueError, match="rho"):
        GreenTrainerConfig(rho=rho)


def test_numpy_numbers_from_a_sweep_are_accepted_and_saved_as_plain_numbers(tmp_path):
    numbers = {"rho": np.float32(0.5), "importance_batches": np.int64(2), "selection_interval_steps": np.int32(3)}
    config = GreenTrainerConfig(**numbers)
    assert (config.rho, config.importance_batches, config.selection_interval_steps) == (0.5, 2, 3)
    assert type(config.rho) is float and type(config.importance_batches) is int
    config.save_pretrained(tmp_path)  # JSON: numpy scalars would not serialise
    assert GreenTrainerConfig.from_pretrained(tmp_path).rho == 0.5


def test_a_trainer_whose_loader_yields_no_model_inputs_is_told_what_to_do(tmp_path):
    """TRL's GRPO and RLOO collate prompts as a list (identity) and generate the model inputs inside each step."""
    model = _peft_model("llama", "lora")
    prompts = datasets.Dataset.from_list([{"prompt": f"count {i}"} for i in range(8)])
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, remove_unused_columns=False),
        train_dataset=prompts,
        data_collator=lambda rows: rows,
        callbacks=[GreenTrainerCallback()],
    )
    with pytest.raises(TypeError, match=r"yields list objects, not model inputs.*GRPO.*plain LoRA"):
        trainer.train()
    with pytest.raises(TypeError, match="batches of model inputs"):
        model.base_model.select_units([[{"prompt": "count"}]])


def test_unknown_units_is_rejected():
    with pytest.raises(ValueError, match="units must be one of"):
        GreenTrainerConfig(units="layers")
    with pytest.raises(ValueError, match="importance_update must be one of"):
        GreenTrainerConfig(importance_update="adam")


def test_lora_fields_with_tensor_units_are_named_in_a_warning(caplog):
    """A ``LoraConfig`` ported with the default units="tensors" would train every base tensor in place, silently."""
    with caplog.at_level(logging.WARNING, logger="peft_greentrainer.config"):
        GreenTrainerConfig(rho=0.5, units="lora", r=16, target_modules=["q_proj"])
        GreenTrainerConfig(rho=0.5, modules_to_save=["score"])  # PEFT's task models fill it with their head
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="peft_greentrainer.config"):
        GreenTrainerConfig(rho=0.5, r=16, target_modules=["q_proj"], use_dora=True)
    (record,) = caplog.records
    assert "r, target_modules, use_dora set" in record.getMessage() and "units='lora'" in record.getMessage()


def test_a_bad_pattern_and_layer_replication_are_clear_errors():
    with pytest.raises(ValueError, match=r"include_patterns holds '\(', which is not a regular expression"):
        GreenTrainerConfig(include_patterns=["("])
    with pytest.raises(ValueError, match=r"layer_replication deepens the model.*replicate_layers"):
        GreenTrainerConfig(units="lora", layer_replication=[[0, 2], [1, 2]])


@pytest.mark.parametrize("units", UNIT_KINDS)
def test_the_gradient_importance_update_scores_a_plain_gradient_step_at_each_groups_base_lr(units):
    """``importance_update="gradient"``: importance ``lr * |g|^2`` with each param group's base learning rate (under
    warmup too), whatever the optimizer's moments; the optimizer is only read."""
    model = _peft_model("llama", units, importance_update="gradient")
    tuner = model.base_model
    params = [p for p in model.parameters() if p.requires_grad]
    half = len(params) // 2
    optimizer, _ = _warmup_optimizer([{"params": params[:half]}, {"params": params[half:], "lr": 3e-2}])
    batch = _batch("llama")
    model(**batch).loss.backward()  # moments a first step's would differ from
    optimizer.step()
    optimizer.zero_grad()
    state = {id(p): s["exp_avg"].clone() for p, s in optimizer.state.items()}
    units_ = tuner.candidate_units()
    feasible = np.ones(len(units_), dtype=bool)
    scored = tuner._importance([batch], units_, feasible, optimizer, None, loss_fn=default_loss, max_grad_norm=None)
    grads = torch.autograd.grad(model(**batch).loss, params)
    lr_of = {id(p): 1e-2 if i < half else 3e-2 for i, p in enumerate(params)}
    step = {id(p): lr_of[id(p)] * float((g.double() ** 2).sum()) for p, g in zip(params, grads, strict=True)}
    expected = [sum(step[id(p)] for p in dict.fromkeys(u.parameters(tuner.model))) for u in units_]
    np.testing.assert_allclose(scored, expected, rtol=1e-4)
    assert all(torch.equal(s["exp_avg"], state[id(p)]) for p, s in optimizer.state.items())


def test_lora_targets_matching_nothing_is_a_clear_error():
    with pytest.raises(ValueError, match=r"(?i)target modules"):
        _peft_model("llama", "lora", target_modules=["no_such_module"])


def test_tensor_units_on_a_frozen_model_point_to_lora_units():
    model = tiny_model("llama")
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="units='lora'"):
        get_peft_model(model, GreenTrainerConfig(units="tensors"))


@pytest.mark.parametrize("units", UNIT_KINDS)
def test_include_patterns_matching_nothing_is_rejected(units):
    with pytest.raises(ValueError, match="include_patterns"):
        _peft_model("llama", units, include_patterns=[r"^no_such_tensor$"])


def test_tensor_adapter_on_a_base_of_other_shapes_names_the_base_model(tmp_path):
    model = _peft_model("llama", "tensors")
    _train_a_little(model, "llama")
    model.save_pretrained(tmp_path)
    other = tiny_model("llama", hidden_size=32, intermediate_size=64)
    with pytest.raises(ValueError, match="base model"):
        PeftModel.from_pretrained(other, tmp_path)


def test_rho_below_the_feasible_floor_names_the_smallest_feasible_rho():
    batch = _batch("llama")
    model = _peft_model("llama", "tensors", rho=0.34)
    floor = model.base_model.min_feasible_rho(batch)
    assert 0.34 < floor < 1  # the forward pass alone is about a third of full fine-tuning
    advice = math.ceil(floor * 1e4) / 1e4
    with pytest.raises(ValueError, match=rf"smallest feasible rho {advice:.4f}"):
        model.base_model.select_units([batch], lr=1e-3)
    assert all(p.requires_grad for p in model.base_model.model.parameters())  # nothing was frozen by the failure
    # following the advice works
    model = _peft_model("llama", "tensors", rho=advice)
    selection = model.base_model.select_units([batch], lr=1e-3)
    assert selection.mask.any() and selection.ratio <= advice


# ------------------------------------------------------------------------------------------ 8. plain PyTorch loop
@pytest.mark.parametrize("units", UNIT_KINDS)
def test_plain_pytorch_loop(units):
    arch = "llama"
    model = _peft_model(arch, units)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batches = [_batch(arch, start=4 * i) for i in range(4)]
    losses = []
    for epoch in range(3):
        model.base_model.select_units(batches, optimizer, epoch=epoch, step=epoch * len(batches))
        assert _trainable_names(model.base_model) == _selected_tensors(model.base_model)
        for batch in batches:
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    history = model.base_model.greentrainer_state.history
    assert [(r.epoch, r.step) for r in history] == [(0, 0), (1, 4), (2, 8)]
    assert np.mean(losses[-2:]) < losses[0] - 0.03, losses


def test_steps_before_the_first_selection_are_saved(tmp_path):
    """Every candidate is trainable until the first selection: tensors stepped then belong in the adapter."""
    arch = "llama"
    model = _peft_model(arch, "tensors")
    batch = _batch(arch)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def step():
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()
    model.save_pretrained(tmp_path / "before")
    loaded = PeftModel.from_pretrained(tiny_model(arch), tmp_path / "before")
    _assert_equal_state_dicts(model.state_dict(), loaded.state_dict())

    selection = model.base_model.select_units([batch], optimizer)
    assert not selection.mask.all()
    candidates = {name for unit in model.base_model.candidate_units() for name in unit.param_names}
    assert set(model.base_model.greentrainer_state.trained_tensors) == candidates
    step()
    model.save_pretrained(tmp_path / "after")
    loaded = PeftModel.from_pretrained(tiny_model(arch), tmp_path / "after")
    _assert_equal_state_dicts(model.state_dict(), loaded.state_dict())


# ------------------------------------------------------------------------------- 9. figures reach the integrations
class Reporter(TrainerCallback):
    """Stands in for TensorBoard / W&B: records what each on_log hands it."""

    def __init__(self):
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def test_figures_reach_reporting_integrations_and_log_history(tmp_path):
    reporter = Reporter()
    callbacks = [reporter, GreenTrainerCallback()]  # integrations, too, run before user callbacks
    trainer = _trainer(_peft_model("gpt2", "lora"), tmp_path, callbacks, "gpt2")
    trainer.train()
    assert callbacks[0] is reporter  # the user's own list is not reordered
    training_logs = [log for log in reporter.logs if "loss" in log]
    assert len(training_logs) == 8
    for log in training_logs:
        assert 0 < log["greentrainer/flops_ratio"] <= 0.5
        assert log["greentrainer/flops_ratio_vs_lora"] > 0
        assert 0 < log["greentrainer/units_selected"] <= log["greentrainer/units_total"]
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["greentrainer/flops_ratio"] for entry in history] == [
        log["greentrainer/flops_ratio"] for log in training_logs
    ]


# ---------------------------------------------------------------------------------------------- 10. atomic saving
def _interrupting_save(monkeypatch) -> None:
    """Make PEFT's safetensors writer leave a partial file, then fail, as a crash or a full disk would."""
    import peft.peft_model

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError("simulated interruption")

    monkeypatch.setattr(peft.peft_model, "safe_save_file", broken)


@pytest.mark.parametrize("units", UNIT_KINDS)
def test_interrupted_save_keeps_the_previous_adapter(units, tmp_path, monkeypatch):
    arch = "llama"
    model = _peft_model(arch, units)
    batch = _train_a_little(model, arch)
    target = tmp_path / "adapter"
    save_adapter(model, target)
    first = model.state_dict()
    first = {k: v.clone() for k, v in first.items()}

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(**batch).loss.backward()
    optimizer.step()
    with monkeypatch.context() as patch:
        _interrupting_save(patch)
        with pytest.raises(OSError, match="simulated"):
            save_adapter(model, target)
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # no .tmp-* / .old-* left behind
    loaded = PeftModel.from_pretrained(tiny_model(arch), target)
    _assert_equal_state_dicts(first, loaded.state_dict())

    # a first save that is interrupted leaves nothing at all
    with monkeypatch.context() as patch:
        _interrupting_save(patch)
        with pytest.raises(OSError, match="simulated"):
            save_adapter(model, tmp_path / "new")
    assert sorted(os.listdir(tmp_path)) == ["adapter"]

    save_adapter(model, target)  # an uninterrupted save replaces the adapter
    _assert_equal_state_dicts(model.state_dict(), PeftModel.from_pretrained(tiny_model(arch), target).state_dict())
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


@pytest.mark.parametrize("swap", ["exchange", "two renames"])
def test_interrupted_swap_puts_the_previous_adapter_back(tmp_path, monkeypatch, swap):
    """Linux swaps the directories in one step; elsewhere (or on a filesystem that cannot) the old one is moved aside
    and back if the new one cannot move in."""
    if swap == "two renames":
        monkeypatch.setattr(saving, "_exchange", lambda first, second: False)
    arch = "llama"
    model = _peft_model(arch, "tensors")
    _train_a_little(model, arch)
    target = tmp_path / "adapter"
    save_adapter(model, target)
    first = {k: v.clone() for k, v in model.state_dict().items()}
    _train_a_little(model, arch)
    replace = os.replace

    def failing(src, dst):
        if os.path.basename(src).startswith(".tmp-"):  # the new adapter moving into place
            raise OSError("simulated interruption")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    if swap == "exchange" and sys.platform.startswith("linux"):
        save_adapter(model, target)  # no rename moves the new adapter in
        first = {k: v.clone() for k, v in model.state_dict().items()}
    else:
        with pytest.raises(OSError, match="simulated"):
            save_adapter(model, target)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["adapter"]
    _assert_equal_state_dicts(first, PeftModel.from_pretrained(tiny_model(arch), target).state_dict())


def test_a_write_killed_between_its_two_renames_is_put_back_by_the_next(tmp_path):
    """Where the swap takes two renames, a kill between them leaves the previous adapter in a ``.old-<name>-*``
    sibling: the next write puts it back first, so that the files it does not write are kept."""
    model = _peft_model("llama", "lora")
    _train_a_little(model, "llama")
    target = tmp_path / "adapter"
    save_adapter(model, target)
    (target / "tokenizer.json").write_text("{}")
    os.replace(target, tmp_path / ".old-adapter-killed")  # where the kill left it
    (tmp_path / ".old-adapter-2-k1lled00").mkdir()  # another directory's ("adapter-2"): not ours to put back
    save_adapter(model, target)
    assert sorted(os.listdir(tmp_path)) == [".old-adapter-2-k1lled00", "adapter"]
    assert {"tokenizer.json", "adapter_model.safetensors"} <= set(os.listdir(target))


def test_a_write_killed_while_writing_is_removed_by_the_next(tmp_path):
    """A preempted save (SIGKILL while writing) leaves its hidden sibling, as large as the adapter (a units="tensors"
    one holds base tensors); the next write removes it, so preemptions do not pile copies up, and leaves alone what a
    live process is writing and what holds previous content."""
    target = tmp_path / "adapter"
    saving.write_atomically(target, lambda d: Path(d, "weights").write_text("old"))
    child = textwrap.dedent(
        f"""
        import os, time
        from peft_greentrainer.saving import write_atomically
        def write(directory):
            open(os.path.join(directory, "weights"), "w").write("partial")
            print("writing", flush=True)
            time.sleep(120)
        write_atomically({str(target)!r}, write)
        """
    )
    process = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "writing"
    finally:
        process.kill()
        process.wait()
    (left,) = [p for p in os.listdir(tmp_path) if p != "adapter"]
    assert left.startswith(".tmp-adapter-") and (target / "weights").read_text() == "old"
    host = saving._owner().split(".")[0]
    live = tmp_path / f".tmp-adapter-{host}.{os.getppid()}-under_way"  # a live process's write
    previous = tmp_path / f".tmp-adapter-{host}.{process.pid}-swapped1"  # killed after its swap: previous content
    for sibling in (live, previous):
        sibling.mkdir()
    (live / saving._NEW_CONTENT).touch()
    saving.write_atomically(target, lambda d: Path(d, "weights").write_text("new"))
    assert sorted(os.listdir(tmp_path)) == sorted(["adapter", live.name, previous.name])
    assert os.listdir(target) == ["weights"] and (target / "weights").read_text() == "new"


def test_a_write_that_begins_while_another_swaps_its_content_in_leaves_both_whole(tmp_path, monkeypatch):
    """A second writer (a thread, another process) that begins just after the first swapped its new content in, before
    the first removed its marker, leaves that marker alone (its owner is alive): the first removed it itself, the
    previous directory's other files carried over (the marker once went: the first write failed and they stayed in a
    hidden sibling)."""
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "weights").write_text("v0")
    (target / "tokenizer.json").write_text("kept")
    exchange, interleaved = saving._exchange, []

    def second_writer_after(first: str, second: str) -> bool:
        swapped = exchange(first, second)
        if not interleaved:
            interleaved.append(True)
            saving.write_atomically(target, lambda d: Path(d, "weights").write_text("v2"), keep_others=True)
        return swapped

    monkeypatch.setattr(saving, "_exchange", second_writer_after)
    saving.write_atomically(target, lambda d: Path(d, "weights").write_text("v1"), keep_others=True)
    assert interleaved and os.listdir(tmp_path) == ["adapter"]
    assert sorted(os.listdir(target)) == ["tokenizer.json", "weights"]


def test_a_save_updates_the_model_card_it_finds_as_save_pretrained_does(tmp_path):
    model = _peft_model("llama", "lora")
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "README.md").write_text("---\nlicense: apache-2.0\n---\n\nOur notes on this adapter.\n")
    save_adapter(model, target)
    card = (target / "README.md").read_text()
    assert "Our notes on this adapter." in card and "apache-2.0" in card


def test_save_keeps_other_files_and_is_a_no_op_off_the_main_process(tmp_path):
    """save_adapter replaces the adapter's own files as save_pretrained would, and leaves the rest of the directory
    (a tokenizer, another adapter's folder); every rank may call it (accelerate's pattern): only the main one writes."""
    arch = "llama"
    model = _peft_model(arch, "lora")
    _train_a_little(model, arch)
    target = tmp_path / "adapter"
    (target / "other").mkdir(parents=True)
    (target / "tokenizer.json").write_text("{}")
    (target / "other" / "adapter_config.json").write_text("{}")
    (target / "adapter_model.bin").write_text("an older save in the other format")
    save_adapter(model, target)
    assert {"tokenizer.json", "other", "adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(target))
    assert "adapter_model.bin" not in os.listdir(target)  # superseded by the new weights, whatever the format
    assert sorted(os.listdir(tmp_path)) == ["adapter"]
    assert os.stat(target).st_mode & 0o777 == 0o777 & ~_umask()  # not mkdtemp's private 0o700
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    _train_a_little(model, arch)
    save_adapter(model, target, is_main_process=False)  # another rank: nothing is written or removed
    _assert_equal_state_dicts(saved, PeftModel.from_pretrained(tiny_model(arch), target).state_dict())
    assert (target / "tokenizer.json").exists()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --------------------------------------------------------------------------------------------- 11. intervals
def test_selection_every_k_steps(tmp_path):
    model = _peft_model("llama", "tensors", selection_interval_steps=3)
    trainer = _trainer(model, tmp_path, [GreenTrainerCallback()], "llama")
    trainer.train()
    history = model.base_model.greentrainer_state.history
    assert [r.step for r in history] == [0, 3, 6]  # 8 steps


def test_selection_every_second_epoch(tmp_path):
    model = _peft_model("llama", "tensors", selection_interval=2)
    trainer = _trainer(model, tmp_path, [GreenTrainerCallback()], "llama", num_train_epochs=5)
    trainer.train()
    history = model.base_model.greentrainer_state.history
    assert [r.epoch for r in history] == [0.0, 2.0, 4.0]
    assert [r.step for r in history] == [0, 8, 16]


def test_selection_every_pass_over_a_streamed_dataset(tmp_path):
    """An IterableDataset has no length, so with max_steps the Trainer's epoch is a fraction of max_steps: selections
    follow the passes over the data (on_epoch_begin), not that fraction."""
    model = _peft_model("llama", "tensors")
    ranked_on = []  # the rows of the batches each importance ranks units on, by their first token

    def numbered(row, index):
        return {key: [3 + index, *row[key][1:]] for key in ("input_ids", "labels")}

    def loss_fn(model, batch):
        ranked_on.append(batch["input_ids"][:, 0].tolist())
        return model(**batch).loss

    trainer = Trainer(
        model=model,
        args=_args(tmp_path, max_steps=3 * N_SAMPLES // BATCH_SIZE),  # three passes
        train_dataset=_dataset("llama").map(numbered, with_indices=True).to_iterable_dataset(),
        data_collator=_collate,
        callbacks=[GreenTrainerCallback(loss_fn=loss_fn)],
    )
    trainer.train()
    history = model.base_model.greentrainer_state.history
    assert [r.step for r in history] == [0, N_SAMPLES // BATCH_SIZE, 2 * N_SAMPLES // BATCH_SIZE]
    # each selection runs loss_fn twice on its batch (what its forward receives, then importance); not on the
    # stream's head each time
    assert len(ranked_on) == 6 and ranked_on[::2] == ranked_on[1::2]
    assert len({tuple(rows) for rows in ranked_on}) == 3


def test_importance_batches_read_on_through_a_stream_and_leave_the_collators_generator_alone():
    """A stream cannot be sampled: each selection reads it further on, going round at its end. A collator with its
    own generator (masked-LM masking with a seed) is copied, so training's masks are those it would get anyway."""
    rows = [{"x": torch.tensor([i])} for i in range(10)]

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(rows)

    class SeededCollator:
        def __init__(self):
            self.generator = torch.Generator().manual_seed(0)

        def __call__(self, batch):
            return {"x": torch.cat([r["x"] for r in batch]), "mask": torch.rand(len(batch), generator=self.generator)}

    collator = SeededCollator()
    stream = torch.utils.data.DataLoader(Stream(), batch_size=4, collate_fn=collator)
    drawn = [[b["x"].tolist() for b in importance_batches(stream, 1, seed=0, draw=d)] for d in (0, 1, 2, 3, 6)]
    assert drawn == [[[0, 1, 2, 3]], [[4, 5, 6, 7]], [[8, 9, 0, 1]], [[2, 3, 4, 5]], [[4, 5, 6, 7]]]
    assert list(importance_batches(torch.utils.data.DataLoader(Stream(), batch_size=4), 1, 0, draw=1)) != []

    sampled = torch.utils.data.DataLoader(rows, batch_size=4, collate_fn=collator)
    assert len(list(importance_batches(sampled, 2, seed=0))) == 2
    assert torch.equal(collator.generator.get_state(), torch.Generator().manual_seed(0).get_state())

    class LazilySeeded(SeededCollator):  # transformers' seeded collators create their generator on first use
        def __init__(self):
            self.generator = None

        def __call__(self, batch):
            self.generator = self.generator or torch.Generator().manual_seed(0)
            return super().__call__(batch)

    class Wrapper:  # the Trainer's column-removing collator around the user's
        def __init__(self, data_collator):
            self.data_collator = data_collator

        def __call__(self, batch):
            return self.data_collator(batch)

    lazy = LazilySeeded()
    list(importance_batches(torch.utils.data.DataLoader(rows, batch_size=4, collate_fn=Wrapper(lazy)), 2, seed=0))
    assert lazy.generator is None
    deep = SeededCollator()
    entropy = Wrapper(deep)
    entropy.rng = random.SystemRandom()  # no state to put back: left alone
    for collate_fn in (Wrapper(Wrapper(deep)), functools.partial(deep.__call__), deep.__call__, entropy):
        loader = torch.utils.data.DataLoader(rows, batch_size=4, collate_fn=collate_fn)
        assert len(list(importance_batches(loader, 1, seed=0))) == 1
        assert torch.equal(deep.generator.get_state(), torch.Generator().manual_seed(0).get_state())


def test_importance_batches_leave_the_global_generators_a_plain_collator_draws_from_alone():
    """A plain-function collator may draw from Python's or numpy's global generator (or torch's): the probe's draws
    must not shift what training's batches get."""

    def jittering(batch):
        noise = [random.random(), float(np.random.rand()), float(torch.rand(()))]
        return {"x": torch.cat([r["x"] for r in batch]), "noise": torch.tensor(noise)}

    rows = [{"x": torch.tensor([i])} for i in range(8)]
    loader = torch.utils.data.DataLoader(rows, batch_size=4, collate_fn=jittering)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    expected = jittering(rows[:4])["noise"]
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    assert len(list(importance_batches(loader, 2, seed=0))) == 2
    assert torch.equal(jittering(rows[:4])["noise"], expected)


@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "checkpoint-wrapped"])
def test_an_adapter_loaded_trainable_and_trained_without_a_selection_saves_every_changed_tensor(tmp_path, wrapped):
    """A trainable load makes every candidate trainable until a selection: a plain loop (or a Trainer without the
    callback) may change any of them, and the saved adapter must hold them all (layers in activation-checkpointing
    wrappers, as accelerate's FSDP config applies, included)."""
    model = _peft_model("llama", "tensors")
    tuner = model.base_model
    batch = _batch("llama")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tuner.select_units([batch], optimizer)
    model.save_pretrained(tmp_path / "stage1")
    stage1 = len(tuner.greentrainer_state.trained_tensors)

    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "stage1", is_trainable=True)
    if wrapped:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        layers = loaded.base_model.model.model.layers
        for index, layer in enumerate(layers):
            layers[index] = checkpoint_wrapper(layer)
    optimizer = torch.optim.AdamW([p for p in loaded.parameters() if p.requires_grad], lr=1e-2)
    loaded(**batch).loss.backward()
    optimizer.step()
    loaded.save_pretrained(tmp_path / "stage2")
    reloaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "stage2").eval()
    saved = load_file(tmp_path / "stage2" / "adapter_model.safetensors")
    stepped = [n for n, p in loaded.named_parameters() if p.grad is not None]
    assert len(saved) > stage1 and len(saved) == len(stepped)
    assert torch.equal(reloaded(**batch).logits, loaded.eval()(**batch).logits)


def test_a_low_memory_load_onto_a_base_of_another_dtype_casts_as_a_copying_load_does(tmp_path):
    """low_cpu_mem_usage assigns the adapter's tensors as they are: an fp32 adapter on a bf16 base must still give a
    bf16 model, the same as the copying load."""
    model = _peft_model("llama", "tensors")
    batch = _batch("llama")
    model.base_model.select_units([batch], torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]))
    model.save_pretrained(tmp_path)
    logits = []
    for low_memory in (False, True):
        loaded = PeftModel.from_pretrained(
            tiny_model("llama").to(torch.bfloat16), tmp_path, low_cpu_mem_usage=low_memory
        ).eval()
        assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
        logits.append(loaded(**batch).logits)
    assert torch.equal(*logits)


def test_the_budget_check_runs_outside_a_compiled_forward():
    """torch_compile=True compiles the PEFT model's forward, hooks included: the check before each step profiles and
    selects in Python, and traced by dynamo it recompiled at every shape and crashed on a cold cache."""
    model = _peft_model("llama", "tensors", rho=0.6)
    tuner = model.base_model
    tuner.select_units([_batch("llama")], torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]))
    compiling = []
    pricer = tuner._pricer
    profile_rows = pricer.price_rows

    def spy(*args, **kwargs):
        compiling.append(torch.compiler.is_compiling())
        return profile_rows(*args, **kwargs)

    pricer.price_rows = spy
    compiled = torch.compile(model, backend="eager")
    batch = _batch("llama")
    for cut in (0, 4):  # two shapes: the second is priced, and re-selected if need be, inside its forward
        compiled(**{k: v[:, : v.shape[1] - cut] for k, v in batch.items()}).loss.backward()
    assert compiling == [False, False]
    assert all(ratio <= 0.6 for ratio in tuner.step_flops_ratios())
    # a deep copy (TRL's reference model, an EMA copy) checks its own steps, and the model still pickles
    del pricer.price_rows
    clone = copy.deepcopy(model)
    before = list(tuner._runtime.step_ratios)
    clone(**batch).loss.backward()
    assert clone.base_model.step_flops_ratios() is not None and tuner._runtime.step_ratios == before
    assert pickle.loads(pickle.dumps(model)).base_model.units_kind == "tensors"


def test_batches_without_a_loss_are_a_clear_error():
    """Preference and reward trainers' batches hold no labels: the error says to pass the loss they train."""
    model = _peft_model("llama", "tensors")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = {"input_ids": _batch("llama")["input_ids"]}
    assert model.base_model.cost_profile(batch)[1] > 0  # a profile needs only the forward pass
    with pytest.raises(ValueError, match=r"returned no loss.*loss_fn"):
        model.base_model.select_units([batch], optimizer)


def test_optimizer_missing_candidates_is_a_clear_error():
    model = _peft_model("llama", "tensors")
    model.base_model.model.lm_head.weight.requires_grad_(False)  # frozen by hand before the optimizer is built
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with pytest.raises(ValueError, match="optimizer does not hold 1 candidate"):
        model.base_model.select_units([_batch("llama")], optimizer)


# ------------------------------------------------------------------------ 12. the recipes' regressions (issue 12)
def _full_reference(model, batch) -> float:
    """Measured FLOPs of full fine-tuning of the base model on ``batch`` (LoRA layers off)."""
    base = model.base_model.model
    names = [n for n, _ in base.named_parameters() if "lora_" not in n]
    if model.base_model.units_kind == "lora":
        with model.disable_adapter():
            return sum(measure_flops(base, batch, names))
    return sum(measure_flops(base, batch, names))


def _counting_batch(seq_len: int, size: int = BATCH_SIZE) -> dict[str, torch.Tensor]:
    ids = torch.tensor([[3 + (s + t) % (VOCAB - 3) for t in range(seq_len)] for s in range(size)])
    return {"input_ids": ids, "labels": ids.clone()}


def _warmup_optimizer(params, lr: float = 1e-2):
    optimizer = torch.optim.AdamW(params, lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, step / 4))
    return optimizer, scheduler


@pytest.mark.parametrize("units", UNIT_KINDS)
def test_warmup_ranks_units_with_the_schedules_base_lr(units):
    """lr is 0 at step 0 under warmup: the selection is the one the schedule's base lr gives, not an empty one."""
    batches = [_batch("llama", start=4 * i) for i in range(2)]
    warm = _peft_model("llama", units)
    optimizer, _ = _warmup_optimizer([p for p in warm.parameters() if p.requires_grad])
    assert optimizer.param_groups[0]["lr"] == 0
    selection = warm.base_model.select_units(batches, optimizer)
    assert selection.mask.any()
    assert optimizer.param_groups[0]["lr"] == 0  # left as it was

    constant = _peft_model("llama", units)
    reference = torch.optim.AdamW([p for p in constant.parameters() if p.requires_grad], lr=1e-2)
    constant.base_model.select_units(batches, reference)
    assert warm.base_model.greentrainer_state.selected == constant.base_model.greentrainer_state.selected
    loss = warm(**batches[0]).loss
    loss.backward()  # trains: something requires grad


def test_no_positive_importance_still_trains_what_fits():
    """A learning rate of 0 and no schedule: every importance is 0; units are ranked by a plain gradient step."""
    model = _peft_model("llama", "tensors")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    batch = _batch("llama")
    selection = model.base_model.select_units([batch], optimizer)
    assert selection.mask.any() and selection.ratio <= 0.5
    model(**batch).loss.backward()
    forward, backward = measure_flops(model.base_model.model, batch)
    assert forward + backward <= 0.5 * _full_reference(model, batch)


def test_units_frozen_inside_a_step_stay_still_when_gradients_are_zeroed_in_place():
    """A re-selection inside a step keeps gradients the accumulation window computed, not the zeros a loop's
    ``zero_grad(set_to_none=False)`` leaves: AdamW would move frozen units with momentum and weight decay."""
    model = _peft_model("llama", "tensors", rho=0.75)
    tuner = model.base_model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    tuner.select_units([_counting_batch(8)], optimizer)
    tuner.restore_selection([u.name for u in tuner.candidate_units()])  # every unit has optimizer state
    model(**_counting_batch(8)).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    model(**_counting_batch(128)).loss.backward()  # a new shape: selected again inside this forward
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad and "lora" not in n}
    assert tuner.greentrainer_state.last.reason == "batch shape" and frozen
    before = {n: p.detach().clone() for n, p in frozen.items()}
    optimizer.step()
    assert all(p.grad is None for p in frozen.values())
    assert all(torch.equal(before[n], p) for n, p in frozen.items())


@pytest.mark.parametrize("mid_window", [True, False])
def test_a_new_shape_inside_an_accumulation_window_selects_among_the_units_selected_so_far(mid_window):
    """A unit first selected in the middle of a window would train on its later micro-batches only: a re-selection
    there keeps a subset of the selection; at a window's start it may choose any unit."""
    rho = 0.75
    model = _peft_model("llama", "tensors", rho=rho)
    tuner = model.base_model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tuner.select_units([_counting_batch(8)], optimizer)
    before = set(tuner.greentrainer_state.selected)
    # the stored importances now favour every unit not selected: an unrestricted re-selection takes some of them
    tuner.greentrainer_state.importance = {u.name: 1.0 if u.name in before else 1e6 for u in tuner.candidate_units()}
    model(**_counting_batch(8)).loss.backward()  # the window's first micro-batch
    if not mid_window:
        optimizer.step()
        optimizer.zero_grad()
    batch = _counting_batch(128)
    model(**batch).loss.backward()  # a new shape, selected again inside this forward
    state = tuner.greentrainer_state
    after = set(state.selected)
    assert state.last.reason == "batch shape" and after
    assert (after <= before) == mid_window
    forward, backward = measure_flops(tuner.model, batch)
    assert forward + backward <= rho * _full_reference(model, batch) * (1 + 1e-9)


def test_inside_a_window_units_selected_without_importance_are_kept_as_far_as_they_fit():
    """A replayed selection whose units hold no stored importance: inside a window the re-selection still keeps to
    them (as many as fit), rather than choosing others that would train on the window's later micro-batches only."""
    model, _, short, long = _selected_on_a_short_shape()
    tuner = model.base_model
    before = set(tuner.greentrainer_state.selected)
    tuner.greentrainer_state.importance = {u.name: 0.0 if u.name in before else 1.0 for u in tuner.candidate_units()}
    model(**short).loss.backward()  # the window's first micro-batch
    _assert_the_step_fits(model, long)  # a new shape, selected again inside this forward
    after = set(tuner.greentrainer_state.selected)
    assert tuner.greentrainer_state.last.reason == "batch shape" and after and after <= before


def test_a_state_restored_in_process_is_checked_at_the_shapes_learned_since_it_was_saved():
    """Resuming in the same process (the callback replaces the state, then restores its selection): the selection
    restored equals the restored state's, yet shapes learned after that state was saved never met it."""
    model, optimizer, short, long = _selected_on_a_short_shape()
    tuner = model.base_model
    saved = tuner.greentrainer_state.to_dict()  # a checkpoint made for the short shape
    for batch in (short, long):  # the long shape forces a cheaper selection
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert tuner.greentrainer_state.last.reason == "batch shape"
    tuner.greentrainer_state = GreenTrainerState.from_dict(saved)
    tuner.restore_selection(list(tuner.greentrainer_state.selected), optimizer)
    _assert_the_step_fits(model, long)


def test_restoring_the_selection_in_force_does_not_check_every_known_shape_again(monkeypatch):
    """TRL's DPO switches to its reference adapter and back around every step, and switching back restores the
    policy's selection: unchanged, it needs no check at every shape known (there may be hundreds)."""
    model, _, short, _ = _selected_on_a_short_shape()
    tuner = model.base_model
    for seq_len in (8, 12, 16, 20):
        model(**_counting_batch(seq_len)).loss.backward()
    calls = []
    original = type(tuner)._ratio
    monkeypatch.setattr(type(tuner), "_ratio", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    tuner.restore_selection(list(tuner.greentrainer_state.selected))
    model(**short).loss.backward()
    assert len(calls) == 1  # the step's own ratio, for the log
    tuner.restore_selection(list(tuner.greentrainer_state.selected)[:-1])  # another selection: checked everywhere
    model(**short).loss.backward()
    assert len(calls) >= 1 + 4


@pytest.mark.parametrize("units", UNIT_KINDS)
def test_budget_holds_at_every_sequence_length_trained(units):
    """Selected at 8 tokens, trained at up to 128: attention grows quadratically, so the selection made for the
    short shape would overspend at the long ones. Each new shape is checked before its step runs."""
    rho = 0.75
    kwargs = {"target_modules": ["q_proj", "v_proj", "up_proj"]} if units == "lora" else {}
    model = _peft_model("llama", units, rho=rho, **kwargs)
    tuner = model.base_model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    tuner.select_units([_counting_batch(8)], optimizer)
    ratios = {}
    for seq_len in (8, 32, 64, 128, 32):
        batch = _counting_batch(seq_len)
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        logged, _ = tuner.step_flops_ratios()
        forward, backward = measure_flops(tuner.model, batch)  # the flags that step trained with
        measured = (forward + backward) / _full_reference(model, batch)
        assert measured <= logged * (1 + 1e-9) and logged <= rho, (seq_len, measured, logged)
        ratios[seq_len] = logged
    assert len(set(ratios.values())) > 1  # the logged ratio is the step's, at its shape
    reasons = [r.reason for r in tuner.greentrainer_state.history]
    assert reasons[0] == "importance" and "batch shape" in reasons  # a longer shape forced a cheaper selection


def test_a_forward_with_gradients_in_eval_mode_is_reported_once_and_changes_nothing(caplog):
    """An evaluation without torch.no_grad(), or a training step in eval mode: it is not checked (on one rank of a
    DDP run the check would wait for the others), so the user is told what to do."""
    model = _peft_model("llama", "tensors", rho=0.5)
    tuner = model.base_model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    tuner.select_units([_counting_batch(8)], optimizer)
    model.train()
    model(**_counting_batch(8)).loss.backward()
    history, trainable = len(tuner.greentrainer_state.history), [p.requires_grad for p in model.parameters()]
    model.eval()
    with caplog.at_level("WARNING", logger="peft_greentrainer.model"):
        for seq_len in (8, 64):
            model(**_counting_batch(seq_len)).loss.item()
    assert caplog.text.count("eval mode with gradients on") == 1 and "model.train()" in caplog.text
    assert "torch.no_grad()" in caplog.text
    assert len(tuner.greentrainer_state.history) == history  # no selection made for it
    assert [p.requires_grad for p in model.parameters()] == trainable


@pytest.mark.parametrize("units", UNIT_KINDS)
def test_training_steps_with_no_selection_in_force_are_reported_once(units, caplog):
    """A Trainer given the model without GreenTrainerCallback trains every candidate: the user is told, once."""
    model = _peft_model("llama", units)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with caplog.at_level("WARNING", logger="peft_greentrainer.model"):
        with torch.no_grad():
            model(**_counting_batch(8))  # an evaluation is no training step
        assert "no selection in force" not in caplog.text
        for _ in range(2):
            model(**_counting_batch(8)).loss.backward()
        assert caplog.text.count("no selection in force") == 1 and "GreenTrainerCallback()" in caplog.text
        caplog.clear()
        model.base_model.select_units([_counting_batch(8)], optimizer)
        model(**_counting_batch(8)).loss.backward()
    assert "no selection in force" not in caplog.text


@pytest.mark.parametrize("units", UNIT_KINDS)
def test_an_adapter_loaded_for_inference_is_not_said_to_train_in_train_mode(units, tmp_path, caplog):
    """Dropout sampling at inference runs forwards in train mode with gradients on; nothing trains there."""
    _peft_model("llama", units).save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    loaded.train()
    with caplog.at_level("WARNING", logger="peft_greentrainer.model"):
        loaded(**_counting_batch(8))
        assert "no selection in force" not in caplog.text
        loaded.base_model.unfreeze_candidates()  # training it after all, without a selection: now it is said
        loaded(**_counting_batch(8))
    assert "no selection in force" in caplog.text


def test_under_ddp_the_no_selection_warning_comes_from_the_first_rank_and_eval_mode_from_any(caplog, monkeypatch):
    """Every rank runs the same training steps: one line per job. An evaluation may run on one rank only, so the
    eval-mode line comes from whichever rank runs it, naming it."""
    from peft_greentrainer import ranks

    for rank in (1, 0):
        caplog.clear()
        monkeypatch.setattr(ranks, "rank_and_world_size", lambda rank=rank: (rank, 2))
        model = _peft_model("llama", "tensors")
        with caplog.at_level("WARNING", logger="peft_greentrainer.model"):
            model.train()(**_counting_batch(8)).loss.backward()
            model.base_model.select_units([_counting_batch(8)], lr=1e-3)
            model.eval()(**_counting_batch(8))
        assert ("no selection in force" in caplog.text) == (rank == 0)
        assert f"GreenTrainer (rank {rank}): a forward pass runs in eval mode" in caplog.text


@pytest.mark.parametrize("sparse_lm_head", [False, pytest.param(True, marks=needs_sparse_head)])
def test_a_profiled_shape_is_not_profiled_again_at_its_training_steps(sparse_lm_head, monkeypatch):
    """Rows with different numbers of labels cost the same under a dense head: the selection's profile prices the
    steps. Only a sparse head (cheaper on rows with fewer labels) needs a step with other label counts profiled: its
    costliest row at its label bucket's top, and full fine-tuning at the bucket's bottom."""
    model = _peft_model("llama", "tensors", rho=0.6, sparse_lm_head=sparse_lm_head)
    tuner = model.base_model
    batch = _counting_batch(16)
    batch["labels"][0, :10] = -100  # rows with different numbers of labels, as a prompt mask makes them
    tuner.restore_selection([u.name for u in tuner.candidate_units()][-2:])  # a selection applied without a probe
    tuner.unit_costs(batch)
    profiled = []
    measure = type(tuner)._measure
    monkeypatch.setattr(type(tuner), "_measure", lambda self, b, fn: profiled.append(b) or measure(self, b, fn))
    model(**batch).loss.backward()
    assert not profiled
    fewer_labels = _counting_batch(16)
    fewer_labels["labels"][:, :12] = -100  # the same shape, another label bucket
    model(**fewer_labels).loss.backward()
    assert len(profiled) == (2 if sparse_lm_head else 0)


def test_lora_patterns_freeze_the_adapters_left_out():
    model = _peft_model("llama", "lora", include_patterns=[r"layers\.2\."], rho=0.8)
    tuner = model.base_model
    candidates = {n for u in tuner.candidate_units() for n in u.param_names}
    left_out = {n for n, _ in tuner.model.named_parameters() if "lora_" in n} - candidates
    assert candidates and left_out
    assert not any(tuner.model.get_parameter(n).requires_grad for n in left_out)  # right after get_peft_model

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tuner.select_units([_batch("llama")], optimizer)
    flags = {n: p.requires_grad for n, p in tuner.model.named_parameters()}
    tuner.unit_costs(_counting_batch(24))  # a new shape: profiled with the adapters switched off and on
    batch = _counting_batch(40)
    model(**batch).loss.backward()  # a new shape during training
    assert {n: p.requires_grad for n, p in tuner.model.named_parameters()} == flags
    assert not any(flags[n] for n in left_out)
    forward, backward = measure_flops(tuner.model, batch)
    assert forward + backward <= 0.8 * _full_reference(model, batch)


def test_loading_an_earlier_adapter_gives_back_tensors_trained_since(tmp_path):
    """units="tensors" trains in place: a tensor first trained after a save must get its value at that save back."""
    model = _peft_model("llama", "tensors")
    tuner = model.base_model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = _batch("llama")
    names = [u.name for u in tuner.candidate_units()]

    def train(selected):
        # stands for a selection (restore_selection, with no history to say what trained before, counts every
        # candidate as trained)
        tuner._apply_selection(selected)
        for _ in range(2):
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()

    train(names[-2:])
    model.save_pretrained(tmp_path / "early")
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    train(names[-4:-2])  # tensors the early adapter does not hold
    assert any(not torch.equal(saved[k], v) for k, v in model.state_dict().items())
    model.load_adapter(tmp_path / "early", adapter_name="default")
    _assert_equal_state_dicts(saved, model.state_dict())
    assert set(tuner.greentrainer_state.trained_tensors) == set(names[-2:])

    # an adapter of another run, without a tensor trained here: refused before anything changes
    other = _peft_model("llama", "tensors")
    other.base_model._apply_selection(names[:1])
    other.save_pretrained(tmp_path / "other")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="fresh copy of the base model"):
        model.load_adapter(tmp_path / "other", adapter_name="default")
    _assert_equal_state_dicts(before, model.state_dict())


def test_tensors_the_forward_never_uses_are_frozen(caplog):
    base = tiny_model("llama")
    base.unused_head = torch.nn.Linear(4, 4)  # a data-dependent path the profiled batch does not take
    model = get_peft_model(base, _config("llama", "tensors"))
    tuner = model.base_model
    assert tuner.model.unused_head.weight.requires_grad  # a candidate until the first selection
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with caplog.at_level("WARNING", logger="peft_greentrainer.model"):
        tuner.select_units([_batch("llama")], optimizer)
    assert not tuner.model.unused_head.weight.requires_grad and not tuner.model.unused_head.bias.requires_grad
    assert "unused_head" in caplog.text


def test_profile_cache_keys_on_checkpointing():
    model = _peft_model("llama", "tensors")
    tuner = model.base_model
    batch = _batch("llama")
    plain = tuner.cost_profile(batch)[0]
    model.gradient_checkpointing_enable()
    checkpointed = tuner.cost_profile(batch)[0]
    assert checkpointed.full_backward_flops > plain.full_backward_flops  # recomputing the blocks costs FLOPs
    # measured at the same shape: the checkpointed step really costs more, and no more than its profile says
    _, backward = measure_flops(tuner.model, batch)
    assert plain.full_backward_flops < backward <= checkpointed.full_backward_flops


def _selected_on_a_short_shape(rho: float = 0.75):
    """A tensor-unit model selected at 8 tokens, whose selection costs more than ``rho`` at 128 tokens."""
    model = _peft_model("llama", "tensors", rho=rho)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    short, long = _counting_batch(8), _counting_batch(128)
    model.base_model.select_units([short], optimizer)
    return model, optimizer, short, long


def _assert_the_step_fits(model, batch) -> None:
    """A training step on ``batch`` (forward and backward), measured with FlopCounterMode, within the budget."""
    model(**batch).loss.backward()
    forward, backward = measure_flops(model.base_model.model, batch)
    rho = model.peft_config["default"].rho
    assert forward + backward <= rho * _full_reference(model, batch) * (1 + 1e-9)


def test_a_selection_made_under_checkpointing_is_checked_against_the_shapes_trained_without_it():
    """Costs are kept per mode (checkpointing changes what a step computes). A selection made for the shapes of one
    mode must still fit the shapes already trained in the other when the run switches back: they are known, so no
    new shape would trigger the check."""
    model, optimizer, short, long = _selected_on_a_short_shape()
    tuner = model.base_model
    for batch in (short, long):  # the long shape forces a cheaper selection
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.gradient_checkpointing_enable()
    tuner.select_units([short], optimizer)  # knows only the short shape in this mode
    model.gradient_checkpointing_disable()
    _assert_the_step_fits(model, long)  # a shape trained before in this mode
    logged, _ = tuner.step_flops_ratios()
    assert logged <= model.peft_config["default"].rho


def test_a_restored_selection_is_checked_at_the_shapes_already_trained():
    """Replaying a selection made for other shapes: the next step at a known shape must not run over the budget."""
    model, optimizer, _, long = _selected_on_a_short_shape()
    tuner = model.base_model
    made_for_short = list(tuner.greentrainer_state.selected)
    model(**long).loss.backward()  # forces a cheaper selection
    assert tuner.greentrainer_state.last.reason == "batch shape"
    optimizer.zero_grad()
    tuner.restore_selection(made_for_short)
    _assert_the_step_fits(model, long)


def test_modes_changed_between_steps_reach_the_step_check():
    """The check reads the modules from a listing kept from step to step (``engine/module_tree.py``). Checkpointing
    switched on, and a layer put in eval mode, between two steps change no module tree: the next step must still be
    priced in its new modes (the key a fresh walk gives), within the budget, with the input-gradient hook that
    checkpointing installs removed."""
    model, optimizer, short, long = _selected_on_a_short_shape()
    tuner = model.base_model

    def step(batch):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        assert tuner._pricer.caches.checked[0] == profile_key(tuner.model, batch)[1]  # a fresh walk's modes
        return tuner._runtime.module_tree

    listed = step(long)
    assert step(short) is listed  # nothing changed: the listing is reused
    model.gradient_checkpointing_enable()
    assert step(short) is listed
    assert tuner._pricer.caches.checked[0][1] == tuple(f"model.layers.{i}" for i in range(3))
    assert not [h for m in tuner.model.modules() for h in m._forward_hooks.values() if "inputs_require" in str(h)]
    _assert_the_step_fits(model, long)
    optimizer.zero_grad()
    tuner.model.model.layers[1].eval()
    assert step(short) is listed
    in_eval, checkpointed, autocast = tuner._pricer.caches.checked[0]
    assert "model.layers.1" in in_eval and checkpointed == ("model.layers.0", "model.layers.2") and autocast == ()
    _assert_the_step_fits(model, long)
    logged, _ = tuner.step_flops_ratios()
    assert logged <= model.peft_config["default"].rho


def _sequence_classifier() -> torch.nn.Module:
    config = tiny_config("llama", pad_token_id=0, num_labels=2)
    torch.manual_seed(0)
    return transformers.LlamaForSequenceClassification(config)


@pytest.mark.parametrize(
    ("make_model", "task", "extra", "aux"),
    [
        (lambda: tiny_model("llama"), "CAUSAL_LM", {"modules_to_save": ["embed_tokens"]}, "modules_to_save"),
        (lambda: tiny_model("opt"), "CAUSAL_LM", {"bias": "all"}, "bias"),
        (lambda: tiny_model("opt"), "CAUSAL_LM", {"bias": "lora_only"}, "base_layer.bias"),
        (_sequence_classifier, "SEQ_CLS", {}, "score.modules_to_save"),
    ],
    ids=["modules_to_save", "bias-all", "bias-lora_only", "seq_cls-head"],
)
def test_everything_a_lora_adapter_trains_is_a_unit_inside_the_budget(make_model, task, extra, aux):
    """modules_to_save copies (the task head PEFT adds for sequence classification too) and the biases PEFT trains
    are units of their own: selected or frozen by the DP, never trained beside it at a cost nobody priced."""
    rho = 0.6
    targets = ["q_proj", "v_proj"]
    config = GreenTrainerConfig(rho=rho, units="lora", task_type=task, target_modules=targets, r=4, **extra)
    peft_model = get_peft_model(make_model(), config)
    tuner = peft_model.base_model
    assert any(aux in u.name for u in tuner.candidate_units())
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad])
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": torch.tensor([0, 1]) if task == "SEQ_CLS" else ids}
    tuner.select_units([batch], optimizer)
    selected = set(tuner.greentrainer_state.selected)
    in_units = {n for u in tuner.candidate_units() if u.name in selected for n in u.param_names}
    assert {n for n, p in tuner.model.named_parameters() if p.requires_grad} == in_units
    peft_model(**batch).loss.backward()
    logged = tuner.step_flops_ratios()[0]
    base = tuner.model
    reference = [n for n, _ in base.named_parameters() if "lora_" not in n and "modules_to_save" not in n]
    with peft_model.disable_adapter():
        full = sum(measure_flops(base, batch, reference))
    assert sum(measure_flops(base, batch)) / full == pytest.approx(logged, rel=row_scaling_rel(1e-9))
    assert logged <= rho


def test_a_part_of_the_task_head_named_in_modules_to_save_is_a_unit_as_peft_trains_it():
    """PEFT then copies ``out_proj`` inside the head's copy too, next to a frozen original: the units are the tensors
    PEFT's LoRA trains (the original was a candidate, and the first selection refused the optimizer)."""
    config = transformers.RobertaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=VOCAB,
        max_position_embeddings=64, num_labels=3, pad_token_id=1,
    )  # fmt: skip
    lora = dict(task_type="SEQ_CLS", target_modules=["query", "value"], r=4, modules_to_save=["out_proj"])
    torch.manual_seed(0)
    plain = get_peft_model(transformers.RobertaForSequenceClassification(config), LoraConfig(**lora))
    trained_by_peft = {n for n, p in plain.base_model.model.named_parameters() if p.requires_grad}
    torch.manual_seed(0)
    model = get_peft_model(
        transformers.RobertaForSequenceClassification(config), GreenTrainerConfig(rho=0.7, units="lora", **lora)
    )
    units = {n for u in model.base_model.candidate_units() for n in u.param_names}
    assert units <= trained_by_peft and any("out_proj.modules_to_save" in n for n in units)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    batch = {"input_ids": torch.randint(3, VOCAB, (2, 12)), "labels": torch.tensor([0, 2])}
    model.base_model.select_units([batch], optimizer)  # the optimizer holds every unit
    assert model.base_model.greentrainer_state.selected


def test_lora_inside_a_task_head_peft_copies_is_one_unit_and_its_frozen_original_none():
    """T5Gemma's token-classification head holds a Linear that "all-linear" adapts before PEFT copies the head: the
    copy's LoRA layer is a LoRA unit (its tensors were units twice, once more as parts of the copy), and the frozen
    original's, which never runs, is none (it was, and the first selection refused a correct optimizer)."""
    sub = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, cross_attention_hidden_size=32, pad_token_id=0,
    )  # fmt: skip
    config = transformers.T5GemmaConfig(encoder=sub, decoder=sub, num_labels=3, vocab_size=VOCAB, pad_token_id=0)
    lora = dict(task_type="TOKEN_CLS", target_modules="all-linear", r=4)
    torch.manual_seed(0)
    plain = get_peft_model(transformers.AutoModelForTokenClassification.from_config(config), LoraConfig(**lora))
    trained_by_peft = {n for n, p in plain.base_model.model.named_parameters() if p.requires_grad}
    torch.manual_seed(0)
    model = get_peft_model(
        transformers.AutoModelForTokenClassification.from_config(config),
        GreenTrainerConfig(rho=0.7, units="lora", **lora),
    )
    names = [n for u in model.base_model.candidate_units() for n in u.param_names]
    assert len(names) == len(set(names)) and set(names) == trained_by_peft
    assert "score.modules_to_save.default.out_proj" in {u.name for u in model.base_model.candidate_units()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    batch = {"input_ids": torch.randint(3, VOCAB, (2, 12)), "labels": torch.randint(0, 3, (2, 12))}
    model.base_model.select_units([batch], optimizer)
    assert model.base_model.greentrainer_state.selected


def test_a_sequence_classifier_head_is_a_unit_with_tensor_units_too(tmp_path):
    """With units="tensors" PEFT still adds the classification head as a modules_to_save copy: it is a unit (selected
    by the DP, not trained beside it), and the adapter saves and loads it as PEFT does."""
    peft_model = get_peft_model(_sequence_classifier(), GreenTrainerConfig(rho=0.6, task_type="SEQ_CLS"))
    tuner = peft_model.base_model
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": torch.tensor([0, 1])}
    tuner.select_units([batch], optimizer)
    assert "score.modules_to_save.default.weight" in tuner.greentrainer_state.selected
    selected = set(tuner.greentrainer_state.selected)
    in_units = {n for u in tuner.candidate_units() if u.name in selected for n in u.param_names}
    assert {n for n, p in tuner.model.named_parameters() if p.requires_grad} == in_units
    peft_model(**batch).loss.backward()
    optimizer.step()
    peft_model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(_sequence_classifier(), tmp_path).eval()
    peft_model.eval()
    trained = peft_model(**batch).logits
    assert torch.equal(loaded(**batch).logits, trained)
    # merged: a plain transformers model whose head is the trained one, as PEFT's LoRA gives it
    merged = peft_model.merge_and_unload()
    assert [n for n, _ in merged.named_parameters() if n.startswith("score")] == ["score.weight"]
    merged.save_pretrained(tmp_path / "merged")
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert torch.equal(reloaded(**batch).logits, trained)


@pytest.mark.parametrize("units", ["tensors", "lora"])
def test_experts_chosen_by_a_router_per_token_are_refused_with_the_reason(units):
    """Per-expert modules (SwitchTransformers, NLLB-MoE) make a step's FLOPs depend on the routing, which no price per
    batch shape can bound; experts stacked in one tensor (Mixtral in transformers 5) are priced exactly."""
    config = transformers.SwitchTransformersConfig(
        d_model=32,
        d_ff=64,
        d_kv=8,
        num_heads=4,
        num_layers=2,
        num_decoder_layers=2,
        num_experts=4,
        vocab_size=VOCAB,
        encoder_sparse_step=1,
        decoder_sparse_step=1,
    )
    switch = transformers.SwitchTransformersForConditionalGeneration(config)
    with pytest.raises(ValueError, match=r"experts .*depend on the routing.*peft\.LoraConfig"):
        get_peft_model(switch, GreenTrainerConfig(rho=0.5, units=units))
    get_peft_model(tiny_model("mixtral"), GreenTrainerConfig(rho=0.5, units=units))


@pytest.mark.parametrize("units", ["tensors", "lora"])
def test_layer_drop_is_refused_naming_where_it_is_set(units):
    """LayerDrop skips layers at random in training: profiles of two lengths listed the units in different backward
    orders (wav2vec2's default 0.1: training crashed) and a step's FLOPs followed the draws (0.573 of full
    fine-tuning measured, 0.494 priced, at rho 0.5). Modules that copy it when built (BART's) are named too."""
    audio = tiny_config("wav2vec2")
    assert audio.layerdrop == 0.1  # its default, as HuBERT's, WavLM's, SEW's, UniSpeech's and Data2VecAudio's
    seq2seq = tiny_config("bart", decoder_layerdrop=0.05)
    lora = {"target_modules": ["q_proj", "v_proj"]} if units == "lora" else {}
    config = GreenTrainerConfig(rho=0.5, units=units, **lora)
    with pytest.raises(ValueError, match=r"LayerDrop on \(config\.layerdrop=0\.1\).*= 0\.0.*peft\.LoraConfig"):
        get_peft_model(transformers.Wav2Vec2ForCTC(audio), config)
    bart = transformers.BartForConditionalGeneration(seq2seq)
    with pytest.raises(ValueError, match=r"\(config\.decoder_layerdrop=0\.05, model\.decoder\.layerdrop=0\.05\)"):
        get_peft_model(bart, config)
    get_peft_model(bart, GreenTrainerConfig(rho=0.5, units=units, inference_mode=True, **lora))  # trains nothing
    bart = transformers.BartForConditionalGeneration(seq2seq)
    bart.config.decoder_layerdrop = bart.model.decoder.layerdrop = 0.0
    get_peft_model(bart, config)


@pytest.mark.parametrize("units", ["tensors", "lora"])
def test_experts_that_compute_nothing_are_refused_naming_the_setting(units):
    """LongCat-Flash routes tokens to stacked experts and to "zero" experts that pass them through: a step's FLOPs
    follow the routing (a reviewer's same-shape batch routed to them: 0.556 of full fine-tuning at rho 0.5, priced
    0.497). Without them its experts cost the same for every routing, and the model is accepted."""
    shape = dict(
        vocab_size=64,
        hidden_size=32,
        num_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        head_dim=8,
        n_routed_experts=2,
        moe_topk=1,
        expert_ffn_hidden_size=16,
        ffn_hidden_size=16,
        kv_lora_rank=8,
        q_lora_rank=8,
        qk_rope_head_dim=4,
        qk_nope_head_dim=4,
        v_head_dim=8,
    )
    lora = {"target_modules": ["q_a_proj"]} if units == "lora" else {}
    config = GreenTrainerConfig(rho=0.5, units=units, **lora)
    model = transformers.AutoModelForCausalLM.from_config(transformers.LongcatFlashConfig(**shape, zero_expert_num=2))
    with pytest.raises(
        ValueError, match=r"compute nothing \(config\.zero_expert_num=2, model\.layers\.0\..*LoraConfig"
    ):
        get_peft_model(model, config)
    model.config.zero_expert_num = 0  # the experts keep their copy (and the router its outputs for them)
    with pytest.raises(ValueError, match=r"compute nothing \(model\.layers\.0\.mlp\.experts\.zero_expert_num=2\)"):
        get_peft_model(model, config)
    model = transformers.AutoModelForCausalLM.from_config(transformers.LongcatFlashConfig(**shape, zero_expert_num=0))
    get_peft_model(model, config)


def test_activated_lora_is_refused_with_what_to_do():
    """PEFT finds aLoRA's invocation tokens in PeftModelForCausalLM.forward, above the model GreenTrainer profiles:
    priced and ranked there, the adapters ran on no token (importance all 0; a step cost 1.30x full fine-tuning at
    rho 0.7)."""
    activated = {"units": "lora", "target_modules": ["q_proj"], "alora_invocation_tokens": [5, 6]}
    with pytest.raises(ValueError, match=r"alora_invocation_tokens.*plain LoRA \(peft\.LoraConfig\)"):
        GreenTrainerConfig(rho=0.7, **activated)
    GreenTrainerConfig(rho=0.7, units="lora", target_modules=["q_proj"])
    # loaded for inference (saved adapters are), it trains nothing; made trainable, the tuner refuses it
    config = GreenTrainerConfig(rho=0.7, inference_mode=True, **activated)
    get_peft_model(tiny_model("llama"), config)
    config.inference_mode = False
    with pytest.raises(ValueError, match=r"alora_invocation_tokens"):
        get_peft_model(tiny_model("llama"), config)


def test_a_floor_asked_first_does_not_price_later_steps_from_a_whole_batch():
    """A weight built from parameters alone (LoRA on stacked experts) costs the same for any number of rows, so a
    batch's costs divided by its rows under-price a one-row step. ``min_feasible_rho`` profiled the whole batch and
    seeded the per-row prices with that quotient: a later selection at rho 0.8 then ran a one-row step at 0.82."""
    rho = 0.8
    lora = {"r": 4, "target_modules": ["q_proj"], "target_parameters": ["mlp.experts.gate_up_proj"]}
    model = get_peft_model(
        tiny_model("mixtral"), GreenTrainerConfig(rho=rho, units="lora", sparse_lm_head=False, **lora)
    )
    tuner = model.base_model
    two_rows, one_row = _counting_batch(16, size=2), _counting_batch(16, size=1)
    floor = tuner.min_feasible_rho(two_rows)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    tuner.select_units([two_rows], optimizer)
    assert floor <= tuner.greentrainer_state.last.predicted_ratio <= rho
    base = tiny_model("mixtral")
    full = sum(measure_flops(base, one_row, [n for n, p in base.named_parameters() if p.dtype.is_floating_point]))
    model.train()
    step = sum(measure_flops(model, one_row))  # the budget check runs inside, before the step's own flags are read
    assert step <= rho * full * (1 + 1e-12), step / full


@pytest.mark.parametrize("units", UNIT_KINDS)
def test_steps_of_any_batch_size_keep_rho_where_some_costs_do_not_grow_with_the_rows(units):
    """DeBERTa-v2 projects its relative position embeddings in every layer, on parameters alone: a cost that does not
    grow with the batch, whose backward full fine-tuning pays and a selection need not. One row's ratio then bounds no
    larger batch (an 8-row step ran at 0.75 of full fine-tuning at rho 0.6); a step is priced at one row and at what
    each further row adds, which bound every batch size together."""
    config = transformers.DebertaV2Config(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64, relative_attention=True, position_buckets=32, pos_att_type=["p2c", "c2p"],
        max_relative_positions=64, num_labels=2,
    )  # fmt: skip
    torch.manual_seed(0)
    base = transformers.DebertaV2ForSequenceClassification(config)
    rho = 0.6
    lora = {"r": 8, "target_modules": ["query_proj", "value_proj", "key_proj"]} if units == "lora" else {}
    model = get_peft_model(base, GreenTrainerConfig(rho=rho, units=units, task_type="SEQ_CLS", **lora))
    tuner = model.base_model

    def batch(rows: int, seed: int = 1) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, VOCAB, (rows, 16), generator=generator)
        return {"input_ids": ids, "labels": torch.randint(0, 2, (rows,), generator=generator)}

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    selection = tuner.select_units([batch(8)], optimizer)
    names = [n for n, p in tuner.model.named_parameters() if p.dtype.is_floating_point and "lora_" not in n]
    for rows in (1, 2, 8, 32):
        step = sum(measure_flops(model, batch(rows)))  # the step's own flags, after its budget check
        with model.disable_adapter() if units == "lora" else contextlib.nullcontext():
            full = sum(measure_flops(tuner.model, batch(rows), names))
        assert step <= rho * full * (1 + 1e-12), (rows, step / full)
        if rows == 8:  # the selection's figures are those of a step on its batch: one row, and seven more
            assert (selection.flops, selection.full_flops) == pytest.approx((step, full), rel=1e-9)


@pytest.mark.parametrize("state_given_back", [False, True], ids=["selection-only", "state-given-back"])
def test_a_plain_loop_resumed_with_restore_selection_saves_every_tensor_it_trained(tmp_path, state_given_back):
    """A plain loop resumes by loading its weights and giving the selection back (``restore_selection``). Which
    tensors earlier selections trained is in ``greentrainer_state``: without it every candidate is saved (before, the
    tensors of earlier selections were left out of the adapter, which then differed from the model without a word)."""
    batch = tiny_batch(tiny_model("llama"))
    model = get_peft_model(tiny_model("llama"), GreenTrainerConfig(rho=0.9, units="tensors"))
    tuner = model.base_model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    last = tuner.candidate_units()[0].name  # nearest the loss
    for epoch in range(2):  # two epochs, each with its own selection
        if epoch == 0:
            tuner.select_units([batch], optimizer)
        else:
            tuner.restore_selection([last], optimizer)  # stands for a second selection
        for _ in range(2):
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    checkpoint = {k: v.clone() for k, v in model.state_dict().items()}

    resumed = get_peft_model(tiny_model("llama"), GreenTrainerConfig(rho=0.9, units="tensors"))
    resumed.load_state_dict(checkpoint)
    if state_given_back:
        resumed.base_model.greentrainer_state = GreenTrainerState.from_dict(tuner.greentrainer_state.to_dict())
    resumed.base_model.restore_selection(tuner.greentrainer_state.selected)
    resumed.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    trained = dict(resumed.named_parameters())
    assert all(torch.equal(p, trained[n]) for n, p in loaded.named_parameters())


def test_select_units_on_a_shuffling_data_loader_leaves_the_epochs_order_alone():
    """A plain loop hands ``select_units`` its training DataLoader: drawing the importance batches must not advance
    the generator the loader's next epoch draws its shuffle from."""
    rows = [{"input_ids": torch.full((8,), 3 + i), "labels": torch.full((8,), 3 + i)} for i in range(16)]
    loader = torch.utils.data.DataLoader(rows, batch_size=2, shuffle=True)
    model = get_peft_model(tiny_model("llama"), GreenTrainerConfig(rho=0.7, units="tensors"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def epoch_order(select: bool) -> list[int]:
        torch.manual_seed(0)
        if select:
            model.base_model.select_units(loader, optimizer)
        return [int(b["input_ids"][0, 0]) for b in loader]

    assert epoch_order(select=True) == epoch_order(select=False)


@pytest.mark.parametrize("units", UNIT_KINDS)
def test_accelerate_save_state_carries_the_selection_of_a_loop(tmp_path, units):
    """``accelerator.save_state`` holds weights and optimizer state, not the selection: registered for checkpointing,
    ``SelectionCheckpoint`` carries it, and ``load_state`` re-applies it in a fresh model (same units trainable, and
    a saved adapter equal to the model)."""
    from accelerate import Accelerator

    from peft_greentrainer import SelectionCheckpoint

    def loop(checkpoint: Path, resume: bool):
        accelerator = Accelerator(cpu=True)
        model = get_peft_model(tiny_model("llama"), _config("llama", units, rho=0.6))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model, optimizer = accelerator.prepare(model, optimizer)
        accelerator.register_for_checkpointing(SelectionCheckpoint(model, optimizer))
        if resume:
            accelerator.load_state(checkpoint)
            return model
        batch = tiny_batch(model)
        model.base_model.select_units([batch], optimizer)
        for _ in range(2):
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        accelerator.save_state(checkpoint)
        return model

    trained = loop(tmp_path / "checkpoint", resume=False)
    resumed = loop(tmp_path / "checkpoint", resume=True)
    assert resumed.greentrainer_state.to_dict() == trained.greentrainer_state.to_dict()
    flags = {n: p.requires_grad for n, p in trained.named_parameters()}
    assert {n: p.requires_grad for n, p in resumed.named_parameters()} == flags
    resumed.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "adapter")
    weights = dict(trained.named_parameters())
    assert all(torch.equal(p, weights[n]) for n, p in loaded.named_parameters())


def _bart_classifier() -> torch.nn.Module:
    config = transformers.BartConfig(
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=VOCAB, max_position_embeddings=64, num_labels=2,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.BartForSequenceClassification(config)


@pytest.mark.parametrize(
    ("make_model", "extra", "head", "warned"),
    [
        (_bart_classifier, {}, "classification_head", True),  # PEFT's SEQ_CLS trains only `classifier` / `score`
        (_bart_classifier, {"modules_to_save": ["classification_head"]}, "classification_head", False),
        (_sequence_classifier, {}, "score", False),  # Llama's head: PEFT trains a copy
    ],
    ids=["bart", "bart-head-saved", "llama"],
)
def test_a_task_head_lora_leaves_frozen_is_named_with_what_to_do(make_model, extra, head, warned, caplog):
    """BART's ``classification_head`` is new when a checkpoint is loaded for classification, and LoRA (PEFT's defaults)
    leaves it frozen: the adapters would learn around a random projection, without a word."""
    targets = ["q_proj", "v_proj"]
    config = GreenTrainerConfig(rho=0.6, units="lora", task_type="SEQ_CLS", target_modules=targets, **extra)
    with caplog.at_level(logging.WARNING, logger="peft_greentrainer.model"):
        model = get_peft_model(make_model(), config)
    said = [r.getMessage() for r in caplog.records if "frozen as loaded" in r.getMessage()]
    units = [u.name for u in model.base_model.candidate_units()]
    if warned:
        assert said == [
            f"GreenTrainer: the SEQ_CLS model's {head}: no LoRA adapter and not in modules_to_save, so frozen as "
            "loaded (random, if transformers reported newly initialized weights there); modules_to_save="
            "['classification_head'] in the config trains their weights with the adapters."
        ]
        assert not any(p.requires_grad for p in getattr(model.base_model.model, head).parameters())
        assert not any(name.startswith(head) for name in units)
    else:
        assert not said, said
        assert any(name.startswith(f"{head}.modules_to_save") for name in units), units
