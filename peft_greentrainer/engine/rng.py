"""Random-number isolation: profiling, measuring and probing importance must not shift training's random streams
(nor, ``running_stats_kept``, the running statistics of batch norms).

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
from torch import nn


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


@contextmanager
def running_stats_kept(model: nn.Module) -> Iterator[None]:
    """Put back the running statistics that batch and instance norms update in every forward in training mode: a
    forward that is no training step must not move them."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]
    saved = [{name: value.clone() for name, value in m.named_buffers(recurse=False)} for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for module, buffers in zip(norms, saved, strict=True):
                for name, value in buffers.items():
                    getattr(module, name).copy_(value)
