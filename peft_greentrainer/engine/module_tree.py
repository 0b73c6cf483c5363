"""A model's modules as a flat list, reused from one training step to the next while the module tree stays the same.

The check before every training step reads state that may change between steps in every module (eval mode,
checkpointing, forced input-gradient hooks, 4-bit weights packed for inference). Walking ``nn.Module.named_modules``
for each of them, a tree of nested generators, cost more than the reads: 12 ms per step on a 1,335-module model, 25 ms
on a 2,497-module one (``benchmarks/bench_step_hook.py``), host time a GPU waits through.

A listing is reused only while it provably equals what a fresh walk would yield. ``named_modules`` reads nothing but
each reached module's ``_modules``, so if every listed module's ``_modules`` holds the same (name, child) items in the
same order, the walk reaches the same modules under the same names. Their classes are compared as well (which
modules are checkpointing layers is an ``isinstance`` test), and a tree holding a module that walks its children
its own way (an overridden ``named_modules``) is listed afresh every time.

Besides the class-based subsets, two are taken from attributes at listing time, which is when the libraries set them:
the modules with a ``config`` (transformers sets a module's config when it builds it) and those whose weight has a
``quant_state`` (bitsandbytes' 4-bit weights, which its layers get when built, moves and quantization included). Their
values are read again at every use.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import nn

__all__ = ["ModuleTree", "checkpointing_layer_class"]


@functools.cache
def checkpointing_layer_class() -> type | None:
    """transformers' ``GradientCheckpointingLayer`` (the layers that checkpoint their forward), None without it."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover - transformers always has it in the supported range
        return None
    return GradientCheckpointingLayer


class ModuleTree:
    """``root.named_modules()`` as a list, with the subsets the step check reads; reuse it through :meth:`of`."""

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self.named: list[tuple[str, nn.Module]] = list(root.named_modules())
        self._fingerprint = _fingerprint(self.named)
        # never reused: a module of it may walk differently from what its ``_modules`` say
        self._reusable = all(_walks_as_module(type(m)) for _, m in self.named)

    @classmethod
    def of(cls, root: nn.Module, cached: ModuleTree | None) -> ModuleTree:
        """``cached`` if it still lists ``root``'s modules as a walk would (module docstring), else a new listing."""
        reusable = cached is not None and cached.root is root and cached._reusable
        if reusable and _fingerprint(cached.named) == cached._fingerprint:
            return cached
        return cls(root)

    def __getstate__(self) -> dict[str, Any]:
        """Copied or pickled, a listing keeps nothing (it may name classes made at run time, such as FSDP2's, which
        do not pickle): the copy lists its root again at its first use."""
        return {"root": None, "named": [], "_fingerprint": [], "_reusable": False}

    @functools.cached_property
    def modules(self) -> list[nn.Module]:
        return [module for _, module in self.named]

    @functools.cached_property
    def checkpointing_layers(self) -> list[tuple[str, nn.Module]]:
        """The modules that can checkpoint their forward (whether they do is their flags', read at each use)."""
        layer = checkpointing_layer_class()
        return [] if layer is None else [(name, m) for name, m in self.named if isinstance(m, layer)]

    @functools.cached_property
    def config_holders(self) -> list[nn.Module]:
        """The modules with a ``config`` (transformers' models and many of their layers)."""
        return [m for _, m in self.named if getattr(m, "config", None) is not None]

    @functools.cached_property
    def valid_frame_encoders(self) -> list[nn.Module]:
        """Audio encoders that run on each clip's valid frames alone (Qwen3-ASR's, Qwen-Omni's): their work follows
        the clips' lengths in the batch's mask, not its shape (other audio encoders run on the padded clip)."""
        return [m for m in self.config_holders if getattr(m.config, "model_type", None) in _VALID_FRAME_ENCODERS]

    @functools.cached_property
    def quantized_weight_holders(self) -> list[nn.Module]:
        """The modules whose ``weight`` has a ``quant_state``: bitsandbytes' 4-bit layers, and PEFT's wrappers of
        them."""
        return [m for _, m in self.named if hasattr(getattr(m, "weight", None), "quant_state")]


# transformers' model types of the audio encoders that keep a clip's valid frames before their layers
_VALID_FRAME_ENCODERS = frozenset({"qwen3_asr_encoder", "qwen2_5_omni_audio_encoder", "qwen3_omni_moe_audio_encoder"})


def _fingerprint(named: list[tuple[str, nn.Module]]) -> list:
    """Each listed module's class and its children's (name, module) items, in order: what decides a walk's result."""
    found: list = []
    for _, module in named:
        found.append(type(module))
        found.extend(module._modules.items())
    return found


@functools.cache
def _walks_as_module(cls: type) -> bool:
    return cls.named_modules is nn.Module.named_modules and cls.modules is nn.Module.modules
