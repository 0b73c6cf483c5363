"""``greentrainer profile`` (``cli/planning.py``): plans from a config alone, on ``meta``, as training prices steps."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from conftest import tiny_config
from peft import get_peft_model

from peft_greentrainer import GreenTrainerConfig
from peft_greentrainer.cli.main import main
from peft_greentrainer.cli.planning import build_on_meta, plan
from peft_greentrainer.engine.profile import dummy_batch, profile_model

_SEQ2SEQ = {"d_model": 32, "encoder_layers": 1, "decoder_layers": 1, "vocab_size": 64, "pad_token_id": 1}
_SEQ2SEQ |= {"encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "encoder_attention_heads": 2, "decoder_attention_heads": 2}
_SEQ2SEQ |= {"decoder_start_token_id": 2, "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0}


@pytest.mark.parametrize(
    "config_class", [transformers.BartConfig, transformers.MarianConfig, transformers.PegasusConfig]
)
def test_a_decoder_that_builds_its_own_mask_is_planned_and_counted_as_on_the_cpu(config_class, tmp_path, capsys):
    """BART's decoder builds a mask of ones and asks whether it is all ones, which meta tensors cannot answer: every
    BART-family config ended ``greentrainer profile`` in a traceback. The meta profile now counts what the CPU does."""
    config = config_class(**_SEQ2SEQ)
    config.save_pretrained(tmp_path / "model")
    assert main(["profile", "--model", str(tmp_path / "model"), "--seq-len", "16", "--target-len", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["full_flops"] > 0
    meta = build_on_meta(tmp_path / "model")
    batch = dummy_batch(meta.config, 2, 16, target_len=8)
    torch.manual_seed(0)
    cpu = transformers.AutoModelForSeq2SeqLM.from_config(config).train()
    on_meta = profile_model(meta, batch)
    on_cpu = profile_model(cpu, {k: torch.randint(3, 64, v.shape) for k, v in batch.items()})
    assert (on_meta.forward_flops, on_meta.full_backward_flops) == (on_cpu.forward_flops, on_cpu.full_backward_flops)
    assert on_meta.t_dw == on_cpu.t_dw


def test_a_config_missing_a_setting_its_model_reads_is_one_clear_line(tmp_path, capsys):
    transformers.T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16, vocab_size=64).save_pretrained(
        tmp_path / "t5"
    )
    assert main(["profile", "--model", str(tmp_path / "t5"), "--seq-len", "16"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "decoder_start_token_id" in err and "config.json" in err


@pytest.mark.parametrize("units", ["tensors", "lora"])
def test_no_row_below_the_printed_floor_is_planned_and_every_plan_trains_within_its_rho(units, tmp_path):
    """A plan's rows were priced on the batch's exact label count while its floor (and training) price a step at its
    label bucket's ends: rows just below the floor showed selections and savings that training refuses. Rows now
    select under training's prices: none below the floor, and each row's selection is one training accepts."""
    config = tiny_config("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, vocab_size=250)
    config.save_pretrained(tmp_path / "model")
    shape = {"batch_size": 2, "seq_len": 21, "label_tokens": 4}
    floor = plan(tmp_path / "model", units=units, **shape)["min_rho"]
    rhos = [floor * (1 - 1e-3), floor * (1 + 1e-3), 0.5 * (floor + 1), 0.95]
    result = plan(tmp_path / "model", units=units, rhos=rhos, **shape)
    rows = result["rhos"]
    assert rows[0]["predicted_flops"] is None and rows[0]["reachable_share"] == 0
    ids = torch.randint(3, 250, (2, 21), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone()}
    batch["labels"][:, :17] = -100  # the last 4 positions supervised, as the plan's labels
    for row in rows[1:]:
        assert row["predicted_flops"] is not None and row["units_selected"] >= 1
        assert row["predicted_flops"] <= row["rho"] * result["full_flops_same_head"] * (1 + 1e-9)
        model = get_peft_model(
            transformers.AutoModelForCausalLM.from_config(config), GreenTrainerConfig(rho=row["rho"], units=units)
        )
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        assert model.base_model.select_units([batch], optimizer).mask.any()  # training accepts this rho too
