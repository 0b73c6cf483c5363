"""FLOP formulas for attention kernels that FlopCounterMode lacks, checked on the CPU against recorded op signatures.

flash_attn (``attn_implementation="flash_attention_2"``) and kernels-hub flash attention only run on CUDA. Their ops
are re-created here with the same names and argument conventions (``q, k, v`` first, ``(batch, seq, heads, dim)``
or varlen ``(tokens, heads, dim)`` with int32 ``cu_seqlens``), backed by a plain CPU attention, so the formula
registrations, the profile and the measurement are exercised exactly as on a GPU.
"""

from __future__ import annotations

import logging

import pytest
import torch
import transformers
from conftest import tiny_batch, tiny_model
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from transformers import AttentionInterface

from peft_greentrainer.engine.flops import (
    fused_kernels_take_one_shared_head,
    register_flop_formulas,
    uncounted_matmul_op,
)
from peft_greentrainer.engine.profile import measure_flops, profile_model
from peft_greentrainer.engine.units import tensor_units


def _heads_first(q, k, v):
    """(batch, heads, seq, dim) views with the grouped key/value heads repeated to the query's."""
    groups = q.shape[2] // k.shape[2]
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    return q, k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1), groups


def _probabilities(q, k, causal: bool):
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1)


def _reference(q, k, v, causal: bool):
    """(batch, seq, heads, dim) attention with grouped key/value heads, as flash_attn computes it."""
    q, k, v, _ = _heads_first(q, k, v)
    return (_probabilities(q, k, causal) @ v).transpose(1, 2)


def _reference_backward(dout, q, k, v, causal: bool):
    """Gradients of :func:`_reference` written out (a custom op's kernel runs below autograd)."""
    shape_k = k.shape
    q, k, v, groups = _heads_first(q, k, v)
    dout = dout.transpose(1, 2)
    probs = _probabilities(q, k, causal)
    dv = probs.transpose(-1, -2) @ dout
    dprobs = dout @ v.transpose(-1, -2)
    dscores = probs * (dprobs - (dprobs * probs).sum(-1, keepdim=True)) / q.shape[-1] ** 0.5
    dq, dk = dscores @ k, dscores.transpose(-1, -2) @ q

    def ungroup(x):  # sum the repeated heads back onto their key/value head
        batch, _, seq, dim = x.shape
        return x.reshape(batch, shape_k[2], groups, seq, dim).sum(2).transpose(1, 2)

    return dq.transpose(1, 2), ungroup(dk), ungroup(dv)


def _define_flash_attn_ops() -> None:
    """``flash_attn::_flash_attn_forward`` / ``_flash_attn_backward`` with flash_attn 2.6+'s leading arguments."""
    if hasattr(torch.ops.flash_attn, "_flash_attn_forward"):
        return

    @torch.library.custom_op("flash_attn::_flash_attn_forward", mutates_args=())
    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, causal: bool) -> torch.Tensor:
        return _reference(q, k, v, causal).contiguous()

    @forward.register_fake
    def _(q, k, v, dropout_p, causal):
        return torch.empty_like(q)

    @torch.library.custom_op("flash_attn::_flash_attn_backward", mutates_args=())
    def backward(
        dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, causal: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(g.contiguous() for g in _reference_backward(dout, q, k, v, causal))

    @backward.register_fake
    def _(dout, q, k, v, dropout_p, causal):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class _FlashAttnFunction(torch.autograd.Function):
    """flash_attn's own wiring (its ``FlashAttnFunc``): the ops have no autograd formula; this Python function calls
    the backward op, which computes dq, dk and dv together."""

    @staticmethod
    def forward(ctx, q, k, v, dropout_p: float, causal: bool):
        ctx.save_for_backward(q, k, v)
        ctx.causal = causal
        return torch.ops.flash_attn._flash_attn_forward(q, k, v, dropout_p, causal)

    @staticmethod
    def backward(ctx, grad):
        q, k, v = ctx.saved_tensors
        return (*torch.ops.flash_attn._flash_attn_backward(grad, q, k, v, 0.0, ctx.causal), None, None)


def _fake_flash_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A transformers attention function that calls the flash_attn op as ``flash_attention_2`` does."""
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    return _FlashAttnFunction.apply(q, k, v, dropout, True), None


@pytest.fixture(scope="module")
def flash_attention() -> str:
    _define_flash_attn_ops()
    AttentionInterface.register("recorded_fused_attention", _fake_flash_attention)
    return "recorded_fused_attention"


def test_flash_attn_ops_are_counted_like_eager_and_sdpa(flash_attention):
    batch = tiny_batch(tiny_model("llama"), batch_size=2, seq_len=24)
    forwards, backwards = {}, {}
    for implementation in ("eager", "sdpa", flash_attention):
        model = tiny_model("llama", attn_implementation=implementation)
        forwards[implementation], backwards[implementation] = measure_flops(model, batch)
    assert forwards[flash_attention] == forwards["eager"] == forwards["sdpa"]
    # backward: the fused kernels recompute the scores, eager keeps them (same relation as SDPA's own formula)
    assert backwards[flash_attention] == pytest.approx(backwards["sdpa"], rel=1e-9)
    flash = tiny_model("llama", attn_implementation=flash_attention)
    with FlopCounterMode(display=False) as counter:
        flash(**batch).loss.backward()
    ops = {str(k) for k in counter.get_flop_counts()["Global"]}
    assert {"flash_attn._flash_attn_forward", "flash_attn._flash_attn_backward"} <= ops, ops


def test_profile_of_a_flash_attention_model_matches_sdpa(flash_attention):
    """The profile replays the op's backward on meta through its fake kernels: same costs as the SDPA model."""
    batch = tiny_batch(tiny_model("llama"), batch_size=2, seq_len=16)
    sdpa = profile_model(tiny_model("llama", attn_implementation="sdpa"), batch)
    flash = profile_model(tiny_model("llama", attn_implementation=flash_attention), batch)
    assert flash.forward_flops == sdpa.forward_flops
    assert flash.full_backward_flops == pytest.approx(sdpa.full_backward_flops, rel=1e-9)
    assert flash.t_dw == pytest.approx(sdpa.t_dw)
    # the fused backward is charged in full as soon as any of q, k, v needs a gradient (only v_proj trained too): each
    # unit's activation-gradient cost is SDPA's (op indices may differ: SDPA can add ops to repeat key/value heads)
    units = tensor_units(tiny_model("llama"))
    flash_costs, sdpa_costs = flash.unit_costs(units), sdpa.unit_costs(units)
    assert [u.name for u in flash_costs.units] == [u.name for u in sdpa_costs.units]
    assert flash_costs.t_dy == pytest.approx(sdpa_costs.t_dy, rel=1e-9)
    assert flash_costs.dy_head == pytest.approx(sdpa_costs.dy_head, rel=1e-9)


def _varlen_op(namespace: str, name: str):
    """A varlen forward with a kernels-hub-like signature: ``(q, k, v, out?, cu_seqlens_q, cu_seqlens_k, ...)``."""
    qualified = f"{namespace}::{name}"
    if not hasattr(getattr(torch.ops, namespace), name):

        @torch.library.custom_op(qualified, mutates_args=())
        def op(
            q: torch.Tensor,
            k: torch.Tensor,
            v: torch.Tensor,
            out: torch.Tensor | None,
            cu_seqlens_q: torch.Tensor,
            cu_seqlens_k: torch.Tensor,
            max_seqlen_q: int,
            max_seqlen_k: int,
        ) -> torch.Tensor:
            return torch.empty_like(q)

        op.register_fake(lambda q, *args: torch.empty_like(q))
    return getattr(getattr(torch.ops, namespace), name)


def test_varlen_flash_attention_counts_each_packed_sequence():
    op = _varlen_op("_flash_attn_0a1b2c3_dirty", "varlen_fwd")  # a kernels-hub build's namespace
    register_flop_formulas()  # discovers the namespace registered after import
    heads_q, heads_kv, dim, lengths = 4, 2, 16, [5, 11, 8]
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(sum(lengths), heads_q, dim)
    k = v = torch.randn(sum(lengths), heads_kv, dim)
    with FlopCounterMode(display=False) as counter:
        op(q, k, v, None, offsets, offsets, max(lengths), max(lengths))
    # per sequence and query head: scores (n x dim by dim x n) and their product with the values, 2 FLOPs per MAC
    expected = sum(2 * 2 * heads_q * n * n * dim for n in lengths)
    assert counter.get_total_flops() == expected
    # on meta the offsets cannot be read: charged as one sequence of all tokens, an upper bound
    with FlopCounterMode(display=False) as counter:
        op(*(x.to("meta") for x in (q, k, v)), None, offsets.to("meta"), offsets.to("meta"), 11, 11)
    assert counter.get_total_flops() >= expected


@pytest.mark.parametrize(
    ("name", "uncounted"),
    [
        ("aten._weight_int8pack_mm", True),  # a matmul torch has no formula for
        ("aten._native_multi_head_attention", True),
        ("aten.mm", False),  # has a formula
        ("prims.convert_element_type", False),  # "conv" of convert
        ("aten._convert_weight_to_int4pack", False),
        ("symm_mem.one_shot_all_reduce", False),  # "mm" of the namespace only
        ("aten.sum", False),
    ],
)
def test_only_ops_that_multiply_are_reported_as_uncounted(name, uncounted):
    namespace, op = name.split(".")
    packet = getattr(getattr(torch.ops, namespace), op, None)
    if packet is None:
        pytest.skip(f"this torch build has no {name}")
    assert uncounted_matmul_op(packet) is uncounted


def test_an_attention_op_without_formula_is_reported(caplog):
    if not hasattr(torch.ops.greentrainer_test, "my_attention"):

        @torch.library.custom_op("greentrainer_test::my_attention", mutates_args=())
        def my_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

        my_attention.register_fake(lambda q, k, v: torch.empty_like(q))

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)

        def forward(self, x):
            h = self.proj(x)
            return torch.ops.greentrainer_test.my_attention(h, h, h)

    with caplog.at_level(logging.WARNING, logger="peft_greentrainer.engine.profile"):
        profile_model(Block(), {"x": torch.randn(2, 1, 4, 8)}, loss_fn=lambda model, batch: model(**batch).sum())
    assert any("my_attention" in r.getMessage() and "no FLOP formula" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------ mixture-of-experts grouped matmuls
def _grouped_reference_flops(a, b, offs) -> int:
    """2 x multiply-adds of the per-group matmuls ``aten._grouped_mm`` stands for, written as a loop."""
    bounds = list(zip([0, *offs.tolist()[:-1]], offs.tolist(), strict=True))
    if a.dim() == 2 and b.dim() == 3:  # tokens sorted by group, times their group's matrix
        return sum(2 * (end - start) * a.shape[1] * b.shape[2] for start, end in bounds)
    if a.dim() == 3 and b.dim() == 3:
        return 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
    if a.dim() == 2 and b.dim() == 2:  # the contraction split: one (M, N) product per group
        return sum(2 * a.shape[0] * (end - start) * b.shape[1] for start, end in bounds)
    return sum(2 * a.shape[1] * a.shape[2] * (end - start) for start, end in bounds)  # (G, M, K) x (K, N split)


@pytest.mark.parametrize("case", ["2d-3d", "3d-3d", "2d-2d", "3d-2d"])
def test_grouped_matmul_formula_counts_the_groups_matmuls(case: str) -> None:
    register_flop_formulas()
    groups, tokens, k, n, m = 3, 48, 16, 32, 16
    offs = torch.tensor([16, 32, 48], dtype=torch.int32)
    shapes = {
        "2d-3d": ((tokens, k), (groups, k, n)),
        "3d-3d": ((groups, m, k), (groups, k, n)),
        "2d-2d": ((k, tokens), (tokens, n)),
        "3d-2d": ((groups, m, k), (k, tokens)),
    }[case]
    a, b = (torch.randn(*shape, dtype=torch.bfloat16) for shape in shapes)
    try:
        with FlopCounterMode(display=False) as counter:
            torch._grouped_mm(a, b, offs=None if case == "3d-3d" else offs)
    except (RuntimeError, NotImplementedError) as error:
        pytest.skip(f"this torch build has no CPU grouped matmul: {error}")
    assert counter.get_total_flops() == _grouped_reference_flops(a, b, offs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_experts_are_counted_and_profiled_like_eager_experts(dtype: torch.dtype) -> None:
    """transformers 5 runs MoE experts as one grouped matmul (aten's in bf16, its own op in float32): same counts and
    the same profile as the per-expert loop, instead of experts that look free."""
    grouped = tiny_model("mixtral").to(dtype)
    assert grouped.config._experts_implementation == "grouped_mm"
    eager = tiny_model("mixtral").to(dtype)  # the same weights, its own config (the switch below sets it)
    eager.set_experts_implementation("eager")
    batch = tiny_batch(grouped, batch_size=2, seq_len=16)
    register_flop_formulas()  # as profiling does: transformers registers its op when a MoE model is first built
    with FlopCounterMode(display=False) as counter:
        grouped(**batch).loss.backward()
    ops = {str(op) for op in counter.get_flop_counts()["Global"]}
    assert ops & {"aten._grouped_mm", "transformers.grouped_mm_fallback"}, ops
    assert measure_flops(grouped, batch) == pytest.approx(measure_flops(eager, batch), rel=1e-9)
    profiles = [profile_model(model, batch) for model in (grouped, eager)]
    assert profiles[0].forward_flops == pytest.approx(profiles[1].forward_flops, rel=1e-9)
    assert profiles[0].full_backward_flops == pytest.approx(profiles[1].full_backward_flops, rel=1e-9)
    assert profiles[0].t_dw == pytest.approx(profiles[1].t_dw, rel=1e-9)
    assert min(flops for name, flops in profiles[0].t_dw.items() if "experts" in name) > 0


def test_transformers_grouped_matmul_fallback_op_is_counted_with_its_backward() -> None:
    """transformers' own grouped-matmul op (used where torch's kernel cannot run) hides its per-expert mm calls."""
    import transformers.integrations.moe  # noqa: F401 - registers transformers::grouped_mm_fallback

    register_flop_formulas()
    tokens, k, n = torch.randn(12, 8, requires_grad=True), 8, 6
    experts = torch.randn(3, k, n, requires_grad=True)
    offs = torch.tensor([5, 5, 12])
    with FlopCounterMode(display=False) as counter:
        torch.ops.transformers.grouped_mm_fallback(tokens, experts, offs).sum().backward()
    assert counter.get_total_flops() == 3 * 2 * 12 * k * n  # forward, then both gradients


def test_sdpa_kernels_count_grouped_query_attention_where_torch_formulas_reject_it(monkeypatch) -> None:
    """Before torch 2.12 (the GPU machine runs 2.11), torch's SDPA formulas raise on fewer key/value heads than query
    heads, so counting a grouped-query model under SDPA on CUDA crashed. There they are replaced: one score matrix per
    query head, as torch 2.12 counts."""
    from torch.utils import flop_counter

    from peft_greentrainer.engine import flops

    torch_counts_it = flops._torch_counts_grouped_query_attention()
    aten = torch.ops.aten
    forward_ops = [
        aten._scaled_dot_product_efficient_attention,
        aten._scaled_dot_product_flash_attention,
        aten._scaled_dot_product_cudnn_attention,
    ]
    backward_ops = [
        aten._scaled_dot_product_efficient_attention_backward,
        aten._scaled_dot_product_flash_attention_backward,
        aten._scaled_dot_product_cudnn_attention_backward,
    ]

    def strict_forward(q, k, v, *args, out_shape=None, **kwargs):  # as torch 2.11 counts
        if q[1] != k[1]:
            raise AssertionError("sdpa_flop_count: query/key/value shapes are incompatible")
        return sdpa_flop_count(q, k, v)

    def strict_backward(grad_out, q, k, v, *args, out_shape=None, **kwargs):
        if q[1] != k[1]:
            raise AssertionError("sdpa_backward_flop_count: batch/heads/dimension mismatch among tensors")
        return flop_counter.sdpa_backward_flop_count(grad_out, q, k, v)

    for ops, formula in ((forward_ops, strict_forward), (backward_ops, strict_backward)):
        for op in ops:  # an older torch's registry, restored afterwards
            monkeypatch.setitem(flop_counter.flop_registry, op, flop_counter.shape_wrapper(formula))
    q, k, v = (torch.empty(2, heads, 16, 8, device="meta") for heads in (8, 2, 2))
    with pytest.raises(AssertionError):
        flop_counter.flop_registry[backward_ops[0]](q, q, k, v, out_val=None)
    monkeypatch.setattr(flops, "_torch_counts_grouped_query_attention", lambda: False)
    register_flop_formulas()

    expanded = torch.empty(2, 8, 16, 8, device="meta")
    for op in forward_ops:
        assert flop_counter.flop_registry[op](q, k, v, out_val=None) == sdpa_flop_count(q.shape, q.shape, q.shape)
    for op in backward_ops:
        counted = flop_counter.flop_registry[op](q, q, k, v, out_val=None)  # grad_out is shaped as the query
        assert counted == flop_counter.sdpa_backward_flop_count(q.shape, q.shape, expanded.shape, expanded.shape)
    if torch_counts_it:  # the same count as torch's own grouped-query formula
        assert sdpa_flop_count(q.shape, k.shape, v.shape) == sdpa_flop_count(q.shape, q.shape, q.shape)


def _meta_and_cpu_profiles(model: torch.nn.Module) -> tuple:
    """The profile of ``model`` on a batch, and of its weightless copy on ``meta`` on the same batch's shape."""
    model.config.pad_token_id = model.config.pad_token_id if model.config.is_encoder_decoder else None
    batch = tiny_batch(model)
    with torch.device("meta"):
        twin = type(model)(model.config).train()
    meta_batch = {k: v.to("meta") for k, v in batch.items()}
    return profile_model(twin, meta_batch), profile_model(model, batch), (twin, meta_batch), (model, batch)


def _falcon_multi_query() -> torch.nn.Module:
    """One key/value head broadcast over the query heads without ``enable_gqa``: no fused kernel takes it."""
    torch.manual_seed(0)
    config = transformers.FalconConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, multi_query=True, alibi=False
    )
    return transformers.AutoModelForCausalLM.from_config(config).train()


@pytest.mark.parametrize("arch", ["llama", "opt", "bloom", "gpt2-without-dropout", "falcon-multi-query"])
def test_a_meta_profile_counts_attention_as_a_fused_kernel_does(arch: str) -> None:
    """On ``meta`` SDPA has no fused kernel and falls back to its math path, whose backward counts 2x its forward where
    fused kernels (CPU flash, CUDA's) count 2.5x: planning from a config under-counted attention. Meta profiles and
    measurements now count what the CPU counts wherever it runs fused (grouped-query Llama), and Falcon's one key/value
    head broadcast without ``enable_gqa`` as the installed torch runs it (math before torch 2.15, fused from 2.15)."""
    if arch == "falcon-multi-query":
        model = _falcon_multi_query()
    elif arch == "gpt2-without-dropout":  # the CPU's flash kernel takes no dropout
        model = tiny_model("gpt2", attn_pdrop=0.0)
    else:
        model = tiny_model(arch)
    meta, cpu, meta_step, cpu_step = _meta_and_cpu_profiles(model)
    assert (meta.forward_flops, meta.full_backward_flops) == (cpu.forward_flops, cpu.full_backward_flops)
    assert meta.t_dw == cpu.t_dw
    assert measure_flops(*meta_step) == measure_flops(*cpu_step)


def test_the_shared_head_query_says_which_kernel_this_torch_runs() -> None:
    """``fused_kernels_take_one_shared_head`` decides how a meta profile counts Falcon's multi-query attention: it must
    say what SDPA really dispatches for one key/value head broadcast over the query heads (torch 2.15 changed it)."""
    query = torch.randn(1, 4, 8, 16, requires_grad=True)
    shared = torch.randn(1, 1, 8, 16, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.scaled_dot_product_attention(query, shared, shared, is_causal=True).sum().backward()
    ran = {str(op) for op in counter.get_flop_counts()["Global"]}
    fused = any("scaled_dot_product" in op for op in ran)
    assert fused == fused_kernels_take_one_shared_head(), ran
    assert fused or "aten.bmm" in ran


@pytest.mark.parametrize("arch", ["gpt2", "t5"])
def test_a_meta_profile_counts_attention_fused_where_only_a_gpu_runs_it_so(arch: str) -> None:
    """Under dropout (GPT-2) or with a position bias that trains (T5) the CPU runs SDPA's math path and a GPU a fused
    kernel; a meta profile counts the GPU's, a little above the CPU's."""
    meta, cpu, *_ = _meta_and_cpu_profiles(tiny_model(arch))
    assert meta.forward_flops == cpu.forward_flops
    assert cpu.full_backward_flops < meta.full_backward_flops < 1.05 * cpu.full_backward_flops


def test_a_step_under_autocast_is_priced_under_autocast(monkeypatch) -> None:
    """A device picks kernels by dtype: CUDA runs SDPA with grouped-query heads on its math path in float32 and on
    flash attention in bf16, whose backward costs differ. Here SDPA does the same on the CPU (math in float32, the
    fused kernel otherwise). A plain loop selects outside autocast, then steps under it: the step must be priced as it
    runs, not at the float32 profile of the same shape (priced so, this step measured 0.535 of full fine-tuning at
    rho 0.5).
    """
    from peft import get_peft_model
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from peft_greentrainer import GreenTrainerConfig

    fused = torch.nn.functional.scaled_dot_product_attention

    def by_dtype(query, *args, **kwargs):  # CUDA's autocast runs SDPA in bf16 (the CPU's leaves it alone)
        if torch.is_autocast_enabled("cpu") or query.dtype != torch.float32:
            return fused(query, *args, **kwargs)
        with sdpa_kernel(SDPBackend.MATH):
            return fused(query, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", by_dtype)
    rho = 0.5
    base = tiny_model("llama", attn_implementation="sdpa", max_position_embeddings=256)
    model = get_peft_model(base, GreenTrainerConfig(rho=rho, units="tensors", sparse_lm_head=False))
    tuner = model.base_model
    batch = tiny_batch(base, seq_len=256)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    tuner.select_units([batch], optimizer)  # float32: the math path
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(**batch).loss.backward()  # a training step: priced, and re-selected if it does not fit
        optimizer.zero_grad()
        with tuner.measuring():
            step = sum(measure_flops(base, batch))
            full = sum(measure_flops(base, batch, [n for n, _ in base.named_parameters()]))
    assert step <= rho * full
    assert tuner.greentrainer_state.last.reason == "batch shape"  # re-selected at the step's kernels


def test_a_twin_is_built_in_the_dtype_its_model_computes_in() -> None:
    """The weightless twin that prices a quantized base or an FSDP2 model runs the kernels of its dtype (CUDA's SDPA:
    math in float32, flash in bf16): it takes the dtype most of the model's floating weights have."""
    from peft_greentrainer.twin import compute_dtype

    model = tiny_model("llama")
    assert compute_dtype(model) == torch.float32
    model.to(torch.bfloat16)
    for module in model.modules():  # norms kept in float32, as `_keep_in_fp32_modules` does: a small share
        if "norm" in type(module).__name__.lower():
            module.float()
    assert compute_dtype(model) == torch.bfloat16
    # PEFT's LoRA weights stay in float32 whatever the base computes in, and may outnumber its float weights
    from peft import LoraConfig, get_peft_model

    adapted = get_peft_model(model, LoraConfig(r=64, target_modules="all-linear")).base_model.model
    lora = sum(p.numel() for n, p in adapted.named_parameters() if "lora_" in n and p.dtype == torch.float32)
    assert lora > sum(p.numel() for n, p in adapted.named_parameters() if "lora_" not in n)
    assert compute_dtype(adapted) == torch.bfloat16


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_a_frozen_learned_attention_bias_keeps_the_profiled_kernel_on_the_cpu(checkpointing: bool) -> None:
    """On the CPU SDPA runs its math path while its learned bias (T5's relative position table) requires grad, and
    its fused kernel, whose backward computes dq, dk and dv together, once a selection freezes it: steps keep the math
    path the profile measured (before, single tensors cost up to 0.2 of full fine-tuning more than priced, and a
    selection at rho 0.6 measured 0.714), also in a checkpointed block's recompute, which must run the forward's
    kernel (a context around forwards alone made it fail torch's recompute check)."""
    import numpy as np
    from peft import get_peft_model

    from peft_greentrainer import GreenTrainerConfig

    base = tiny_model("t5", dropout_rate=0.0, attn_implementation="sdpa")
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(base, GreenTrainerConfig(rho=0.6, units="tensors"))
    tuner = model.base_model
    ids = torch.randint(3, 64, (2, 64), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids[:, :6].clone()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    tuner.select_units([batch], optimizer)  # (also takes out the input-gradient hook checkpointing installs)
    assert not torch.backends.cuda.flash_sdp_enabled()  # conftest switches it back on after each test
    for _ in range(2):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    costs = tuner.unit_costs(batch)
    with tuner.measuring():
        step = sum(measure_flops(base, batch))
        full = sum(measure_flops(base, batch, [n for n, _ in base.named_parameters()]))
        assert step <= 0.6 * full
        for i, unit in enumerate(costs.units):
            mask = np.arange(len(costs.units)) == i
            assert sum(measure_flops(base, batch, unit.param_names)) <= costs.predicted_flops(mask), unit.name
