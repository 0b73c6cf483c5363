"""What GreenTrainer can select: *units*, each a group of parameter tensors trained or frozen together.

Two kinds exist:

* ``tensor_units``: every distinct floating-point parameter tensor of the base model is one unit. Tied tensors
  (an input embedding shared with the LM head) are a single unit listed under all of their names, because freezing
  one alias freezes the other.
* ``lora_units``: every LoRA-adapted module is one unit made of its adapter tensors (A and B, plus the DoRA
  magnitude or LoRA bias where present), so an adapter is trained or frozen as a whole. ``auxiliary_units`` adds
  the other tensors a LoRA adapter trains (``modules_to_save`` copies, a task head, trainable tokens, biases) as
  one unit each: whatever trains must be a unit, or it would train outside the budget.

Units here are plain descriptions (names); the cost profile gives them their position in backward order.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class Unit:
    """A selectable group of parameter tensors.

    Attributes:
        name: Display name (a parameter name for tensor units, a module path for LoRA units).
        param_names: Canonical names (as in ``model.named_parameters()``) of the tensors the unit trains.
        aliases: Every other name under which one of those tensors is reachable (tied weights).
    """

    name: str
    param_names: tuple[str, ...]
    aliases: tuple[str, ...] = field(default=())

    def parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [model.get_parameter(name) for name in self.param_names]

    def numel(self, model: nn.Module) -> int:
        return sum(p.numel() for p in self.parameters(model))


@contextmanager
def requires_grad_kept(params: Iterable[nn.Parameter]) -> Iterator[None]:
    """Every ``requires_grad`` flag of ``params`` as it was on leaving, whatever the block switched: measuring costs
    or importance, or registering hooks, must not change what trains."""
    flags = [(param, param.requires_grad) for param in params]
    try:
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)


def is_trainable_storage(param: torch.Tensor) -> bool:
    """Quantized storage (bitsandbytes int8 / packed 4-bit) has no usable gradient; only float tensors can train.

    Packed 4-bit weights may be stored in a float dtype (``bnb_4bit_quant_storage=torch.bfloat16``, as FSDP-QLoRA
    recipes set it): bitsandbytes marks them, and they are quantized whatever their dtype says."""
    if getattr(param, "bnb_quantized", False) or getattr(param, "quant_state", None) is not None:
        return False
    return param.dtype.is_floating_point or param.dtype.is_complex


def float_packed_weights(model: nn.Module) -> dict[str, torch.dtype]:
    """Quantized weights stored in a float dtype (bitsandbytes 4-bit with a float ``bnb_4bit_quant_storage``), by
    name, with that dtype."""
    return {
        n: p.dtype for n, p in model.named_parameters() if not is_trainable_storage(p) and p.dtype.is_floating_point
    }


def parameter_aliases(model: nn.Module) -> dict[str, list[str]]:
    """Map each canonical parameter name to all names sharing that tensor (first one first). The canonical name is
    the first one without the path parts that wrappers insert (``checkpoint_wrapper``'s, ``torch.compile``'s), as
    the model's ``state_dict`` names it; it still resolves through the wrappers (``get_parameter``)."""
    by_tensor: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(param), []).append(name)
    return {unwrapped_name(names[0]): names for names in by_tensor.values()}


def unwrapped_name(name: str) -> str:
    """``name`` without the path parts activation checkpointing's and ``torch.compile``'s wrappers insert
    (accelerate's ``fsdp2_canonicalize_names``)."""
    from accelerate.utils.fsdp_utils import fsdp2_canonicalize_names

    return next(iter(fsdp2_canonicalize_names({name: None})))


def matches_any(name: str, patterns: Sequence[str] | None) -> bool:
    """Whether ``re.search`` finds one of ``patterns`` in ``name`` (none given: False)."""
    return any(re.search(pattern, name) for pattern in patterns or ())


def tensor_units(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    names: Iterable[str] | None = None,
) -> list[Unit]:
    """One unit per distinct float parameter tensor, in ``named_parameters`` order.

    Args:
        include: Regular expressions; when given, only tensors whose name (or an alias) matches one are candidates.
        exclude: Regular expressions; tensors whose name (or an alias) matches one are never candidates.
        names: Restrict to these canonical parameter names (used by the tuner, which keeps its own candidate list).
    """
    allowed = set(names) if names is not None else None
    units = []
    for canonical, all_names in parameter_aliases(model).items():
        param = model.get_parameter(canonical)
        if not is_trainable_storage(param):
            continue
        if allowed is not None and canonical not in allowed:
            continue
        if include and not any(matches_any(n, include) for n in all_names):
            continue
        if exclude and any(matches_any(n, exclude) for n in all_names):
            continue
        units.append(Unit(name=canonical, param_names=(canonical,), aliases=tuple(all_names[1:])))
    return units


def lora_units(model: nn.Module, adapter_name: str = "default") -> list[Unit]:
    """One unit per PEFT LoRA layer: the adapter's own tensors (``lora_*`` parameters of ``adapter_name``).

    Not the layers inside the frozen ``original_module`` PEFT keeps beside a ``modules_to_save`` copy (LoRA injected
    into a head before PEFT wrapped it): they never run while the copy does, and PEFT never trains them."""
    from peft.tuners.lora import LoraLayer

    units = []
    for module_name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or "original_module" in module_name.split("."):
            continue
        # "lora_A.<adapter>.weight", "lora_embedding_A.<adapter>", ...: the adapter is the second component (a
        # looser match would mix in another adapter whose name equals a parameter name, such as "weight")
        tensors = tuple(
            f"{module_name}.{pname}"
            for pname, _ in module.named_parameters()
            if pname.startswith("lora_") and pname.split(".")[1:2] == [adapter_name]
        )
        if tensors:
            units.append(Unit(name=module_name, param_names=tensors))
    return units


_AUXILIARY_CONTAINERS = ("modules_to_save", "trainable_tokens_delta")  # PEFT's per-adapter copies and deltas


def auxiliary_units(model: nn.Module, adapter_name: str = "default", bias: str = "none") -> list[Unit]:
    """One unit per tensor a PEFT LoRA adapter trains besides its ``lora_*`` tensors, in model order.

    These are its ``modules_to_save`` copies (PEFT adds the task head of sequence classification there itself), its
    ``trainable_token_indices`` deltas, and the base biases ``bias="all"`` or ``"lora_only"`` trains (PEFT's own rules:
    every ``*.bias``, or those of LoRA-adapted layers).
    """
    from peft.tuners.lora import LoraLayer

    adapted_biases = set()
    if bias.endswith("_only"):
        adapted_biases = {
            id(m.bias) for m in model.modules() if isinstance(m, LoraLayer) and getattr(m, "bias", None) is not None
        }
    # the originals PEFT keeps frozen beside its copies; one may sit inside another module's copy too, or be the
    # same tensor as a module of a copy (``modules_to_save`` naming a part of the task head PEFT adds)
    originals = {id(p) for n, p in model.named_parameters(remove_duplicate=False) if "original_module" in n.split(".")}
    units = []
    for name, param in model.named_parameters():
        parts = name.split(".")
        # (a LoRA layer inside the copy is a LoRA unit of its own: its ``lora_*`` tensors are not repeated here)
        copied = (
            id(param) not in originals
            and any(part in _AUXILIARY_CONTAINERS and parts[i + 1] == adapter_name for i, part in enumerate(parts[:-1]))
            and not any(part.startswith("lora_") and parts[i + 1] == adapter_name for i, part in enumerate(parts[:-1]))
        )
        is_bias = parts[-1] == "bias" and "lora_" not in name and "original_module" not in parts
        trained_bias = is_bias and (bias == "all" or id(param) in adapted_biases)
        if (copied or trained_bias) and is_trainable_storage(param):
            units.append(Unit(name=name, param_names=(name,)))
    return units


def inputs_device(model: nn.Module) -> torch.device:
    """Where ``model``'s inputs go: its first weight's device, passing over the weights accelerate keeps on ``meta``
    between forwards (offloaded: its hooks bring them in); ``meta`` where every weight is (a plan from a config)."""
    found = None
    for param in model.parameters():
        if param.device.type != "meta":
            return param.device
        found = found or param.device
    if found is None:
        raise ValueError("model has no parameters")
    return found
