"""Random-number isolation: profiling, measuring and probing importance must not shift training's random streams.

Dropout in those extra forward passes draws from the CPU generator and, on a GPU, from the device's generators; a
collator may draw from Python's or numpy's global generator. A run with GreenTrainer must see the same random numbers
in its training steps as the same run without it: the generators a Trainer checkpoint saves are all put back.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


@contextmanager
def fork_rng() -> Iterator[None]:
    """Fork Python's and numpy's global generators, the CPU generator and those of every device of the current
    accelerator (CUDA, XPU, ...), if any."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    accelerator = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
    if accelerator is None:
        torch_fork = torch.random.fork_rng(devices=[])
    else:
        module = torch.get_device_module(accelerator.type)
        torch_fork = torch.random.fork_rng(devices=list(range(module.device_count())), device_type=accelerator.type)
    try:
        with torch_fork:
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
