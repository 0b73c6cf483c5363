"""Model families and task heads beyond the other tests' four (catalogue: ``benchmarks/families.py``): one selection
each, with both unit kinds, then the next training step's FLOPs measured by FlopCounterMode against full fine-tuning
measured the same way, and the saved adapter loaded back."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model

from benchmarks.families import CASES, collate, example, full_fine_tuning_flops
from peft_greentrainer.engine.profile import measure_flops

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
    assert len(tuner._shape_costs) == 1  # that step found the shape its selection priced (no profile inside it)

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
