"""Tests for peft_greentrainer.engine.importance: exact optimizer updates, importance values, no side effects."""

from __future__ import annotations

import copy
import logging
import math

import numpy as np
import peft
import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from peft_greentrainer.engine.importance import compute_importance
from peft_greentrainer.engine.optimizer_update import base_learning_rates, optimizer_update, plain_gradient_step
from peft_greentrainer.engine.units import Unit, lora_units, tensor_units

VOCAB = 64


def tiny_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
    )
    return transformers.LlamaForCausalLM(config)


def tiny_opt(seed: int = 0, dropout: float = 0.0) -> transformers.OPTForCausalLM:
    torch.manual_seed(seed)
    config = transformers.OPTConfig(
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=VOCAB,
        word_embed_proj_dim=32,
        max_position_embeddings=64,
        dropout=dropout,
        attention_dropout=dropout,
        tie_word_embeddings=True,
    )
    return transformers.OPTForCausalLM(config)


def make_batches(n: int = 2, seed: int = 1, batch_size: int = 2, seq_len: int = 8) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (batch_size, seq_len), generator=gen)
        batches.append({"input_ids": ids, "labels": ids})
    return batches


def train_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int = 7) -> None:
    for batch in make_batches(steps, seed=seed):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    optimizer.zero_grad()


def mean_grads(model: torch.nn.Module, params: list[torch.Tensor], batches) -> list[torch.Tensor]:
    """Reference gradients: plain autograd on the unmodified model, averaged over batches."""
    sums = [torch.zeros_like(p) for p in params]
    for batch in batches:
        grads = torch.autograd.grad(model(**batch).loss, params, allow_unused=True)
        for acc, g in zip(sums, grads, strict=True):
            if g is not None:
                acc += g
    return [s / len(batches) for s in sums]


def two_groups(model: torch.nn.Module) -> list[dict]:
    """Matrices at the optimizer default lr; vectors (norms) in a second group with their own lr and no decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2]},
        {"params": [p for p in params if p.ndim < 2], "lr": 3e-3, "weight_decay": 0.0},
    ]


OPTIMIZERS = {
    "adamw": lambda groups: torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1),
    "adamw_amsgrad_maximize": lambda groups: torch.optim.AdamW(groups, lr=1e-2, amsgrad=True, maximize=True),
    "adam_l2": lambda groups: torch.optim.Adam(groups, lr=1e-2, weight_decay=0.1),
    "adam_amsgrad_tensor_lr": lambda groups: torch.optim.Adam(
        groups, lr=torch.tensor(1e-2), betas=(0.5, 0.9), amsgrad=True, foreach=False
    ),
    "sgd_nesterov": lambda groups: torch.optim.SGD(groups, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    "sgd_dampening_maximize": lambda groups: torch.optim.SGD(
        groups, lr=0.1, momentum=0.9, dampening=0.3, maximize=True
    ),
    "sgd_plain": lambda groups: torch.optim.SGD(groups, lr=0.1),
    "rmsprop": lambda groups: torch.optim.RMSprop(groups, lr=1e-2),  # optim="rmsprop"
    "rmsprop_centered_momentum_decay_maximize": lambda groups: torch.optim.RMSprop(
        groups, lr=1e-2, alpha=0.9, momentum=0.5, centered=True, weight_decay=0.1, maximize=True
    ),
    "adagrad": lambda groups: torch.optim.Adagrad(groups, lr=0.1),  # optim="adagrad"
    "adagrad_lr_decay_accumulator_maximize": lambda groups: torch.optim.Adagrad(
        groups, lr=0.1, lr_decay=0.01, weight_decay=0.1, initial_accumulator_value=0.5, maximize=True
    ),
}
if hasattr(torch.optim, "Muon"):  # torch >= 2.9: 2-D tensors only (a LoRA adapter's A and B, a model's matrices)
    MATRIX_OPTIMIZERS = {
        "muon": lambda params: torch.optim.Muon(params, lr=1e-2),
        "muon_plain_momentum_adamw_rms": lambda params: torch.optim.Muon(
            params, lr=1e-2, weight_decay=0.0, nesterov=False, adjust_lr_fn="match_rms_adamw"
        ),
    }
else:
    MATRIX_OPTIMIZERS = {}


def real_step_change(model, optimizer, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Parameter change of a real optimizer.step() on a deep copy of (model, optimizer) with .grad set."""
    model_copy, opt_copy = copy.deepcopy((model, optimizer))
    params = dict(model_copy.named_parameters())
    for name, g in grads.items():
        params[name].grad = g.clone()
    before = {name: p.detach().clone() for name, p in params.items()}
    opt_copy.step()
    return {name: params[name].detach() - before[name] for name in grads}


# ---------------------------------------------------------------------------------------------------------------
# optimizer_update exactness
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [0, 2])
@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_optimizer_update_matches_real_step(kind: str, steps: int) -> None:
    model = tiny_llama().double()  # float64: the real step's parameter difference is then exact enough for rtol 1e-5
    optimizer = OPTIMIZERS[kind](two_groups(model))
    train_steps(model, optimizer, steps)
    # Adagrad makes its state (the accumulator, at initial_accumulator_value) when built; the others at their first step
    assert (len(optimizer.state) > 0) == ((steps > 0 and kind != "sgd_plain") or kind.startswith("adagrad"))

    named = dict(model.named_parameters())
    grads = dict(zip(named, mean_grads(model, list(named.values()), make_batches(1, seed=3)), strict=True))
    expected = real_step_change(model, optimizer, grads)
    for name, param in named.items():
        delta = optimizer_update(param, grads[name], optimizer)
        assert delta.dtype == torch.float64 and delta.shape == param.shape
        torch.testing.assert_close(delta, expected[name], rtol=1e-5, atol=1e-12, msg=name)


@pytest.mark.parametrize("steps", [0, 2])
@pytest.mark.parametrize("kind", sorted(MATRIX_OPTIMIZERS))
def test_matrix_optimizer_update_matches_real_step(kind: str, steps: int) -> None:
    model = tiny_llama().double()
    matrices = [p for p in model.parameters() if p.ndim == 2]
    for p in model.parameters():
        p.requires_grad_(p.ndim == 2)
    optimizer = MATRIX_OPTIMIZERS[kind](matrices)
    train_steps(model, optimizer, steps)
    named = {n: p for n, p in model.named_parameters() if p.ndim == 2}
    grads = dict(zip(named, mean_grads(model, list(named.values()), make_batches(1, seed=3)), strict=True))
    expected = real_step_change(model, optimizer, grads)
    for name, param in named.items():
        delta = optimizer_update(param, grads[name], optimizer)
        torch.testing.assert_close(delta, expected[name], rtol=1e-5, atol=1e-12, msg=name)


def test_optimizer_update_float32_model_adamw() -> None:
    model = tiny_llama()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    train_steps(model, optimizer, 2)
    named = dict(model.named_parameters())
    grads = dict(zip(named, mean_grads(model, list(named.values()), make_batches(1, seed=3)), strict=True))
    expected = real_step_change(model, optimizer, grads)
    for name, param in named.items():
        delta = optimizer_update(param, grads[name], optimizer)
        # The real change w_new - w_old carries float32 rounding of |w|: allow a few ulps of the weights.
        atol = 4 * torch.finfo(torch.float32).eps * param.detach().abs().max().item()
        torch.testing.assert_close(delta, expected[name], rtol=1e-5, atol=atol, msg=name)


@settings(max_examples=40, deadline=None)
@given(
    adamw=st.booleans(),
    amsgrad=st.booleans(),
    maximize=st.booleans(),
    weight_decay=st.sampled_from([0.0, 0.01, 0.3]),
    beta1=st.sampled_from([0.0, 0.3, 0.9]),
    beta2=st.sampled_from([0.5, 0.999]),
    steps=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_adam_update_property(adamw, amsgrad, maximize, weight_decay, beta1, beta2, steps, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    param = torch.nn.Parameter(torch.randn(5, 3, generator=gen, dtype=torch.float64))
    cls = torch.optim.AdamW if adamw else torch.optim.Adam
    opt = cls([param], lr=0.05, betas=(beta1, beta2), weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)
    _assert_mirrored_after(opt, param, steps, gen)


def _assert_mirrored_after(opt: torch.optim.Optimizer, param: torch.Tensor, steps: int, gen: torch.Generator) -> None:
    """After ``steps`` steps on random gradients, the mirrored update of the next one is the real step's."""
    for _ in range(steps):
        param.grad = torch.randn(param.shape, generator=gen, dtype=param.dtype)
        opt.step()
    g = torch.randn(param.shape, generator=gen, dtype=param.dtype)
    delta = optimizer_update(param, g, opt)
    before = param.detach().clone()
    param.grad = g
    opt.step()
    torch.testing.assert_close(delta, param.detach() - before, rtol=1e-5, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(["rmsprop", "adagrad"]),
    maximize=st.booleans(),
    weight_decay=st.sampled_from([0.0, 0.01, 0.3]),
    centered=st.booleans(),
    momentum=st.sampled_from([0.0, 0.5]),
    decay=st.sampled_from([0.0, 0.1]),
    steps=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_rmsprop_and_adagrad_update_property(kind, maximize, weight_decay, centered, momentum, decay, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    param = torch.nn.Parameter(torch.randn(5, 3, generator=gen, dtype=torch.float64))
    common = {"lr": 0.05, "weight_decay": weight_decay, "maximize": maximize}
    if kind == "rmsprop":
        opt = torch.optim.RMSprop([param], alpha=0.9, centered=centered, momentum=momentum, **common)
    else:
        opt = torch.optim.Adagrad([param], lr_decay=decay, initial_accumulator_value=momentum, **common)
    _assert_mirrored_after(opt, param, steps, gen)


def test_optimizer_update_leaves_optimizer_untouched() -> None:
    param = torch.nn.Parameter(torch.randn(4))
    opt = torch.optim.AdamW([param])
    optimizer_update(param, torch.randn(4), opt)  # empty state: must not insert an entry into the defaultdict
    assert len(opt.state) == 0
    param.grad = torch.randn(4)
    opt.step()
    state = {k: v.clone() for k, v in opt.state[param].items()}
    optimizer_update(param, torch.randn(4), opt)
    for key, value in state.items():
        assert torch.equal(opt.state[param][key], value)


def test_optimizer_update_fallbacks(caplog: pytest.LogCaptureFixture) -> None:
    param, stranger = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    g = torch.randn(3)
    with pytest.raises(ValueError, match="lr"):
        optimizer_update(param, g, None)
    torch.testing.assert_close(optimizer_update(param, g, None, lr=0.5), -0.5 * g)
    torch.testing.assert_close(optimizer_update(param, g, None, lr=torch.tensor(0.5)), -0.5 * g)

    opt = torch.optim.AdamW([param], lr=0.2)
    with caplog.at_level(logging.WARNING, logger="peft_greentrainer.engine.importance"):
        torch.testing.assert_close(optimizer_update(stranger, g, opt), -0.2 * g)  # first group's lr
        torch.testing.assert_close(optimizer_update(stranger, g, opt, lr=0.5), -0.5 * g)
    assert caplog.records

    caplog.clear()
    adamax = torch.optim.Adamax([param], lr=0.3)
    with caplog.at_level(logging.WARNING, logger="peft_greentrainer.engine.optimizer_update"):
        torch.testing.assert_close(optimizer_update(param, g, adamax), -0.3 * g)
    assert len(caplog.records) == 1 and "Adamax" in caplog.records[0].getMessage()


@pytest.mark.parametrize("kind", ["adamw", "sgd_nesterov", "rmsprop_centered_momentum_decay_maximize", "adagrad"])
def test_a_complex_parameter_is_mirrored_from_its_complex_state(kind: str) -> None:
    """Complex state read for the real work dtype lost its imaginary part: a shape error once any state existed
    (at once for Adagrad, which makes its state when built)."""
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(3, 4, dtype=torch.complex128))
    optimizer = OPTIMIZERS[kind]([param])
    for _ in range(2):
        param.grad = torch.randn(3, 4, dtype=torch.complex128)
        optimizer.step()
    grad = torch.randn(3, 4, dtype=torch.complex128)
    mirrored = optimizer_update(param, grad, optimizer)
    before = param.detach().clone()
    param.grad = grad.clone()
    optimizer.step()
    torch.testing.assert_close(mirrored, param.detach() - before, rtol=1e-9, atol=1e-12)


def test_optimizer_update_upcasts_half_precision() -> None:
    param = torch.nn.Parameter(torch.randn(8).to(torch.bfloat16))
    opt = torch.optim.AdamW([param], lr=1e-3)
    delta = optimizer_update(param, torch.full((8,), 1e-30).to(torch.bfloat16), opt)
    assert delta.dtype == torch.float32 and torch.isfinite(delta).all()


def test_optimizer_update_unwraps_wrapper() -> None:
    """Wrappers exposing the real optimizer as ``.optimizer`` (accelerate's AcceleratedOptimizer) are unwrapped."""

    class Wrapper(torch.optim.Optimizer):
        def __init__(self, inner: torch.optim.Optimizer) -> None:
            self.optimizer = inner

        @property
        def param_groups(self):
            return self.optimizer.param_groups

        @property
        def state(self):
            return self.optimizer.state

    param = torch.nn.Parameter(torch.randn(6, dtype=torch.float64))
    opt = torch.optim.AdamW([param], lr=0.1)
    g = torch.randn(6, dtype=torch.float64)
    torch.testing.assert_close(optimizer_update(param, g, Wrapper(opt)), optimizer_update(param, g, opt))
    assert not torch.allclose(optimizer_update(param, g, opt), -0.1 * g)


# ---------------------------------------------------------------------------------------------------------------
# Optimizers of real recipes: bitsandbytes 8-bit / paged Adam, Adafactor, subclasses, warmup (lr 0 at step 0)
# ---------------------------------------------------------------------------------------------------------------


def small_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    """Matrices of 4096 elements: the smallest that bitsandbytes keeps in 8 bits at its default min_8bit_size."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
    )
    return transformers.LlamaForCausalLM(config)


def mirrored_then_real(model, optimizer, group_lrs=None, step_lrs=None) -> tuple[dict, dict]:
    """Mirrored updates for fresh gradients, then the real ``optimizer.step()`` (at ``step_lrs`` if given, one per
    param group) on the same state, in place.

    Mirroring first and stepping afterwards needs no copy of the optimizer (bitsandbytes optimizers cannot be
    deep-copied) and also catches a mirror that writes into the optimizer state: the real step would then differ.
    """
    named = dict(model.named_parameters())
    grads = dict(zip(named, mean_grads(model, list(named.values()), make_batches(1, seed=3)), strict=True))
    mirrored = {name: optimizer_update(p, grads[name], optimizer, group_lrs=group_lrs) for name, p in named.items()}
    before = {name: p.detach().clone() for name, p in named.items()}
    for name, p in named.items():
        p.grad = grads[name].clone()
    for group, step_lr in zip(optimizer.param_groups, step_lrs or [], strict=False):
        group["lr"] = step_lr
    optimizer.step()
    real = {name: p.detach() - before[name] for name, p in named.items()}
    optimizer.zero_grad()
    return mirrored, real


def assert_float32_step_close(model, mirrored: dict, real: dict) -> None:
    """Equal up to the float32 rounding the real ``w_new - w_old`` carries: at most 2 ulps of the largest |w|."""
    for name, param in model.named_parameters():
        atol = 2 * torch.finfo(torch.float32).eps * param.detach().abs().max().item()
        torch.testing.assert_close(mirrored[name], real[name], rtol=0.0, atol=atol, msg=name)


BNB_OPTIMIZERS = {
    # what transformers builds for optim="adamw_bnb_8bit" / "paged_adamw_8bit" / "paged_adamw_32bit"
    "adamw_bnb_8bit": lambda bnb, groups: bnb.optim.AdamW(groups, lr=1e-2, weight_decay=0.1, optim_bits=8),
    "paged_adamw_8bit": lambda bnb, groups: bnb.optim.AdamW(groups, lr=1e-2, optim_bits=8, is_paged=True),
    "paged_adamw_32bit": lambda bnb, groups: bnb.optim.AdamW(groups, lr=1e-2, optim_bits=32, is_paged=True),
    "AdamW8bit": lambda bnb, groups: bnb.optim.AdamW8bit(groups, lr=1e-2, betas=(0.5, 0.9), weight_decay=0.1),
    "PagedAdamW8bit": lambda bnb, groups: bnb.optim.PagedAdamW8bit(groups, lr=1e-2),
    "PagedAdamW32bit": lambda bnb, groups: bnb.optim.PagedAdamW32bit(groups, lr=1e-2, weight_decay=0.05),
    "AdamW32bit": lambda bnb, groups: bnb.optim.AdamW32bit(groups, lr=1e-2),
    "Adam8bit_decay": lambda bnb, groups: bnb.optim.Adam8bit(groups, lr=1e-2, weight_decay=0.1),
    # optim="lion_8bit" / "paged_lion_32bit"
    "lion_8bit": lambda bnb, groups: bnb.optim.Lion(groups, lr=1e-3, weight_decay=0.1, optim_bits=8),
    "paged_lion_32bit": lambda bnb, groups: bnb.optim.Lion(groups, lr=1e-3, optim_bits=32, is_paged=True),
    "Lion8bit_betas": lambda bnb, groups: bnb.optim.Lion8bit(groups, lr=1e-3, betas=(0.5, 0.9)),
    # optim="ademamix_8bit" / "paged_ademamix_32bit", and alpha / beta3 warmed up over a few steps
    "ademamix_8bit": lambda bnb, groups: bnb.optim.AdEMAMix(groups, lr=1e-2, optim_bits=8, weight_decay=0.1),
    "paged_ademamix_32bit": lambda bnb, groups: bnb.optim.AdEMAMix(groups, lr=1e-2, optim_bits=32, is_paged=True),
    "AdEMAMix8bit_schedules": lambda bnb, groups: bnb.optim.AdEMAMix8bit(groups, lr=1e-2, t_alpha=5, t_beta3=5),
    "ademamix_32bit_schedules": lambda bnb, groups: bnb.optim.AdEMAMix(groups, lr=1e-2, optim_bits=32, t_alpha=3),
    # optim="rmsprop_bnb_8bit" / "rmsprop_bnb_32bit"
    "rmsprop_bnb_8bit": lambda bnb, groups: bnb.optim.RMSprop(groups, lr=1e-2, optim_bits=8, weight_decay=0.1),
    "rmsprop_bnb_32bit": lambda bnb, groups: bnb.optim.RMSprop(groups, lr=1e-2, alpha=0.9, optim_bits=32),
    "Adagrad8bit": lambda bnb, groups: bnb.optim.Adagrad8bit(groups, lr=1e-2, weight_decay=0.1),
    "Adagrad32bit": lambda bnb, groups: bnb.optim.Adagrad32bit(groups, lr=1e-2),
    "SGD8bit_momentum": lambda bnb, groups: bnb.optim.SGD8bit(groups, lr=1e-2, momentum=0.9, weight_decay=0.1),
    "SGD32bit_momentum": lambda bnb, groups: bnb.optim.SGD32bit(groups, lr=1e-2, momentum=0.5),
}


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
@pytest.mark.parametrize("steps", [0, 2])
@pytest.mark.parametrize("kind", sorted(BNB_OPTIMIZERS))
def test_bitsandbytes_update_matches_real_step(kind: str, steps: int, caplog: pytest.LogCaptureFixture) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    model = small_llama()
    optimizer = BNB_OPTIMIZERS[kind](bnb, two_groups(model))
    train_steps(model, optimizer, steps)
    if steps:
        dtypes = {s["state1"].dtype for s in optimizer.state.values()}
        # 8-bit kinds keep the 4096-element matrices in 8 bits and the norm vectors in 32 bits: both layouts checked
        assert dtypes == ({torch.uint8, torch.float32} if "8bit" in kind else {torch.float32})
    with caplog.at_level(logging.WARNING, logger="peft_greentrainer.engine.importance"):
        mirrored, real = mirrored_then_real(model, optimizer)
    assert not caplog.records  # mirrored, not approximated
    # The moments are dequantised as the step itself reads them, so 8-bit state is as exact as 32-bit.
    assert_float32_step_close(model, mirrored, real)
    if steps:  # Adam's normalised step, not the -lr * grad fallback
        up = dict(model.named_parameters())["model.layers.0.mlp.up_proj.weight"]
        grad = mean_grads(model, [up], make_batches(1, seed=3))[0]
        assert not torch.allclose(mirrored["model.layers.0.mlp.up_proj.weight"], -1e-2 * grad, rtol=0.5)


ADAFACTOR_CONFIGS = {
    # what transformers builds for optim="adafactor"
    "trainer_adafactor": {"lr": 1e-2, "scale_parameter": False, "relative_step": False},
    "relative_step": {},
    "warmup_init": {"warmup_init": True},
    "first_moment_decay_clip": {"beta1": 0.9, "weight_decay": 0.1, "clip_threshold": 0.5},
    "scaled_fixed_lr": {"lr": 1e-2, "relative_step": False, "scale_parameter": True, "beta1": 0.5},
}


@pytest.mark.parametrize("steps", [0, 2])
@pytest.mark.parametrize("kind", sorted(ADAFACTOR_CONFIGS))
def test_adafactor_update_matches_real_step(kind: str, steps: int, caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_llama().double()  # float64 throughout: Adafactor then steps in float64 too
    optimizer = transformers.optimization.Adafactor(model.parameters(), **ADAFACTOR_CONFIGS[kind])
    train_steps(model, optimizer, steps)
    with caplog.at_level(logging.WARNING, logger="peft_greentrainer.engine.importance"):
        mirrored, real = mirrored_then_real(model, optimizer)
    assert not caplog.records
    assert {p.ndim for p in model.parameters()} == {1, 2}  # both the full and the factored second moment
    for name, param in model.named_parameters():
        atol = 4 * torch.finfo(torch.float64).eps * param.detach().abs().max().item()
        torch.testing.assert_close(mirrored[name], real[name], rtol=1e-9, atol=atol, msg=name)


def test_torch_optimizer_subclasses_are_mirrored(caplog: pytest.LogCaptureFixture) -> None:
    class LoggingAdamW(torch.optim.AdamW):
        """A subclass that keeps the update rule, as most do."""

    class TrackedSGD(torch.optim.SGD):
        pass

    for make in (
        lambda params: LoggingAdamW(params, lr=1e-2, weight_decay=0.1),
        lambda params: TrackedSGD(params, lr=0.1, momentum=0.9),
    ):
        model = tiny_llama().double()
        optimizer = make(model.parameters())
        train_steps(model, optimizer, 2)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="peft_greentrainer.engine.importance"):
            mirrored, real = mirrored_then_real(model, optimizer)
        assert not caplog.records
        for name in mirrored:
            torch.testing.assert_close(mirrored[name], real[name], rtol=1e-5, atol=1e-12, msg=name)


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
@pytest.mark.parametrize(
    "optim",
    [
        "adamw_torch",
        "adamw_bnb_8bit",
        "paged_adamw_8bit",
        "paged_adamw_32bit",
        "adafactor",
        "lion_8bit",
        "paged_lion_32bit",
        "paged_ademamix_8bit",
        "ademamix",
        "rmsprop_bnb_8bit",
        "rmsprop",
        "adagrad",
    ],
)
def test_trainer_optimizers_under_warmup(optim: str, tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    """The optimizers ``TrainingArguments(optim=...)`` builds, at step 0 of a warmup schedule (their lr is 0 there).

    The current lr predicts no update, so every importance is 0 and one warning says what to pass; with
    ``group_lrs=base_learning_rates(optimizer)`` the update is mirrored at the schedule's base lr, exactly as a real
    step at that lr moves the weights.
    """
    if "bnb" in optim or "paged" in optim or "lion" in optim or "ademamix" in optim:
        pytest.importorskip("bitsandbytes")
    model = small_llama()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        optim=optim,
        learning_rate=1e-2,
        warmup_steps=4,
        weight_decay=0.1,
        report_to=[],
        use_cpu=True,
    )
    trainer = transformers.Trainer(model=model, args=args)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    optimizer = trainer.optimizer
    assert all(group["lr"] == 0 for group in optimizer.param_groups)  # step 0 of the warmup
    assert base_learning_rates(optimizer) == [1e-2] * len(optimizer.param_groups)
    units = tensor_units(model)

    with caplog.at_level(logging.WARNING, logger="peft_greentrainer.engine.importance"):
        at_current_lr = compute_importance(model, units, make_batches(1), optimizer)
    records = [r for r in caplog.records if r.name == "peft_greentrainer.engine.importance"]
    assert len(records) == 1 and "lr 0" in records[0].getMessage() and "group_lrs" in records[0].getMessage()
    assert (at_current_lr == 0).all()

    caplog.clear()
    base = base_learning_rates(optimizer)
    with caplog.at_level(logging.WARNING, logger="peft_greentrainer.engine.importance"):
        at_base_lr = compute_importance(model, units, make_batches(1), optimizer, group_lrs=base)
    assert not caplog.records  # mirrored: no approximation, no zero lr
    assert np.isfinite(at_base_lr).all() and (at_base_lr > 0).sum() > len(units) // 2

    mirrored, real = mirrored_then_real(model, optimizer, group_lrs=base, step_lrs=base)
    assert_float32_step_close(model, mirrored, real)
    assert any(bool(delta.abs().max() > 0) for delta in real.values())


def test_group_lrs_validation() -> None:
    param = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    opt = torch.optim.SGD([{"params": [param]}, {"params": [torch.nn.Parameter(torch.randn(2))], "lr": 0.5}], lr=0.1)
    g = torch.randn(3, dtype=torch.float64)
    torch.testing.assert_close(optimizer_update(param, g, opt, group_lrs=[0.3, None]), -0.3 * g)
    torch.testing.assert_close(optimizer_update(param, g, opt, group_lrs=[None, 0.3]), -0.1 * g)  # None: own lr
    torch.testing.assert_close(optimizer_update(param, g, opt, group_lrs=[torch.tensor(0.2), 1.0]), -0.2 * g)
    for bad, match in (([0.1], "2 param groups"), ([0.1, -1.0], r"group_lrs\[1\]"), ([math.nan, 0.1], "finite")):
        with pytest.raises(ValueError, match=match):
            optimizer_update(param, g, opt, group_lrs=bad)
    with pytest.raises(ValueError, match="optimizer"):
        optimizer_update(param, g, None, lr=0.1, group_lrs=[0.1])
    with pytest.raises(TypeError, match=r"group_lrs\[0\]"):
        optimizer_update(param, g, opt, group_lrs=["0.1", None])


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
@pytest.mark.parametrize("kind", ["paged_adamw_8bit", "adafactor"])
def test_no_side_effects_bitsandbytes_and_adafactor(kind: str) -> None:
    model = small_llama()
    if kind == "adafactor":
        optimizer = transformers.optimization.Adafactor(model.parameters(), beta1=0.9, weight_decay=0.1)
    else:
        bnb = pytest.importorskip("bitsandbytes")
        optimizer = BNB_OPTIMIZERS[kind](bnb, two_groups(model))
    train_steps(model, optimizer, 2)
    units = tensor_units(model)
    before = snapshot(model, optimizer)
    first = compute_importance(model, units, make_batches(2), optimizer)
    assert_same(before, snapshot(model, optimizer))
    np.testing.assert_array_equal(first, compute_importance(model, units, make_batches(2), optimizer))
    assert np.isfinite(first).all() and (first > 0).any()


@pytest.mark.parametrize("bits", [8, 32])
def test_bitsandbytes_moments_not_shaped_as_their_parameter_are_not_mirrored(bits, caplog):
    """GaLore's 8-bit AdamW runs bitsandbytes' "adam" kernel on moments of the projected, low-rank gradient: read as
    the parameter's own, they crashed the selection (a shape error)."""
    bnb = pytest.importorskip("bitsandbytes")
    bnb.optim.GlobalOptimManager.get_instance().initialize()  # no override left by an earlier test's reused ids
    param = torch.nn.Parameter(torch.randn(64, 128))
    optimizer = bnb.optim.AdamW([param], lr=1e-2, optim_bits=bits, min_8bit_size=0)
    optimizer.init_state(optimizer.param_groups[0], param, 0, 0)
    state = optimizer.state[param]
    for key in ("state1", "state2"):  # as GaLore keeps them: those of a rank-16 projection
        state[key] = state[key].reshape(-1)[: 16 * 128].reshape(16, 128).clone()
    if bits == 8:
        for key in ("absmax1", "absmax2"):
            state[key] = state[key][: 16 * 128 // 256].clone()
    grad = torch.randn(64, 128)
    with caplog.at_level(logging.WARNING, logger="peft_greentrainer.engine.optimizer_update"):
        delta = optimizer_update(param, grad, optimizer)
    torch.testing.assert_close(delta, -1e-2 * grad)
    assert len(caplog.records) == 1 and "not mirrored" in caplog.records[0].getMessage()


@pytest.mark.parametrize("how", ["by tensor", "by module, before the first step"])
@pytest.mark.parametrize("kind", ["AdamW8bit", "lion_8bit", "rmsprop_bnb_32bit"])
def test_a_bitsandbytes_lr_set_for_one_tensor_is_the_lr_its_update_is_mirrored_at(kind: str, how: str) -> None:
    """``GlobalOptimManager`` settings for one tensor replace its group's, lr included (schedule and all), as the
    step applies them: one set by module (``register_module_override``) takes effect only at the first step, and
    then replaces those set by tensor."""
    bnb = pytest.importorskip("bitsandbytes")
    manager = bnb.optim.GlobalOptimManager.get_instance()
    manager.initialize()  # one manager per process: no override of an earlier test's (reused) tensor ids
    model = small_llama()
    up = model.model.layers[0].mlp
    try:
        optimizer = BNB_OPTIMIZERS[kind](bnb, two_groups(model))
        if how == "by tensor":
            manager.override_config(up.up_proj.weight, "lr", 0.5)
            train_steps(model, optimizer, 2)
        else:
            manager.override_config(up.up_proj.weight, "lr", 3.0)  # replaced at the first step by the module's
            manager.register_module_override(up.up_proj, "weight", {"lr": 0.5, "betas": (0.5, 0.9)})
            for group in optimizer.param_groups:
                group["lr"] = 0.0  # a warmup's first step: the tensor's own lr is not the group's
        mirrored, real = mirrored_then_real(model, optimizer)
    finally:
        manager.initialize()  # leave no override to later optimizers
    assert_float32_step_close(model, mirrored, real)
    assert float(real["model.layers.0.mlp.up_proj.weight"].abs().max()) > 0.1  # the tensor's own lr, not 0 or 1e-2


def test_a_bitsandbytes_lr_of_0_set_for_one_tensor_is_not_blamed_on_its_group(caplog) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    manager = bnb.optim.GlobalOptimManager.get_instance()
    manager.initialize()
    model = small_llama()
    try:
        optimizer = BNB_OPTIMIZERS["AdamW8bit"](bnb, two_groups(model))
        weight = model.model.layers[0].mlp.up_proj.weight
        manager.override_config(weight, "lr", 0.0)  # this tensor frozen in place by its own lr
        with caplog.at_level(logging.WARNING, logger="peft_greentrainer.engine.optimizer_update"):
            base = base_learning_rates(optimizer)
            delta = optimizer_update(weight, torch.randn_like(weight), optimizer, group_lrs=base)
    finally:
        manager.initialize()
    assert not delta.any() and not caplog.records


def test_unmirrored_bitsandbytes_optimizer_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    model = small_llama()
    optimizer = bnb.optim.LAMB8bit(model.parameters(), lr=1e-3)  # its trust ratio is not mirrored
    train_steps(model, optimizer, 1)
    units = tensor_units(model)
    with caplog.at_level(logging.WARNING, logger="peft_greentrainer.engine.importance"):
        result = compute_importance(model, units, make_batches(1), optimizer)
    records = [r for r in caplog.records if r.name == "peft_greentrainer.engine.importance"]
    assert len(records) == 1 and "LAMB8bit" in records[0].getMessage()
    np.testing.assert_allclose(result, compute_importance(model, units, make_batches(1), lr=1e-3), rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# compute_importance
# ---------------------------------------------------------------------------------------------------------------


def hand_importance(model, units, batches, optimizer, lr=None) -> np.ndarray:
    out = []
    for unit in units:
        params = list({id(p): p for p in unit.parameters(model)}.values())
        grads = mean_grads(model, params, batches)
        total = 0.0
        for p, g in zip(params, grads, strict=True):
            delta = optimizer_update(p, g, optimizer, lr=lr)
            total += -(g.float() * delta).sum().item()
        out.append(total)
    return np.array(out)


@pytest.mark.parametrize("with_optimizer", [True, False])
def test_importance_matches_hand_computation(with_optimizer: bool) -> None:
    model = tiny_llama()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    train_steps(model, optimizer, 2)
    units = tensor_units(model)
    batches = make_batches(2)
    opt = optimizer if with_optimizer else None
    lr = None if with_optimizer else 1e-3

    got = compute_importance(model, units, batches, opt, lr=lr)
    expected = hand_importance(model, units, batches, opt, lr=lr)
    assert got.dtype == np.float64 and got.shape == (len(units),)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())
    if not with_optimizer:
        assert (got >= 0).all() and (got > 0).any()  # lr * ||g||^2


@pytest.mark.parametrize("kind", ["adamw", "sgd_momentum"])
def test_the_predicted_update_is_that_of_the_clipped_gradient(kind: str) -> None:
    """Trainer clips before the step (max_grad_norm 1.0 by default): importance predicts the clipped step."""

    def make_optimizer(params):
        if kind == "adamw":
            return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
        return torch.optim.SGD(params, lr=1e-1, momentum=0.9)

    model = tiny_llama()
    optimizer = make_optimizer(model.parameters())
    train_steps(model, optimizer, 3)  # momentum state, so the clip changes more than the scale
    units, batch = tensor_units(model), make_batches(1, seed=11)
    norm = torch.nn.utils.get_total_norm(mean_grads(model, list(model.parameters()), batch))
    max_norm = 0.2 * float(norm)  # clipping active

    stepped = copy.deepcopy(model)
    real = make_optimizer(stepped.parameters())
    real.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # loading shares the state's tensors
    stepped(**batch[0]).loss.backward()
    torch.nn.utils.clip_grad_norm_(stepped.parameters(), max_norm)
    real.step()
    names, params = zip(*model.named_parameters(), strict=True)
    grads = dict(zip(names, mean_grads(model, list(params), batch), strict=True))
    deltas = {n: q.detach() - p.detach() for n, p, q in zip(names, params, stepped.parameters(), strict=True)}
    expected = np.array([-sum(float((grads[n] * deltas[n]).sum()) for n in unit.param_names) for unit in units])

    got = compute_importance(model, units, batch, optimizer, max_grad_norm=max_norm)
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-6 * np.abs(expected).max())
    unclipped = compute_importance(model, units, batch, optimizer)
    assert np.abs(unclipped - expected).max() > 0.05 * np.abs(expected).max()
    np.testing.assert_array_equal(compute_importance(model, units, batch, optimizer, max_grad_norm=1e9), unclipped)


def test_tied_embedding_counts_once() -> None:
    model = tiny_opt()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    train_steps(model, optimizer, 1)
    units = tensor_units(model)
    tied = next(u for u in units if u.aliases)
    assert tied.name == "model.decoder.embed_tokens.weight" and "lm_head.weight" in tied.aliases
    both_names = Unit(name="tied", param_names=(tied.name, *tied.aliases))  # same tensor listed twice

    batches = make_batches(2)
    got = compute_importance(model, [tied, both_names], batches, optimizer)
    expected = hand_importance(model, [tied], batches, optimizer)[0]
    assert got[0] == got[1]
    np.testing.assert_allclose(got[0], expected, rtol=1e-4)


def snapshot(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    def clone(value):
        return value.clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)

    names = {id(p): n for n, p in model.named_parameters()}
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "flags": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": {n: (None if p.grad is None else (id(p.grad), p.grad.clone())) for n, p in model.named_parameters()},
        "state": {names[id(p)]: {k: clone(v) for k, v in s.items()} for p, s in optimizer.state.items()},
        "groups": [
            {k: ([names[id(p)] for p in v] if k == "params" else clone(v)) for k, v in g.items()}
            for g in optimizer.param_groups
        ],
        "rng": torch.get_rng_state(),
        "training": [m.training for m in model.modules()],
    }


def assert_same(a, b, path: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for key in a:
            assert_same(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def test_no_side_effects() -> None:
    model = tiny_opt(dropout=0.1)  # dropout active in train mode: exercises the RNG fork
    model.model.decoder.embed_positions.weight.requires_grad_(False)
    model.model.decoder.layers[0].fc1.bias.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=torch.tensor(1e-3))
    model.train()
    train_steps(model, optimizer, 2)
    model.model.decoder.layers[0].self_attn_layer_norm.eval()  # mixed modes must survive too
    # .grad: some None, some set (one of them on a frozen tensor).
    model.model.decoder.layers[1].fc2.weight.grad = torch.randn_like(model.model.decoder.layers[1].fc2.weight)
    model.model.decoder.embed_positions.weight.grad = torch.ones_like(model.model.decoder.embed_positions.weight)
    assert any(p.grad is None for p in model.parameters())

    units = tensor_units(model)
    before = snapshot(model, optimizer)
    mask = np.array([i % 3 != 0 for i in range(len(units))])
    first = compute_importance(model, units, make_batches(2), optimizer)
    assert_same(before, snapshot(model, optimizer))
    compute_importance(model, units, make_batches(2), optimizer, candidates=mask)
    assert_same(before, snapshot(model, optimizer))
    # Forked RNG: same dropout masks each call, so the result is reproducible.
    np.testing.assert_array_equal(first, compute_importance(model, units, make_batches(2), optimizer))

    def failing_loss(model, batch):
        model(**batch)  # draws dropout masks, then fails mid-evaluation
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        compute_importance(model, units, make_batches(2), optimizer, loss_fn=failing_loss)
    assert_same(before, snapshot(model, optimizer))


def test_candidates_mask_skips_work() -> None:
    model = tiny_llama()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_steps(model, optimizer, 1)
    units = tensor_units(model)
    mask = np.array([any(k in u.name for k in ("layers.1.", "model.norm", "lm_head")) for u in units])
    assert 0 < mask.sum() < len(units)

    seen: list[tuple[bool, bool]] = []

    def hook(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        seen.append((out.requires_grad, module.self_attn.q_proj.weight.requires_grad))

    handle = model.model.layers[0].register_forward_hook(hook)
    try:
        with FlopCounterMode(display=False) as full_counter:
            full = compute_importance(model, units, make_batches(1), optimizer)
        full_seen, seen[:] = list(seen), []
        with FlopCounterMode(display=False) as part_counter:
            part = compute_importance(model, units, make_batches(1), optimizer, candidates=mask)
        part_seen = list(seen)
    finally:
        handle.remove()

    assert (part[~mask] == 0.0).all()
    np.testing.assert_allclose(part[mask], full[mask], rtol=1e-5)
    assert np.isfinite(full).all() and (full[~mask] != 0).any()
    # With all candidates layer 0 is on the backward path; without, nothing below layer 1 needs a gradient.
    assert full_seen == [(True, True)]
    assert part_seen == [(False, False)]
    assert part_counter.get_total_flops() < full_counter.get_total_flops()
    assert all(p.requires_grad for p in model.parameters())  # restored


def test_lora_units() -> None:
    base = tiny_llama()
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    units = lora_units(model)
    assert len(units) == 4
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    fresh = compute_importance(model, units, make_batches(2), optimizer)  # empty state, lora_B == 0
    assert fresh.shape == (4,) and np.isfinite(fresh).all()
    assert (fresh >= 0).all() and (fresh > 0).any()

    train_steps(model, optimizer, 2)
    trained = compute_importance(model, units, make_batches(2), optimizer)
    assert trained.shape == (4,) and np.isfinite(trained).all()
    np.testing.assert_allclose(trained, hand_importance(model, units, make_batches(2), optimizer), rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_is_finite(dtype: torch.dtype) -> None:
    model = tiny_llama().to(dtype)
    # Real half-precision AdamW steps need a representable eps (1e-8 underflows to 0 in fp16 and torch's own step
    # then divides 0 by 0); importance must stay finite with the default eps, since it computes in float32.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-4)
    units = tensor_units(model)
    optimizer.param_groups[0]["eps"] = 1e-8
    empty = compute_importance(model, units, make_batches(2), optimizer)
    optimizer.param_groups[0]["eps"] = 1e-4
    train_steps(model, optimizer, 2)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    optimizer.param_groups[0]["eps"] = 1e-8
    trained = compute_importance(model, units, make_batches(2), optimizer)
    plain = compute_importance(model, units, make_batches(2), lr=1e-3)
    for result in (empty, trained, plain):
        assert result.dtype == np.float64 and np.isfinite(result).all() and (result != 0).any()


def test_under_float16_autocast_the_loss_is_scaled_as_a_training_step_scales_it() -> None:
    """float16 activations flush small gradients to zero: unscaled, 8 of 30 units of a tiny Llama got importance 0 at
    a loss of small gradients (a mean over many tokens makes them so) and the rest were 10% off float32's. The loss
    is scaled as GradScaler scales a step's, halved while any gradient overflows."""
    model = tiny_llama(seed=1).train()
    units = tensor_units(model)
    batches = make_batches(1)

    def small(m, batch):
        return m(**batch).loss * 1e-4

    exact = compute_importance(model, units, batches, lr=1e-3, loss_fn=small)
    with torch.autocast("cpu", dtype=torch.float16):
        half = compute_importance(model, units, batches, lr=1e-3, loss_fn=small)
    assert (half != 0).all()
    np.testing.assert_allclose(half, exact, rtol=0, atol=1e-2 * np.abs(exact).max())

    def huge(m, batch):  # the first scale overflows float16: halved until it does not
        labels = batch.pop("labels")  # as Trainer.compute_loss does: each try must get the batch whole
        return m(**batch, labels=labels).loss * 1e3

    # each retry runs the batch again: a region under selective activation checkpointing (TRL's "selective") can be
    # backpropagated only once, and a retry through the kept graph crashed there
    from peft_greentrainer.backprop import make_checkpointing_non_reentrant

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"selective": True})
    make_checkpointing_non_reentrant(model)
    exact = compute_importance(model, units, batches, lr=1e-3, loss_fn=huge)
    with torch.autocast("cpu", dtype=torch.float16):
        half = compute_importance(model, units, batches, lr=1e-3, loss_fn=huge)
    assert np.isfinite(half).all()
    np.testing.assert_allclose(half, exact, rtol=0, atol=1e-2 * np.abs(exact).max())


def test_errors_and_unknown_optimizer(caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_llama()
    units = tensor_units(model)
    with pytest.raises(ValueError, match="lr"):
        compute_importance(model, units, make_batches(1))
    with pytest.raises(ValueError, match="candidates"):
        compute_importance(model, units, make_batches(1), lr=1e-3, candidates=[True])
    with pytest.raises(ValueError, match="empty"):
        compute_importance(model, units, [], lr=1e-3)
    assert (compute_importance(model, units, make_batches(1), lr=1e-3, candidates=[False] * len(units)) == 0).all()

    optimizer = torch.optim.Adamax(model.parameters(), lr=0.01)
    with caplog.at_level(logging.WARNING, logger="peft_greentrainer.engine.importance"):
        result = compute_importance(model, units, make_batches(1), optimizer)
    records = [r for r in caplog.records if r.name == "peft_greentrainer.engine.importance"]
    assert len(records) == 1 and "Adamax" in records[0].getMessage()
    assert np.isfinite(result).all() and (result >= 0).all()
    np.testing.assert_allclose(result, compute_importance(model, units, make_batches(1), lr=0.01), rtol=1e-6)


def test_a_plain_gradient_step_takes_each_groups_base_lr_and_needs_one_in_every_group_or_none():
    first, second = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW([{"params": [first]}, {"params": [second], "lr": 3e-2}], lr=1e-2)
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.0)  # warmup: the current lrs are 0
    step = plain_gradient_step(optimizer)
    assert [g["lr"] for g in step.param_groups] == [1e-2, 3e-2] and not step.state
    assert [g["params"] for g in step.param_groups] == [[first], [second]]
    for group in optimizer.param_groups:  # no learning rate anywhere (Adafactor's relative step): one scale
        group.pop("initial_lr")
        group["lr"] = None
    assert [g["lr"] for g in plain_gradient_step(optimizer).param_groups] == [1.0, 1.0]
    optimizer.param_groups[1]["lr"] = 1e-3  # only some: which scale would be right is unknown
    with pytest.raises(ValueError, match=r"group 0 of AdamW has none.*importance_update='optimizer'"):
        plain_gradient_step(optimizer)
