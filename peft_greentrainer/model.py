"""``GreenTrainerModel``: the PEFT tuner that applies budgeted unit selections to a model.

units="lora" reuses PEFT's LoRA layers unchanged (including their bitsandbytes variants): this tuner is a
``LoraModel`` that additionally freezes the adapters that do not pay. units="tensors" injects nothing and trains the
selected base tensors *in place*: no copy of the model is kept, so memory stays that of the base model. Two
consequences, both enforced with clear errors rather than wrong weights:

* the saved adapter holds exactly the tensors that were ever trained; loading writes them onto a fresh base;
* ``disable_adapter()`` and ``unload()`` cannot give the original weights back (there is no separate adapter);
  ``merge_and_unload()`` returns the plain transformers model with the trained weights.

Flow of one selection (``select_units``): cost profiles of the batch shapes -> importance of the units that can fit the
budget at all of them -> exact DP -> ``requires_grad`` flags, so autograd skips frozen weight gradients and stops below
the deepest selected unit.

The budget is a promise per training step, at every batch shape the run trains on (dynamic padding, packing, uneven
last batches, checkpointing switched on later): before each training forward the tuner looks at the inputs' shapes and
the model's mode. A shape not seen before is profiled on one row of the batch (costs are linear in the batch size) and,
if the current selection would cost more than ``rho`` there, the units are re-selected with the same importances
against every shape seen so far. Under ``torch.distributed`` the ranks exchange the costs of their new shapes before
deciding, so every rank decides on the same data, and the decision is checked to agree.
"""

from __future__ import annotations

import functools
import logging
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from itertools import islice
from typing import Any

import numpy as np
import torch
from peft.tuners.lora import LoraLayer, LoraModel
from peft.utils import PeftType
from torch import nn

from . import ddp, fsdp, ranks
from .backprop import keep_backprop_shallow, unpack_weights_packed_for_inference
from .config import GreenTrainerConfig
from .engine.attention_kernels import LearnedBiasProbe, use_math_attention
from .engine.costs import UnitCosts, select_at_every_shape
from .engine.importance import compute_importance
from .engine.module_tree import ModuleTree
from .engine.optimizer_params import held_parameters, per_parameter_optimizers, stepped_parameters, unwrap_optimizer
from .engine.optimizer_update import base_learning_rates, plain_gradient_step
from .engine.profile import (
    CostProfile,
    LossFn,
    batch_size,
    computation_free_experts,
    default_loss,
    layer_drop_settings,
    profile_model,
    routed_expert_modules,
    training_mode,
)
from .engine.rng import fork_rng, running_stats_kept
from .engine.selector import Selection
from .engine.step_loss import as_batch, probe_loss
from .engine.units import (
    Unit,
    auxiliary_units,
    float_packed_weights,
    inputs_device,
    is_trainable_storage,
    lora_units,
    matches_any,
    parameter_aliases,
    requires_grad_kept,
    tensor_units,
)
from .pricing import StepPricer, is_each_row_more
from .sparse_head import attached_sparse_lm_head, enable_sparse_lm_head
from .twin import fake_inputs, fake_twin, mirror_modes, twin_runs

logger = logging.getLogger(__name__)

BASE_PREFIX = "base_model.model."


@dataclass
class SelectionRecord:
    """What one selection decided, for logs, reports and resuming."""

    step: int
    epoch: float
    selected: list[str]
    predicted_ratio: float
    ratio_vs_lora: float | None
    importance: float
    num_units: int
    seconds: float
    # "importance": a new importance evaluation; "batch shape": the same importances re-selected because a batch shape
    # seen in training would have cost more than rho with the previous selection
    reason: str = "importance"


@dataclass
class GreenTrainerState:
    """Selections made so far; kept on the model as ``model.greentrainer_state``."""

    selected: list[str] = field(default_factory=list)
    trained_tensors: list[str] = field(default_factory=list)
    history: list[SelectionRecord] = field(default_factory=list)
    # unit name -> importance of the last evaluation (units that could not fit were not evaluated: 0); a re-selection
    # for a new batch shape reuses them, also after resuming from a checkpoint
    importance: dict[str, float] = field(default_factory=dict)

    @property
    def last(self) -> SelectionRecord | None:
        return self.history[-1] if self.history else None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> GreenTrainerState:
        history = [SelectionRecord(**record) for record in data.get("history", [])]
        importance = {str(k): float(v) for k, v in (data.get("importance") or {}).items()}
        return cls(list(data.get("selected", [])), list(data.get("trained_tensors", [])), history, importance)


class _AccumulationWindow:
    """Training forwards since the last step of the optimizer followed (a step hook resets the count), so that a
    re-selection knows whether it falls inside a gradient-accumulation window. Pickled or copied, it follows no
    optimizer (the hook belongs to the original) until the next ``select_units``."""

    def __init__(self) -> None:
        self.forwards = 0
        self._optimizer: weakref.ref | None = None
        self._hook: Any = None

    def follow(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Follow ``optimizer``'s steps (unwrapped; None or one without step hooks: follow none)."""
        inner = unwrap_optimizer(optimizer)
        if inner is None or self.following(inner):
            return
        self.stop()
        try:
            hook = inner.register_step_post_hook(self._window_ends)
        except AttributeError:  # a wrapper that never ran Optimizer.__init__: gradients will have to tell
            return
        self._optimizer, self._hook, self.forwards = weakref.ref(inner), hook, 0

    def stop(self) -> None:
        if self._hook is not None:
            self._hook.remove()
        self._optimizer, self._hook, self.forwards = None, None, 0

    def following(self, optimizer: torch.optim.Optimizer | None = None) -> bool:
        followed = self._optimizer() if self._optimizer is not None else None
        return followed is not None and (optimizer is None or followed is optimizer)

    def _window_ends(self, *_: Any) -> None:
        self.forwards = 0

    def __getstate__(self) -> dict[str, Any]:
        return {"forwards": 0, "_optimizer": None, "_hook": None}


class _WeakLink:
    """A weak reference that copies and pickles as empty: what it points to (a DDP wrapper) belongs to this model, not
    to a copy of it."""

    def __init__(self, target: Any = None) -> None:
        self._ref = weakref.ref(target) if target is not None else None

    def __call__(self) -> Any:
        return self._ref() if self._ref is not None else None

    def __getstate__(self) -> dict[str, Any]:
        return {"_ref": None}

    def __deepcopy__(self, memo: dict) -> _WeakLink:
        return _WeakLink()


@dataclass
class _TunerRuntime:
    """The tuner's working state, none of it saved with the adapter: caches, the budget check's hook and records, and
    what a selection must know of the run. One object, so that it is declared in one place."""

    step_hook: Any = None  # handle of the forward pre-hook that checks every training step's budget
    candidates_by_adapter: dict[str, list[str]] = field(default_factory=dict)
    states: dict[str, GreenTrainerState] = field(default_factory=dict)  # per adapter
    pricer: StepPricer | None = None  # the prices of training steps (made on first use: it asks the tuner)
    twin: Any = None  # (float twin, its fake mode) of a quantized base: built once
    busy: int = 0  # > 0 while profiling or computing importance: forwards then are no training step
    selection_applied: bool = False  # whether a selection is in force (the steps are then budget-checked)
    position: tuple[int, float] | None = None  # the Trainer's (step, epoch), for records of in-step re-selections
    step_ratios: list[float] = field(default_factory=list)  # each step's FLOPs ratio since the last read
    window: _AccumulationWindow = field(default_factory=_AccumulationWindow)
    warned_unused: set[str] = field(default_factory=set)
    warned_without_selection: bool = False
    warned_eval_mode: bool = False
    originals: dict[str, torch.Tensor] = field(default_factory=dict)  # units="tensors": values before training
    reloads_best: bool = False  # the Trainer reloads its best checkpoint at the end (load_best_model_at_end)
    flags_while_disabled: list[tuple[nn.Parameter, bool]] | None = None
    module_tree: ModuleTree | None = None  # the base model's modules, listed again when the tree changes
    # selected under torch.distributed with no DDP wrapper found yet: the first training step looks for it again
    ddp_unseen: bool = False
    prepared_ddp: _WeakLink = field(default_factory=_WeakLink)  # the DDP wrapper made to follow selections


# the task types whose model puts a head of its own on the backbone, often newly initialized when loaded
_HEAD_TASKS = frozenset({"SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS"})


def _warn_frozen_task_heads(model: nn.Module, task_type: str | None) -> None:
    """Warn about the modules of a task model, besides its backbone, that LoRA leaves wholly frozen: PEFT's task types
    make only heads whose names hold ``classifier``, ``score`` or ``qa_outputs`` trainable, so BART's and T5's
    ``classification_head`` or XLNet's ``sequence_summary`` and ``logits_proj`` keep what they were loaded with, often a
    random initialization, and the adapters learn around a random projection."""
    if task_type not in _HEAD_TASKS:
        return
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    heads = {name: list(child.parameters()) for name, child in model.named_children() if child is not backbone}
    frozen = [name for name, params in heads.items() if params and not any(p.requires_grad for p in params)]
    if frozen:
        logger.warning(
            "GreenTrainer: the %s model's %s: no LoRA adapter and not in modules_to_save, so frozen as loaded (random, "
            "if transformers reported newly initialized weights there); modules_to_save=%r in the config trains their "
            "weights with the adapters.",
            getattr(task_type, "value", task_type),
            ", ".join(frozen),
            frozen,
        )


def _refuse_what_no_price_bounds(model: nn.Module) -> None:
    """Raise, saying what to do, for a model whose steps' FLOPs follow the data or chance rather than the batch shape
    GreenTrainer prices (routed expert modules, experts that compute nothing, LayerDrop), or whose kernels the profile
    cannot price (4-bit weights packed in a float dtype). Adapters loaded for inference train nothing: not checked."""
    routed = routed_expert_modules(model)
    if routed:
        raise ValueError(
            f"GreenTrainer cannot keep its FLOPs budget on this model: {routed[0]} (and {len(routed) - 1} more) "
            "route each token to some of their expert modules, so a step's FLOPs depend on the routing, not "
            "only on the batch shape GreenTrainer prices. Mixture-of-experts models whose experts are stacked "
            "tensors (transformers 5's Mixtral, Qwen2-MoE, OLMoE, ...) are priced exactly; for this one, use "
            "plain LoRA (peft.LoraConfig)."
        )
    free = computation_free_experts(model)
    if free:
        raise ValueError(
            "GreenTrainer cannot keep its FLOPs budget on this model: it has experts that compute nothing "
            f"({_settings(free)}), so a step's FLOPs depend on how many tokens the router sends to them, not only on "
            "the batch shape GreenTrainer prices (a checkpoint's router is trained with them: they cannot be switched "
            "off). Train this model with plain LoRA (peft.LoraConfig)."
        )
    packed = float_packed_weights(model)
    if packed:
        name, dtype = next(iter(packed.items()))
        raise ValueError(
            f"GreenTrainer cannot price steps on 4-bit weights packed in a float dtype ({name} and "
            f"{len(packed) - 1} more: bnb_4bit_quant_storage={dtype}): bitsandbytes then runs another matmul "
            "path, whose backward the cost profile attributes too low (a step cost 0.68 of full fine-tuning at "
            "rho=0.5). Load the model with the default bnb_4bit_quant_storage (torch.uint8); a float storage "
            "serves FSDP, and GreenTrainer trains quantized bases with DDP, not FSDP."
        )
    layer_drop = layer_drop_settings(model)
    if layer_drop:
        raise ValueError(
            f"GreenTrainer cannot keep its FLOPs budget with LayerDrop on ({_settings(layer_drop)}): in training it "
            "skips layers at random, so a step's FLOPs depend on random draws, not only on the batch shape "
            "GreenTrainer prices. Set each to 0.0 before get_peft_model: in the config (from_pretrained(..., "
            "layerdrop=0.0), "
            "or model.config.layerdrop = 0.0, with the field named) and on each module named (modules copy it "
            "when built); or use plain LoRA (peft.LoraConfig)."
        )


def _settings(found: Mapping[str, Any]) -> str:
    return ", ".join(f"{where}={value}" for where, value in found.items())


class GreenTrainerModel(LoraModel):
    """Tuner for [`GreenTrainerConfig`]; see the module docstring for the two unit kinds."""

    prefix: str = "lora_"

    @property
    def _runtime(self) -> _TunerRuntime:
        """Created on first use: PEFT's tuner injects the adapters from its ``__init__``, before code of ours after
        it could run, and in ``__dict__`` rather than as an attribute because ``nn.Module`` would register the twin
        model it may hold as a submodule, and the tuner forwards unknown attribute names to the base model."""
        return self.__dict__.setdefault("_greentrainer_runtime", _TunerRuntime())

    # ------------------------------------------------------------------ construction
    def _check_new_adapter_config(self, config) -> None:
        """Several adapters per model with units="lora", as LoRA; units="tensors" is alone on its model.

        units="tensors" trains the base model's own tensors in place: a second adapter of any kind would train (or
        sit on top of) the same weights, and switching between them could not give either one its weights back.
        """
        if len(self.peft_config) > 1:
            # transformers' load_adapter may put a plain LoraConfig beside this one
            tensors = [name for name, other in self.peft_config.items() if getattr(other, "units", "") == "tensors"]
            if tensors:
                raise ValueError(
                    f"GreenTrainer with units='tensors' (adapter {tensors[0]!r}) trains the base model's own tensors "
                    "in place, so it cannot share a model with another adapter: each would overwrite the other's "
                    "weights. Use units='lora' for several adapters on one base model, or call get_peft_model on a "
                    "fresh copy of the base model for each units='tensors' run (TRL's DPO and KTO trainers: pass a "
                    "fresh copy as `ref_model=` instead of a reference adapter)."
                )
        if config.units == "lora":
            super()._check_new_adapter_config(config)

    def _prepare_adapter_config(self, peft_config, model_config):
        if peft_config.units == "lora":
            return super()._prepare_adapter_config(peft_config, model_config)
        return peft_config

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        config = self.peft_config[adapter_name]
        config.check_trainable()
        if not config.inference_mode:
            _refuse_what_no_price_bounds(model)
        self._drop_cached_profiles()
        if self._runtime.step_hook is None:  # the budget check before every training forward (module docstring)
            # first: it prices the inputs as given, before a hook rewrites them (a sparse LM head already attached)
            self._runtime.step_hook = model.register_forward_pre_hook(
                self._before_forward, with_kwargs=True, prepend=True
            )
        if config.units == "lora":
            # PEFT renames transformers 4's expert targets before it fills in the default targets, and that renaming
            # turns unset targets into an empty set, which LoRA's own injection then refuses (PEFT 0.21, MoE
            # models): fill in the defaults first
            self._prepare_adapter_config(config, self.get_model_config(model))
            with _seen_as_lora(config):
                super().inject_adapter(model, adapter_name, *args, **kwargs)
            candidates = [p for u in self._lora_candidates(model, adapter_name) for p in u.param_names]
            if not candidates:
                raise ValueError(
                    f"No LoRA adapter of {adapter_name!r} is a candidate: include_patterns/exclude_patterns removed "
                    "every adapted module."
                )
            self._candidates[adapter_name] = candidates
            if not config.inference_mode:
                _warn_frozen_task_heads(model, config.task_type)
            return
        self._check_new_adapter_config(config)  # LoraModel's injection (which would call it) is skipped here
        self._candidates[adapter_name] = self._tensor_candidates(model, config)  # (names without wrappers' parts)
        self._mark_only_adapters_as_trainable(model)

    @property
    def _candidates(self) -> dict[str, list[str]]:
        """Per adapter name: the canonical names of the tensors its units are made of."""
        return self._runtime.candidates_by_adapter

    def _drop_cached_profiles(self) -> None:
        """Cost profiles describe the model as it ran (which adapters it had and which were active): stale once
        adapters are added or deleted (and the listed modules, which would keep deleted ones alive until the next
        step)."""
        self._pricer.drop()
        self._runtime.module_tree = None

    def _module_tree(self) -> ModuleTree:
        """The base model's modules, from the listing of an earlier call while their tree is the same
        (:meth:`ModuleTree.of <peft_greentrainer.engine.module_tree.ModuleTree.of>`)."""
        tree = self._runtime.module_tree = ModuleTree.of(self.model, self._runtime.module_tree)
        return tree

    def _post_injection_hook(self, model: nn.Module, config, adapter_name: str) -> None:
        """Attach the sparse LM head (``config.sparse_lm_head``) to the base model itself, so that everything that
        runs it (the Trainer's forward, the cost profile, importance, FLOP measurements) runs the same head."""
        super()._post_injection_hook(model, config, adapter_name)
        if config.sparse_lm_head and attached_sparse_lm_head(model) is None:
            head = enable_sparse_lm_head(model)
            if head is not None:
                head.attached_by_tuner = True

    @staticmethod
    def _tensor_candidates(model: nn.Module, config) -> list[str]:
        """Float tensors that match the patterns and were trainable before get_peft_model.

        Loading an adapter for inference (``inference_mode``) trains nothing, so a frozen base is fine then.
        """
        units = tensor_units(model, include=config.include_patterns, exclude=config.exclude_patterns)
        if config.inference_mode:
            return [u.name for u in units]
        names = [u.name for u in units if model.get_parameter(u.name).requires_grad]
        if names:
            return names
        aliases = parameter_aliases(model)
        quantized = sum(not is_trainable_storage(model.get_parameter(n)) for n in aliases)
        frozen = sum(not model.get_parameter(n).requires_grad for n in aliases)
        causes = []
        if config.include_patterns or config.exclude_patterns:
            matched = len(units)
            causes.append(f"include_patterns/exclude_patterns leave {matched} of {len(aliases)} tensors")
        if frozen:
            causes.append(f"{frozen} of {len(aliases)} tensors were frozen (requires_grad=False) before get_peft_model")
        if quantized:
            causes.append(f"{quantized} of {len(aliases)} tensors are quantized and cannot be trained in place")
        raise ValueError(
            f"units='tensors' found no candidate tensor: {'; '.join(causes) or 'the model has no float parameter'}. "
            "Use units='lora' (LoRA adapters, also on quantized or frozen layers), unfreeze the tensors you want "
            "considered, or widen include_patterns/exclude_patterns."
        )

    def _freeze_left_out(self, model: nn.Module) -> None:
        """units="lora": adapters and extra trained tensors (``modules_to_save`` copies, biases) that
        include_patterns/exclude_patterns leave out are not candidates, so they never train: nothing may train at a
        cost the budget does not hold. PEFT adds a task head to ``modules_to_save`` after injection, so every
        selection applies this again."""
        adapter = self.active_adapters[0]
        units = self._adapter_units(model, adapter)
        candidates = {id(u) for u in self._within_patterns(units, self.peft_config[adapter])}
        for unit in units:
            if id(unit) not in candidates:
                for param in unit.parameters(model):
                    param.requires_grad_(False)

    def _lora_candidates(self, model: nn.Module, adapter_name: str) -> list[Unit]:
        return self._within_patterns(self._adapter_units(model, adapter_name), self.peft_config[adapter_name])

    def _adapter_units(self, model: nn.Module, adapter_name: str) -> list[Unit]:
        """Every LoRA adapter and extra trained tensor of ``adapter_name``, named as if no wrapper (fsdp.py). Found
        anew each time: PEFT adds a task head to ``modules_to_save`` after injection."""
        extra = auxiliary_units(model, adapter_name, self.peft_config[adapter_name].bias)
        return fsdp.canonical_units(lora_units(model, adapter_name) + extra)

    @staticmethod
    def _within_patterns(units: list[Unit], config: GreenTrainerConfig) -> list[Unit]:
        """The units include_patterns/exclude_patterns admit."""
        if config.include_patterns:
            units = [u for u in units if matches_any(u.name, config.include_patterns)]
        if config.exclude_patterns:
            units = [u for u in units if not matches_any(u.name, config.exclude_patterns)]
        return units

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        if self.units_kind == "lora":
            super()._mark_only_adapters_as_trainable(model)
            self._freeze_left_out(model)
            return
        ((name, config),) = self.peft_config.items()  # units="tensors" is alone on its model
        # Every candidate is trainable until the first selection: an optimizer built now must hold all of them.
        candidates = {id(model.get_parameter(n)) for n in self._candidates.get(name, [])}
        for param in model.parameters():
            param.requires_grad_(id(param) in candidates and not config.inference_mode)

    # ------------------------------------------------------------------ adapters
    @property
    def units_kind(self) -> str:
        """The unit kind of this model's adapters (one kind per model: units="tensors" allows no second adapter)."""
        return next((config.units for config in self.peft_config.values()), "lora")

    def _selecting_adapter(self) -> str:
        """The adapter a selection acts on: the single active one."""
        active = self.active_adapters
        if len(active) != 1:
            raise ValueError(
                f"GreenTrainer selects units of one adapter at a time, but {len(active)} adapters are active "
                f"({active}). Choose the adapter to train with model.set_adapter(name)."
            )
        return active[0]

    @property
    def greentrainer_config(self):
        """The config of the active adapter (the one selections act on)."""
        return self.peft_config[self._selecting_adapter()]

    @property
    def greentrainer_state(self) -> GreenTrainerState:
        """Selections made so far for the active adapter (each adapter keeps its own)."""
        return self.state_of(self._selecting_adapter())

    @greentrainer_state.setter
    def greentrainer_state(self, state: GreenTrainerState) -> None:
        self._runtime.states[self._selecting_adapter()] = state

    def state_of(self, adapter_name: str) -> GreenTrainerState:
        """The selection state of ``adapter_name``, active or not."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"No adapter named {adapter_name!r}; this model has {list(self.peft_config)}.")
        return self._runtime.states.setdefault(adapter_name, GreenTrainerState())

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activate adapter(s) as LoRA does, then re-apply the activated adapter's last selection, if any."""
        if self.units_kind == "tensors" and not isinstance(adapter_name, str) and len(adapter_name) > 1:
            raise ValueError("units='tensors' has a single adapter (the base model's own tensors): nothing to combine.")
        previous = tuple(self.active_adapters)
        if self._runtime.busy:
            # a loss being probed for importance switches adapters (TRL's DPO/KTO run their reference adapter between
            # the policy's forward and the backward): which tensors take a gradient stays as the probe set it, or
            # checkpointed blocks would recompute with other flags than they ran with
            with requires_grad_kept(self.model.parameters()):
                super().set_adapter(adapter_name, inference_mode=inference_mode)
            self._pricer.switch(previous, tuple(self.active_adapters))
            return
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        self._pricer.switch(previous, tuple(self.active_adapters))
        if not inference_mode:
            self._reapply_selection()

    def add_weighted_adapter(self, adapters: list[str], *args, **kwargs) -> None:
        """LoRA's weighted combination of adapters (units="lora"); units="tensors" has a single adapter."""
        if any(self.peft_config[name].units == "tensors" for name in adapters if name in self.peft_config):
            raise ValueError(
                "units='tensors' has a single adapter (the base model's own tensors, trained in place): there are no "
                "adapters to combine. Use units='lora' for adapters that add_weighted_adapter can combine."
            )
        return super().add_weighted_adapter(adapters, *args, **kwargs)

    def _reapply_selection(self) -> None:
        """PEFT makes every tensor of an activated (or re-enabled) adapter trainable: one that was trained under a
        budget goes back to the units of its last selection instead, so the budget is never silently lifted."""
        if self.units_kind != "lora" or len(self.active_adapters) != 1:
            return
        state = self.state_of(self.active_adapters[0])
        if state.history or state.selected:
            self._apply_selection(state.selected)
        else:
            # never selected: it trains every tensor, as PEFT activated it; its steps are told so, and priced at none
            self._runtime.selection_applied = False
            self._runtime.warned_without_selection = False

    def delete_adapter(self, adapter_name: str) -> None:
        if self.units_kind == "tensors":
            raise RuntimeError(
                "GreenTrainer with units='tensors' trained the base model's tensors in place, so deleting its adapter "
                "cannot give the original weights back. Use merge_and_unload() to keep the trained model without "
                "PEFT, or load a fresh copy of the base model."
            )
        super().delete_adapter(adapter_name)
        self._candidates.pop(adapter_name, None)
        self._runtime.states.pop(adapter_name, None)
        self._drop_cached_profiles()
        self._reapply_selection()  # deleting the active adapter activates another, every tensor of it trainable

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        if self.units_kind == "tensors" and kwargs.get("adapter_names") is not None:
            raise ValueError(
                "adapter_names (a different adapter per sample) needs several adapters: units='tensors' has one, the "
                "base model's own tensors. Use units='lora' adapters for mixed-adapter batches."
            )
        with super()._enable_peft_forward_hooks(*args, **kwargs):
            yield

    def candidate_units(self) -> list[Unit]:
        """The selectable units of the active adapter, in model order."""
        adapter = self._selecting_adapter()
        if self.units_kind == "lora":
            return self._lora_candidates(self.model, adapter)
        candidates = set(self._candidates[adapter])  # named as if no wrapper were inserted (fsdp.py)
        units = [u for u in fsdp.canonical_units(tensor_units(self.model)) if u.name in candidates]
        # PEFT's modules_to_save copies (the head it adds for sequence classification) train beside the base tensors
        return units + fsdp.canonical_units(auxiliary_units(self.model, adapter))

    # ------------------------------------------------------------------ costs
    def cost_profile(self, batch: Mapping[str, Any], loss_fn: LossFn = default_loss) -> tuple[CostProfile, float]:
        """Profile of one training step on ``batch``, and the full fine-tuning FLOPs of the base model.

        Measured in training mode (checkpointing acts only there). Cached per input shapes, checkpointed blocks and
        module modes (:func:`~peft_greentrainer.engine.profile.profile_key`): one forward pass the first time.
        """
        return self._pricer.profile(batch, loss_fn)

    def _measure(self, batch: Mapping[str, Any], loss_fn: LossFn) -> tuple[CostProfile, float]:
        """Profile of the model in its current modes, and the reference; flags, weights and RNG stay as they were."""
        if fsdp.is_sharded(self.model):  # shards cannot run a forward outside FSDP's: measured on a twin
            return fsdp.measure_on_twin(self, batch, loss_fn)
        # only where the fused CPU kernel could still be switched off (engine/attention_kernels.py): GPU runs and later
        # profiles pay no probe
        watch = torch.backends.cuda.flash_sdp_enabled() and inputs_device(self.model).type == "cpu"
        with self.measuring(), LearnedBiasProbe() if watch else nullcontext() as probe:
            profile = profile_model(self.model, batch, loss_fn)
            # rho refers to full fine-tuning of the base model (so both unit kinds spend the same budget): measured
            # with the adapters off, and for a quantized base on its float twin, as int8/4-bit weights cannot train
            full = profile.full_flops
            twin = self._float_twin()
            if twin is not None:
                reference, mode = twin
                mirror_modes(self.model, reference.model)
                with _adapters_off(reference), twin_runs(self.model):
                    # labels keep their values: the twin's sparse LM head (if any) then projects as many rows as the
                    # real model's, so rho is a fraction of full fine-tuning with the same head, as for a float base
                    full = profile_model(reference.model, fake_inputs(batch, mode), loss_fn).full_flops
            elif self.units_kind == "lora":
                with _adapters_off(self):
                    full = profile_model(self.model, batch, loss_fn).full_flops
        if probe is not None and probe.found:
            logger.warning(
                "SDPA takes a learned attention bias on the CPU: its fused CPU kernel is switched off for this process "
                "(torch.backends.cuda.enable_flash_sdp(False)), so that training steps run the kernel their prices "
                "are measured on (a selection that freezes the bias would otherwise switch them to the fused kernel, "
                "whose backward costs more). Loading the model with attn_implementation='eager' avoids it."
            )
            use_math_attention()
        return profile, full

    def dense_head_full_flops(self, batch: Mapping[str, Any], loss_fn: LossFn = default_loss) -> float:
        """Full fine-tuning FLOPs of a training step on ``batch`` with the dense LM head: what one would otherwise
        run, next to ``rho``'s reference (``cost_profile``), which uses the run's own head."""
        twin = self._float_twin()
        models = [self.model] + ([twin[0].model] if twin is not None else [])
        heads = [h for h in map(attached_sparse_lm_head, models) if h is not None]
        with ExitStack() as stack, training_mode(self.model):
            for head in heads:
                stack.enter_context(head.disabled())
            return self._measure(batch, loss_fn)[1]

    @contextmanager
    def measuring(self) -> Iterator[None]:
        """Forward passes run inside measure costs or importance, ours or a caller's (a FLOP audit of a step between
        steps): they are no training step (the budget check skips them), and every ``requires_grad`` flag and batch
        norm's running statistics are as before afterwards."""
        self._runtime.busy += 1
        try:
            with requires_grad_kept(self.model.parameters()), running_stats_kept(self.model):
                yield
        finally:
            self._runtime.busy -= 1

    def _float_twin(self) -> tuple[GreenTrainerModel, Any] | None:
        """For a quantized base, the same architecture in float made of fake tensors on the same device (no weights,
        no memory: :func:`~peft_greentrainer.twin.fake_twin`), and the mode its inputs are made fake in
        (:func:`~peft_greentrainer.twin.fake_inputs`); None for a float base.

        The twin gives the reference the budget is a fraction of: full fine-tuning, which a quantized model cannot
        do, with the kernels the real device chooses. Unit costs still come from the real model, whose kernels (CPU
        flash attention, bitsandbytes matmuls) are what each step runs. Its modes and checkpointing follow the real
        model's at every profile.
        """
        if all(is_trainable_storage(p) for p in self.model.parameters()):
            return None
        if self._runtime.twin is None:
            self._runtime.twin = fake_twin(self, type(self.model))
        return self._runtime.twin

    def unit_costs(self, batch: Mapping[str, Any], loss_fn: LossFn = default_loss) -> UnitCosts:
        profile, full = self.cost_profile(batch, loss_fn)
        return profile.unit_costs(self.candidate_units(), full_flops=full)

    def min_feasible_rho(self, batch: Mapping[str, Any], loss_fn: LossFn = default_loss) -> float:
        """The smallest rho that lets a unit train on ``batch``, priced as its training steps are (with an LM head
        that projects only labelled positions: at its label bucket's ends; with attention that follows the values: at
        its spans' extremes), so that a rho at or above it does not fail at the first selection."""
        return self._pricer.min_feasible_rho(batch)

    def step_prices(self, batch: Mapping[str, Any]) -> list[UnitCosts]:
        """The costs a training step on ``batch`` is priced at (one row's each; see ``StepPricer.step_prices``):
        what a plan must select under to select as training will."""
        return self._pricer.step_prices(batch)

    @property
    def _pricer(self) -> StepPricer:
        runtime = self._runtime
        if runtime.pricer is None:
            runtime.pricer = StepPricer(self)
        return runtime.pricer

    def _mask(self, costs: UnitCosts) -> np.ndarray:
        selected = set(self.greentrainer_state.selected)
        return np.array([u.name in selected for u in costs.units], dtype=bool)

    def _ratio(self, key: tuple, mask: np.ndarray | None = None) -> float:
        """FLOPs of a training step at shape ``key`` as a fraction of full fine-tuning there (current selection)."""
        costs = self._pricer.shape_costs[key]
        return costs.predicted_flops(self._mask(costs) if mask is None else mask) / costs.full_flops

    # ------------------------------------------------------------------ selection
    def select_units(
        self,
        batches: Iterable[Mapping[str, Any]],
        optimizer: torch.optim.Optimizer | None = None,
        *,
        loss_fn: LossFn | None = None,
        lr: float | None = None,
        max_grad_norm: float | None = None,
        step: int = 0,
        epoch: float = 0.0,
    ) -> Selection:
        """Choose the units to train until the next selection and freeze the rest.

        Call it once per epoch (or every K steps) in a plain training loop, after creating the optimizer over all
        trainable parameters. ``batches`` are training batches (the first ``importance_batches`` are used). The
        budget holds at the shapes of these batches and of every training step so far, and later steps are checked
        as they come (module docstring). Weights and optimizer state are not changed.

        Importance uses the learning rate a schedule is based on (the param groups' ``initial_lr``, which LR
        schedulers set), not the current one: under warmup the current one is 0 at step 0, and would rank nothing.
        Pass ``max_grad_norm`` if training clips gradients: the predicted update is then that of the clipped gradient.
        If no unit that fits has a positive importance, units are ranked by the loss reduction of a plain gradient
        step instead (and, should no gradient reach them, as many units as fit are trained): a selection is never
        empty. The returned ``Selection`` gives the FLOPs of a step on the first batch (with an LM head that projects
        only labelled positions: at its label bucket's top, with ``full_flops`` and ``budget`` at its bottom, the
        bound the budget is kept against).
        """
        start = time.perf_counter()
        config = self.greentrainer_config
        loss_fn = loss_fn or default_loss
        device = inputs_device(self.model)
        with fork_rng():  # a shuffling DataLoader draws its order from torch's generator: training's stays the same
            batches = list(islice(batches, config.importance_batches))
        if not batches:
            raise ValueError("select_units needs at least one training batch to estimate importance.")
        if not all(isinstance(b, Mapping) for b in batches):
            kinds = sorted({type(b).__name__ for b in batches if not isinstance(b, Mapping)})
            raise TypeError(
                f"select_units needs batches of model inputs (mappings such as {{'input_ids': ..., 'labels': ...}}, "
                f"as the model's forward takes them), got {', '.join(kinds)}."
            )
        batches = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in batches]
        self._follow_ddp()
        self._note_stepped_tensors(optimizer)
        self._check_optimizer_holds_candidates(optimizer)
        self._runtime.window.follow(optimizer)
        tree = self._module_tree()
        keep_backprop_shallow(self.model, tree=tree)  # checkpointing may have been switched on since the last selection
        unpack_weights_packed_for_inference(self.model, tree)  # an evaluation since may have packed 4-bit weights
        pricer = self._pricer
        with training_mode(self.model):  # the steps that follow run in training mode
            priced = self._forward_inputs(batches, loss_fn)
            new: dict[tuple, UnitCosts] = {}
            first = pricer.price_rows(priced[0], new)
            for batch in priced[1:]:
                pricer.price_rows(batch, new)
        pricer.learn_shapes(new)  # every rank now knows every rank's shapes: they decide on the same costs
        envelope, keys, feasible = pricer.feasible_envelope(first[0][1], config.rho)
        # the gradient collectives of a distributed importance follow the feasible set: it must be the same everywhere
        ranks.check_agreement((tuple(map(repr, keys)), feasible.tobytes()), "the batch shapes and the units that fit")
        # only units that can fit at all need a gradient: backprop for importance stops at the deepest of them
        measure = functools.partial(
            self._importance, batches, envelope.units, feasible, loss_fn=loss_fn, max_grad_norm=max_grad_norm
        )
        importance = _positive(measure(optimizer, lr), feasible, lambda: measure(None, 1.0))
        self.greentrainer_state.importance = {u.name: float(v) for u, v in zip(envelope.units, importance, strict=True)}
        mask = self._select(envelope, keys, importance, step=step, epoch=epoch, reason="importance", start=start)
        # in FLOPs of a step on the first batch, at the bound it is priced at
        rows = 1 if pricer.caches.rows_couple else batch_size(priced[0]) or 1  # (priced whole, then)
        steps = [pricer.step_figures(k, first, rows, mask) for k in first if not is_each_row_more(k)]
        flops, backward, full = max(steps, key=lambda figures: figures[0] / figures[2])
        return Selection(
            mask=mask,
            flops=flops,
            backward_flops=backward,
            importance=float(importance[mask].sum()),
            budget=min(config.rho, 1.0) * full,
            full_flops=full,
            rho=config.rho,
        )

    def _forward_inputs(self, batches: list[Mapping[str, Any]], loss_fn: LossFn) -> list[Mapping[str, Any]]:
        """The inputs the model's forward receives in a training step on each of ``batches``: the batches themselves
        under the default loss; under a caller's ``loss_fn``, what it gives the forward (its batches may hold more,
        such as targets the forward does not take: ``probe_loss``). The first time, ``loss_fn`` runs to its end on
        each batch, without a backward, to see which outputs its loss reads, the roots of rho's reference; later it
        is stopped before the forward runs."""
        if loss_fn is default_loss or fsdp.is_sharded(self.model):  # (shards run only through FSDP's root)
            return batches
        learn = self._pricer.caches.loss_reads is None
        probes = []
        with self.measuring():
            for batch in batches:
                try:
                    probes.append(probe_loss(self.model, loss_fn, batch, reads=learn))
                except LookupError:  # no training forward to price (importance says what is missing)
                    return batches
        if learn:  # (every rank's: the same roots everywhere)
            found = ranks.gather([(p.reads, p.forward_flops, p.outside_flops) for p in probes])
            self._pricer.learn_loss_reads(*zip(*[seen for part in found for seen in part], strict=True))
        return [probe.inputs for probe in probes]

    def _importance(
        self,
        batches: list[Mapping[str, Any]],
        units: list[Unit],
        feasible: np.ndarray,
        optimizer: torch.optim.Optimizer | None,
        lr: float | None,
        *,
        loss_fn: LossFn,
        max_grad_norm: float | None,
    ) -> np.ndarray:
        """Importance of the ``feasible`` units on ``batches``, the same on every rank: of the optimizer's next step,
        or (``importance_update="gradient"``, or without an optimizer: ``select_units``' fallback at ``lr``) of a plain
        gradient step."""
        optimizer = unwrap_optimizer(optimizer)
        if optimizer is not None and per_parameter_optimizers(optimizer):
            max_grad_norm = None  # a layer-wise optimizer steps inside the backward, before a Trainer would clip
        if optimizer is not None and self.greentrainer_config.importance_update == "gradient":
            optimizer = plain_gradient_step(optimizer)
        group_lrs = base_learning_rates(optimizer) if optimizer is not None else None
        importance_fn = fsdp.compute_importance if fsdp.is_sharded(self.model) else compute_importance
        # the gradient of the step it predicts (a Trainer may not have set training mode yet)
        with training_mode(self.model), self.measuring():
            values = importance_fn(
                self.model,
                units,
                batches,
                optimizer,
                loss_fn=loss_fn,
                candidates=feasible,
                lr=lr,
                group_lrs=group_lrs,
                max_grad_norm=max_grad_norm,
            )
        return ranks.average_across_ranks(values)

    def _select(
        self,
        envelope: UnitCosts,
        keys: list[tuple],
        importance: np.ndarray,
        *,
        step: int,
        epoch: float,
        reason: str,
        start: float,
        within: np.ndarray | None = None,
    ) -> np.ndarray:
        """Solve the DP at every shape of ``keys`` (``select_at_every_shape``), apply it, record it, return the mask;
        every rank must call it with the same data. ``within``: choose only among these units (the others must have
        importance 0, so the optimum over the subsets of ``within`` is the DP's optimum restricted to it; dropping
        units never raises a cost)."""
        config = self.greentrainer_config
        every = np.ones(len(envelope.units), dtype=bool)
        if config.rho >= 1:
            mask = every if within is None else within.copy()
        else:
            shapes = [self._pricer.shape_costs[key] for key in keys]
            mask = select_at_every_shape(shapes, importance, config.rho, resolution=config.dp_resolution)
            if within is not None:
                mask = mask & within
        ranks.check_agreement((tuple(map(repr, keys)), mask.tobytes()), "the batch shapes and the selected units")
        # a re-selection for a new batch shape happens inside a step, possibly within a gradient-accumulation window
        self._set_trainable(envelope.units, mask, within_step=reason == "batch shape")
        # the envelope holds every shape known in these modes
        self._pricer.caches.checked = (keys[0][1], frozenset(self.greentrainer_state.selected))
        ratios = [self._ratio(key, mask) for key in keys]
        worst = self._pricer.shape_costs[keys[int(np.argmax(ratios))]]
        lora_ratio = None
        if self.units_kind == "lora":
            lora_ratio = worst.predicted_flops(mask) / worst.predicted_flops(every)
        record = SelectionRecord(
            step=step,
            epoch=epoch,
            selected=list(self.greentrainer_state.selected),
            predicted_ratio=max(ratios),
            ratio_vs_lora=lora_ratio,
            importance=float(importance[mask].sum()),
            num_units=len(envelope.units),
            seconds=time.perf_counter() - start,
            reason=reason,
        )
        self.greentrainer_state.history.append(record)
        logger.info(
            "GreenTrainer selection at step %d (%s): %d of %d units, predicted FLOPs at most %.1f%% of full "
            "fine-tuning at %d batch shape(s) (budget rho=%.2f)%s, in %.2f s",
            step,
            reason,
            len(record.selected),
            record.num_units,
            100 * record.predicted_ratio,
            len(keys),
            config.rho,
            f", {100 * record.ratio_vs_lora:.1f}% of plain LoRA" if record.ratio_vs_lora else "",
            record.seconds,
        )
        return mask

    # ------------------------------------------------------------------ the check before every training step
    def note_training_position(self, step: int, epoch: float) -> None:
        """Tell the tuner the Trainer's position, for the records of re-selections made during a step."""
        self._runtime.position = (step, epoch)

    def step_flops_ratios(self) -> tuple[float, float] | None:
        """FLOPs of the last training step as a fraction of full fine-tuning at its batch shape (the bound it is
        priced at: with attention that follows the values, at its spans' extremes), and the largest since the
        previous call; None if no step ran since a selection was applied."""
        ratios = self._runtime.step_ratios
        if not ratios:
            return None
        self._runtime.step_ratios = [ratios[-1]]
        return ratios[-1], max(ratios)

    # outside any torch.compile'd forward: the check profiles and selects in Python (dynamo tracing it recompiled on
    # every shape key and crashed on a cold cache); disabled on the method, so a deep copy's hook is its own
    @torch.compiler.disable
    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of the base model: keep the budget promise for the training step about to run.

        A forward with gradients on in eval mode is not checked: it may be an evaluation run without
        ``torch.no_grad()`` (on one rank only, where checking it would wait for the others), so the user is told
        once instead (:meth:`_warn_once_in_eval_mode_with_gradients`).
        """
        if not torch.is_grad_enabled():
            return  # evaluation or generation: no training step
        if self._runtime.busy:
            # profiling or importance, no training step; a loss being probed may have made checkpointing reentrant
            # again (TRL's DPO and KTO leave it as their args say after each reference forward), and a reentrant
            # block whose inputs need no gradient gives its parameters none: every unit in it would rank 0
            keep_backprop_shallow(self.model, quiet=True, tree=self._module_tree())
            return
        if not module.training:
            self._warn_once_in_eval_mode_with_gradients()
            return
        tree = self._module_tree()  # listed once per module tree, not walked at every step
        if self.units_kind == "lora" and _adapter_layers_off(tree):
            return  # under PeftModel.disable_adapter() no adapter runs: the forward trains no unit (a reference's)
        unpack_weights_packed_for_inference(self.model, tree)  # an evaluation may have packed them, selection or not
        if not self._runtime.selection_applied:
            # before the first selection every candidate trains (the optimizer is built over all of them)
            self._warn_once_without_selection()
            return
        if self._runtime.ddp_unseen and ranks.is_distributed():
            self._check_ddp_follows()
        keep_backprop_shallow(self.model, tree=tree)  # checkpointing enabled since the last step would force it deeper
        batch = as_batch(args, kwargs)
        new: dict[tuple, UnitCosts] = {}
        pricer = self._pricer
        keys = pricer.price_rows(batch, new, tree)
        signature = keys[0][1]
        learned = [k for k in pricer.learn_shapes(new) if k[1] == signature]
        in_force = (signature, frozenset(self.greentrainer_state.selected))
        if pricer.caches.checked != in_force:
            # another selection (restored) or other modes (checkpointing toggled): check it at every known shape
            learned = [k for k in pricer.shape_costs if k[1] == signature]
        rho = self.greentrainer_config.rho
        if learned and max(self._ratio(k) for k in learned) > rho * (1 + 1e-12):
            self._reselect(signature)  # _select records the new selection as checked
        else:
            pricer.caches.checked = in_force
        self._runtime.window.forwards += 1
        ratios = self._runtime.step_ratios
        ratios.append(max(self._ratio(k) for k in keys))
        del ratios[:-1000]  # a plain loop may never read them

    def _warn_once_in_eval_mode_with_gradients(self) -> None:
        """A training step in eval mode (a loop that evaluated and did not call ``model.train()`` again) would run
        unchecked; an evaluation with gradients on is told how to be cheaper."""
        if self._runtime.warned_eval_mode or not self._runtime.selection_applied:
            return
        self._runtime.warned_eval_mode = True
        rank, world_size = ranks.rank_and_world_size()  # on any rank: an evaluation may run on one rank only
        logger.warning(
            "GreenTrainer%s: a forward pass runs in eval mode with gradients on. If it is a training step, call "
            "model.train() before it: steps in eval mode are not checked against the FLOPs budget. If it is an "
            "evaluation, run it under torch.no_grad() (as Trainer.evaluate does), which also saves its memory.",
            f" (rank {rank})" if world_size > 1 else "",
        )

    def _warn_once_without_selection(self) -> None:
        """Training with no selection ever made trains every candidate: no FLOPs saved, which the user would not
        otherwise see (a Trainer given the model without GreenTrainerCallback)."""
        if self._runtime.warned_without_selection:
            return
        if not any(p.requires_grad for p in self.model.parameters()):
            return  # an adapter loaded for inference (is_trainable=False), run in train mode: nothing trains
        self._runtime.warned_without_selection = True
        if ranks.rank_and_world_size()[0] != 0:  # every rank trains alike: one line per job
            return
        trains = "the base model's tensors (full fine-tuning)" if self.units_kind == "tensors" else "every adapter"
        logger.warning(
            "GreenTrainer: a training step runs with no selection in force, so it trains %s and saves no FLOPs. Add "
            "GreenTrainerCallback() to the Trainer's callbacks (TRL's trainers too), or call "
            "model.base_model.select_units(batches, optimizer) in a plain training loop before its steps.",
            trains,
        )

    def _reselect(self, signature: tuple) -> None:
        """The current selection costs more than rho at a new shape: select again, with the same importances,
        against every shape seen (every rank does, with the same data)."""
        start = time.perf_counter()
        envelope, keys, feasible = self._pricer.feasible_envelope(signature, self.greentrainer_config.rho)
        stored = self.greentrainer_state.importance
        if stored:
            importance = np.array([stored.get(u.name, 0.0) for u in envelope.units])
        else:  # a state saved without importances: keep what was selected, as much of it as fits
            importance = self._mask(envelope).astype(np.float64)
        importance = _positive(importance, feasible, None)
        current = self._mask(envelope)
        # inside an accumulation window a unit selected now would train on the window's later micro-batches only:
        # choose among the units selected so far, unless none of them fits the new shape
        within = current if self._window_under_way(envelope, current) else None
        if within is not None and not np.any(current & feasible):
            logger.warning(
                "GreenTrainer: no unit selected so far fits the budget at the new batch shape in the middle of a "
                "gradient-accumulation window; the units selected now train on the window's remaining micro-batches "
                "only."
            )
            within = None
        if within is not None:
            importance = np.where(within, importance, 0.0)
            if not np.any(importance[feasible] > 0):  # none of them valued (a replayed selection): as many as fit
                importance = (within & feasible).astype(np.float64)
        last = self.greentrainer_state.last
        step, epoch = self._runtime.position or ((last.step, last.epoch) if last else (0, 0.0))
        self._select(
            envelope, keys, importance, step=step, epoch=epoch, reason="batch shape", start=start, within=within
        )

    def _window_under_way(self, envelope: UnitCosts, current: np.ndarray) -> bool:
        """Whether training forwards ran since the optimizer's last step (on any rank: every rank must decide alike),
        i.e. a re-selection now happens in the middle of a gradient-accumulation window.

        Counted through a step hook on the optimizer ``select_units`` was given: gradients cannot tell, since FSDP2
        accumulates a window's gradients in unsharded copies, not in ``.grad``. Without one, non-zero gradients on
        the selected units tell (a DDP loop may zero them in place at a window's start).
        """
        window = self._runtime.window
        if window.following():
            return ranks.any_across_ranks(window.forwards > 0)
        params = [
            p for unit, on in zip(envelope.units, current, strict=True) if on for p in unit.parameters(self.model)
        ]
        return ranks.any_across_ranks(any(_local_gradient_is_nonzero(p) for p in params))

    def _check_optimizer_holds_candidates(self, optimizer: torch.optim.Optimizer | None) -> None:
        """A unit the optimizer does not hold would be selected, get gradients, and silently never change."""
        optimizer = unwrap_optimizer(optimizer)
        if optimizer is None:
            return
        held = held_parameters(optimizer)  # with those a layer-wise optimizer steps from hooks
        names = [n for u in self.candidate_units() for n in u.param_names]
        missing = [n for n in names if id(self.model.get_parameter(n)) not in held]
        adapter = self._selecting_adapter()
        if missing and getattr(self.peft_config[adapter], "inference_mode", False):
            raise ValueError(
                f"Adapter {adapter!r} was loaded for inference (PeftModel.from_pretrained's default, "
                "is_trainable=False), so none of its tensors can train. Load it with PeftModel.from_pretrained(base, "
                "path, is_trainable=True) to train it further."
            )
        if missing:
            raise ValueError(
                f"The optimizer does not hold {len(missing)} candidate tensor(s) (e.g. {missing[0]}), so selecting "
                "them would train nothing. Create the optimizer while every candidate is trainable: after "
                "get_peft_model and before any selection (on a model trained before, after "
                "tuner.unfreeze_candidates(); GreenTrainerCallback does it for a new Trainer), without freezing "
                "parameters yourself (use exclude_patterns to keep tensors out of the candidates)."
            )

    def unfreeze_candidates(self) -> None:
        """Make every candidate unit of the active adapter trainable again, as after ``get_peft_model``.

        For training a model again (new data, a second stage): an optimizer created next holds every candidate, and
        the next selection freezes the rest. Until that selection steps are not budget-checked, as before the first.
        """
        for unit in self.candidate_units():
            for param in unit.parameters(self.model):
                param.requires_grad_(True)
        self._runtime.selection_applied = False
        self._runtime.window.stop()  # the optimizer created next is the one to follow

    def _note_stepped_tensors(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Count as trained every candidate the optimizer holds state for.

        Steps taken before the first selection (every candidate trainable then) change tensors no selection
        recorded; the saved adapter must hold them too, or loading it would silently miss those updates.
        """
        optimizer = unwrap_optimizer(optimizer)
        if optimizer is None:
            return
        stepped = stepped_parameters(optimizer)
        if not stepped:
            return
        names = [n for u in self.candidate_units() for n in u.param_names if id(self.model.get_parameter(n)) in stepped]
        state = self.greentrainer_state
        state.trained_tensors = list(dict.fromkeys([*state.trained_tensors, *names]))

    def restore_selection(self, selected: Iterable[str], optimizer: torch.optim.Optimizer | None = None) -> None:
        """Re-apply a selection by unit names (resuming from a checkpoint, or replaying a logged selection); the
        next training step checks it at every batch shape known. Pass the optimizer that trains on, as to
        ``select_units``, so that a re-selection inside an accumulation window is recognised as such.

        To resume, first give back the state the checkpoint's run had (``tuner.greentrainer_state =
        GreenTrainerState.from_dict(saved)``, saved from ``tuner.greentrainer_state.to_dict()``; accelerate's
        checkpoints carry it with :class:`~peft_greentrainer.SelectionCheckpoint`): it says which tensors earlier
        selections trained. Without it (no selection in ``history``) that is unknown, so with units="tensors" every
        candidate counts as trained, and a saved adapter holds them all."""
        self._follow_ddp()
        if not self.greentrainer_state.history:
            names = [n for u in self.candidate_units() for n in u.param_names]
            self.greentrainer_state.trained_tensors = list(
                dict.fromkeys([*self.greentrainer_state.trained_tensors, *names])
            )
        self._apply_selection(selected, optimizer)

    def _apply_selection(self, selected: Iterable[str], optimizer: torch.optim.Optimizer | None = None) -> None:
        selected = list(selected)
        wanted = set(selected)
        units = self.candidate_units()
        unknown = wanted - {u.name for u in units}
        if unknown:
            raise ValueError(f"Cannot restore the selection: unknown units {sorted(unknown)[:5]}.")
        self._set_trainable(units, np.array([u.name in wanted for u in units]))
        self.greentrainer_state.selected = list(dict.fromkeys(selected))  # the order it was selected in
        if optimizer is not None:
            self._runtime.window.follow(optimizer)

    def _follow_ddp(self) -> None:
        """Under DDP, make the wrapper reduce whichever units a selection trains, as the callback does at the start of
        training: a plain or accelerate loop wraps the model itself, with DDP's defaults (no
        ``find_unused_parameters``) and the units trainable at that moment. Every rank calls it (``select_units``)."""
        runtime = self._runtime
        if fsdp.is_sharded(self.model):
            return
        if not ranks.is_distributed():  # maybe not yet: a process group made after this selection
            runtime.ddp_unseen = True
            return
        if runtime.prepared_ddp() is not None:
            return  # it reduces any selection since (finding a wrapper walks every object: a second or more)
        wrapper = ddp.find_ddp_around(self)
        runtime.ddp_unseen = wrapper is None
        if wrapper is not None:
            ddp.prepare_ddp(wrapper, self._candidate_parameters())
            runtime.prepared_ddp = _WeakLink(wrapper)

    def _check_ddp_follows(self) -> None:
        """At the first training step after a selection made with no DDP wrapper around the model: a wrapper built
        since registered only the units trainable then, and would leave the others' gradients unreduced (the ranks'
        weights drift apart) or fail at a later step. It cannot be rebuilt inside its own forward pass."""
        self._runtime.ddp_unseen = False
        if fsdp.is_sharded(self.model):
            return
        wrapper = ddp.find_ddp_around(self)
        if wrapper is None:
            ddp.warn_no_wrapper()
        elif not ddp.reduces_any_selection(wrapper, self._candidate_parameters()):
            raise RuntimeError(
                "GreenTrainer selected units before DistributedDataParallel wrapped the model, so DDP registered only "
                "the units trained then and would not reduce the gradients of those selected later. Call "
                "select_units (or restore_selection, when resuming) after wrapping, after accelerator.prepare(model): "
                "it makes the wrapper follow the selections; or wrap with "
                "peft_greentrainer.distributed.wrap_ddp(model)."
            )

    def _candidate_parameters(self) -> list[nn.Parameter]:
        """The distinct parameters of every candidate unit."""
        params = [p for unit in self.candidate_units() for p in unit.parameters(self.model)]
        return list({id(p): p for p in params}.values())

    def _set_trainable(self, units: list[Unit], mask: np.ndarray, *, within_step: bool = False) -> None:
        """Train the units of ``units`` marked in ``mask`` and freeze every other candidate.

        Between steps a frozen unit's gradient is dropped, so that an optimizer skips it (momentum and weight decay
        included). ``within_step`` (a re-selection inside a forward pass): gradients that earlier micro-batches of
        the accumulation window already computed are kept and applied by the coming optimizer step: their FLOPs are
        spent, and DDP, which saw the unit used in those micro-batches, must find them to reduce (FSDP2 keeps its
        own copy anyway); see :func:`_accumulated_gradients` for zeroed ones.

        Candidates missing from ``units`` (the profiled forward pass never used them, so their cost is unknown) are
        frozen too: a data-dependent path must not train outside the budget. With units="tensors", a tensor trained
        for the first time after others were trained gets its current value kept (on the CPU): a checkpoint saved
        before holds no value for it, and loading that checkpoint in this process must give it back.
        """
        state = self.greentrainer_state
        chosen = {u.name for u, s in zip(units, mask, strict=True) if s}
        placed = {u.name for u in units}
        candidates = self.candidate_units()
        unplaced = [u.name for u in candidates if u.name not in placed]
        warned = self._runtime.warned_unused
        if set(unplaced) - warned:
            logger.warning(
                "GreenTrainer froze %d unit(s) the profiled forward pass does not use, or uses under torch.no_grad "
                "only (e.g. %s): their cost is unknown, or no gradient reaches them, so they are never trained.",
                len(unplaced),
                unplaced[0],
            )
            warned.update(unplaced)
        trained = dict.fromkeys(state.trained_tensors)
        originals = self._runtime.originals
        keep_originals = self.units_kind == "tensors" and bool(trained)
        frozen = [p for u in candidates if u.name not in chosen for p in u.parameters(self.model)]
        kept = _accumulated_gradients(frozen) if within_step else set()
        for unit in candidates:
            selected = unit.name in chosen
            for name, param in zip(unit.param_names, unit.parameters(self.model), strict=True):
                if selected and keep_originals and name not in trained and name not in originals:
                    originals[name] = param.detach().to("cpu", copy=True)
                param.requires_grad_(selected)
                if not selected and id(param) not in kept:
                    param.grad = None  # an optimizer must skip it, momentum and weight decay included
            if selected:
                trained.update(dict.fromkeys(unit.param_names))
        if self.units_kind == "lora" and len(self.active_adapters) == 1:
            self._freeze_left_out(self.model)
        state.selected = [u.name for u, s in zip(units, mask, strict=True) if s]
        state.trained_tensors = list(trained)
        self._runtime.selection_applied = True

    def _with_original_values(self, state_dict: dict, names: list[str], trainable: bool) -> dict:
        """``state_dict`` (an adapter being loaded, units="tensors") plus the original values of the tensors this
        process trained since, which the adapter does not hold, so that loading gives the model the adapter saved.

        A ``trainable`` load (resuming) in a run that reloads its best checkpoint at the end
        (``load_best_model_at_end``, which ``GreenTrainerCallback`` tells the tuner) first keeps, on the CPU, the
        values of the tensors it overwrites that nothing has changed yet: the base model's. Resuming restores a
        selection history whose tensors that best checkpoint may not hold. Raises if a tensor to restore has no kept
        value (trained before anything was saved, so not from this run).
        """
        state = self.greentrainer_state
        loaded = set(names)
        originals = self._runtime.originals
        if trainable and self._runtime.reloads_best:
            untouched = set(state.trained_tensors) | originals.keys()
            for name in names:
                value = self.model.get_parameter(name)
                if name not in untouched and value.device.type != "meta":  # meta: offloaded, nothing to keep
                    originals[name] = value.detach().to("cpu", copy=True)
        copies = _auxiliary_names(self.model, self._selecting_adapter())
        later = [n for n in state.trained_tensors if n not in loaded and n not in copies]  # PEFT loads the copies
        unknown = [n for n in later if n not in originals]
        if unknown:
            raise ValueError(
                f"This model has trained {len(unknown)} tensor(s) in place that the adapter being loaded does not hold "
                f"(e.g. {unknown[0]}), so loading it would leave a mix of both. Load the adapter onto a fresh copy of "
                "the base model instead."
            )
        prefix = BASE_PREFIX if any(k.startswith(BASE_PREFIX) for k in state_dict) else ""
        restored = dict(state_dict)
        for name in later:
            param = self.model.get_parameter(name)
            restored[f"{prefix}{name}"] = originals.pop(name).to(device=param.device, dtype=param.dtype)
        state.trained_tensors = [n for n in state.trained_tensors if n in loaded]
        state.trained_tensors = list(dict.fromkeys([*state.trained_tensors, *names]))
        return restored

    def floating_point_ops(self, inputs: Mapping[str, Any], exclude_embeddings: bool = True) -> int:
        """transformers' ``6 x tokens x parameters`` estimate, scaled by the predicted FLOPs ratio of the selection.

        For callers that ask the model; transformers 5's Trainer computes ``total_flos`` itself, unscaled.
        """
        base = self.model.floating_point_ops(inputs, exclude_embeddings=exclude_embeddings)
        last = self.greentrainer_state.last if len(self.active_adapters) == 1 else None
        return int(base * last.predicted_ratio) if last else base

    # ------------------------------------------------------------------ adapters and state dicts
    def check_can_disable_adapter(self) -> None:
        """Called by ``PeftModel.disable_adapter()`` (see registration.py) before it looks for adapter layers."""
        if self.units_kind == "tensors":
            raise RuntimeError(
                "GreenTrainer with units='tensors' trains the base weights in place, so there is no adapter to "
                "disable and the original weights are not kept. Load a fresh copy of the base model to compare "
                "against it (TRL's DPO and KTO trainers: pass it as `ref_model=`), or use units='lora'."
            )

    def disable_adapter_layers(self) -> None:
        self.check_can_disable_adapter()
        self._runtime.flags_while_disabled = [(p, p.requires_grad) for p in self.model.parameters()]
        super().disable_adapter_layers()

    def enable_adapter_layers(self) -> None:
        if self.units_kind == "lora":
            super().enable_adapter_layers()  # PEFT makes every adapter trainable again: give the selection back
            flags, self._runtime.flags_while_disabled = self._runtime.flags_while_disabled, None
            for param, flag in flags or []:
                param.requires_grad_(flag)
            if not flags:
                self._reapply_selection()

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        if self.units_kind == "tensors" and not merge:
            raise RuntimeError(
                "unload() must return the original base model, but units='tensors' trained it in place. Use "
                "merge_and_unload() to get the trained transformers model, or load a fresh base model."
            )
        # the returned model is a plain transformers model again: no budget check, and no sparse head this tuner put
        # on (training-mode logits would be the labelled rows only); one attached before get_peft_model stays
        if self._runtime.step_hook is not None:
            self._runtime.step_hook.remove()
            self._runtime.step_hook = None
        head = attached_sparse_lm_head(self.model)
        if head is not None and head.attached_by_tuner:
            head.remove()
        # units="tensors": the base weights are already the trained ones; PEFT's own pass unwraps its
        # modules_to_save copies (a SEQ_CLS head) into plain modules holding the trained values
        return super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        if config.units == "lora":  # PEFT finds LoRA keys by module names, which must be the state dict's (fsdp.py)
            with fsdp.without_checkpoint_wrappers(model):
                return super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        tuner = getattr(model, "base_model", model)
        state = tuner.state_of(adapter_name)
        trained = state.trained_tensors
        sharded = fsdp.holds_shards(state_dict)
        if (not trained and not state.history) or sharded:
            # no selection yet: every candidate was trainable; or a sharded FSDP2 checkpoint, which is loaded before
            # the selection state is back, and so must hold every candidate
            trained = tuner._candidates[adapter_name]
        elif not tuner._runtime.selection_applied:
            # no selection in force (a trainable load, unfreeze_candidates()): steps without one, in a plain loop or
            # a Trainer without the callback, may have changed any trainable candidate
            params = {fsdp.canonical_name(n): p for n, p in tuner.model.named_parameters(remove_duplicate=False)}
            loose = [n for n in tuner._candidates[adapter_name] if n in params and params[n].requires_grad]
            trained = list(dict.fromkeys([*trained, *loose]))
        prefix = BASE_PREFIX if any(k.startswith(BASE_PREFIX) for k in state_dict) else ""
        # modules_to_save copies are PEFT's to save (under the wrapped module's own name), as for any adapter
        copies = _auxiliary_names(tuner.model, adapter_name)
        # copied: tied aliases share storage, which safetensors refuses; only the canonical name is saved anyway. Full
        # tensors are copied to the CPU, where they are written from: a copy on the GPU would need memory for every
        # tensor trained so far at each checkpoint. FSDP2 shards stay where they are, for the checkpoint's planner.
        return {
            f"{prefix}{name}": _detached_copy(state_dict[f"{prefix}{name}"], on_cpu=not sharded)
            for name in trained
            if name not in copies
        }

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        if config.units == "lora":
            with fsdp.without_checkpoint_wrappers(model):
                return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        tuner = getattr(model, "base_model", model)
        params = {fsdp.canonical_name(n): p for n, p in tuner.model.named_parameters(remove_duplicate=False)}
        mismatched = []
        names = []
        state_dict = dict(state_dict)
        for key, value in state_dict.items():
            name = key.removeprefix(BASE_PREFIX)
            if name not in params:
                raise ValueError(
                    f"The adapter holds tensor {name!r}, which this base model does not have: load it onto the "
                    f"base model it was trained from ({config.base_model_name_or_path or 'see adapter_config.json'})."
                )
            target = params[name]
            if tuple(target.shape) != tuple(value.shape):
                mismatched.append(f"{name}: adapter {tuple(value.shape)} vs base {tuple(target.shape)}")
            # low_cpu_mem_usage loads by assigning the tensors as they are: give them the base's dtype and device,
            # as a copying load does (an offloaded parameter, on meta, keeps the adapter's value where it is)
            device = value.device if target.device.type == "meta" else target.device
            state_dict[key] = value.to(device=device, dtype=target.dtype)
            names.append(name)
        if mismatched:
            raise ValueError(
                "The adapter was trained on a base model of other shapes ("
                + "; ".join(mismatched[:3])
                + f"{'; ...' if len(mismatched) > 3 else ''}). Load it onto the base model it was trained from ("
                f"{config.base_model_name_or_path or 'see adapter_config.json'})."
            )
        return tuner._with_original_values(state_dict, names, trainable=not config.inference_mode)


@contextmanager
def _seen_as_lora(config: GreenTrainerConfig) -> Iterator[None]:
    """units="lora" injects PEFT's own LoRA layers, so PEFT's injection must treat the config as LoRA: it keys some
    steps on ``peft_type`` (mapping transformers 4's Mixtral expert names ``w1``/``w2``/``w3`` to transformers 5's
    stacked experts, refusing Mamba's ``out_proj`` and ``conv1d``), which our own type would silently skip."""
    own = config.peft_type
    config.peft_type = PeftType.LORA
    try:
        yield
    finally:
        config.peft_type = own


def _auxiliary_names(model: nn.Module, adapter_name: str) -> set[str]:
    """The tensors of PEFT's ``modules_to_save`` copies (and the like) in ``model``: PEFT saves and loads them."""
    return {name for unit in auxiliary_units(model, adapter_name) for name in unit.param_names}


def _local_gradient_is_nonzero(param: nn.Parameter) -> bool:
    """Whether ``param`` holds a non-zero gradient on this rank (a sharded one's local part: no collective)."""
    grad = param.grad
    if grad is None:
        return False
    local = grad.to_local() if hasattr(grad, "to_local") else grad
    return bool(local.any())


def _accumulated_gradients(params: list[nn.Parameter]) -> set[int]:
    """Ids of ``params`` whose gradient a re-selection inside a step keeps.

    Under DDP every gradient that exists: the reducer saw those units used in the window's earlier micro-batches and
    fails on one it cannot find (a zero one included: a LoRA A matrix has a zero gradient while its B is zero). In one
    process only non-zero ones: a gradient zeroed in place (``zero_grad(set_to_none=False)``) would let the optimizer
    move a frozen unit by momentum and weight decay.
    """
    held = [p for p in params if p.grad is not None]
    if ranks.is_distributed():
        return {id(p) for p in held}
    return {id(p) for p in held if bool(p.grad.any())}


def _adapter_layers_off(tree: ModuleTree) -> bool:
    """Whether PEFT's ``disable_adapter()`` is in force (it switches every LoRA layer to its base layer alone)."""
    layer = next((m for m in tree.modules if isinstance(m, LoraLayer)), None)
    return layer is not None and layer.disable_adapters


@contextmanager
def _adapters_off(tuner: GreenTrainerModel):
    """LoRA layers off (for the base model's full fine-tuning reference); PEFT's switch back on would make every
    adapter trainable, so the flags are restored as they were."""
    if tuner.units_kind != "lora":
        yield
        return
    with requires_grad_kept(tuner.model.parameters()):
        LoraModel.disable_adapter_layers(tuner)
        try:
            yield
        finally:
            LoraModel.enable_adapter_layers(tuner)


def _positive(importance: np.ndarray, feasible: np.ndarray, gradient_step: Callable[[], np.ndarray] | None):
    """``importance``, or a fallback when no unit that fits has a positive one (the selection would be empty and
    training would stop on "element 0 of tensors does not require grad")."""
    if np.any(importance[feasible] > 0):
        return importance
    if gradient_step is not None:
        logger.warning(
            "GreenTrainer: no unit that fits the budget has a positive importance (the optimizer's next step would "
            "not lower the loss to first order, e.g. a learning rate of 0); ranking them by the loss reduction of a "
            "plain gradient step instead."
        )
        fallback = gradient_step()
        if np.any(fallback[feasible] > 0):
            return fallback
    logger.warning("GreenTrainer: no unit that fits the budget has a positive importance; training as many as fit.")
    return feasible.astype(np.float64)


def _detached_copy(tensor: torch.Tensor, on_cpu: bool) -> torch.Tensor:
    return tensor.detach().to("cpu", copy=True) if on_cpu else tensor.detach().clone()


def find_tuner(model: torch.nn.Module) -> GreenTrainerModel:
    """The GreenTrainer tuner inside a PeftModel (possibly wrapped by DDP / accelerate)."""
    for module in (model, getattr(model, "module", None), getattr(model, "base_model", None)):
        if isinstance(module, GreenTrainerModel):
            return module
        if module is not None and isinstance(getattr(module, "base_model", None), GreenTrainerModel):
            return module.base_model
    raise TypeError(
        "GreenTrainer needs a model made with get_peft_model(model, GreenTrainerConfig(...)); "
        f"got {type(model).__name__}."
    )
