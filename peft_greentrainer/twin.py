"""A weightless twin of a tuned model: the same architecture and GreenTrainer config on ``meta``, for profiling.

Profiles only need shapes, so a twin costs no memory. ``model.py`` uses one to price full fine-tuning of a quantized
base (which cannot be fully fine-tuned itself); ``fsdp.py`` makes one of fake tensors on the real device to profile
a sharded model as if it were whole.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .backprop import keep_backprop_shallow


def weightless_twin(tuner, model_class: type[nn.Module]):
    """``tuner``'s architecture (``model_class`` built from its base's config) on ``meta``, tuned with a copy of its
    GreenTrainer config; the twin never trains, and it is float even where the base is quantized."""
    from peft import get_peft_model

    config = copy.deepcopy(tuner.model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # with a KV cache transformers skips a data-dependent mask check that meta tensors cannot run; the cache only keeps
    # keys and values, it adds no FLOPs
    config.use_cache = True
    with torch.device("meta"):
        base = model_class(config)
    twin = get_peft_model(base, copy.deepcopy(tuner.greentrainer_config)).base_model
    twin.__dict__["_step_hook"].remove()
    keep_backprop_shallow(twin.model, quiet=True)
    return twin
