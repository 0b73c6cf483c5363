"""FLOP formulas that ``torch.utils.flop_counter.FlopCounterMode`` lacks, registered in one place.

On real CPU tensors two kinds of kernel count 0 FLOPs out of the box, which would make every measurement of this
project (profiles, tests, benchmarks) wrong there while it is right on the ``meta`` device:

* SDPA's CPU flash kernel ``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward.
* bitsandbytes' quantized matmuls (``gemm_4bit``, ``gemv_4bit``, ``int8_mixed_scaled_mm``, ``int8_scaled_mm``,
  ``int8_linear_matmul``): a quantized matmul does the same multiply-adds as the float one it replaces.

Call :func:`register_flop_formulas` before counting (importing ``peft_greentrainer`` does it for the torch ops;
profiling and measuring call it again so bitsandbytes ops are added once bitsandbytes is imported).
"""

from __future__ import annotations

import math
import sys

import torch
from torch.utils.flop_counter import (
    flop_registry,
    register_flop_formula,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

aten = torch.ops.aten


def _register(targets: list, formula, *, get_raw: bool = False) -> None:
    """Register ``formula`` for the targets that exist and have no formula yet (idempotent)."""
    missing = [t for t in targets if t not in flop_registry]
    if missing:
        register_flop_formula(missing, get_raw=get_raw)(formula)


def _cpu_flash_forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


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
    _register([aten._scaled_dot_product_flash_attention_for_cpu], _cpu_flash_forward)
    _register([aten._scaled_dot_product_flash_attention_for_cpu_backward], _cpu_flash_backward)
    _register_bitsandbytes()
