"""``GreenTrainerConfig``: the PEFT config of GreenTrainer (a ``LoraConfig`` plus the budget and selection fields)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from peft import LoraConfig

from .registration import GREENTRAINER_PEFT_TYPE

UNIT_KINDS = ("tensors", "lora")


@dataclass
class GreenTrainerConfig(LoraConfig):
    """Configuration of a [`GreenTrainerModel`]: train, every selection interval, only the units that pay.

    The LoRA fields of [`peft.LoraConfig`] (``r``, ``lora_alpha``, ``target_modules``, ``lora_dropout``, ...) apply
    when ``units="lora"`` and are ignored when ``units="tensors"``.

    Args:
        rho: Allowed fraction of the FLOPs of full fine-tuning of the base model (forward + backward with every base
            parameter trainable), per training step. ``0 < rho <= 1``; the same ``rho`` costs the same for both unit
            kinds. Too small a ``rho`` for a model raises an error that names the smallest feasible one.
        units: ``"tensors"`` selects among the base model's own float parameter tensors (trained in place);
            ``"lora"`` inserts LoRA adapters on ``target_modules`` and selects among them (one unit per module).
        selection_interval: Re-select every this many epochs.
        selection_interval_steps: Re-select every this many optimizer steps instead (overrides the epoch interval).
        importance_batches: Training batches whose averaged gradient gives the importance of each unit.
        dp_resolution: Budget resolution of the dynamic program (time and memory grow linearly with it).
        include_patterns: Regular expressions: only units whose name matches one are candidates.
        exclude_patterns: Regular expressions: units whose name matches one are never candidates.
        sparse_lm_head: Compute a causal LM's logits and loss only at positions whose next-token label is not -100
            (see ``sparse_head.py``): the same loss and gradients, without the LM-head work on prompt and padding.
            The cost profile measures what runs, so ``rho`` is then a fraction of full fine-tuning *with the same
            sparse head*. Models it cannot be exact for (encoder-decoders, forwards without a boolean
            ``logits_to_keep``) keep the dense head, with one log line.
    """

    rho: float = field(
        default=0.5,
        metadata={"help": "Fraction of full fine-tuning FLOPs allowed per step, in (0, 1]."},
    )
    units: Literal["tensors", "lora"] = field(
        default="tensors",
        metadata={"help": "'tensors': select base parameter tensors; 'lora': select LoRA adapters on target_modules."},
    )
    selection_interval: int = field(default=1, metadata={"help": "Select units every this many epochs."})
    selection_interval_steps: int | None = field(
        default=None, metadata={"help": "Select units every this many optimizer steps (overrides the epochs)."}
    )
    importance_batches: int = field(
        default=4, metadata={"help": "Number of training batches used to estimate unit importance."}
    )
    dp_resolution: int = field(
        default=10_000, metadata={"help": "Budget resolution of the exact dynamic program (cost is linear in it)."}
    )
    include_patterns: list[str] | None = field(
        default=None, metadata={"help": "Regexes; when set, only units whose name matches one are candidates."}
    )
    exclude_patterns: list[str] | None = field(
        default=None, metadata={"help": "Regexes; units whose name matches one are never candidates."}
    )
    sparse_lm_head: bool = field(
        default=True,
        metadata={"help": "Causal LMs: logits and loss only where the next-token label is not -100 (exact)."},
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = GREENTRAINER_PEFT_TYPE
        if isinstance(self.rho, bool) or not isinstance(self.rho, (int, float)) or not math.isfinite(self.rho):
            raise ValueError(f"rho must be a number in (0, 1], got {self.rho!r}.")
        if not 0 < self.rho <= 1:
            raise ValueError(
                f"rho must be in (0, 1] (a fraction of full fine-tuning FLOPs), got {self.rho}; "
                "use rho=1 for full fine-tuning."
            )
        if self.units not in UNIT_KINDS:
            raise ValueError(f"units must be one of {UNIT_KINDS}, got {self.units!r}.")
        for name in ("selection_interval", "importance_batches", "dp_resolution"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if not isinstance(self.sparse_lm_head, bool):
            raise ValueError(f"sparse_lm_head must be True or False, got {self.sparse_lm_head!r}.")
        steps = self.selection_interval_steps
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ValueError(f"selection_interval_steps must be a positive integer or None, got {steps!r}.")
        for name in ("include_patterns", "exclude_patterns"):
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, [value])

    def to_lora_config(self) -> LoraConfig:
        """The plain ``LoraConfig`` with the same LoRA fields (for exporting a units="lora" adapter)."""
        lora_fields = {f for f in LoraConfig.__dataclass_fields__ if f != "peft_type"}
        values = {name: getattr(self, name) for name in lora_fields if name in self.__dict__}
        return LoraConfig(**{k: v for k, v in values.items() if k in _init_fields(LoraConfig)})


def _init_fields(cls) -> set[str]:
    return {name for name, f in cls.__dataclass_fields__.items() if f.init}
