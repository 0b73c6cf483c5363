"""``GreenTrainerConfig``: the PEFT config of GreenTrainer (a ``LoraConfig`` plus the budget and selection fields).

On disk, a units="lora" adapter is a plain LoRA adapter: ``adapter_config.json`` is a ``LoraConfig`` (so vLLM, TGI
and PEFT without this package load it as LoRA) and GreenTrainer's own fields sit alongside in
``greentrainer_config.json``, which LoRA consumers ignore. With this package imported, loading such a directory gives
the ``GreenTrainerConfig`` back (see registration.py). A units="tensors" adapter holds base tensors, which no LoRA
consumer can use: it is saved as a GreenTrainer config, as are adapters saved by earlier versions, which still load.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import numbers
import os
import re
from dataclasses import dataclass, field
from typing import Literal

from peft import LoraConfig, PeftConfig
from peft.utils import CONFIG_NAME

from .registration import GREENTRAINER_PEFT_TYPE

logger = logging.getLogger(__name__)

UNIT_KINDS = ("tensors", "lora")
IMPORTANCE_UPDATES = ("optimizer", "gradient")
METADATA_NAME = "greentrainer_config.json"


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
        importance_batches: Training batches whose averaged gradient gives the importance of each unit. One (the
            paper's "one extra iteration") costs about one training step at ``rho``; on SmolLM2-135M mid-training, a
            one-batch choice kept 98.5% of the importance of a 16-batch one, four batches 99.3% (bench_importance.py).
        importance_update: Which update ``delta_w`` the importance ``-sum(g * delta_w)`` predicts. ``"optimizer"``
            (the paper's): the optimizer's own next update; under AdamW an untrained unit's first step is about
            ``-lr * sign(g)``, so its importance is about ``lr * |g|_1`` and grows with the unit's size. ``"gradient"``:
            a plain gradient step at each param group's base learning rate (importance ``lr * |g|^2``), which ranks
            units by how steeply the loss falls along them, whatever their size and optimizer state. In the quality
            protocol (SmolLM2-135M on ACLSum, tensor units at half of full fine-tuning's FLOPs) it lowered the
            held-out loss beyond the seed spread; see docs/results.md.
        dp_resolution: Budget resolution of the dynamic program (time and memory grow linearly with it).
        include_patterns: Regular expressions: only units whose name matches one are candidates.
        exclude_patterns: Regular expressions: units whose name matches one are never candidates.
        sparse_lm_head: Compute a causal LM's logits and loss only at positions whose next-token label is not -100
            (see ``sparse_head.py``): the same loss and gradients, without the LM-head work on prompt and padding.
            The cost profile measures what runs, so ``rho`` is then a fraction of full fine-tuning *with the same
            sparse head*. Models it cannot be exact for (encoder-decoders, forwards without a boolean
            ``logits_to_keep``) keep the dense head, with one log line; so do FSDP2-sharded models and
            ``return_dict=False`` forwards. The dense head is then what is priced.
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
        default=1, metadata={"help": "Number of training batches used to estimate unit importance."}
    )
    importance_update: Literal["optimizer", "gradient"] = field(
        default="optimizer",
        metadata={
            "help": "The update the importance predicts: 'optimizer' (its next step, the paper's) or 'gradient' (a "
            "plain gradient step at the base learning rate: lr * |g|^2)."
        },
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
        if isinstance(self.rho, bool) or not isinstance(self.rho, numbers.Real) or not math.isfinite(self.rho):
            raise ValueError(f"rho must be a number in (0, 1], got {self.rho!r}.")
        self.rho = float(self.rho)  # a numpy scalar (from a sweep) would not serialise to adapter_config.json
        if not 0 < self.rho <= 1:
            raise ValueError(
                f"rho must be in (0, 1] (a fraction of full fine-tuning FLOPs), got {self.rho}; "
                "use rho=1 for full fine-tuning."
            )
        if self.units not in UNIT_KINDS:
            raise ValueError(f"units must be one of {UNIT_KINDS}, got {self.units!r}.")
        for name in ("selection_interval", "importance_batches", "dp_resolution"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
            setattr(self, name, int(value))
        if self.importance_update not in IMPORTANCE_UPDATES:
            raise ValueError(f"importance_update must be one of {IMPORTANCE_UPDATES}, got {self.importance_update!r}.")
        if not isinstance(self.sparse_lm_head, bool):
            raise ValueError(f"sparse_lm_head must be True or False, got {self.sparse_lm_head!r}.")
        steps = self.selection_interval_steps
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1):
            raise ValueError(f"selection_interval_steps must be a positive integer or None, got {steps!r}.")
        self.selection_interval_steps = None if steps is None else int(steps)
        for name in ("include_patterns", "exclude_patterns"):
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, [value])
            for pattern in getattr(self, name) or ():
                try:
                    re.compile(pattern)
                except re.error as error:
                    raise ValueError(f"{name} holds {pattern!r}, which is not a regular expression: {error}.") from None
        if self.units == "lora" and self.layer_replication:
            raise ValueError(
                "layer_replication deepens the model before training, so rho would be a fraction of full fine-tuning "
                "of the deeper model, not of the base model given. Replicate the layers first "
                "(peft.tuners.tuners_utils.replicate_layers(model, layer_map)) and tune the result, whose full "
                "fine-tuning rho then refers to."
            )
        self.check_trainable()
        ignored = self._lora_fields_set()
        if self.units == "tensors" and ignored:
            logger.warning(
                "GreenTrainerConfig: %s set, but units='tensors' trains the base model's own tensors in place and "
                "ignores LoRA fields. Pass units='lora' to train LoRA adapters; include_patterns/exclude_patterns "
                "choose which tensors are candidates.",
                ", ".join(ignored),
            )

    def check_trainable(self) -> None:
        """Refuse what GreenTrainer cannot train within its budget, unless the adapter is loaded for inference only
        (``inference_mode``: it is saved so, and ``PeftModel.from_pretrained(..., is_trainable=True)`` clears it
        before the tuner is built, which checks again)."""
        if self.inference_mode or self.units != "lora" or not getattr(self, "alora_invocation_tokens", None):
            return
        raise ValueError(
            "alora_invocation_tokens (activated LoRA) runs the adapters only on the tokens after the invocation "
            "sequence, which PEFT finds in each batch inside PeftModelForCausalLM.forward; GreenTrainer prices and "
            "ranks the adapters on the model below that wrapper, where they would run on no token (a step then cost "
            "1.30x full fine-tuning at rho=0.7). Train activated LoRA with plain LoRA (peft.LoraConfig), or leave "
            "alora_invocation_tokens unset."
        )

    def _lora_fields_set(self) -> list[str]:
        """The LoRA fields given values other than their defaults (``modules_to_save`` aside: PEFT's task models fill
        it with their head, which units="tensors" trains as a base tensor)."""
        changed = []
        for name, spec in LoraConfig.__dataclass_fields__.items():
            if name in PeftConfig.__dataclass_fields__ or name == "modules_to_save" or not spec.init:
                continue
            default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
            if getattr(self, name, default) != default:
                changed.append(name)
        return changed

    @property
    def init_weights(self) -> bool | str:
        """``init_lora_weights`` under the name PEFT gives a method other than LoRA: ``PeftModel.save_pretrained``
        sets it on the initial adapter of a PiSSA/OLoRA conversion (``path_initial_model_for_weight_conversion``),
        which must say ``True``."""
        return self.init_lora_weights

    @init_weights.setter
    def init_weights(self, value: bool | str) -> None:
        self.init_lora_weights = value

    def to_lora_config(self) -> LoraConfig:
        """The plain ``LoraConfig`` with the same LoRA fields (what a units="lora" adapter is saved as)."""
        lora_fields = {f for f in LoraConfig.__dataclass_fields__ if f != "peft_type"}
        values = {name: getattr(self, name) for name in lora_fields if name in self.__dict__}
        return LoraConfig(**{k: v for k, v in values.items() if k in _init_fields(LoraConfig)})

    def greentrainer_fields(self) -> dict:
        """GreenTrainer's own fields (those a ``LoraConfig`` does not have), JSON-ready."""
        return {name: getattr(self, name) for name in _own_fields()}

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """units="lora": a plain ``LoraConfig`` in ``adapter_config.json`` plus ``greentrainer_config.json``.

        units="tensors": the GreenTrainer config in ``adapter_config.json``, as PEFT writes any config.
        """
        metadata = os.path.join(save_directory, METADATA_NAME)
        if self.units != "lora":
            super().save_pretrained(save_directory, **kwargs)
            if os.path.isfile(metadata):  # left by an earlier units="lora" save: it would describe another adapter
                os.remove(metadata)
            return
        self.to_lora_config().save_pretrained(save_directory, **kwargs)
        with open(metadata, "w") as handle:
            fields = {**self.greentrainer_fields(), FINGERPRINT: lora_fingerprint(save_directory)}
            json.dump(fields, handle, indent=2, sort_keys=True)

    @classmethod
    def from_lora_config(cls, lora_config: LoraConfig, metadata: dict) -> GreenTrainerConfig:
        """Rebuild the config of a units="lora" adapter from its ``LoraConfig`` and ``greentrainer_config.json``."""
        unknown = set(metadata) - set(_own_fields())
        if unknown:
            raise ValueError(
                f"{METADATA_NAME} has fields this version of peft-greentrainer does not know: {sorted(unknown)}. "
                f"Upgrade peft-greentrainer, or move {METADATA_NAME} away to load the adapter as plain LoRA."
            )
        lora_values = {f.name: getattr(lora_config, f.name) for f in dataclasses.fields(LoraConfig) if f.init}
        lora_values.pop("peft_type", None)
        return cls(**lora_values, **metadata)

    @staticmethod
    def read_metadata(directory: str | os.PathLike) -> dict | None:
        """The GreenTrainer fields saved next to the LoRA ``adapter_config.json`` of ``directory``, if any. None, with
        a warning, when they were saved with another LoRA config: a plain LoRA adapter saved later into the same
        directory (a reused output directory) is that adapter, not GreenTrainer's."""
        path = os.path.join(directory, METADATA_NAME)
        if not os.path.isfile(path):
            return None
        with open(path) as handle:
            metadata = json.load(handle)
        saved_with = metadata.pop(FINGERPRINT, None)  # absent in files of earlier versions: trusted as before
        if saved_with is not None and saved_with != lora_fingerprint(directory):
            logger.warning(
                "%s was saved with another LoRA config than the adapter_config.json beside it (a plain LoRA adapter "
                "saved into the same directory later?), so the adapter loads as plain LoRA. Delete the file if that "
                "is what the directory holds.",
                path,
            )
            return None
        return metadata


FINGERPRINT = "lora_config_fingerprint"
# what saving or hand-editing an adapter changes without making it another adapter
_UNIDENTIFYING = {"base_model_name_or_path", "revision", "inference_mode", "peft_version", "auto_mapping"}


def lora_fingerprint(directory: str | os.PathLike) -> str | None:
    """A short hash of the LoRA config written in ``directory`` (its ``adapter_config.json`` as stored, so that a
    PEFT release with new fields reads the same hash from an old file), less what does not identify the adapter."""
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        values = {k: v for k, v in json.load(handle).items() if k not in _UNIDENTIFYING}
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def _init_fields(cls) -> set[str]:
    return {name for name, f in cls.__dataclass_fields__.items() if f.init}


def _own_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(GreenTrainerConfig) if f.name not in LoraConfig.__dataclass_fields__]
