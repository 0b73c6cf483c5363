"""Model families and task heads beyond the other tests' four (catalogue: ``benchmarks/families.py``): one selection
each, with both unit kinds, then the next training step's FLOPs measured by FlopCounterMode against full fine-tuning
measured the same way, and the saved adapter loaded back."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import transformers
from conftest import tiny_config
from peft import PeftModel, get_peft_model

from benchmarks.families import CASES, collate, example, full_fine_tuning_flops
from peft_greentrainer import GreenTrainerConfig
from peft_greentrainer.engine.length_fit import LengthFit
from peft_greentrainer.engine.profile import measure_flops, profile_model

RHO = 0.6  # the tiniest models' cheapest LoRA unit needs just above 0.5


def _outputs(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    out = model(**batch)
    return out.logits if getattr(out, "logits", None) is not None else out.start_logits


@pytest.mark.slow
@pytest.mark.parametrize("units", ["tensors", "lora"])
@pytest.mark.parametrize("family", list(CASES))
def test_each_family_keeps_its_budget_and_round_trips(family, units, tmp_path):
    case = CASES[family]
    model = get_peft_model(case.model(), case.peft_config(units, RHO))
    tuner = model.base_model
    batch = collate([example(model.config, case.task_type, length, seed) for seed, length in enumerate((12, 9))])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    assert tuner.select_units([batch], optimizer).mask.any()
    predicted = tuner.greentrainer_state.last.predicted_ratio

    step = sum(measure_flops(model, batch))  # the step's own flags, as the next training step runs
    ratio = step / full_fine_tuning_flops(model, batch)
    assert ratio <= min(RHO, predicted) * (1 + 1e-9), (ratio, predicted)
    assert len(tuner._pricer.shape_costs) == 1  # that step found the shape its selection priced (no profile inside it)

    model(**batch).loss.backward()
    optimizer.step()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(case.model(), tmp_path)
    expected, actual = model.state_dict(), loaded.state_dict()
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[key], actual[key]) for key in expected)
    model.eval()
    loaded.eval()
    with torch.no_grad():  # equal weights; Mamba's LoRA on x_proj runs in another order (plain LoRA too): 1e-6 apart
        torch.testing.assert_close(_outputs(model, batch), _outputs(loaded, batch))


@pytest.mark.slow
@pytest.mark.parametrize("units", ["tensors", "lora"])
@pytest.mark.parametrize("family", list(CASES))
def test_full_fine_tuning_that_rho_refers_to_is_priced_exactly(family, units):
    """Every step is held to rho times the reference: one counted above what full fine-tuning runs would let steps
    spend more than promised (the hybrids' linear-attention scans compute a final state no backward goes through)."""
    case = CASES[family]
    model = get_peft_model(case.model(), case.peft_config(units, RHO))
    batch = collate([example(model.config, case.task_type, length, seed) for seed, length in enumerate((40, 33))])
    _, reference = model.base_model.cost_profile(batch)
    assert reference == full_fine_tuning_flops(model, batch)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(CASES))
def test_full_fine_tuning_under_activation_checkpointing_is_priced_exactly(family):
    """Each block's recompute stops where torch's early stop ends it: after the last tensor it saves (Falcon's block
    ends in an in-place add, Granite's in a product with a Python number: neither saves one)."""
    case = CASES[family]
    model = case.model().train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = collate([example(model.config, case.task_type, length, seed) for seed, length in enumerate((12, 9))])
    forward, backward = measure_flops(model, batch, [name for name, _ in model.named_parameters()])
    assert profile_model(model, batch).full_flops == forward + backward


@pytest.mark.slow
@pytest.mark.parametrize("units", ["tensors", "lora"])
@pytest.mark.parametrize("family", ["qwen2", "gemma2", "mamba", "bert-classification", "qwen3_moe"])
def test_lengths_padded_per_batch_are_priced_without_a_profile_and_exactly(family, units, monkeypatch):
    """Once profiled lengths pin the polynomial the costs follow, a new length between them costs no profile; the
    costs it is priced at equal what a profile of it measures, entry for entry."""
    case = CASES[family]
    model = get_peft_model(case.model(), case.peft_config(units, RHO))
    tuner = model.base_model
    rows = random.Random(0)

    def batch(step: int) -> dict:
        return collate([example(model.config, case.task_type, rows.randint(6, 40), 3 * step + i) for i in range(3)])

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    tuner.select_units([batch(0)], optimizer)
    profiles, predicted = [], []
    measure = tuner._measure
    monkeypatch.setattr(tuner, "_measure", lambda *a, **k: profiles.append(1) or measure(*a, **k))
    for step in range(1, 30):
        inputs = batch(step)
        before = (len(profiles), set(tuner._pricer.caches.measured_rows))
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        new = set(tuner._pricer.caches.measured_rows) - before[1]
        if new and len(profiles) == before[0]:
            predicted.append((inputs, new))
    assert len(predicted) >= 5, "new lengths between those profiled are priced without a profile"

    monkeypatch.setattr(LengthFit, "predict", lambda *a, **k: None)
    # each check profiles the row again: six, spread over the run's lengths (checking all, 18 for Mamba, took 60% of
    # its time)
    for inputs, keys in predicted[:: math.ceil(len(predicted) / 6)]:
        for row, key, bucket in tuner._pricer.row_keys(inputs):
            if key in keys:
                expected, actual = tuner._pricer._row_costs(row, key, bucket), tuner._pricer.caches.measured_rows[key]
                assert [u.name for u in actual.units] == [u.name for u in expected.units]
                for name in ("t_dw", "t_dy", "forward_share"):
                    assert np.array_equal(getattr(actual, name), getattr(expected, name)), name
                assert (actual.dy_head, actual.forward_flops, actual.full_flops) == (
                    expected.dy_head,
                    expected.forward_flops,
                    expected.full_flops,
                )


def _wav2vec2_for_ctc() -> transformers.Wav2Vec2ForCTC:
    torch.manual_seed(0)
    # random layer skips are refused (a step's FLOPs would not follow its shape)
    return transformers.Wav2Vec2ForCTC(tiny_config("wav2vec2", layerdrop=0.0))


@pytest.mark.parametrize("units", ["tensors", "lora"])
def test_t5s_position_bias_under_checkpointing_forces_no_backprop(units, caplog):
    """Checkpointed T5 attention makes the zero position bias of its layers without a relative bias require grad;
    shared by every layer, it drew each step into every decoder layer's cross-attention (0.560 of full fine-tuning at
    rho 0.55, tensors). Its flag is cleared with the other forced input gradients: steps keep rho."""
    config = transformers.T5Config(
        vocab_size=64, d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16, decoder_start_token_id=0
    )
    base = transformers.T5ForConditionalGeneration(config)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    rho = 0.55 if units == "tensors" else 0.6
    lora = {"r": 4, "target_modules": ["q", "v"]} if units == "lora" else {}
    model = get_peft_model(base, GreenTrainerConfig(rho=rho, units=units, **lora))
    model.train()
    generator = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(1, 64, (2, 16), generator=generator)}
    batch["labels"] = torch.randint(1, 64, (2, 8), generator=generator)
    model.base_model.select_units([batch], torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]))
    model(**batch).loss.backward()
    ratio = sum(measure_flops(model, batch)) / full_fine_tuning_flops(model, batch)
    assert ratio <= model.base_model.step_flops_ratios()[0] <= rho
    assert "requires grad but is no parameter" not in caplog.text


@pytest.mark.parametrize("units", ["tensors", "lora"])
def test_an_audio_feature_encoder_backpropagates_no_deeper_than_the_selection(units):
    """transformers' wav2vec2-family feature encoders (HuBERT, WavLM, SEW, ...) set ``requires_grad`` on their input
    in training, for reentrant checkpointing: left on, every step backpropagated through the whole encoder to the
    waveform, unpriced (0.81 of full fine-tuning at rho 0.5, predicted 0.44). The encoder stays trainable."""
    rho = 0.5
    targets = r".*(q_proj|v_proj|conv_layers\.\d+\.conv)"  # the encoder's convolutions too
    lora = {"target_modules": targets, "r": 4} if units == "lora" else {}
    model = get_peft_model(_wav2vec2_for_ctc(), GreenTrainerConfig(rho=rho, units=units, **lora))
    tuner = model.base_model
    batch = {"input_values": torch.randn(2, 1600), "labels": torch.randint(1, 32, (2, 6))}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    tuner.select_units([batch], optimizer)
    assert any("feature_extractor" in unit.name for unit in tuner.candidate_units())  # still selectable units
    for _ in range(2):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
        predicted, _ = tuner.step_flops_ratios()
        ratio = sum(measure_flops(model, batch)) / full_fine_tuning_flops(model, batch)
        assert ratio == pytest.approx(predicted, rel=1e-9)
        assert ratio <= rho
