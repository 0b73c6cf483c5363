"""``GreenTrainerModel``: the PEFT tuner that applies budgeted unit selections to a model.

units="lora" reuses PEFT's LoRA layers unchanged (including their bitsandbytes variants): this tuner is a
``LoraModel`` that additionally freezes the adapters that do not pay. units="tensors" injects nothing and trains the
selected base tensors *in place*: no copy of the model is kept, so memory stays that of the base model. Two
consequences, both enforced with clear errors rather than wrong weights:

* the saved adapter holds exactly the tensors that were ever trained; loading writes them onto a fresh base;
* ``disable_adapter()`` and ``unload()`` cannot give the original weights back (there is no separate adapter);
  ``merge_and_unload()`` returns the plain transformers model with the trained weights.

Flow of one selection (``select_units``): cost profile (cached per batch shape) -> importance of the units that can
fit the budget -> exact DP -> ``requires_grad`` flags, so autograd skips frozen weight gradients and stops below the
deepest selected unit.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from itertools import islice
from typing import Any

import numpy as np
import torch
from peft.tuners.lora import LoraModel
from torch import nn

from .backprop import keep_backprop_shallow
from .engine.importance import _unwrap_optimizer, compute_importance
from .engine.profile import CostProfile, UnitCosts, default_loss, is_checkpointed, profile_model
from .engine.selector import Selection, check_feasible, min_feasible_rho, min_unit_costs, select_units
from .engine.units import Unit, is_trainable_dtype, lora_units, parameter_aliases, tensor_units
from .ranks import average_across_ranks
from .sparse_head import enable_sparse_lm_head

logger = logging.getLogger(__name__)

BASE_PREFIX = "base_model.model."
LossFn = Callable[[nn.Module, Mapping[str, Any]], torch.Tensor]


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


@dataclass
class GreenTrainerState:
    """Selections made so far; kept on the model as ``model.greentrainer_state``."""

    selected: list[str] = field(default_factory=list)
    trained_tensors: list[str] = field(default_factory=list)
    history: list[SelectionRecord] = field(default_factory=list)

    @property
    def last(self) -> SelectionRecord | None:
        return self.history[-1] if self.history else None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> GreenTrainerState:
        history = [SelectionRecord(**record) for record in data.get("history", [])]
        return cls(list(data.get("selected", [])), list(data.get("trained_tensors", [])), history)


def _shape_key(batch: Mapping[str, Any]) -> tuple:
    return tuple(sorted((k, tuple(v.shape)) for k, v in batch.items() if isinstance(v, torch.Tensor)))


class GreenTrainerModel(LoraModel):
    """Tuner for [`GreenTrainerConfig`]; see the module docstring for the two unit kinds."""

    prefix: str = "lora_"

    # ------------------------------------------------------------------ construction
    def _check_new_adapter_config(self, config) -> None:
        if len(self.peft_config) > 1:
            raise ValueError("GreenTrainer supports one adapter per model; create a new model for another adapter.")
        if config.units == "lora":
            super()._check_new_adapter_config(config)

    def _prepare_adapter_config(self, peft_config, model_config):
        if peft_config.units == "lora":
            return super()._prepare_adapter_config(peft_config, model_config)
        return peft_config

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        config = self.peft_config[adapter_name]
        if config.units == "lora":
            super().inject_adapter(model, adapter_name, *args, **kwargs)
            self._candidate_names = [p for u in self._lora_candidates(model, adapter_name) for p in u.param_names]
            if not self._candidate_names:
                raise ValueError(
                    "No LoRA adapter is a candidate: include_patterns/exclude_patterns removed every adapted module."
                )
            return
        self._candidate_names = self._tensor_candidates(model, config)
        self._mark_only_adapters_as_trainable(model)

    def _post_injection_hook(self, model: nn.Module, config, adapter_name: str) -> None:
        """Attach the sparse LM head (``config.sparse_lm_head``) to the base model itself, so that everything that
        runs it (the Trainer's forward, the cost profile, importance, FLOP measurements) runs the same head."""
        super()._post_injection_hook(model, config, adapter_name)
        if config.sparse_lm_head:
            enable_sparse_lm_head(model)

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
        quantized = sum(not is_trainable_dtype(model.get_parameter(n)) for n in aliases)
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

    def _lora_candidates(self, model: nn.Module, adapter_name: str) -> list[Unit]:
        config = self.peft_config[adapter_name]
        units = lora_units(model, adapter_name)
        if config.include_patterns:
            units = [u for u in units if any(re.search(p, u.name) for p in config.include_patterns)]
        if config.exclude_patterns:
            units = [u for u in units if not any(re.search(p, u.name) for p in config.exclude_patterns)]
        return units

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        config = self.peft_config[self.active_adapters[0]]
        if config.units == "lora":
            super()._mark_only_adapters_as_trainable(model)
            return
        # Every candidate is trainable until the first selection: an optimizer built now must hold all of them.
        candidates = {id(model.get_parameter(n)) for n in getattr(self, "_candidate_names", [])}
        for param in model.parameters():
            param.requires_grad_(id(param) in candidates and not config.inference_mode)

    @property
    def units_kind(self) -> str:
        return self.peft_config[self.active_adapters[0]].units

    @property
    def greentrainer_config(self):
        return self.peft_config[self.active_adapters[0]]

    @property
    def greentrainer_state(self) -> GreenTrainerState:
        if "_greentrainer_state" not in self.__dict__:
            self.__dict__["_greentrainer_state"] = GreenTrainerState()
        return self.__dict__["_greentrainer_state"]

    @greentrainer_state.setter
    def greentrainer_state(self, state: GreenTrainerState) -> None:
        self.__dict__["_greentrainer_state"] = state

    def candidate_units(self) -> list[Unit]:
        """The selectable units, in model order."""
        if self.units_kind == "lora":
            return self._lora_candidates(self.model, self.active_adapters[0])
        return tensor_units(self.model, names=self._candidate_names)

    # ------------------------------------------------------------------ costs
    def cost_profile(self, batch: Mapping[str, Any], loss_fn: LossFn = default_loss) -> tuple[CostProfile, float]:
        """Profile of one training step on ``batch``'s shape, and the full fine-tuning FLOPs of the base model.

        Cached per batch shape: one forward pass the first time a shape is seen.
        """
        cache = self.__dict__.setdefault("_profiles", {})
        key = _shape_key(batch)
        if key not in cache:
            with _training_mode(self.model):  # a training step's costs (checkpointing acts only in training)
                profile = profile_model(self.model, batch, loss_fn)
            # rho refers to full fine-tuning of the base model (so both unit kinds spend the same budget): measured
            # with the adapters off, and for a quantized base on its float twin, as int8/4-bit weights cannot train
            reference = self._float_twin()
            if reference is not self:
                batch = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            full = profile.full_flops
            if reference is not self or self.units_kind == "lora":
                with _training_mode(reference.model), _adapters_off(reference):
                    full = profile_model(reference.model, batch, loss_fn).full_flops
            cache[key] = (profile, full)
        return cache[key]

    def _float_twin(self) -> GreenTrainerModel:
        """This tuner, or for a quantized base the same architecture in float on ``meta`` (no weights, no memory).

        The twin gives the reference the budget is a fraction of: full fine-tuning, which a quantized model cannot
        do. Unit costs still come from the real model, whose kernels (CPU flash attention, bitsandbytes matmuls)
        are what each step runs.
        """
        if all(is_trainable_dtype(p) for p in self.model.parameters()):
            return self
        if "_twin" not in self.__dict__:
            import copy

            from peft import get_peft_model

            config = copy.deepcopy(self.model.config)
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            # with a KV cache transformers skips a data-dependent mask check that meta tensors cannot run; the cache
            # only keeps keys and values, it adds no FLOPs
            config.use_cache = True
            with torch.device("meta"):
                base = type(self.model)(config)
            base.train(self.model.training)
            # Mirror checkpointing block by block (not through gradient_checkpointing_enable, which would also turn
            # the KV cache off and send transformers' mask code into data-dependent checks that meta cannot run).
            with _training_mode(self.model):  # checkpointing is on whatever the current mode
                checkpointed = {name for name, m in self.model.named_modules() if is_checkpointed(m)}
            for name, module in base.named_modules():
                if name in checkpointed:
                    module.gradient_checkpointing = True
                    module._gradient_checkpointing_func = functools.partial(
                        torch.utils.checkpoint.checkpoint, use_reentrant=False
                    )
            twin = get_peft_model(base, copy.deepcopy(self.greentrainer_config)).base_model
            keep_backprop_shallow(twin.model, quiet=True)
            self.__dict__["_twin"] = twin
        return self.__dict__["_twin"]

    def unit_costs(self, batch: Mapping[str, Any], loss_fn: LossFn = default_loss) -> UnitCosts:
        profile, full = self.cost_profile(batch, loss_fn)
        return profile.unit_costs(self.candidate_units(), full_flops=full)

    def min_feasible_rho(self, batch: Mapping[str, Any], loss_fn: LossFn = default_loss) -> float:
        costs = self.unit_costs(batch, loss_fn)
        return min_feasible_rho(
            costs.t_dw, costs.t_dy, costs.forward_flops, full_flops=costs.full_flops, dy_head=costs.dy_head
        )

    # ------------------------------------------------------------------ selection
    def select_units(
        self,
        batches: Iterable[Mapping[str, Any]],
        optimizer: torch.optim.Optimizer | None = None,
        *,
        loss_fn: LossFn | None = None,
        lr: float | None = None,
        step: int = 0,
        epoch: float = 0.0,
    ) -> Selection:
        """Choose the units to train until the next selection and freeze the rest.

        Call it once per epoch (or every K steps) in a plain training loop, after creating the optimizer over all
        trainable parameters. ``batches`` are training batches (the first ``importance_batches`` are used; the
        first one's shape is the one the budget is computed for). Weights and optimizer state are not changed.
        """
        start = time.perf_counter()
        config = self.greentrainer_config
        loss_fn = loss_fn or default_loss
        device = next(self.model.parameters()).device
        batches = [
            {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
            for b in islice(batches, config.importance_batches)
        ]
        if not batches:
            raise ValueError("select_units needs at least one training batch to estimate importance.")
        self._note_stepped_tensors(optimizer)
        self._check_optimizer_holds_candidates(optimizer)
        keep_backprop_shallow(self.model)  # checkpointing may have been switched on since the last selection
        costs = self.unit_costs(batches[0], loss_fn)
        # before computing importance: a rho that affords no unit is the selector's error, raised now
        check_feasible(
            config.rho, costs.t_dw, costs.t_dy, costs.forward_flops, full_flops=costs.full_flops, dy_head=costs.dy_head
        )
        budget = config.rho * costs.full_flops
        # Only units that can fit at all need a gradient: backprop for importance stops at the deepest of them.
        feasible = min_unit_costs(costs.t_dw, costs.t_dy, costs.forward_flops, costs.dy_head) <= budget
        with _training_mode(self.model):  # the gradient of the step it predicts (a Trainer may not have set it yet)
            importance = compute_importance(
                self.model, costs.units, batches, optimizer, loss_fn=loss_fn, candidates=feasible, lr=lr
            )
        importance = average_across_ranks(importance)
        selection = select_units(
            importance,
            costs.t_dw,
            costs.t_dy,
            costs.forward_flops,
            config.rho,
            full_flops=costs.full_flops,
            dy_head=costs.dy_head,
            resolution=config.dp_resolution,
        )
        self._set_trainable(costs.units, selection.mask)
        lora_flops = costs.predicted_flops(np.ones(len(costs.units), bool)) if self.units_kind == "lora" else None
        record = SelectionRecord(
            step=step,
            epoch=epoch,
            selected=[u.name for u, s in zip(costs.units, selection.mask, strict=True) if s],
            predicted_ratio=selection.ratio,
            ratio_vs_lora=selection.flops / lora_flops if lora_flops else None,
            importance=float(selection.importance),
            num_units=len(costs.units),
            seconds=time.perf_counter() - start,
        )
        self.greentrainer_state.history.append(record)
        logger.info(
            "GreenTrainer selection at step %d: %d of %d units, predicted FLOPs %.1f%% of full fine-tuning "
            "(budget rho=%.2f)%s, in %.2f s",
            step,
            len(record.selected),
            record.num_units,
            100 * record.predicted_ratio,
            config.rho,
            f", {100 * record.ratio_vs_lora:.1f}% of plain LoRA" if record.ratio_vs_lora else "",
            record.seconds,
        )
        return selection

    def _check_optimizer_holds_candidates(self, optimizer: torch.optim.Optimizer | None) -> None:
        """A unit the optimizer does not hold would be selected, get gradients, and silently never change."""
        optimizer = _unwrap_optimizer(optimizer)
        if optimizer is None:
            return
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        names = [n for u in self.candidate_units() for n in u.param_names]
        missing = [n for n in names if id(self.model.get_parameter(n)) not in held]
        if missing:
            raise ValueError(
                f"The optimizer does not hold {len(missing)} candidate tensor(s) (e.g. {missing[0]}), so selecting "
                "them would train nothing. Create the optimizer while every candidate is trainable: after "
                "get_peft_model and before any selection, without freezing parameters yourself (use "
                "exclude_patterns to keep tensors out of the candidates)."
            )

    def _note_stepped_tensors(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Count as trained every candidate the optimizer holds state for.

        Steps taken before the first selection (every candidate trainable then) change tensors no selection
        recorded; the saved adapter must hold them too, or loading it would silently miss those updates.
        """
        optimizer = _unwrap_optimizer(optimizer)
        if optimizer is None:
            return
        stepped = {id(p) for p, s in optimizer.state.items() if s}
        if not stepped:
            return
        names = [n for u in self.candidate_units() for n in u.param_names if id(self.model.get_parameter(n)) in stepped]
        state = self.greentrainer_state
        state.trained_tensors = list(dict.fromkeys([*state.trained_tensors, *names]))

    def restore_selection(self, selected: Iterable[str]) -> None:
        """Re-apply a selection by unit names (resuming from a checkpoint, or replaying a logged selection)."""
        selected = list(selected)
        wanted = set(selected)
        units = self.candidate_units()
        unknown = wanted - {u.name for u in units}
        if unknown:
            raise ValueError(f"Cannot restore the selection: unknown units {sorted(unknown)[:5]}.")
        self._set_trainable(units, np.array([u.name in wanted for u in units]))
        self.greentrainer_state.selected = list(dict.fromkeys(selected))  # the order it was selected in

    def _set_trainable(self, units: list[Unit], mask: np.ndarray) -> None:
        state = self.greentrainer_state
        trained = dict.fromkeys(state.trained_tensors)
        for unit, selected in zip(units, mask, strict=True):
            for param in unit.parameters(self.model):
                param.requires_grad_(bool(selected))
                if not selected:
                    param.grad = None  # an optimizer must skip it, momentum and weight decay included
            if selected:
                trained.update(dict.fromkeys(unit.param_names))
        state.selected = [u.name for u, s in zip(units, mask, strict=True) if s]
        state.trained_tensors = list(trained)

    def floating_point_ops(self, inputs: Mapping[str, Any], exclude_embeddings: bool = True) -> int:
        """transformers' ``6 x tokens x parameters`` estimate, scaled by the predicted FLOPs ratio of the selection.

        For callers that ask the model; transformers 5's Trainer computes ``total_flos`` itself, unscaled.
        """
        base = self.model.floating_point_ops(inputs, exclude_embeddings=exclude_embeddings)
        last = self.greentrainer_state.last
        return int(base * last.predicted_ratio) if last else base

    # ------------------------------------------------------------------ adapters and state dicts
    def check_can_disable_adapter(self) -> None:
        """Called by ``PeftModel.disable_adapter()`` (see registration.py) before it looks for adapter layers."""
        if self.units_kind == "tensors":
            raise RuntimeError(
                "GreenTrainer with units='tensors' trains the base weights in place, so there is no adapter to "
                "disable and the original weights are not kept. Load a fresh copy of the base model to compare "
                "against it, or use units='lora'."
            )

    def disable_adapter_layers(self) -> None:
        self.check_can_disable_adapter()
        super().disable_adapter_layers()

    def enable_adapter_layers(self) -> None:
        if self.units_kind == "lora":
            super().enable_adapter_layers()

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        if self.units_kind == "lora":
            return super()._unload_and_optionally_merge(
                merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
            )
        if not merge:
            raise RuntimeError(
                "unload() must return the original base model, but units='tensors' trained it in place. Use "
                "merge_and_unload() to get the trained transformers model, or load a fresh base model."
            )
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        return self.model

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        if config.units == "lora":
            return super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        tuner = getattr(model, "base_model", model)
        state = tuner.greentrainer_state
        trained = state.trained_tensors
        if not trained and not state.history:
            trained = tuner._candidate_names  # no selection yet: every candidate was trainable
        prefix = BASE_PREFIX if any(k.startswith(BASE_PREFIX) for k in state_dict) else ""
        # clone: tied aliases share storage, which safetensors refuses; only the canonical name is saved anyway
        return {f"{prefix}{name}": state_dict[f"{prefix}{name}"].detach().clone() for name in trained}

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        if config.units == "lora":
            return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        tuner = getattr(model, "base_model", model)
        params = dict(tuner.model.named_parameters(remove_duplicate=False))
        mismatched = []
        names = []
        for key, value in state_dict.items():
            name = key.removeprefix(BASE_PREFIX)
            if name not in params:
                raise ValueError(
                    f"The adapter holds tensor {name!r}, which this base model does not have: load it onto the "
                    f"base model it was trained from ({config.base_model_name_or_path or 'see adapter_config.json'})."
                )
            if tuple(params[name].shape) != tuple(value.shape):
                mismatched.append(f"{name}: adapter {tuple(value.shape)} vs base {tuple(params[name].shape)}")
            names.append(name)
        if mismatched:
            raise ValueError(
                "The adapter was trained on a base model of other shapes ("
                + "; ".join(mismatched[:3])
                + f"{'; ...' if len(mismatched) > 3 else ''}). Load it onto the base model it was trained from ("
                f"{config.base_model_name_or_path or 'see adapter_config.json'})."
            )
        state = tuner.greentrainer_state
        state.trained_tensors = list(dict.fromkeys([*state.trained_tensors, *names]))
        return dict(state_dict)


@contextmanager
def _adapters_off(tuner: GreenTrainerModel):
    if tuner.units_kind != "lora":
        yield
        return
    LoraModel.disable_adapter_layers(tuner)
    try:
        yield
    finally:
        LoraModel.enable_adapter_layers(tuner)


@contextmanager
def _training_mode(model: nn.Module):
    modes = [(module, module.training) for module in model.modules()]
    model.train()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


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
