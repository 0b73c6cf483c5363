"""Random-number isolation: profiling, measuring and probing importance must not shift training's random streams.

Dropout in those extra forward passes draws from the CPU generator and, on a GPU, from the device's generators; a run
with GreenTrainer must see the same random numbers in its training steps as the same run without it.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch


def fork_rng() -> AbstractContextManager:
    """Fork the CPU generator and those of every device of the current accelerator (CUDA, XPU, ...), if any."""
    accelerator = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
    if accelerator is None:
        return torch.random.fork_rng(devices=[])
    module = torch.get_device_module(accelerator.type)
    return torch.random.fork_rng(devices=list(range(module.device_count())), device_type=accelerator.type)
