"""The recipes people run, on tiny config-built models: every run trains, the loss falls, and every training step
costs at most rho x full fine-tuning at its own batch shape, measured by FlopCounterMode.

A recipe runs in a Trainer (or TRL's SFTTrainer) with a ``BudgetAudit``: after each training step it measures, with
the ``requires_grad`` flags and checkpointing that step ran with, the step's forward + backward FLOPs and those of full
fine-tuning on the same inputs. The 2-rank DDP recipe is in ``test_distributed.py``.
"""

from __future__ import annotations

import logging
import random
from dataclasses import replace

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import WORDS, row_scaling_rel, save_tiny_checkpoint, tiny_batch, tiny_config, tiny_model
from peft import PeftModel, get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments

from peft_greentrainer import GreenTrainerCallback, GreenTrainerConfig
from peft_greentrainer import callback as callback_module
from peft_greentrainer.engine.costs import cost_envelope, select_at_every_shape
from peft_greentrainer.engine.profile import (
    batch_size,
    costliest_row,
    measure_flops,
    profile_key,
    profile_model,
)
from peft_greentrainer.engine.units import tensor_units

RHO = 0.6
LORA = {"target_modules": ["q_proj", "v_proj", "up_proj"], "r": 4}
LR = {"tensors": 1e-2, "lora": 5e-2}  # tiny LoRA adapters need the larger step to move the loss in a few steps


# ---------------------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_checkpoint(directory)
    return directory


@pytest.fixture(scope="module")
def t5_checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-t5")
    save_tiny_checkpoint(directory, arch="t5")
    return directory


def _counting(n: int, vocab: int, lengths: tuple[int, int] = (5, 40), seed: int = 0) -> list[list[int]]:
    """Sequences of varied length, each token the previous plus one: learnable in a few steps at any length."""
    rng = random.Random(seed)
    span = vocab - 3
    return [[3 + (s + t) % span for t in range(rng.randint(*lengths))] for s in (rng.randrange(span) for _ in range(n))]


def _lm_dataset(vocab: int, n: int = 24, seed: int = 0) -> datasets.Dataset:
    rows = _counting(n, vocab, seed=seed)
    return datasets.Dataset.from_dict({"input_ids": rows, "labels": [list(r) for r in rows]})


def _config(units: str, rho: float = RHO, **kwargs) -> GreenTrainerConfig:
    return GreenTrainerConfig(rho=rho, units=units, **(LORA if units == "lora" else {}), **kwargs)


def _args(tmp_path, **kwargs) -> TrainingArguments:
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        learning_rate=1e-2,
        logging_steps=1,
        num_train_epochs=2,
        per_device_train_batch_size=4,
        seed=0,
        disable_tqdm=True,
    )
    defaults.update(kwargs)
    return TrainingArguments(**defaults)


class BudgetAudit:
    """Trainer mixin: after every training step, the step's FLOPs and full fine-tuning's on the same inputs.

    The inputs are taken as the model's forward received them (a forward pre-hook; the first forward of the step is
    the step's: GreenTrainer's profiling forwards for a new shape run inside its pre-hook, after this one). Each
    distinct (shapes, labelled positions, flags, checkpointing) is measured once, after the step, so GreenTrainer
    already knows the shape and profiles nothing during the count.
    """

    def _audit_init(self, rho: float) -> None:
        self.rho = rho
        self.audit: dict[tuple, float] = {}  # (shapes, trainable, checkpointed) -> measured ratio
        self._forward_inputs: dict | None = None
        # prepend: the inputs as the Trainer passed them, before the sparse LM head's hook rewrites them
        self._base().register_forward_pre_hook(self._remember_inputs, with_kwargs=True, prepend=True)

    def _base(self) -> torch.nn.Module:
        return self.model.base_model.model

    def _remember_inputs(self, module, args, kwargs):
        if self._forward_inputs is None:
            self._forward_inputs = dict(kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._forward_inputs = None
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._measure(self._forward_inputs)
        return loss

    def _measure(self, batch: dict) -> None:
        base = self._base()
        trainable = frozenset(n for n, p in base.named_parameters() if p.requires_grad)
        checkpointed = any(getattr(m, "gradient_checkpointing", False) for m in base.modules())
        shapes = tuple(sorted((k, tuple(v.shape)) for k, v in batch.items() if isinstance(v, torch.Tensor)))
        labels = batch.get("labels")
        # the sparse LM head's cost follows the labelled positions: each count is measured too
        labelled = int((labels != -100).sum()) if isinstance(labels, torch.Tensor) else None
        key = (shapes, labelled, trainable, checkpointed)
        if key in self.audit:
            return
        assert trainable, "a training step ran with nothing trainable"
        # under bf16=True, measured under the steps' autocast (accelerate's, around the model above ``base``): outside
        # it, GreenTrainer prices the inputs as a new case, and its profiling forward was counted into the step
        with self.accelerator.autocast():
            step = sum(measure_flops(base, batch))
            if self.model.base_model.units_kind == "lora":
                with self.model.disable_adapter():
                    trained = [n for n, _ in base.named_parameters() if "lora_" not in n]
                    full = sum(measure_flops(base, batch, trained))
            else:
                full = sum(measure_flops(base, batch, [n for n, _ in base.named_parameters()]))
        self.audit[key] = step / full

    def check_budget(self, min_shapes: int = 2) -> list[float]:
        shapes = {key[0] for key in self.audit}
        assert len(shapes) >= min_shapes, f"the recipe should train at {min_shapes}+ batch shapes, saw {len(shapes)}"
        ratios = list(self.audit.values())
        assert max(ratios) <= self.rho * (1 + 1e-9), sorted(ratios)[-5:]
        return ratios


def _audited(cls: type[Trainer]) -> type:
    return type(f"Audited{cls.__name__}", (BudgetAudit, cls), {})


def _train(trainer_cls: type[Trainer], rho: float = RHO, resume: str | None = None, **kwargs):
    trainer = _audited(trainer_cls)(**kwargs)
    trainer._audit_init(rho)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def _assert_loss_falls(trainer, margin: float = 0.05) -> None:
    losses = _losses(trainer)
    assert len(losses) >= 4, losses
    quarter = max(2, len(losses) // 4)  # batches differ in length and content: compare averages
    assert np.mean(losses[-quarter:]) < np.mean(losses[:quarter]) - margin, losses


def _assert_logged_ratios(trainer, rho: float = RHO) -> None:
    logged = [entry["greentrainer/flops_ratio"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all(0 < r <= rho for r in logged), logged
    assert all(
        entry["greentrainer/flops_ratio"] <= entry["greentrainer/flops_ratio_max"] <= rho
        for entry in trainer.state.log_history
        if "loss" in entry
    )


def _tokenizer(checkpoint):
    return transformers.AutoTokenizer.from_pretrained(checkpoint)


def _causal_lm(checkpoint, units: str, **kwargs):
    torch.manual_seed(0)
    return get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(checkpoint), _config(units, **kwargs))


# ------------------------------------------------------------------------------------------- per-shape costs
@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2", "bloom", "t5"])
def test_one_row_profiles_scale_to_the_whole_batch(arch):
    """The costs of a new shape come from one row: every counted op is linear in the batch size, checked here
    against the profile of the whole batch and against FlopCounterMode's count of the real step."""
    model = tiny_model(arch)
    batch = tiny_batch(model, batch_size=3, seq_len=20)
    row = costliest_row(batch)
    assert batch_size(batch) == 3 and batch_size(row) == 1
    units = tensor_units(model)
    whole, single = profile_model(model, batch).unit_costs(units), profile_model(model, row).unit_costs(units)
    for name in ("t_dw", "t_dy"):
        np.testing.assert_allclose(getattr(whole, name), 3 * getattr(single, name), rtol=1e-12)
    assert whole.forward_flops == pytest.approx(3 * single.forward_flops, rel=row_scaling_rel(1e-12))
    assert whole.forward_flops <= 3 * single.forward_flops  # any difference is on the safe side
    assert sum(measure_flops(model, batch)) == pytest.approx(3 * single.full_flops, rel=row_scaling_rel(1e-12))


def test_the_envelope_bounds_every_shape():
    model = tiny_model("llama")
    units = tensor_units(model)
    costs = [profile_model(model, tiny_batch(model, 1, length)).unit_costs(units) for length in (4, 24, 96)]
    envelope = cost_envelope(costs)
    rng = np.random.default_rng(0)
    for _ in range(50):
        mask = rng.random(len(units)) < 0.5
        bound = envelope.predicted_flops(mask)
        assert all(c.predicted_flops(mask) / c.full_flops <= bound * (1 + 1e-12) for c in costs)
    ratios = [c.predicted_flops(mask) / c.full_flops for c in costs]
    assert len(set(ratios)) == len(ratios)  # the shares really move with the length
    with pytest.raises(ValueError, match="different backward orders"):
        cost_envelope([costs[0], replace(costs[1], units=costs[1].units[::-1])])


def test_a_selection_at_several_shapes_spends_what_the_envelope_leaves_and_keeps_rho_at_each():
    """Units peak at different lengths, so the envelope's selection costs less than rho at every shape; raising its
    budget while each shape is checked selects more importance, never over rho at any shape."""
    model = tiny_model("llama", num_hidden_layers=6)
    units = tensor_units(model)
    costs = [profile_model(model, tiny_batch(model, 1, length)).unit_costs(units) for length in (4, 24, 96)]
    envelope, rng, gained = cost_envelope(costs), np.random.default_rng(0), 0
    for _ in range(40):
        importance, rho = rng.lognormal(size=len(units)), rng.uniform(0.4, 0.9)
        mask = select_at_every_shape(costs, importance, rho)
        assert all(c.predicted_flops(mask) <= rho * c.full_flops * (1 + 1e-12) for c in costs)
        plain = envelope.select(importance, rho).mask
        assert importance[mask].sum() >= importance[plain].sum()
        gained += importance[mask].sum() > importance[plain].sum() * 1.01
    assert gained >= 20  # the envelope alone leaves budget unspent in most draws
    assert np.array_equal(select_at_every_shape(costs[:1], importance, rho), costs[0].select(importance, rho).mask)


def test_one_shape_is_its_own_envelope_so_the_dp_stays_exact():
    """The envelope of a single batch shape keeps its whole FLOP counts (not fractions of full fine-tuning), so the
    DP takes its exact path on it: selections as good as on the shape's own costs. Normalised, the grid path fell
    short in about one draw in five on these 75 units."""
    model = tiny_model("llama", num_hidden_layers=8, intermediate_size=176)
    costs = profile_model(model, tiny_batch(model, 1, 40)).unit_costs(tensor_units(model))
    envelope = cost_envelope([costs])
    assert envelope.full_flops == costs.full_flops
    rng = np.random.default_rng(0)
    for _ in range(100):
        importance, rho = rng.lognormal(size=len(costs.units)), rng.uniform(0.35, 0.95)
        exact = costs.select(importance, rho)
        assert envelope.select(importance, rho).importance == pytest.approx(exact.importance, rel=1e-12)


def test_profile_key_follows_shapes_checkpointing_and_modes():
    model = tiny_model("llama")
    batch = tiny_batch(model, 2, 16)
    key = profile_key(model, batch)
    assert profile_key(model, {**batch, "num_items_in_batch": torch.tensor(7), "return_dict": None}) == key
    assert profile_key(model, tiny_batch(model, 2, 17)) != key
    model.model.layers[0].eval()
    assert profile_key(model, batch) != key
    model.train()
    model.gradient_checkpointing_enable()
    assert profile_key(model, batch) != key


# ------------------------------------------------------------------------------------- warmup + LR schedules
@pytest.mark.parametrize(("schedule", "units"), [("cosine", "tensors"), ("linear", "lora")])
def test_warmup_schedule_with_dynamic_padding(checkpoint, schedule, units, tmp_path):
    """warmup makes the lr 0 at step 0: importance uses the schedule's base lr (issue 12, item 1)."""
    tokenizer = _tokenizer(checkpoint)
    model = _causal_lm(checkpoint, units)
    trainer = _train(
        Trainer,
        model=model,
        args=_args(tmp_path, warmup_steps=2, lr_scheduler_type=schedule, learning_rate=LR[units]),
        train_dataset=_lm_dataset(len(tokenizer), n=22),  # and an uneven last batch
        data_collator=transformers.DataCollatorForSeq2Seq(tokenizer, padding="longest"),
        callbacks=[GreenTrainerCallback()],
    )
    assert trainer.state.log_history[0]["learning_rate"] == 0  # the first step really ran at lr 0
    trainer.check_budget()
    _assert_loss_falls(trainer)
    _assert_logged_ratios(trainer)
    assert all(record.selected for record in model.base_model.greentrainer_state.history)


# ---------------------------------------------------------------------------------- gradient accumulation
def test_gradient_accumulation_with_dynamic_padding(checkpoint, tmp_path):
    tokenizer = _tokenizer(checkpoint)
    model = _causal_lm(checkpoint, "tensors", selection_interval_steps=2)
    trainer = _train(
        Trainer,
        model=model,
        args=_args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, num_train_epochs=3),
        train_dataset=_lm_dataset(len(tokenizer), n=16),
        data_collator=transformers.DataCollatorForSeq2Seq(tokenizer, padding="longest"),
        callbacks=[GreenTrainerCallback()],
    )
    assert trainer.state.global_step == 12
    trainer.check_budget(min_shapes=4)
    _assert_loss_falls(trainer)
    _assert_logged_ratios(trainer)


# --------------------------------------------------------------------------- the two padding collators
@pytest.mark.slow
def test_seq2seq_collator_on_an_encoder_decoder(t5_checkpoint, tmp_path):
    """Source and target lengths both vary: the costs of each (source, target) shape pair are profiled."""
    tokenizer = _tokenizer(t5_checkpoint)
    torch.manual_seed(0)
    base = transformers.T5ForConditionalGeneration.from_pretrained(t5_checkpoint)
    model = get_peft_model(base, _config("tensors", rho=0.7))
    rows = _counting(24, len(tokenizer), lengths=(6, 30))
    data = datasets.Dataset.from_dict({"input_ids": rows, "labels": [r[1 : 1 + len(r) // 2] for r in rows]})
    trainer = _train(
        Trainer,
        rho=0.7,
        model=model,
        args=_args(tmp_path, num_train_epochs=3),
        train_dataset=data,
        data_collator=transformers.DataCollatorForSeq2Seq(tokenizer, model=base, padding="longest"),
        callbacks=[GreenTrainerCallback()],
    )
    trainer.check_budget()
    _assert_loss_falls(trainer)
    _assert_logged_ratios(trainer, rho=0.7)


def test_padding_collator_for_sequence_classification(checkpoint, tmp_path):
    tokenizer = _tokenizer(checkpoint)
    torch.manual_seed(0)
    base = transformers.AutoModelForSequenceClassification.from_pretrained(checkpoint, num_labels=2)
    model = get_peft_model(base, _config("tensors"))
    rng = random.Random(0)
    rows, labels = [], []
    for _ in range(32):  # the label is the step between consecutive tokens: 1 or 2
        step, start = rng.choice([1, 2]), rng.randrange(30)
        rows.append([3 + (start + step * t) % 30 for t in range(rng.randint(4, 30))])
        labels.append(step - 1)
    data = datasets.Dataset.from_dict({"input_ids": rows, "label": labels})
    trainer = _train(
        Trainer,
        model=model,
        args=_args(tmp_path, num_train_epochs=4, learning_rate=3e-3),
        train_dataset=data,
        data_collator=transformers.DataCollatorWithPadding(tokenizer),
        callbacks=[GreenTrainerCallback()],
    )
    trainer.check_budget()
    _assert_loss_falls(trainer)
    _assert_logged_ratios(trainer)


# ------------------------------------------------------------------------------------------------ TRL SFT
def _prompt_completion(n: int = 32) -> datasets.Dataset:
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        start = rng.randrange(20)
        prompt = [WORDS[(start + t) % 20] for t in range(rng.randint(3, 12))]
        completion = [WORDS[(start + len(prompt) + t) % 20] for t in range(3)]
        rows.append({"prompt": " ".join(prompt), "completion": " " + " ".join(completion)})
    return datasets.Dataset.from_list(rows)


def _sft_config(tmp_path, units: str, **kwargs):
    import trl  # a test dependency (pyproject's "test" extra)

    defaults = dict(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        report_to=[],
        bf16=False,  # SFTConfig defaults to bf16 (and to gradient checkpointing, kept here)
        learning_rate=LR[units],
        per_device_train_batch_size=4,
        logging_steps=1,
        max_length=64,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
    )
    return trl.SFTConfig(**{**defaults, **kwargs})


@pytest.mark.slow
@pytest.mark.parametrize(("packing", "units", "rho"), [(False, "tensors", RHO), (True, "lora", 0.75)])
def test_trl_sft_trainer(checkpoint, packing, units, rho, tmp_path):
    """SFTTrainer builds the PEFT model from peft_config; prompt/completion data trains on the completion only;
    packing=True gives padding-free batches (one row of the packed sequences, position_ids per document). Unpacked,
    with SFTConfig's defaults: bf16 autocast and gradient checkpointing."""
    import trl  # a test dependency (pyproject's "test" extra)

    tokenizer = _tokenizer(checkpoint)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint)
    args = _sft_config(tmp_path, units, num_train_epochs=3, packing=packing, bf16=not packing)
    assert args.gradient_checkpointing
    trainer = _audited(trl.SFTTrainer)(
        model=model,
        args=args,
        train_dataset=_prompt_completion(),
        processing_class=tokenizer,
        peft_config=_config(units, rho=rho),
        callbacks=[GreenTrainerCallback()],
    )
    trainer._audit_init(rho)
    batch = next(iter(trainer.get_train_dataloader()))
    if packing:
        assert batch["input_ids"].shape[0] == 1 and "position_ids" in batch and "attention_mask" not in batch
    else:
        assert (batch["labels"] == -100).any(axis=1).all()  # the prompt tokens are masked
    trainer.train()
    trainer.check_budget()
    _assert_loss_falls(trainer)
    _assert_logged_ratios(trainer, rho=rho)


@pytest.mark.slow
def test_trl_selective_checkpointing_is_applied_and_priced(checkpoint, tmp_path):
    """TRL applies ``gradient_checkpointing_kwargs={"selective": True}`` through ``gradient_checkpointing_enable``,
    which transformers 5's Trainer no longer calls: the flag reached the layers unapplied (every layer recomputed in
    full). GreenTrainer makes it the policy TRL asks for, attention saved, and prices it."""
    import trl

    args = _sft_config(tmp_path, "lora", num_train_epochs=2, gradient_checkpointing_kwargs={"selective": True})
    torch.manual_seed(0)
    trainer = _audited(trl.SFTTrainer)(
        model=transformers.AutoModelForCausalLM.from_pretrained(checkpoint),
        args=args,
        train_dataset=_prompt_completion(),
        processing_class=_tokenizer(checkpoint),
        peft_config=_config("lora"),
        callbacks=[GreenTrainerCallback()],
    )
    trainer._audit_init(RHO)
    trainer.train()
    layers = trainer.model.base_model.model.model.layers
    keywords = [layer._gradient_checkpointing_func.keywords for layer in layers]
    assert all(layer.gradient_checkpointing for layer in layers)
    assert all("selective" not in k and k["use_reentrant"] is False and "context_fn" in k for k in keywords)
    trainer.check_budget()
    _assert_loss_falls(trainer)


def _preferences(n: int = 16) -> datasets.Dataset:
    """The prompt/completion pairs, the completion chosen over three random words."""
    rng = random.Random(1)
    rows = [
        {"prompt": row["prompt"], "chosen": row["completion"], "rejected": " " + " ".join(rng.choices(WORDS[:20], k=3))}
        for row in _prompt_completion(n)
    ]
    return datasets.Dataset.from_list(rows)


@pytest.mark.parametrize("units", ["tensors", "lora"])
def test_a_compute_loss_func_reaches_the_selection_through_the_trainers_compute_loss(checkpoint, units, tmp_path):
    """``loss_fn=trainer.compute_loss`` (the README's way to rank units on a loss the model does not return): the
    Trainer pops the labels from the batch it is given, and the probe of what the forward receives ran it on the
    batch importance then read, without labels (a crash at the first selection)."""
    tokenizer = _tokenizer(checkpoint)

    def cross_entropy(outputs, labels, num_items_in_batch=None):
        logits = outputs["logits"][:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)

    trainer = None
    callback = GreenTrainerCallback(loss_fn=lambda inner, batch: trainer.compute_loss(inner, batch))
    trainer = Trainer(
        model=_causal_lm(checkpoint, units),
        args=_args(tmp_path, learning_rate=LR[units]),
        train_dataset=_lm_dataset(len(tokenizer)),
        data_collator=transformers.DataCollatorForSeq2Seq(tokenizer, padding="longest"),
        compute_loss_func=cross_entropy,
        callbacks=[callback],
    )
    trainer.train()
    _assert_loss_falls(trainer)
    _assert_logged_ratios(trainer)


@pytest.mark.slow
@pytest.mark.parametrize("reentrant", [False, True], ids=["default", "reentrant"])
def test_trl_dpo_trainer_with_lora_units_under_its_gradient_checkpointing(checkpoint, reentrant, tmp_path, caplog):
    """DPOTrainer on a GreenTrainer-LoRA PeftModel runs its reference adapter inside the loss the units are ranked
    on, with gradient checkpointing on (DPOConfig's default); before: a CheckpointError at the first selection. With
    ``use_reentrant=True``, TRL makes checkpointing reentrant again after each reference forward: every unit ranked 0
    (their checkpointed blocks' inputs need no gradient) until the probed forwards were made non-reentrant too."""
    import trl

    model = get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(checkpoint), _config("lora", rho=0.5))
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        report_to=[],
        bf16=False,
        max_steps=4,
        per_device_train_batch_size=2,
        learning_rate=LR["lora"],
        logging_steps=1,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
        **({"gradient_checkpointing_kwargs": {"use_reentrant": True}} if reentrant else {}),
    )
    assert args.gradient_checkpointing
    trainer = None
    callback = GreenTrainerCallback(loss_fn=lambda inner, batch: trainer.compute_loss(inner, batch))
    trainer = trl.DPOTrainer(
        model=model,
        args=args,
        train_dataset=_preferences(),
        processing_class=_tokenizer(checkpoint),
        callbacks=[callback],
    )
    tuner = model.base_model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with caplog.at_level("WARNING", logger="peft_greentrainer"):
        trainer.train()
    assert "positive importance" not in caplog.text  # the units were ranked by their importance
    selected = {unit for record in tuner.greentrainer_state.history for unit in record.selected}
    assert selected and len(selected) < len(tuner.candidate_units())
    changed = [n for n, p in model.named_parameters() if not torch.equal(before[n], p)]
    assert changed and all(any(f"{unit}.lora_" in n for unit in selected) for n in changed)
    assert tuner.step_flops_ratios()[1] <= 0.5  # the most any step since the last read cost


# ------------------------------------------------------------------------------- load_best_model_at_end
@pytest.mark.parametrize("resumed", [False, True], ids=["one-run", "resumed"])
def test_load_best_model_at_end_gives_exactly_the_best_checkpoint(checkpoint, resumed, tmp_path):
    """Selections change every 2 steps, so tensors are trained for the first time after the best checkpoint: the
    reloaded model must hold their values as of that checkpoint (issue 12, item 5), also when the run was resumed
    after them, in a process that never trained them."""
    tokenizer = _tokenizer(checkpoint)
    data = _lm_dataset(len(tokenizer), n=24)

    def run(resume: str | None = None, **schedule):
        model = _causal_lm(checkpoint, "tensors", selection_interval_steps=2)
        trainer = _train(
            Trainer,
            resume=resume,
            model=model,
            args=_args(
                tmp_path,
                eval_strategy="steps",
                eval_steps=2,
                save_strategy="steps",
                save_steps=2,
                load_best_model_at_end=True,
                metric_for_best_model="eval_loss",
                greater_is_better=True,  # the worst loss "wins": the first checkpoint, long before the end
                **schedule,
            ),
            train_dataset=data,
            eval_dataset=data.select(range(8)),
            data_collator=transformers.DataCollatorForSeq2Seq(tokenizer, padding="longest"),
            callbacks=[GreenTrainerCallback()],
        )
        return model, trainer

    if resumed:
        run(max_steps=6)  # selections at steps 0, 2 and 4
        model, trainer = run(resume=str(tmp_path / "out" / "checkpoint-6"), max_steps=12)
    else:
        model, trainer = run(num_train_epochs=2)
    best = trainer.state.best_model_checkpoint
    assert best.endswith("checkpoint-2")
    trainer.check_budget()
    _assert_loss_falls(trainer)
    expected = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(checkpoint), best)
    actual = {k: v for k, v in model.state_dict().items()}
    different = [k for k, v in expected.state_dict().items() if not torch.equal(v, actual[k])]
    assert not different, different[:5]


# ------------------------------------------------------------------------------ a second stage, a new Trainer
@pytest.mark.parametrize("units", ["tensors", "lora"])
def test_a_new_trainer_on_a_trained_model_trains_again(checkpoint, units, tmp_path):
    """Training again (new data, a second stage) builds a new optimizer: it must hold every candidate, not only the
    units the first run ended with, and the budget holds in both runs."""
    tokenizer = _tokenizer(checkpoint)
    model = _causal_lm(checkpoint, units)
    for stage in range(2):
        trainer = _train(
            Trainer,
            model=model,
            args=_args(tmp_path / f"stage{stage}", learning_rate=LR[units]),
            train_dataset=_lm_dataset(len(tokenizer)),
            data_collator=transformers.DataCollatorForSeq2Seq(tokenizer, padding="longest"),
            callbacks=[GreenTrainerCallback()],
        )
        trainer.check_budget()
        _assert_logged_ratios(trainer)
    history = model.base_model.greentrainer_state.history
    assert [r.step for r in history if r.reason == "importance"].count(0) == 2  # each stage selected at its start


# ---------------------------------------------------------------------- checkpointing switched on later
class EnableCheckpointing(TrainerCallback):
    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.at_step:
            model.gradient_checkpointing_enable()  # also installs the forced input-gradient hook


@pytest.mark.parametrize("units", ["tensors", "lora"])
def test_gradient_checkpointing_switched_on_after_the_first_selection(checkpoint, units, tmp_path):
    """The step after the switch recomputes blocks and would backprop to the embeddings: it is checked before it
    runs, with a profile keyed on checkpointing (issue 12, item 7)."""
    tokenizer = _tokenizer(checkpoint)
    model = _causal_lm(checkpoint, units)
    trainer = _train(
        Trainer,
        model=model,
        args=_args(tmp_path, learning_rate=LR[units]),
        train_dataset=_lm_dataset(len(tokenizer)),
        data_collator=transformers.DataCollatorForSeq2Seq(tokenizer, padding="longest"),
        callbacks=[GreenTrainerCallback(), EnableCheckpointing(at_step=2)],
    )
    assert {key[-1] for key in trainer.audit} == {False, True}  # steps ran both ways (checkpointed or not)
    trainer.check_budget()
    _assert_loss_falls(trainer)


# ------------------------------------------------------------------------------------- other optimizers
@pytest.mark.parametrize("optim", ["adamw_bnb_8bit", "adafactor"])
def test_optimizers(checkpoint, optim, tmp_path):
    tokenizer = _tokenizer(checkpoint)
    model = _causal_lm(checkpoint, "tensors")
    trainer = _train(
        Trainer,
        model=model,
        args=_args(tmp_path, optim=optim, num_train_epochs=3),
        train_dataset=_lm_dataset(len(tokenizer)),
        data_collator=transformers.DataCollatorForSeq2Seq(tokenizer, padding="longest"),
        callbacks=[GreenTrainerCallback()],
    )
    trainer.check_budget()
    _assert_loss_falls(trainer)


def _layer_wise_optimizer(model, lr: float):
    """What ``TrainingArguments(optim="galore_adamw_layerwise")`` builds (transformers' ``trainer_optimizer.py``),
    with torch's AdamW as each parameter's optimizer (GaLore's needs galore_torch): one optimizer per parameter,
    stepped by a hook as its gradient is ready, behind a ``LayerWiseDummyOptimizer`` holding a dummy tensor."""
    from transformers.trainer_pt_utils import LayerWiseDummyOptimizer

    per_parameter = {p: torch.optim.AdamW([p], lr=lr) for p in model.parameters()}  # frozen ones too, as there

    def step(param):
        if param.grad is not None:
            per_parameter[param].step()
            per_parameter[param].zero_grad()

    for param in per_parameter:
        if param.requires_grad:  # only these are ever stepped
            param.register_post_accumulate_grad_hook(step)
    return LayerWiseDummyOptimizer(optimizer_dict=per_parameter, lr=lr)


@pytest.mark.parametrize("units", ["tensors", "lora"])
def test_a_layer_wise_optimizer_steps_what_is_selected_and_its_update_is_mirrored(checkpoint, units, tmp_path, caplog):
    """``optim="galore_adamw_layerwise"`` and the like hold each parameter in an optimizer of its own: GreenTrainer
    refused them ("the optimizer does not hold the candidates"). Each unit's update is now mirrored from its own
    optimizer, the tensors those optimizers step are what the adapter saves, and nothing frozen moves (its gradient
    never comes, so its hook never steps)."""
    tokenizer = _tokenizer(checkpoint)
    model = _causal_lm(checkpoint, units)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = _lm_dataset(len(tokenizer))
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, learning_rate=LR[units], num_train_epochs=2),
        train_dataset=data,
        data_collator=transformers.DataCollatorForSeq2Seq(tokenizer, padding="longest"),
        callbacks=[GreenTrainerCallback()],
        optimizers=(_layer_wise_optimizer(model, LR[units]), None),  # the Trainer makes the schedule, as for optim=
    )
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert not [r for r in caplog.records if "importance" in r.getMessage()]  # mirrored: no -lr*grad
    _assert_loss_falls(trainer)
    _assert_logged_ratios(trainer)
    state = model.greentrainer_state
    selections = [record for record in state.history if record.reason == "importance"]
    assert len(selections) == 2 and all(record.importance > 0 for record in selections)
    tensors_of = {unit.name: unit.param_names for unit in model.base_model.candidate_units()}
    selected = {n for record in state.history for u in record.selected for n in tensors_of[u]}
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    changed = {n.removeprefix("base_model.model.") for n in moved}
    assert changed and changed <= selected
    if units == "tensors":
        assert set(state.trained_tensors) == changed


def _ids_batch(model) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids.clone()}


def test_a_layer_wise_optimizer_built_after_a_selection_is_refused_as_a_plain_one_is(checkpoint):
    """transformers hooks only the tensors trainable when the optimizer is built: one built while units are frozen
    would never step them once selected, so it does not hold them."""
    model = _causal_lm(checkpoint, "tensors")
    batch = _ids_batch(model)
    model.base_model.select_units([batch], torch.optim.AdamW(model.parameters(), lr=1e-3))
    with pytest.raises(ValueError, match="does not hold"):
        model.base_model.select_units([batch], _layer_wise_optimizer(model, 1e-3))


@pytest.mark.parametrize("update", ["optimizer", "gradient"])
def test_a_layer_wise_optimizers_steps_are_predicted_unclipped(checkpoint, update, caplog):
    """Its steps run inside the backward, before a Trainer clips gradients: the importance predicts unclipped ones,
    and ``importance_update="gradient"`` weighs each tensor by its own optimizer's lr, with no warning."""
    importances = []
    for max_grad_norm in (None, 1e-3):
        model = _causal_lm(checkpoint, "tensors", importance_update=update)
        optimizer = _layer_wise_optimizer(model, 1e-3)
        with caplog.at_level(logging.WARNING):
            model.base_model.select_units([_ids_batch(model)], optimizer, max_grad_norm=max_grad_norm)
        importances.append(model.greentrainer_state.importance)
    assert importances[0] == importances[1] and any(v > 0 for v in importances[0].values())
    assert not [r for r in caplog.records if "importance" in r.getMessage()]


def test_label_smoothing_without_its_loss_for_the_importance_is_warned_about(checkpoint, tmp_path, caplog):
    from transformers.trainer_pt_utils import LabelSmoother

    tokenizer = _tokenizer(checkpoint)
    smoothed = LabelSmoother(0.1)

    def smoothed_loss(model, batch):
        return smoothed(model(**{k: v for k, v in batch.items() if k != "labels"}), batch["labels"], shift_labels=True)

    warned = []
    for loss_fn in (None, smoothed_loss):
        caplog.clear()
        trainer = Trainer(
            model=_causal_lm(checkpoint, "tensors"),
            args=_args(tmp_path, label_smoothing_factor=0.1, max_steps=1),
            train_dataset=_lm_dataset(len(tokenizer), n=4),
            data_collator=transformers.DataCollatorForSeq2Seq(tokenizer, padding="longest"),
            callbacks=[GreenTrainerCallback(loss_fn=loss_fn)],
        )
        with caplog.at_level(logging.WARNING, logger="peft_greentrainer.callback"):
            trainer.train()
        warned.append(any("label_smoothing_factor=0.1:" in r.getMessage() for r in caplog.records))
    assert warned == [True, False]


@pytest.mark.parametrize("loss_fn", [None, "trainer's"])
def test_a_trl_loss_type_without_its_loss_for_the_importance_is_warned_about(checkpoint, loss_fn, tmp_path, caplog):
    """SFTConfig(loss_type="dft") trains DFT's reweighted loss; the importance ranked by the model's cross-entropy
    without a word (a review probe). The trainer's own compute_loss, passed as loss_fn, silences it."""
    import trl

    trainer = None
    callback = GreenTrainerCallback(loss_fn=loss_fn and (lambda inner, batch: trainer.compute_loss(inner, batch)))
    trainer = trl.SFTTrainer(
        model=transformers.AutoModelForCausalLM.from_pretrained(checkpoint),
        args=_sft_config(tmp_path, "lora", loss_type="dft", max_steps=1),
        train_dataset=_prompt_completion(),
        processing_class=_tokenizer(checkpoint),
        peft_config=_config("lora"),
        callbacks=[callback],
    )
    with caplog.at_level(logging.WARNING, logger="peft_greentrainer.callback"):
        trainer.train()
    warned = [r.getMessage() for r in caplog.records if "loss_type='dft'" in r.getMessage()]
    assert len(warned) == (loss_fn is None), warned
    assert trainer.model.base_model.greentrainer_state.history  # a selection was made either way


# ----------------------------------------------------------------------------------------------- resume
@pytest.mark.slow
# 6 steps per epoch: a checkpoint mid-epoch, and one at an epoch's last step (written before the epoch's end is
# counted: the resumed run once skipped the next epoch's selection)
@pytest.mark.parametrize(("units", "save_steps"), [("tensors", 6), ("lora", 4)])
def test_resume_from_a_checkpoint_with_dynamic_padding(checkpoint, units, save_steps, tmp_path):
    tokenizer = _tokenizer(checkpoint)
    data = _lm_dataset(len(tokenizer))
    collator = transformers.DataCollatorForSeq2Seq(tokenizer, padding="longest")

    def run(out, resume=None):
        model = _causal_lm(checkpoint, units)
        schedule = {"warmup_steps": 2, "lr_scheduler_type": "cosine", "learning_rate": LR[units]}
        args = _args(out, save_strategy="steps", save_steps=save_steps, **schedule)
        trainer = _train(
            Trainer,
            resume=resume,
            model=model,
            args=args,
            train_dataset=data,
            data_collator=collator,
            callbacks=[GreenTrainerCallback()],
        )
        return model, trainer

    full, full_trainer = run(tmp_path / "full")
    resumed, trainer = run(tmp_path / "resumed", resume=str(tmp_path / "full" / "out" / f"checkpoint-{save_steps}"))
    assert trainer.state.global_step == full_trainer.state.global_step == 12
    trainer.check_budget()
    _assert_loss_falls(trainer)
    history = resumed.base_model.greentrainer_state.history
    assert [(r.step, r.reason) for r in history][:1] == [(0, "importance")]  # restored from the checkpoint
    assert [r.step for r in history if r.reason == "importance"] == [
        r.step for r in full.base_model.greentrainer_state.history if r.reason == "importance"
    ]


def test_a_resumed_run_draws_its_importance_batches_as_the_uninterrupted_one(tmp_path, monkeypatch):
    """A resumed run prices again the batch shapes seen before its checkpoint, so its re-selections for a new shape
    ("batch shape" records) need not be the uninterrupted run's; they must not move the importance draws after them."""
    drawn: list[tuple[int, int]] = []
    original = callback_module.importance_batches

    def spy(loader, count, seed, rank=0, world_size=1, *, draw=0):
        drawn.append((seed, draw))
        return original(loader, count, seed, rank, world_size, draw=draw)

    monkeypatch.setattr(callback_module, "importance_batches", spy)
    rng = random.Random(0)  # short rows, and now and then a long one, whose shape re-selects within its step
    data = []
    for i in range(24):
        length = rng.choice([4, 6, 8, 200]) if i % 6 else rng.randint(100, 220)
        start = rng.randrange(37)
        data.append([3 + (start + t) % 37 for t in range(length)])
    shape = {"hidden_size": 32, "head_dim": 8, "intermediate_size": 64, "num_hidden_layers": 2, "vocab_size": 40}
    config = tiny_config("llama", **shape, max_position_embeddings=256, pad_token_id=0)

    def collator(rows: list[list[int]]) -> dict[str, torch.Tensor]:
        longest = max(map(len, rows))
        ids = torch.tensor([row + [0] * (longest - len(row)) for row in rows])
        mask = torch.tensor([[1] * len(row) + [0] * (longest - len(row)) for row in rows])
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    def run(out, resume=None):
        drawn.clear()
        torch.manual_seed(0)
        base = transformers.AutoModelForCausalLM.from_config(config)
        model = get_peft_model(base, GreenTrainerConfig(rho=0.5, selection_interval_steps=4))
        args = _args(out, max_steps=16, save_strategy="steps", save_steps=3, remove_unused_columns=False)
        trainer = Trainer(
            model=model, args=args, train_dataset=data, data_collator=collator, callbacks=[GreenTrainerCallback()]
        )
        trainer.train(resume_from_checkpoint=resume)
        reasons = [(r.step, r.reason) for r in model.base_model.greentrainer_state.history]
        return reasons, list(drawn)

    full_reasons, full_draws = run(tmp_path / "full")
    resumed_reasons, resumed_draws = run(tmp_path / "resumed", resume=str(tmp_path / "full" / "out" / "checkpoint-3"))
    assert resumed_reasons != full_reasons  # the resumed run re-selected for shapes at other steps ...
    assert resumed_draws == full_draws[-len(resumed_draws) :] and len(resumed_draws) == 3  # ... and drew alike
