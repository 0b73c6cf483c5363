"""FLOP formulas that ``torch.utils.flop_counter.FlopCounterMode`` lacks, registered in one place.

On real CPU tensors three kinds of kernel count 0 FLOPs out of the box, which would make every measurement of this
project (profiles, tests, benchmarks) wrong there while it is right on the ``meta`` device:

* SDPA's CPU flash kernel ``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward.
* in-place ``addmm_`` (``acc.addmm_(a, b)``), with which TRL's fused LM head accumulates its gradient matmuls on
  the CPU: the same multiply-adds as ``addmm``.
* bitsandbytes' quantized matmuls (``gemm_4bit``, ``gemv_4bit``, ``int8_mixed_scaled_mm``, ``int8_scaled_mm``,
  ``int8_linear_matmul``): a quantized matmul does the same multiply-adds as the float one it replaces.

On CUDA, SDPA's flash / memory-efficient / cuDNN kernels already have formulas in torch; before torch 2.12 those
reject grouped-query attention (fewer key/value heads, as SDPA runs Llama 3, Qwen or SmolLM2 with ``enable_gqa``),
so there they are replaced by formulas that charge one score matrix per query head, as torch 2.12's do. Flash
attention outside torch has no formula, and a kernel that counts 0 forward FLOPs is also skipped backward, so the
profile would under-predict every attention layer:

* the ``flash_attn`` package (``attn_implementation="flash_attention_2"``), whose custom ops are
  ``flash_attn::_flash_attn_forward`` / ``_flash_attn_backward`` and their ``_varlen_`` variants (padding-free
  batches);
* flash attention loaded from the kernels hub (``attn_implementation="kernels-community/flash-attn"``), which
  registers ``fwd`` / ``bwd`` / ``varlen_fwd`` / ``varlen_bwd`` under a namespace named after the kernel build
  (``_flash_attn_<hash>``), so it is found by scanning the registered ops each time formulas are registered.

Both take ``q, k, v`` first (backward: ``dout, q, k, v``), laid out ``(batch, seq, heads, head_dim)``, or
``(tokens, heads, head_dim)`` with ``cu_seqlens`` offsets when variable-length. They are charged what eager
attention computes on the same shapes (``sdpa_flop_count``), so every implementation gives the same profile.

Mixture-of-experts layers in transformers 5 run their experts as one grouped matmul by default
(``experts_implementation="grouped_mm"``): ``aten._grouped_mm`` where torch has a kernel for it (bf16, CUDA SM80+,
recent CPU builds), else transformers' own ``transformers::grouped_mm_fallback`` op and its backward. Without formulas
every expert would count 0 and the DP would take the experts for free.

On the ``meta`` device SDPA has no fused kernel and runs its math path, whose backward counts 2x its forward where every
fused kernel's (CPU flash; CUDA flash, memory-efficient, cuDNN) counts 2.5x: it recomputes the scores. Profiles and
measurements on ``meta`` (planning a model from its config) run under :func:`fused_attention_on_meta`, which sends
SDPA there to CUDA's memory-efficient op wherever a GPU would run a fused kernel, so they count what a GPU run counts.
The CPU runs the math path in two more cases (dropout, a bias that trains), where a meta profile over-counts it.

Call :func:`register_flop_formulas` before counting (importing ``peft_greentrainer`` does it for the torch ops;
profiling and measuring call it again so bitsandbytes ops are added once bitsandbytes is imported).
"""

from __future__ import annotations

import functools
import logging
import math
import re
import sys
from contextlib import contextmanager

import torch
from torch.nn.attention import SDPBackend
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import (
    addmm_flop,
    flop_registry,
    register_flop_formula,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

aten = torch.ops.aten
logger = logging.getLogger(__name__)

# flash_attn's torch.library ops, and the op names a kernels-hub flash-attention build registers
_FLASH_ATTN_OPS = {
    "_flash_attn_forward": "forward",
    "_flash_attn_backward": "backward",
    "_flash_attn_varlen_forward": "forward",
    "_flash_attn_varlen_backward": "backward",
}
_HUB_FLASH_OPS = {"fwd": "forward", "bwd": "backward", "varlen_fwd": "forward", "varlen_bwd": "backward"}
_HUB_FLASH_NAMESPACE = re.compile(r"^_?flash_attn\w*$")


def _register(targets: list, formula, *, get_raw: bool = False) -> None:
    """Register ``formula`` for the targets that exist and have no formula yet (idempotent)."""
    missing = [t for t in targets if t not in flop_registry]
    if missing:
        register_flop_formula(missing, get_raw=get_raw)(formula)


def _per_query_head(query_shape, shape) -> tuple[int, ...]:
    """``shape`` (a key or value of shape ``(batch, heads, seq, dim)``) with as many heads as the query: with
    grouped-query attention each key/value head serves several query heads, and the kernel computes one score matrix
    per query head. Older torch formulas (before 2.12) reject fewer key/value heads than query heads."""
    batch, _, seq, dim = shape
    return (batch, query_shape[1], seq, dim)


def _attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """SDPA forward FLOPs, grouped-query attention included (the CPU flash kernel; the CUDA kernels on older torch)."""
    return sdpa_flop_count(
        query_shape, _per_query_head(query_shape, key_shape), _per_query_head(query_shape, value_shape)
    )


def _attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    """SDPA backward FLOPs, grouped-query attention included."""
    return sdpa_backward_flop_count(
        grad_out_shape, query_shape, _per_query_head(query_shape, key_shape), _per_query_head(query_shape, value_shape)
    )


def _torch_counts_grouped_query_attention() -> bool:
    """Whether this torch's SDPA formulas accept fewer key/value heads than query heads (torch 2.12 on)."""
    try:
        sdpa_flop_count((1, 4, 2, 8), (1, 2, 2, 8), (1, 2, 2, 8))
    except AssertionError:
        return False
    return True


def _register_sdpa_with_grouped_queries() -> None:
    """Replace torch's SDPA formulas where they reject grouped-query attention (torch before 2.12): transformers runs a
    grouped-query model (Llama 3, Qwen, SmolLM2) through SDPA with ``enable_gqa=True`` and fewer key/value heads, and
    counting it would raise. (The lower-level ``_flash_attention_forward`` / ``_efficient_attention_forward`` ops keep
    torch's formulas: the counter sees them only where nested tensors are passed to SDPA, which transformers does
    not do.)"""
    if _torch_counts_grouped_query_attention():
        return
    table = {
        _attention_flops: ["_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                           "_scaled_dot_product_cudnn_attention"],
        _attention_backward_flops: ["_scaled_dot_product_flash_attention_backward",
                                    "_scaled_dot_product_efficient_attention_backward",
                                    "_scaled_dot_product_cudnn_attention_backward"],
    }  # fmt: skip
    for formula, names in table.items():
        packets = [getattr(aten, name) for name in names if hasattr(aten, name)]
        if all(getattr(flop_registry.get(p), "__wrapped__", None) is formula for p in packets):
            continue  # replaced already
        for packet in packets:
            flop_registry.pop(packet, None)
        _register(packets, formula)


def _linear_flops(activation_shape, weight_shape) -> int:
    """2 * rows * out_features * in_features for ``activation @ weight.T`` with weight of shape (out, in)."""
    rows = math.prod(activation_shape[:-1])
    return 2 * rows * weight_shape[0] * weight_shape[1]


def _gemm_4bit(a, b, shape_b, *args, out_val=None, **kwargs) -> int:
    # B is the packed 4-bit weight; its logical (out, in) shape is passed separately.
    return _linear_flops(a.shape, list(shape_b))


def _int8_mixed_scaled_mm(a, ca, cb, *args, out_val=None, **kwargs) -> int:
    return _linear_flops(a.shape, cb.shape)


def _int8_matmul(a, b, *args, out_val=None, **kwargs) -> int:
    return _linear_flops(a.shape, b.shape)


def _grouped_mm(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """``aten._grouped_mm(a, b, offs)``: one matmul per group, the groups splitting a dimension by ``offs``.

    ``(T, K) x (G, K, N)``: each token's row times its group's matrix; ``(G, M, K) x (G, K, N)``: a batched matmul;
    ``(M, T) x (T, N) -> (G, M, N)``: the contraction split into groups (a weight gradient); ``(G, M, K) x (K, N)``:
    the columns split. Rows past the last offset (padding) are charged too: an upper bound.
    """
    if len(a_shape) == 3 and len(b_shape) == 2:
        return 2 * a_shape[1] * a_shape[2] * b_shape[1]
    return 2 * math.prod(a_shape) * b_shape[-1]


def _grouped_mm_fallback(input_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    """transformers' grouped matmul op: ``(S, K)`` tokens sorted by expert times ``(E, K, N)`` experts."""
    return 2 * input_shape[0] * input_shape[1] * weight_shape[2]


def _grouped_mm_fallback_backward(input_shape, weight_shape, offs_shape, grad_shape, *args, out_shape=None, **kwargs):
    """Its backward computes both gradients, the input's and the experts', whichever are needed."""
    return 2 * _grouped_mm_fallback(input_shape, weight_shape)


def _register_grouped_matmuls() -> None:
    """aten's grouped matmuls, and transformers' fallback ops once transformers' MoE integration registered them."""
    _register([aten._grouped_mm], _grouped_mm)
    if hasattr(aten, "_scaled_grouped_mm"):  # float8 experts: the same multiply-adds
        _register([aten._scaled_grouped_mm], _grouped_mm)
    names = set(torch._C._dispatch_get_all_op_names())
    fallbacks = {
        "grouped_mm_fallback": _grouped_mm_fallback,
        "grouped_mm_fallback_backward": _grouped_mm_fallback_backward,
    }
    for name, formula in fallbacks.items():
        if f"transformers::{name}" in names:
            _register([getattr(torch.ops.transformers, name)], formula)


def _attention_segments(q, k, cu_seqlens: list[torch.Tensor]) -> list[tuple[int, int]]:
    """(query length, key length) of each sequence: the batch rows, or the ``cu_seqlens`` segments when varlen."""
    if q.dim() == 4:  # (batch, seq, heads, head_dim)
        return [(q.shape[1], k.shape[1])] * q.shape[0]
    if len(cu_seqlens) >= 2 and cu_seqlens[0].device.type != "meta":
        q_lengths = torch.diff(cu_seqlens[0]).tolist()
        k_lengths = torch.diff(cu_seqlens[1]).tolist()
        return list(zip(q_lengths, k_lengths, strict=True))
    # offsets unknown (meta): one sequence of all tokens is an upper bound, so the budget stays a promise
    return [(q.shape[0], k.shape[0])]


def _flash_attention_flops(args: tuple, kwargs: dict, *, backward: bool) -> int:
    """FLOPs of a flash-attention call from its raw arguments (see the module docstring for the conventions)."""
    leaves = [*args, *kwargs.values()]
    floats = [x for x in leaves if isinstance(x, torch.Tensor) and x.is_floating_point()]
    offsets = [x for x in leaves if isinstance(x, torch.Tensor) and x.dtype == torch.int32 and x.dim() == 1]
    first = 1 if backward else 0  # backward: dout, q, k, v
    if len(floats) < first + 3:
        return 0
    q, k, v = floats[first : first + 3]
    if q.dim() not in (3, 4) or k.dim() != q.dim() or q.shape[-1] != k.shape[-1]:
        return 0
    heads_q, heads_kv, head_dim, value_dim = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    total = 0
    for q_len, k_len in _attention_segments(q, k, offsets):
        query, key, value = (
            (1, heads_q, q_len, head_dim),
            (1, heads_kv, k_len, head_dim),
            (1, heads_kv, k_len, value_dim),
        )
        if backward:
            total += _attention_backward_flops((1, heads_q, q_len, value_dim), query, key, value)
        else:
            total += _attention_flops(query, key, value)
    return total


def _flash_forward(*args, out_val=None, **kwargs) -> int:
    return _flash_attention_flops(args, kwargs, backward=False)


def _flash_backward(*args, out_val=None, **kwargs) -> int:
    return _flash_attention_flops(args, kwargs, backward=True)


def _register_flash_attention() -> None:
    """Formulas for flash_attn's ops and any kernels-hub flash-attention build loaded so far."""
    formulas = {"forward": _flash_forward, "backward": _flash_backward}
    for qualified in torch._C._dispatch_get_all_op_names():
        namespace, _, name = qualified.partition("::")
        name = name.split(".")[0]
        if namespace == "flash_attn" and name in _FLASH_ATTN_OPS:
            kind = _FLASH_ATTN_OPS[name]
        elif _HUB_FLASH_NAMESPACE.match(namespace) and name in _HUB_FLASH_OPS:
            kind = _HUB_FLASH_OPS[name]
        else:
            continue
        packet = getattr(getattr(torch.ops, namespace), name)
        _register([packet], formulas[kind], get_raw=True)


# op names that do matmul-class work: counted as 0 FLOPs without a formula, they would make a unit look free. Attention
# is recognised anywhere in the name (hub kernels name it in their namespace), matmul words only in the op's own name
# (after the namespace: ``symm_mem``'s collectives and ``prims.convert_element_type`` multiply nothing)
_ATTENTION_LIKE = re.compile(r"attention|attn")
_MATMUL_LIKE = re.compile(r"(?:^|_)(?:[a-z0-9]*mm|matmul|gemm|gemv|linear|conv(?!ert)[a-z0-9]*|einsum)(?:_|$)")


def is_attention_op(func) -> bool:
    """True for an attention kernel (by its name): its fused backward computes every input's gradient at once."""
    return _ATTENTION_LIKE.search(str(getattr(func, "overloadpacket", func)).lower()) is not None


# Linear-algebra ops FlopCounterMode counts nothing for forward, whose backward runs matmuls it does count (the
# gradients of a triangular solve are another solve and a batched matmul): Qwen3.5's gated delta rule solves one.
_LINALG_WITH_MATMUL_BACKWARD = re.compile(r"^(linalg_|triangular_solve|cholesky|lu_solve|inverse|solve)")


def backward_may_count_without_forward(func) -> bool:
    """True for an op whose forward FlopCounterMode counts as 0 but whose backward it may count (linear algebra)."""
    name = str(getattr(func, "overloadpacket", func)).split(".", 1)[-1]  # as uncounted_matmul_op reads it
    return _LINALG_WITH_MATMUL_BACKWARD.match(name) is not None


def uncounted_matmul_op(func) -> bool:
    """True for an attention- or matmul-like op FlopCounterMode has no formula for: the profile would under-predict
    it."""
    packet = getattr(func, "overloadpacket", func)
    if packet in flop_registry:
        return False
    name = str(packet).lower()
    return is_attention_op(packet) or _MATMUL_LIKE.search(name.split(".", 1)[-1]) is not None


def _register_bitsandbytes() -> None:
    if "bitsandbytes" not in sys.modules:  # never import it ourselves: it is slow and only needed for its own ops
        return
    ops = torch.ops.bitsandbytes
    table = {
        "gemm_4bit": _gemm_4bit,
        "gemv_4bit": _gemm_4bit,
        "int8_mixed_scaled_mm": _int8_mixed_scaled_mm,
        "int8_scaled_mm": _int8_matmul,
        "int8_linear_matmul": _int8_matmul,
    }
    for name, formula in table.items():
        try:
            packet = getattr(ops, name)
        except (AttributeError, RuntimeError):
            continue
        _register([packet], formula, get_raw=True)


def register_flop_formulas() -> None:
    """Make FlopCounterMode count the kernels above; safe to call any number of times."""
    _register([aten._scaled_dot_product_flash_attention_for_cpu], _attention_flops)
    _register([aten._scaled_dot_product_flash_attention_for_cpu_backward], _attention_backward_flops)
    _register_sdpa_with_grouped_queries()
    _register([aten.addmm_], addmm_flop, get_raw=True)  # torch's own formula, already shape-wrapped
    _register_bitsandbytes()
    _register_flash_attention()
    _register_grouped_matmuls()


class _FusedAttentionOnMeta(TorchFunctionMode):
    """Runs SDPA on ``meta`` tensors as a GPU's fused kernel would run it (see the module text)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.__bool__ and args[0].device.type == "meta" and args[0].dtype == torch.bool:
            # a test of values meta tensors do not hold; transformers asks whether a mask it built of ones is all ones,
            # to skip passing it (BART's decoder): no, so the mask is passed, which changes no FLOP count
            return False
        if func is torch.nn.functional.scaled_dot_product_attention:
            fused = _fused_meta_attention(*args, **kwargs)
            if fused is not None:
                return fused
        return func(*args, **kwargs)


def _fused_meta_attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
) -> torch.Tensor | None:
    """SDPA through ``aten._scaled_dot_product_efficient_attention``, the fused kernel that takes every input a GPU's
    fused kernels take (dropout, a trained bias as T5's); None where no fused kernel would run, or the inputs are not
    meta tensors of (batch, heads, length, head dim)."""
    tensors = (query, key, value)
    if not all(type(t) is torch.Tensor and t.device.type == "meta" and t.dim() == 4 for t in tensors):
        return None
    if key.shape[1] != query.shape[1]:
        # fused kernels take fewer key/value heads as groups (``enable_gqa``), and one head broadcast without it
        # (Falcon's multi-query attention) where this torch's kernels take it; otherwise the math path runs
        heads = query.shape[1]
        if enable_gqa and heads % key.shape[1] == 0:
            groups = heads // key.shape[1]  # as the math path does: each key/value head serves a group
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        elif key.shape[1] == value.shape[1] == 1 and fused_kernels_take_one_shared_head():
            key, value = key.expand(-1, heads, -1, -1), value.expand(-1, heads, -1, -1)
        else:
            return None
    if isinstance(attn_mask, torch.Tensor) and attn_mask.dtype == torch.bool:  # as SDPA does: an additive bias
        attn_mask = torch.zeros_like(attn_mask, dtype=query.dtype).masked_fill(~attn_mask, float("-inf"))
    log_sumexp = any(t.requires_grad for t in (query, key, value, attn_mask) if isinstance(t, torch.Tensor))
    out, *_ = aten._scaled_dot_product_efficient_attention(
        query, key, value, attn_mask, log_sumexp, dropout_p, is_causal, scale=scale
    )
    return out


@functools.cache
def fused_kernels_take_one_shared_head() -> bool:
    """Whether this torch's SDPA runs a fused kernel where one key/value head serves every query head without
    ``enable_gqa`` (broadcast: Falcon's multi-query attention). Torch 2.15 does, on the CPU and CUDA alike (one check
    of the inputs serves both); earlier versions ran the math path. Asked of the CPU's own kernel choice."""
    query, shared = torch.zeros(1, 2, 4, 8), torch.zeros(1, 1, 4, 8)
    try:
        return int(torch._fused_sdp_choice(query, shared, shared)) != int(SDPBackend.MATH.value)
    except (AttributeError, RuntimeError):  # no such query in this torch: the math path, as before 2.15
        return False


@contextmanager
def fused_attention_on_meta():
    """Count SDPA on ``meta`` as a GPU's fused kernels count it (backward 2.5x forward), not as its math path (2x)."""
    with _FusedAttentionOnMeta():
        yield
