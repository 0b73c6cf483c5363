"""SDPA's kernel on the CPU follows whether a learned attention bias needs a gradient; steps keep the profiled one.

Given an ``attn_mask`` that requires grad (a learned relative position table: T5 and its relatives, BEiT, Swin), the
CPU runs SDPA's math path, whose backward computes only the gradients a step needs. With that bias frozen it runs its
fused kernel, whose backward computes dq, dk and dv together, 2.5x the forward. The profile trains every tensor, so
it sees the math path; a selection that freezes the bias would switch every step to the fused kernel, priced at the
math path's costs (a tiny T5 without dropout measured 0.714 of full fine-tuning at ``rho=0.6``). Where a profile sees
such a call on the CPU (:class:`LearnedBiasProbe`), SDPA's fused CPU kernel is switched off for the process
(:func:`use_math_attention`), so that steps run the kernel their prices were measured on. Process-wide, because a
backward that recomputes a checkpointed block runs outside any forward a context could wrap, and must run the kernel
its forward ran. CUDA runs one kernel either way.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


class LearnedBiasProbe(TorchFunctionMode):
    """Notes whether SDPA ran on the CPU with an ``attn_mask`` that requires grad (``found``)."""

    def __init__(self) -> None:
        super().__init__()
        self.found = False

    def __torch_function__(self, func, types, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and not self.found:
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            query = args[0] if args else kwargs.get("query")
            self.found = bool(
                isinstance(mask, torch.Tensor)
                and mask.requires_grad
                and isinstance(query, torch.Tensor)
                and query.device.type == "cpu"
            )
        return func(*args, **kwargs)


def use_math_attention() -> None:
    """Switch SDPA's fused kernels off for this process: the CPU's kernel choice reads the same switch as CUDA's."""
    torch.backends.cuda.enable_flash_sdp(False)
