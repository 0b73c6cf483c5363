"""CUDA paths: run by ``pytest -m gpu`` (``benchmarks/gpu_check.py`` does) and skipped where there is no GPU."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import tiny_batch, tiny_model
from peft import get_peft_model
from peft.utils import get_peft_model_state_dict

from peft_greentrainer import GreenTrainerCallback, GreenTrainerConfig
from peft_greentrainer.engine.profile import measure_flops, profile_model
from peft_greentrainer.engine.units import tensor_units

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)"),
]
CUDA = torch.device("cuda")


def _cuda_model(arch: str = "llama", **overrides) -> torch.nn.Module:
    return tiny_model(arch, attn_implementation="sdpa", **overrides).to(CUDA)


def _cuda_batch(model, **kwargs) -> dict:
    return {k: v.to(CUDA) for k, v in tiny_batch(model, **kwargs).items()}


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_predicted_flops_match_measured_on_cuda_in_bf16(arch):
    """The profile of a CUDA bf16-autocast step predicts FlopCounterMode's count within 2% for several selections."""
    model = _cuda_model(arch)
    batch = _cuda_batch(model, batch_size=2, seq_len=64)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        costs = profile_model(model, batch).unit_costs(tensor_units(model))
        units = costs.units  # backward order: the first ones are nearest the loss
        rng = np.random.default_rng(0)
        masks = {
            "nearest third": np.arange(len(units)) < len(units) // 3,
            "random 30%": rng.random(len(units)) < 0.3,
            "all": np.ones(len(units), bool),
        }
        for name, mask in masks.items():
            trainable = [n for u, keep in zip(units, mask, strict=True) if keep for n in u.param_names]
            forward, backward = measure_flops(model, batch, trainable=trainable)
            assert forward == pytest.approx(costs.forward_flops, rel=0.02), name
            assert costs.predicted_backward(mask) == pytest.approx(backward, rel=0.02), name


def test_profile_and_importance_leave_cuda_rng_untouched():
    """Dropout in the extra forward passes must not shift the training's CUDA random stream."""
    base = _cuda_model("opt", dropout=0.1)
    model = get_peft_model(base, GreenTrainerConfig(rho=0.5, units="tensors"))
    model.train()
    batch = _cuda_batch(base)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    before = torch.cuda.get_rng_state()
    profile_model(base, batch)
    model.select_units([batch], optimizer)
    assert torch.equal(torch.cuda.get_rng_state(), before)


def test_trainer_in_bf16_on_cuda(tmp_path):
    from transformers import Trainer, TrainingArguments

    base = _cuda_model("llama")
    ids = torch.randint(3, 128, (32, 32), generator=torch.Generator().manual_seed(0))
    dataset = [{"input_ids": row, "labels": row} for row in ids]  # no `datasets` needed on the GPU machine
    model = get_peft_model(base, GreenTrainerConfig(rho=0.5, units="tensors"))
    args = TrainingArguments(
        output_dir=str(tmp_path),
        num_train_epochs=2,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        bf16=True,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[GreenTrainerCallback()])
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0]
    assert len(model.greentrainer_state.history) == 2
    assert all(record.predicted_ratio <= 0.5 for record in model.greentrainer_state.history)


def test_a_saved_adapter_of_trained_tensors_is_copied_to_the_cpu(tmp_path):
    """Saving copies the trained tensors to the CPU, where they are written from, not into more GPU memory."""
    model = get_peft_model(_cuda_model(), GreenTrainerConfig(rho=0.7, units="tensors"))
    batch = _cuda_batch(model.base_model.model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.base_model.select_units([batch], optimizer)
    state = get_peft_model_state_dict(model)
    assert state and all(v.device.type == "cpu" for v in state.values())
    model.save_pretrained(tmp_path)


def test_a_selection_made_in_float32_holds_at_steps_under_bf16_autocast():
    """CUDA picks SDPA's kernel by dtype (math for grouped-query heads in float32, flash in bf16, whose backward costs
    differ): a plain loop that selects outside autocast and steps under it is checked again at the step's kernels
    (emulated on the CPU in ``test_flops.py``; here the real dispatch)."""
    base = _cuda_model("llama")
    model = get_peft_model(base, GreenTrainerConfig(rho=0.5, units="tensors", sparse_lm_head=False))
    tuner = model.base_model
    batch = _cuda_batch(base, batch_size=2, seq_len=128)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    tuner.select_units([batch], optimizer)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(**batch).loss.backward()
        optimizer.zero_grad()
        with tuner.measuring():
            step = sum(measure_flops(base, batch))
            full = sum(measure_flops(base, batch, [n for n, _ in base.named_parameters()]))
    assert step <= 0.5 * full


@pytest.mark.parametrize(
    ("kind", "bits"), [("AdamW", 8), ("AdamW", 32), ("Lion", 8), ("Lion", 32), ("RMSprop", 8), ("AdEMAMix", 8)]
)
def test_bitsandbytes_cuda_kernels_step_as_the_mirror_predicts(kind, bits):
    """The mirrors follow bitsandbytes' CPU kernels (``engine/bnb_update.py``); its CUDA kernels must step alike,
    weight decay included (decoupled for Adam, AdEMAMix and Lion, folded into the gradient for RMSprop)."""
    bnb = pytest.importorskip("bitsandbytes")
    from peft_greentrainer.engine.optimizer_update import optimizer_update

    bnb.optim.GlobalOptimManager.get_instance().initialize()  # no override of an earlier test's (reused) tensor ids
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(64, 128, device=CUDA))
    optimizer = getattr(bnb.optim, kind)([param], lr=1e-2, weight_decay=0.1, optim_bits=bits)
    for _ in range(2):
        param.grad = torch.randn_like(param)
        optimizer.step()
    grad = torch.randn_like(param)
    mirrored = optimizer_update(param, grad, optimizer)
    before = param.detach().clone()
    param.grad = grad
    optimizer.step()
    real = param.detach() - before
    assert float((mirrored - real).abs().max()) <= 1e-5 * float(real.abs().max()) + 4e-7 * float(before.abs().max())
