"""Several adapters per model (units="lora", as LoRA), the on-disk format, and units="tensors" staying alone."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from conftest import tiny_batch, tiny_model
from peft import LoraConfig, PeftConfig, PeftMixedModel, PeftModel, get_peft_model
from peft.config import PeftConfigMixin
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from transformers import Trainer, TrainingArguments

from peft_greentrainer import GreenTrainerCallback, GreenTrainerConfig, export_lora_adapter
from peft_greentrainer.config import FINGERPRINT, METADATA_NAME

ARCH = "llama"
TARGETS = {"default": ["q_proj", "v_proj"], "other": ["k_proj", "o_proj", "v_proj"]}


def _config(name: str = "default", **kwargs) -> GreenTrainerConfig:
    values = {"units": "lora", "rho": 0.5, "r": 4, "target_modules": TARGETS[name], "init_lora_weights": False}
    return GreenTrainerConfig(**{**values, **kwargs})


def _two_adapters(seed: int = 0):
    """A model with adapters "default" (active) and "other"; LoRA B initialised non-zero so each changes the output."""
    model = get_peft_model(tiny_model(ARCH, seed=seed), _config("default"))
    model.add_adapter("other", _config("other"))
    return model


def _adapter_params(model, name: str) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if f".{name}." in n or n.endswith(f".{name}")}


def _optimizer(model) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def _select_and_train(model, steps: int = 2) -> dict[str, torch.Tensor]:
    batch = tiny_batch(model.base_model.model)
    optimizer = _optimizer(model)
    model.base_model.select_units([batch], optimizer)
    for _ in range(steps):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return batch


def _logits(model, batch, **kwargs) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], **kwargs).logits


# ---------------------------------------------------------------------------------------- selection per adapter
def test_selection_acts_on_the_active_adapter_only():
    model = _two_adapters()
    tuner = model.base_model
    other = _adapter_params(model, "other")
    assert other and not any(p.requires_grad for p in other.values())  # PEFT: a newly added adapter is inactive
    next(iter(other.values())).requires_grad_(True)  # a flag set by the user: a selection must keep it
    flags = {n: p.requires_grad for n, p in other.items()}
    weights = {n: p.detach().clone() for n, p in other.items()}

    _select_and_train(model)

    selected = set(tuner.greentrainer_state.selected)
    assert 0 < len(selected) < len(tuner.candidate_units())
    trainable_default = {n for n, p in _adapter_params(model, "default").items() if p.requires_grad}
    assert trainable_default == {
        f"base_model.model.{n}" for u in tuner.candidate_units() if u.name in selected for n in u.param_names
    }
    assert {n: p.requires_grad for n, p in other.items()} == flags
    assert all(torch.equal(p, weights[n]) for n, p in other.items())
    assert tuner.state_of("other").history == []


def test_each_adapter_keeps_its_selection_across_set_adapter():
    model = _two_adapters()
    tuner = model.base_model
    _select_and_train(model)
    chosen_default = list(tuner.greentrainer_state.selected)

    model.set_adapter("other")  # never selected: PEFT makes the whole adapter trainable
    assert all(p.requires_grad for p in _adapter_params(model, "other").values())
    assert not any(p.requires_grad for p in _adapter_params(model, "default").values())
    assert {u.name.rsplit(".", 1)[-1] for u in tuner.candidate_units()} == set(TARGETS["other"])
    _select_and_train(model)
    chosen_other = list(tuner.greentrainer_state.selected)
    assert chosen_other and set(chosen_other) <= {u.name for u in tuner.candidate_units()}
    assert tuner.state_of("default").selected == chosen_default

    model.set_adapter("default")  # back under its budget: exactly its last selection is trainable
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        f"base_model.model.{n}" for u in tuner.candidate_units() if u.name in chosen_default for n in u.param_names
    }
    assert tuner.greentrainer_state.selected == chosen_default


def test_switching_to_another_adapter_and_back_profiles_no_shape_again(monkeypatch):
    """TRL's DPO runs its reference adapter and comes back around every step: the active adapter's profiles stay, so
    steps at shapes already priced profile nothing (before: two profiling forwards per step, over full FT's cost)."""
    import peft_greentrainer.model as tuner_module

    model = _two_adapters()
    batch = _select_and_train(model, steps=1)
    profiled = []
    real_profile = tuner_module.profile_model
    monkeypatch.setattr(tuner_module, "profile_model", lambda *a, **k: profiled.append(1) or real_profile(*a, **k))
    for _ in range(2):
        model.set_adapter("other")
        with torch.no_grad():
            model(**batch)
        model.set_adapter("default")
        model(**batch).loss.backward()
    assert profiled == []
    model.base_model.delete_adapter("other")  # the model changed: its shapes are priced again
    model(**batch).loss.backward()
    assert profiled


def test_a_forward_with_gradients_under_disable_adapter_is_no_step_to_price():
    """No adapter runs there, so the forward trains no unit: a reference computed with gradients on (or a FLOP count
    of full fine-tuning) used to be priced as a step with no unit in it and failed ("at least one unit is required")."""
    model = get_peft_model(tiny_model(ARCH), _config())
    batch = _select_and_train(model, steps=1)
    tuner = model.base_model
    priced = dict(tuner._pricer.shape_costs)
    longer = tiny_batch(tuner.model, seq_len=batch["input_ids"].shape[1] + 3)
    for _ in range(2):
        with model.disable_adapter():
            model(**longer).logits.sum()
    assert tuner._pricer.shape_costs == priced
    model(**longer).loss.backward()  # with the adapters back, that shape is a step: priced
    assert len(tuner._pricer.shape_costs) > len(priced)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_loss_that_runs_a_reference_adapter_can_rank_units(checkpointing):
    """TRL's DPO/KTO loss switches to its reference adapter and back between the policy's forward and the backward:
    the switch must not change which tensors take a gradient mid-probe (checkpointed blocks recompute with the flags
    they were saved with; before: a CheckpointError at the first selection, TRL's default gradient checkpointing)."""
    every_linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    # at this rho only part of the last block's adapters can fit: the probe trains fewer tensors than PEFT activates
    model = get_peft_model(tiny_model(ARCH), _config("default", target_modules=every_linear, rho=0.45))
    model.add_adapter("other", _config("other"))
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = tiny_batch(model.base_model.model)

    def reference_loss(inner, batch):  # as DPO's: the trainer's PeftModel switches adapters
        policy = inner(**batch)
        model.set_adapter("other")
        with torch.no_grad():
            inner(**batch)
        model.set_adapter("default")
        return policy.loss

    optimizer = _optimizer(model)
    selection = model.base_model.select_units([batch], optimizer, loss_fn=reference_loss)
    assert selection.mask.any()
    chosen = model.base_model.greentrainer_state.selected
    trainable = {n for n, p in _adapter_params(model, "default").items() if p.requires_grad}
    assert trainable and all(any(f"{unit}.lora_" in n for unit in chosen) for n in trainable)
    assert not any(p.requires_grad for p in _adapter_params(model, "other").values())


def test_extra_trained_tensors_the_patterns_leave_out_never_train():
    """A modules_to_save copy (PEFT makes it after injection) excluded from the candidates would train outside the
    selection, at a cost the budget does not hold (before: trainable after every selection)."""
    config = _config(modules_to_save=["lm_head"], exclude_patterns=[r"lm_head"], sparse_lm_head=False)
    model = get_peft_model(tiny_model(ARCH, tie_word_embeddings=False), config)
    assert not any("lm_head" in u.name for u in model.base_model.candidate_units())
    batch = _select_and_train(model, steps=1)
    head = model.base_model.model.lm_head.modules_to_save["default"].weight
    assert not head.requires_grad and head.grad is None
    before = head.detach().clone()
    model(**batch).loss.backward()
    assert head.grad is None and torch.equal(head, before)


def test_disable_adapter_keeps_the_selection():
    """PEFT re-enables an adapter by making all of it trainable: the budget must survive ``disable_adapter()``."""
    model = _two_adapters()
    _select_and_train(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert 0 < sum(flags.values()) < len(_adapter_params(model, "default"))
    with model.disable_adapter():
        assert not any(p.requires_grad for p in _adapter_params(model, "default").values())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    with pytest.raises(ValueError, match="No adapter named 'typo'"):
        model.base_model.state_of("typo")


def test_selecting_with_several_active_adapters_says_which_to_choose():
    model = _two_adapters()
    model.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match=r"set_adapter\(name\)"):
        model.base_model.select_units([tiny_batch(model.base_model.model)])


def test_trainer_trains_the_active_adapter_and_leaves_the_other_alone(tmp_path):
    model = _two_adapters()
    model.set_adapter("other")
    default = {n: p.detach().clone() for n, p in _adapter_params(model, "default").items()}
    ids = torch.randint(3, 100, (8, 16), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no", learning_rate=1e-2,
        num_train_epochs=1, per_device_train_batch_size=4, disable_tqdm=True,
    )  # fmt: skip
    other_before = {n: p.detach().clone() for n, p in _adapter_params(model, "other").items()}
    Trainer(model=model, args=args, train_dataset=data, callbacks=[GreenTrainerCallback()]).train()

    assert model.base_model.greentrainer_state.history  # the callback selected among "other"'s units
    assert model.base_model.state_of("default").history == []
    assert all(torch.equal(p, default[n]) for n, p in _adapter_params(model, "default").items())
    changed = [n for n, p in _adapter_params(model, "other").items() if not torch.equal(p, other_before[n])]
    assert changed


# ------------------------------------------------------------------------------- the rest of LoRA's adapter API
def test_delete_adapter_forgets_its_candidates_and_state():
    model = _two_adapters()
    model.set_adapter("other")
    _select_and_train(model)
    model.set_adapter("default")
    model.delete_adapter("other")
    tuner = model.base_model
    assert set(model.peft_config) == {"default"} and set(tuner._candidates) == {"default"}
    assert "other" not in tuner._runtime.states
    assert not _adapter_params(model, "other")
    _select_and_train(model)  # the remaining adapter still selects
    assert tuner.greentrainer_state.selected


def test_deleting_the_active_adapter_puts_the_other_back_under_its_selection():
    """PEFT activates another adapter when the active one is deleted, every tensor of it trainable: a plain-loop step
    on it then measured 0.735 of full fine-tuning at rho=0.5 while its recorded selection said 0.41."""
    model = _two_adapters()
    tuner = model.base_model
    _select_and_train(model)
    chosen = list(tuner.greentrainer_state.selected)
    model.set_adapter("other")
    _select_and_train(model)
    model.delete_adapter("other")
    assert model.active_adapters == ["default"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    selected = [u for u in tuner.candidate_units() if u.name in chosen]
    assert trainable == {f"base_model.model.{n}" for u in selected for n in u.param_names}


def test_an_adapter_never_selected_trains_unbudgeted_and_says_so(caplog):
    """An adapter activated before any selection of its own trains every tensor: its steps are told so, as before a
    first selection, and add no ratio (they reported the empty selection's forward-only 0.35 of full
    fine-tuning while measuring 0.74)."""
    model = _two_adapters()
    tuner = model.base_model
    batch = _select_and_train(model)
    last, _ = tuner.step_flops_ratios()  # what "default"'s steps logged
    model.set_adapter("other")
    with caplog.at_level("WARNING", logger="peft_greentrainer"):
        model(**batch).loss.backward()
    assert "no selection in force" in caplog.text
    assert tuner.step_flops_ratios() == (last, last)  # nothing added for the unbudgeted step
    model.set_adapter("default")  # back under its selection: budget-checked again
    model.train()
    model(**batch).loss.backward()
    ratio, _ = tuner.step_flops_ratios()
    assert 0 < ratio <= 0.5


def test_mixed_adapter_batches_disable_adapter_and_merging():
    model = _two_adapters()
    batch = tiny_batch(model.base_model.model, batch_size=3)
    base = _logits(tiny_model(ARCH).eval(), batch)
    default = _logits(model, batch)
    model.set_adapter("other")
    other = _logits(model, batch)
    assert not torch.allclose(default, other) and not torch.allclose(default, base)

    mixed = _logits(model, batch, adapter_names=["default", "other", "__base__"])
    torch.testing.assert_close(mixed, torch.stack([default[0], other[1], base[2]]))

    with model.disable_adapter():
        torch.testing.assert_close(_logits(model, batch), base)
    torch.testing.assert_close(_logits(model, batch), other)

    model.base_model.merge_adapter(["other"])
    torch.testing.assert_close(_logits(model, batch), other, atol=1e-5, rtol=1e-5)
    model.base_model.unmerge_adapter()
    model.set_adapter("default")
    merged = model.merge_and_unload(adapter_names=["default"])
    torch.testing.assert_close(_logits(merged, batch), default, atol=1e-5, rtol=1e-5)


def test_adapter_named_like_a_parameter_gets_only_its_own_tensors():
    model = get_peft_model(tiny_model(ARCH), _config("default"))
    model.add_adapter("weight", _config("default"))
    model.set_adapter("weight")
    names = {n for u in model.base_model.candidate_units() for n in u.param_names}
    assert names and all(".weight." in n and ".default." not in n for n in names)


# ---------------------------------------------------------------------------------------------- saving, loading
PLAIN_PEFT_CHECK = textwrap.dedent(
    """
    import sys
    import peft, torch, transformers

    root = sys.argv[1]
    base = transformers.AutoModelForCausalLM.from_pretrained(root + "/base")
    model = peft.PeftModel.from_pretrained(base, root + "/adapters")
    model.load_adapter(root + "/adapters/other", "other")
    assert all(type(c) is peft.LoraConfig for c in model.peft_config.values()), model.peft_config
    data = torch.load(root + "/inputs.pt")
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=data, adapter_names=["default", "other"]).logits
    assert "peft_greentrainer" not in sys.modules
    torch.save(logits, root + "/plain.pt")
    """
)


def test_a_plain_lora_adapter_saved_later_into_the_same_directory_loads_as_plain_lora(tmp_path, caplog, monkeypatch):
    """A reused output directory keeps an earlier run's greentrainer_config.json: it describes another LoRA config, so
    it is not applied to the plain adapter saved there since. Editing the base model's path keeps it applied."""
    config = GreenTrainerConfig(units="lora", rho=0.5, target_modules=["q_proj", "v_proj"], r=4)
    get_peft_model(tiny_model(ARCH), config).save_pretrained(tmp_path)
    adapter_config = tmp_path / "adapter_config.json"
    edited = {**json.loads(adapter_config.read_text()), "base_model_name_or_path": "/elsewhere/the-base"}
    adapter_config.write_text(json.dumps(edited))
    assert isinstance(PeftConfig.from_pretrained(tmp_path), GreenTrainerConfig)
    with monkeypatch.context() as patch:  # a later PEFT release, whose configs have a field more
        to_dict = LoraConfig.to_dict
        patch.setattr(LoraConfig, "to_dict", lambda self: {**to_dict(self), "a_new_field": None})
        assert isinstance(PeftConfig.from_pretrained(tmp_path), GreenTrainerConfig)

    plain = get_peft_model(tiny_model(ARCH), LoraConfig(r=8, target_modules=["q_proj", "k_proj"]))
    plain.save_pretrained(tmp_path)
    assert (tmp_path / METADATA_NAME).exists()  # PEFT's own save leaves it
    with caplog.at_level("WARNING", logger="peft_greentrainer.config"):
        loaded = PeftConfig.from_pretrained(tmp_path)
    assert type(loaded) is LoraConfig and loaded.r == 8
    assert "loads as plain LoRA" in caplog.text
    assert type(PeftModel.from_pretrained(tiny_model(ARCH), tmp_path).base_model).__name__ == "LoraModel"


def test_each_adapter_is_saved_under_its_name_as_plain_lora(tmp_path):
    model = _two_adapters()
    _select_and_train(model)
    batch = tiny_batch(model.base_model.model)
    expected = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        expected[name] = _logits(model, batch)
    model.save_pretrained(tmp_path / "adapters")

    for name, directory in (("default", tmp_path / "adapters"), ("other", tmp_path / "adapters" / "other")):
        written = json.loads((directory / "adapter_config.json").read_text())
        assert written["peft_type"] == "LORA" and "rho" not in written and "units" not in written
        assert sorted(written["target_modules"]) == sorted(TARGETS[name])
        metadata = json.loads((directory / METADATA_NAME).read_text())
        assert metadata.pop(FINGERPRINT) and metadata == model.peft_config[name].greentrainer_fields()
        config = PeftConfig.from_pretrained(directory)  # this package imported: the GreenTrainer config is back
        assert isinstance(config, GreenTrainerConfig) and config.units == "lora"
        assert config.greentrainer_fields() == model.peft_config[name].greentrainer_fields()

    loaded = PeftModel.from_pretrained(tiny_model(ARCH, seed=5), tmp_path / "adapters")
    loaded.load_adapter(tmp_path / "adapters" / "other", "other")
    assert type(loaded.base_model).__name__ == "GreenTrainerModel"
    state = get_peft_model_state_dict(model, adapter_name="other")
    assert all(torch.equal(v, get_peft_model_state_dict(loaded, adapter_name="other")[k]) for k, v in state.items())

    # Without this package: plain PEFT loads both adapters as LoRA, with the same outputs.
    tiny_model(ARCH).save_pretrained(tmp_path / "base")  # the same base weights, for the subprocess
    torch.save(batch["input_ids"][:2], tmp_path / "inputs.pt")
    command = [sys.executable, "-c", PLAIN_PEFT_CHECK, str(tmp_path)]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    plain = torch.load(tmp_path / "plain.pt")
    torch.testing.assert_close(plain, torch.stack([expected["default"][0], expected["other"][1]]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_pissa_or_olora_adapter_converts_to_plain_lora_on_save(init, tmp_path):
    """PEFT's conversion (``save_pretrained(path_initial_model_for_weight_conversion=...)``) marks the initial adapter
    ``init_weights=True`` for a method other than LoRA, and refused ours, still marked "pissa"."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_model(ARCH), _config(init_lora_weights=init))
    model.peft_config["default"].init_lora_weights = True  # PEFT's flow: the initial adapter saved as plain LoRA
    model.save_pretrained(tmp_path / "initial")
    model.peft_config["default"].init_lora_weights = init
    batch = tiny_batch(model.base_model.model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.base_model.select_units([batch], optimizer)
    for _ in range(3):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=batch["input_ids"]).logits
    model.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=tmp_path / "initial")
    loaded = PeftModel.from_pretrained(tiny_model(ARCH), tmp_path / "converted").eval()  # on the unmodified base
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=batch["input_ids"]).logits, trained, rtol=0, atol=1e-5)


def test_a_floor_set_by_costs_that_do_not_grow_with_the_rows_says_so():
    """DoRA's weight norm costs the same for any number of rows: a step is priced for any batch size, one row
    included, so the floor is a one-row step's, which the refusal says (capping the length would not lower it)."""
    targets = ["q_proj", "v_proj", "o_proj", "down_proj"]
    config = _config(rho=0.3, r=16, lora_alpha=32, use_dora=True, target_modules=targets)
    model = get_peft_model(tiny_model(ARCH), config)
    batch = tiny_batch(model.base_model.model, batch_size=4, seq_len=16)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with pytest.raises(ValueError, match="DoRA's weight norm"):
        model.base_model.select_units([batch], optimizer)


def test_config_round_trip_keeps_every_field(tmp_path):
    config = GreenTrainerConfig(
        units="lora", rho=0.7, r=8, lora_alpha=32, target_modules=["q_proj"], use_dora=True,
        selection_interval_steps=5, importance_batches=2, importance_update="gradient", dp_resolution=500,
        include_patterns=["layers\\.1"],
        exclude_patterns="v_proj", modules_to_save=["lm_head"],
    )  # fmt: skip
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert type(loaded) is GreenTrainerConfig
    assert loaded.to_dict() == config.to_dict()


def test_old_format_adapters_still_load(tmp_path):
    """Adapters saved before the plain-LoRA format: ``adapter_config.json`` holds the whole GreenTrainer config."""
    model = get_peft_model(tiny_model(ARCH), _config("default"))
    _select_and_train(model)
    config = model.peft_config["default"]
    PeftConfigMixin.save_pretrained(config, tmp_path)  # the format PEFT writes for any config
    save_file(get_peft_model_state_dict(model), tmp_path / "adapter_model.safetensors")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "GREENTRAINER"

    loaded = PeftModel.from_pretrained(tiny_model(ARCH), tmp_path)
    assert isinstance(loaded.peft_config["default"], GreenTrainerConfig)
    batch = tiny_batch(model.base_model.model)
    torch.testing.assert_close(_logits(loaded, batch), _logits(model, batch), atol=0, rtol=0)


def test_export_lora_adapter_is_the_saved_format_of_the_active_adapter(tmp_path):
    model = _two_adapters()
    model.set_adapter("other")
    export_lora_adapter(model, tmp_path / "export")
    model.save_pretrained(tmp_path / "saved")
    for name in ("adapter_config.json", METADATA_NAME):
        assert (tmp_path / "export" / name).read_text() == (tmp_path / "saved" / "other" / name).read_text()
    model.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="set_adapter"):
        export_lora_adapter(model, tmp_path / "both")


def test_unknown_metadata_fields_are_refused_with_what_to_do(tmp_path):
    get_peft_model(tiny_model(ARCH), _config("default")).save_pretrained(tmp_path)
    metadata = json.loads((tmp_path / METADATA_NAME).read_text())
    (tmp_path / METADATA_NAME).write_text(json.dumps({**metadata, "budget_schedule": "cosine"}))
    with pytest.raises(ValueError, match=rf"budget_schedule.*{METADATA_NAME}"):
        PeftConfig.from_pretrained(tmp_path)


def test_plain_lora_directories_load_as_lora(tmp_path):
    get_peft_model(tiny_model(ARCH), LoraConfig(target_modules=["q_proj"])).save_pretrained(tmp_path)
    assert type(PeftConfig.from_pretrained(tmp_path)) is LoraConfig


def test_a_units_lora_adapter_joins_plain_lora_as_plain_lora(tmp_path):
    """With this package imported, a plain LoRA model (a process serving several LoRAs) loads a GreenTrainer-trained
    adapter as the LoRA adapter it is on disk, as without the package; so does transformers' own ``load_adapter``,
    which has no GreenTrainer tuner to train with (its budget hook and sparse head stay off a plain model)."""
    trained = get_peft_model(tiny_model(ARCH), _config("default"))
    trained.save_pretrained(tmp_path / "greentrainer")
    get_peft_model(tiny_model(ARCH), LoraConfig(r=4, target_modules=["k_proj"])).save_pretrained(tmp_path / "plain")
    batch = tiny_batch(trained.base_model.model)

    plain = PeftModel.from_pretrained(tiny_model(ARCH), tmp_path / "plain")
    plain.load_adapter(tmp_path / "greentrainer", adapter_name="green")
    assert type(plain.peft_config["green"]) is LoraConfig
    plain.set_adapter("green")
    torch.testing.assert_close(_logits(plain, batch), _logits(trained, batch), atol=0, rtol=0)

    mixed = PeftMixedModel.from_pretrained(tiny_model(ARCH), tmp_path / "plain")
    mixed.load_adapter(tmp_path / "plain", adapter_name="again")  # PeftMixedModel has no peft_type of its own

    base = tiny_model(ARCH)
    base.load_adapter(str(tmp_path / "greentrainer"), adapter_name="green", is_trainable=True)
    assert type(base.peft_config["green"]) is LoraConfig and not base._forward_pre_hooks
    base.train()
    assert base(**batch).logits.shape == (*batch["input_ids"].shape, base.config.vocab_size)  # no sparse head


def test_plain_lora_joins_a_greentrainer_model_with_its_fields(tmp_path):
    """A reference adapter for DPO, say: PEFT would refuse to mix the two methods on one model."""
    get_peft_model(tiny_model(ARCH), LoraConfig(r=4, target_modules=["k_proj"])).save_pretrained(tmp_path)
    # its patterns name the active adapter's modules, not the joining one's (which they would leave no candidate)
    model = get_peft_model(tiny_model(ARCH), _config("default", rho=0.7, include_patterns=[r"q_proj"]))
    model.load_adapter(tmp_path, adapter_name="reference")
    model.add_adapter("added", LoraConfig(r=2, target_modules=["o_proj"]))
    for name, r in (("reference", 4), ("added", 2)):
        config = model.peft_config[name]
        assert type(config) is GreenTrainerConfig and (config.units, config.rho, config.r) == ("lora", 0.7, r)
    assert model.peft_config["reference"].inference_mode and not model.peft_config["added"].inference_mode


# ------------------------------------------------------------------------------- units="tensors": one adapter
def test_tensor_units_refuse_a_second_adapter_and_say_why():
    model = get_peft_model(tiny_model(ARCH), GreenTrainerConfig(units="tensors"))
    for second in (GreenTrainerConfig(units="tensors"), _config("default")):
        with pytest.raises(ValueError, match=r"in place.*units='lora' for several adapters.*fresh copy"):
            model.add_adapter("second", second)
        assert set(model.peft_config) == {"default"}

    lora = _two_adapters()
    with pytest.raises(ValueError, match=r"units='tensors'.*in place"):
        lora.add_adapter("tensors", GreenTrainerConfig(units="tensors"))
    assert set(lora.peft_config) == {"default", "other"}


def test_tensor_units_refuse_delete_and_mixed_batches():
    model = get_peft_model(tiny_model(ARCH), GreenTrainerConfig(units="tensors"))
    with pytest.raises(RuntimeError, match="merge_and_unload"):
        model.delete_adapter("default")
    assert set(model.peft_config) == {"default"}
    batch = tiny_batch(model.base_model.model)
    with pytest.raises(ValueError, match="units='lora'"):
        model(input_ids=batch["input_ids"], adapter_names=["default", "default"])
    with pytest.raises(ValueError, match="no adapters to combine"):
        model.add_weighted_adapter(["default"], [1.0], "combined")
    assert set(model.peft_config) == {"default"}


def test_tensor_units_are_saved_in_the_greentrainer_format(tmp_path):
    model = get_peft_model(tiny_model(ARCH), GreenTrainerConfig(units="tensors"))
    _select_and_train(model)
    (tmp_path / METADATA_NAME).write_text("{}")  # left by an earlier units="lora" save into the same directory
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "GREENTRAINER"
    assert not (tmp_path / METADATA_NAME).exists()


def test_lora_units_are_injected_as_peft_injects_lora():
    """PEFT keys some injection steps on the LoRA type: mapping transformers 4's Mixtral expert names to transformers
    5's stacked experts (which our own type once skipped silently, training attention adapters only), and refusing
    modules LoRA breaks (Mamba's out_proj, whose saved adapter did not reproduce the model)."""
    targets = ["q_proj", "w1", "w2", "w3"]

    def adapted(config) -> set[str]:
        model = get_peft_model(tiny_model("mixtral"), config)
        return {name for name, p in model.named_parameters() if p.requires_grad}

    lora = adapted(LoraConfig(r=4, target_modules=targets))
    assert any(".mlp.experts." in name for name in lora)
    assert adapted(GreenTrainerConfig(units="lora", r=4, target_modules=targets)) == lora

    config = transformers.MambaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, state_size=8)
    with pytest.raises(ValueError, match=r"out_proj.*incompatible with Mamba"):
        get_peft_model(
            transformers.MambaForCausalLM(config),
            GreenTrainerConfig(units="lora", target_modules=["in_proj", "out_proj"]),
        )
