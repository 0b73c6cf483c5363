"""The registry of compared methods: ``key -> how to build the trainable model, its lr family, callbacks, optimizer``.

Every builder returns a :class:`Method` over a fresh copy of the workload's base model. The runner needs nothing
method-specific beyond that: which units' FLOPs a step pays is read from ``requires_grad`` at each step start and
priced by ``costs`` (the cost profile of the method's own units), so a method that changes its trainable set during
training (GreenTrainer, random selection, LISA, BAdam) is accounted for without telling the runner when.

Adding a method is one ``register(key, kind, build)`` call.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import TrainerCallback

from peft_greentrainer import GreenTrainerCallback, GreenTrainerConfig, enable_sparse_lm_head
from peft_greentrainer.engine.costs import UnitCosts
from peft_greentrainer.engine.importance import compute_importance
from peft_greentrainer.engine.optimizer_params import unwrap_optimizer
from peft_greentrainer.engine.optimizer_update import base_learning_rates
from peft_greentrainer.engine.profile import costliest_row, profile_model
from peft_greentrainer.engine.selector import min_unit_costs
from peft_greentrainer.engine.units import lora_units, tensor_units

from .workload import Workload

LORA_QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


@dataclass
class MethodOptions:
    """Settings the builders share; one object per benchmark run."""

    seed: int = 42
    importance_batches: int = 4
    baseline_rho: float = 0.5  # the budget of FT-top-k and random selection
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: list[str] | str = field(default_factory=lambda: list(LORA_QKVO))
    total_steps: int = 0  # optimizer steps of the run (LISA's and BAdam's periods derive from it)
    lisa_layers: int = 2  # LISA's gamma: middle layers trained at a time (the paper's "E+H+2L")
    # GreenTrainer's sparse LM head is exact but saves FLOPs any method could save: off, every method pays the same
    # dense head, so a budget is the same fraction of the same full fine-tuning for all of them
    sparse_lm_head: bool = False
    lora_lr_factor: float = 3.0  # mixed units: LoRA adapters' lr over base tensors' (protocol: its grids' ratio)

    def lora_config(self) -> dict:
        return {"r": self.lora_r, "lora_alpha": self.lora_alpha, "target_modules": self.lora_targets}

    def lora_label(self) -> str:
        targets = (
            self.lora_targets
            if isinstance(self.lora_targets, str)
            else ",".join(t.removesuffix("_proj") for t in self.lora_targets)
        )
        return f"r={self.lora_r} ({targets})"


@dataclass
class Method:
    """One configured method, ready for the Trainer.

    ``costs`` prices the units of ``units_model`` (a mask of trained units -> FLOPs per step); ``selector`` is the
    callback that changes the trainable set, if any (its hooks are timed and FLOP-counted as selection overhead).
    """

    name: str
    model: nn.Module
    costs: UnitCosts
    units_model: nn.Module
    key: str = ""  # the registry's key, set by ``build``
    kind: str = ""  # "tensors" or "lora": its learning-rate family (set from the registry by ``build``)
    selector: TrainerCallback | None = None
    optimizer: Callable[[nn.Module, float], torch.optim.Optimizer] | None = None
    describe: Callable[[], str] = lambda: ""  # what was trained, in a few words (after training)
    selections: Callable[[], list[list[str]]] = lambda: []  # units chosen at each selection, if it selects

    def trained_mask(self) -> np.ndarray:
        return np.array([any(p.requires_grad for p in u.parameters(self.units_model)) for u in self.costs.units])


Builder = Callable[[Workload, MethodOptions], Method]


@dataclass(frozen=True)
class MethodSpec:
    key: str
    kind: str
    build: Callable[[Workload, MethodOptions], Method]
    # a variant of another method (one setting changed), run at that method's chosen learning rate: no grid of its own
    ablation_of: str | None = None


REGISTRY: dict[str, MethodSpec] = {}


def register(
    key: str, kind: str, build: Callable[[Workload, MethodOptions], Method], ablation_of: str | None = None
) -> None:
    REGISTRY[key] = MethodSpec(key, kind, build, ablation_of)


def build(key: str, work: Workload, options: MethodOptions) -> Method:
    if key not in REGISTRY:
        raise SystemExit(f"unknown method {key!r}; registered: {', '.join(REGISTRY)}")
    method = REGISTRY[key].build(work, options)
    method.key, method.kind = key, REGISTRY[key].kind
    return method


def block_index(name: str) -> int | None:
    """Index of the transformer block a parameter belongs to (``...layers.7.mlp...`` -> 7), None outside blocks."""
    match = re.search(r"\.(?:layers|h|blocks|layer)\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def _trained_of(selections: Callable[[], list[list[str]]], total: int, kind: str) -> Callable[[], str]:
    return lambda: f"{'/'.join(str(len(s)) for s in selections())} of {total} {kind} per selection"


# ------------------------------------------------------------------------------------------------- full, LoRA
def _full(work: Workload, options: MethodOptions) -> Method:
    model = work.new_model()
    for param in model.parameters():
        param.requires_grad_(True)
    costs = work.base_costs(model)
    return Method("full fine-tuning", model, costs, model, describe=lambda: "all")


def _lora_model(work: Workload, options: MethodOptions) -> tuple[nn.Module, UnitCosts]:
    base = work.new_model()
    full = work.base_costs(base).full_flops
    model = get_peft_model(base, LoraConfig(**options.lora_config(), task_type="CAUSAL_LM"))
    inner = model.base_model.model
    costs = profile_model(inner, work.example).unit_costs(lora_units(inner, "default"), full_flops=full)
    return model, costs


def _lora(work: Workload, options: MethodOptions) -> Method:
    model, costs = _lora_model(work, options)
    return Method(
        f"LoRA {options.lora_label()}",
        model,
        costs,
        model.base_model.model,
        describe=lambda: f"{len(costs.units)} adapters",
    )


# ------------------------------------------------------------------------------------------------- FT-top-k, random
def top_k_mask(costs: UnitCosts, k: int, num_blocks: int) -> np.ndarray:
    """Units of the last ``k`` blocks, plus the units above every block in backward order (final norm, untied head).

    A head tied to the input embedding is the deepest unit (it is the embedding), so it is never part of FT-top-k.
    """
    blocks = [block_index(u.name) for u in costs.units]
    first_block = next(i for i, b in enumerate(blocks) if b is not None)
    return np.array(
        [i < first_block or (b is not None and b >= num_blocks - k) for i, b in enumerate(blocks)], dtype=bool
    )


def _top_k(units: str = "tensors", shipped_head: bool = False) -> Builder:
    """FT-top-k at its budget: the units of the last k blocks (and those above every block), k as large as fits.

    ``units="lora"``: the last k LoRA adapters in backward order (adapters, not blocks: a whole block of them may not
    fit a budget that its output projection does). ``shipped_head``: with the sparse LM head, at that budget of
    dense full fine-tuning (as the ``gt_*_shipped_head`` rows); k is chosen on the training row with the most
    labelled positions, so that no step costs more.
    """

    def build_top_k(work: Workload, options: MethodOptions) -> Method:
        rho = options.baseline_rho
        if units == "lora":
            model, costs = _lora_model(work, options)
            units_model = model.base_model.model
        else:
            model = units_model = work.new_model()
            costs = work.base_costs(model)
        bound = costs  # what k is chosen on
        if shipped_head:
            units_model.train()  # the head acts in training mode only
            enable_sparse_lm_head(units_model)
            full = costs.full_flops  # FLOPs stay fractions of dense full fine-tuning, the protocol's reference
            bound = profile_model(units_model, busiest_batch(work)).unit_costs(costs.units, full_flops=full)
            costs = profile_model(units_model, work.example).unit_costs(costs.units, full_flops=full)
        num_blocks = 1 + max(b for b in map(block_index, (u.name for u in costs.units)) if b is not None)
        if units == "lora":
            masks = [np.arange(len(costs.units)) < k for k in range(1, len(costs.units) + 1)]
        else:
            masks = [top_k_mask(costs, k, num_blocks) for k in range(num_blocks + 1)]
        fitting = [i for i, mask in enumerate(masks) if bound.predicted_flops(mask) <= rho * costs.full_flops]
        if not fitting:
            smallest = "last adapter" if units == "lora" else "final norm and head"
            raise SystemExit(f"FT-top-k: not even the {smallest} fits rho={rho}")
        mask = masks[fitting[-1]]
        trained = {
            id(p) for unit, keep in zip(costs.units, mask, strict=True) if keep for p in unit.parameters(units_model)
        }
        for param in units_model.parameters():
            param.requires_grad_(id(param) in trained)
        if units == "lora":
            k = int(mask.sum())
            name, what = f"LoRA top-k (k={k}, rho {rho:g} of dense full FT)", f"the last {k} of {len(mask)} adapters"
        else:
            k = fitting[-1]
            head = [u.name for u, keep in zip(costs.units, mask, strict=True) if keep and block_index(u.name) is None]
            name, what = (
                f"FT-top-k (k={k}, rho {rho})",
                f"last {k} of {num_blocks} blocks + {', '.join(head) or 'nothing else'}",
            )
        if shipped_head:
            name += ", with the sparse LM head"
        return Method(name, model, costs, units_model, describe=lambda: what)

    return build_top_k


def random_choice(costs: UnitCosts, rho: float, rng: np.random.Generator, resolution: int = 10_000) -> list[str]:
    """Units chosen by random positive importances through GreenTrainer's exact DP at ``rho``: a choice that fills
    the same budget but ignores the data."""
    mask = costs.select(rng.uniform(0.01, 1.0, len(costs.units)), rho, resolution=resolution).mask
    return [u.name for u, keep in zip(costs.units, mask, strict=True) if keep]


class RandomSelection(TrainerCallback):
    """Each epoch: random positive importances (seeded), the same exact DP as GreenTrainer, applied as flags."""

    def __init__(self, tuner, example: dict, rho: float, seed: int):
        self.tuner, self.example, self.rho = tuner, example, rho
        self.rng = np.random.default_rng(seed)
        self.records: list[list[str]] = []  # units selected at each selection

    def on_epoch_begin(self, args, state, control, **kwargs):
        costs = self.tuner.unit_costs(self.example)  # profile cached by the tuner
        names = random_choice(costs, self.rho, self.rng, self.tuner.greentrainer_config.dp_resolution)
        self.tuner.restore_selection(names)
        self.records.append(names)


def _random(work: Workload, options: MethodOptions) -> Method:
    rho = options.baseline_rho
    config = GreenTrainerConfig(units="tensors", rho=rho, sparse_lm_head=options.sparse_lm_head, task_type="CAUSAL_LM")
    model = get_peft_model(work.new_model(), config)
    tuner = model.base_model
    costs = tuner.unit_costs(work.example)  # profiles now, outside the timed selection
    selector = RandomSelection(tuner, work.example, rho, options.seed)
    return Method(
        f"random selection (rho {rho})",
        model,
        costs,
        tuner.model,
        selector=selector,
        describe=_trained_of(lambda: selector.records, len(costs.units), "tensors"),
        selections=lambda: selector.records,
    )


# ------------------------------------------------------------------------------------------------- GreenTrainer
def dense_over_sparse_full_flops(work: Workload) -> float:
    """Full fine-tuning's FLOPs with a dense LM head over the most they can be with the sparse one, on any batch.

    The sparse head's cost grows with a batch's labelled positions; a batch of the training row with the most of them
    bounds every batch. A budget of ``rho`` times this ratio, in the sparse head's terms, is therefore at most ``rho``
    of dense full fine-tuning at every step.
    """
    model = work.new_model().train()  # the sparse head acts in training mode only
    dense = profile_model(model, work.example).full_flops
    enable_sparse_lm_head(model)
    return dense / profile_model(model, busiest_batch(work)).full_flops


def busiest_batch(work: Workload) -> dict:
    """A training batch of the row with the most labelled positions: with the sparse LM head, no batch costs more."""
    row = costliest_row(work.train_columns)
    return {k: v.expand(work.batch_size, *v.shape[1:]) for k, v in row.items()}


def _greentrainer(
    units: str,
    rho: float | None,
    importance_batches: int | None = None,
    selection_count: int | None = None,
    shipped_head: bool = False,
    chance: bool = False,
    importance: str | None = None,
) -> Callable[[Workload, MethodOptions], Method]:
    """GreenTrainer at ``rho``; ``rho=None`` (units="lora" only): at the FLOPs of LoRA with the same adapters.

    ``importance_batches`` overrides the options' count; ``selection_count`` re-selects about that many times (at
    most; exactly for the protocol's 150 steps and 8), evenly over the run (``selection_interval_steps``), instead of
    once per epoch. ``shipped_head`` trains with the sparse LM head GreenTrainer ships with, its budget still ``rho``
    of dense full fine-tuning (the protocol's common reference): what a user gets for half of their usual full FT.
    ``chance``: the random-selection baseline of that row: everything as GreenTrainer does it (the probe batches
    priced, the DP over the same shapes, re-selections at new ones), with importances drawn at random instead of
    computed. ``importance``: a variant of the importance formula to measure (a key of ``IMPORTANCE_VARIANTS``).
    """

    def build_greentrainer(work: Workload, options: MethodOptions) -> Method:
        budget = rho
        if budget is None:
            _, lora_costs = _lora_model(work, options)
            budget = lora_costs.predicted_flops(np.ones(len(lora_costs.units), bool)) / lora_costs.full_flops
        if shipped_head:
            budget = min(1.0, budget * dense_over_sparse_full_flops(work))
        lora = options.lora_config() if units == "lora" else {}
        interval = None
        if selection_count:
            if options.total_steps < 1:
                raise SystemExit("re-selecting a number of times needs the run's total_steps")
            interval = math.ceil(options.total_steps / selection_count)
        config = GreenTrainerConfig(
            units=units,
            rho=budget,
            importance_batches=importance_batches or options.importance_batches,
            selection_interval_steps=interval,
            sparse_lm_head=shipped_head or options.sparse_lm_head,
            importance_update="gradient" if importance == "gradient" else "optimizer",
            task_type="CAUSAL_LM",
            **lora,
        )
        # priced in the mode the steps run in (the sparse head, if on, acts in training mode only)
        model = get_peft_model(work.new_model().train(), config)
        tuner = model.base_model
        floor = tuner.min_feasible_rho(work.example)  # also profiles now, outside the timed selection
        if budget < floor:
            raise SystemExit(f"GreenTrainer units={units}: rho={budget} is below this model's feasible {floor:.4f}")
        costs = tuner.unit_costs(work.example)
        history = tuner.greentrainer_state.history
        if chance:
            _draw_importances_at_random(tuner, options.seed)
        if importance and IMPORTANCE_VARIANTS[importance][1] is not None:
            IMPORTANCE_VARIANTS[importance][1](tuner)

        def selections() -> list[list[str]]:
            return [list(record.selected) for record in history]

        suffix = f"rho {budget:g}" if rho is not None else f"rho {budget:.3f} (LoRA's FLOPs)"
        if importance_batches:
            suffix += f", {importance_batches} importance batch{'es' if importance_batches > 1 else ''}"
        if interval:
            suffix += f", re-selected every {interval} steps"
        if shipped_head:
            suffix = f"rho {rho:g} of dense full FT, with its sparse LM head (any method could use it)"
        if importance:
            suffix += IMPORTANCE_VARIANTS[importance][0]
        kind = "adapters" if units == "lora" else "tensors"
        name = f"GreenTrainer {units} {suffix}"
        if chance:
            name = f"random selection of {kind} through GreenTrainer's DP at rho {rho:g} of dense full FT"
            name += ", with the sparse LM head" if shipped_head else ""
        return Method(
            name,
            model,
            costs,
            tuner.model,
            selector=GreenTrainerCallback(),
            describe=_trained_of(selections, len(costs.units), kind),
            selections=selections,
        )

    return build_greentrainer


def _draw_importances_at_random(tuner, seed: int) -> None:
    """Replace the tuner's importance by positive values drawn at random (seeded), one per unit: each selection is
    then GreenTrainer's own, importance aside. Reaches into the tuner's private ``_importance`` on purpose: this
    baseline exists to measure what the importance is worth."""
    rng = np.random.default_rng(seed)

    def chance(batches, units, feasible, optimizer, lr, **kwargs) -> np.ndarray:
        return rng.uniform(0.01, 1.0, len(units))

    tuner._importance = chance


def _importance_from_fresh_state(tuner) -> None:
    """Score every unit as at its first optimizer step: the tuner's importance, given an optimizer of the same class
    and hyper-parameters that holds no state. Under AdamW the paper's importance predicts a trained unit's next step
    from its moments, typically smaller and less aligned with the gradient than an untrained unit's first,
    ``-lr * sign(g)``; this ablation measures what that does to the selections. Reaches into the tuner's private
    ``_importance`` on purpose, as the random baseline does."""
    computed = tuner._importance

    def fresh(batches, units, feasible, optimizer, lr, **kwargs) -> np.ndarray:
        inner = unwrap_optimizer(optimizer)
        if inner is not None:  # the same groups (lr, initial_lr, betas, decay), no moments
            optimizer = type(inner)([{**group, "params": list(group["params"])} for group in inner.param_groups])
        return computed(batches, units, feasible, optimizer, lr, **kwargs)

    tuner._importance = fresh


# the importance variants the ablations measure: what the row's name says, and the harness's stand-in for the
# tuner's importance (None: the package's own ``importance_update="gradient"``)
IMPORTANCE_VARIANTS: dict[str, tuple[str, Callable | None]] = {
    "fresh": (", importance from a fresh optimizer state", _importance_from_fresh_state),
    "gradient": (", importance of a plain gradient step", None),
}


# ------------------------------------------------------------------------------------------------- mixed units
class MixedSelection(TrainerCallback):
    """GreenTrainer over a mixed unit space: each adapted linear module offers its base weight *and* its LoRA adapter
    (every other float tensor is a unit as usual), so one exact DP under one budget decides per module whether to
    train it in full, through the low-rank adapter, both or neither. The idea: where full training of a module pays
    less per FLOP than its adapter (or the reverse), the budget goes where it buys the most loss reduction.

    Each epoch: importance (``-sum(grad * delta_w)``, the optimizer's next update, on ``importance_batches`` random
    training batches, for the units that can fit) -> DP at ``rho`` -> ``requires_grad`` flags, as GreenTrainer does.

    Caveats of this prototype: importance is linear in each param group's learning rate, so the adapters' lr factor
    (fixed, not tuned: the ratio of the protocol's two grids) shifts the split between the two kinds; and a module's
    weight and its adapter both count their full first-order gain when chosen together, though the two overlap.
    """

    def __init__(self, model: nn.Module, costs: UnitCosts, rho: float, work: Workload, batches: int, seed: int):
        self.model, self.costs, self.rho, self.work, self.batches = model, costs, rho, work, batches
        self.rng = np.random.default_rng(seed)
        self.records: list[list[str]] = []

    def on_epoch_begin(self, args, state, control, optimizer=None, **kwargs):
        costs, columns, size = self.costs, self.work.train_columns, self.work.batch_size
        rows = self.rng.choice(self.work.train_size, self.batches * size, replace=False)
        batches = [{k: v[rows[i : i + size]] for k, v in columns.items()} for i in range(0, len(rows), size)]
        fits = min_unit_costs(costs.t_dw, costs.t_dy, costs.forward_flops, costs.dy_head) <= self.rho * costs.full_flops
        group_lrs = base_learning_rates(optimizer) if optimizer is not None else None
        importance = compute_importance(
            self.model, costs.units, batches, optimizer, candidates=fits, group_lrs=group_lrs
        )
        if not (importance[fits] > 0).any():  # as GreenTrainer: rank by a plain gradient step's loss reduction instead
            importance = compute_importance(self.model, costs.units, batches, None, candidates=fits, lr=1.0)
        mask = costs.select(np.where(fits, importance, 0.0), self.rho).mask
        trained = {n for unit, keep in zip(costs.units, mask, strict=True) if keep for n in unit.param_names}
        for name, param in self.model.named_parameters():
            param.requires_grad_(name in trained)
            if name not in trained:
                param.grad = None
        self.records.append([u.name for u, keep in zip(costs.units, mask, strict=True) if keep])


def _mixed(rho: float) -> Callable[[Workload, MethodOptions], Method]:
    def build_mixed(work: Workload, options: MethodOptions) -> Method:
        base = work.new_model()
        full = work.base_costs(base).full_flops
        model = get_peft_model(base, LoraConfig(**options.lora_config(), task_type="CAUSAL_LM"))
        inner = model.base_model.model
        units = tensor_units(inner, exclude=[r"\.lora_"]) + lora_units(inner, "default")
        costs = profile_model(inner, work.example).unit_costs(units, full_flops=full)
        for param in inner.parameters():  # every candidate is in the optimizer until the first selection
            param.requires_grad_(True)
        selector = MixedSelection(inner, costs, rho, work, options.importance_batches, options.seed)
        adapters = {u.name for u in lora_units(inner, "default")}

        def optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
            # two learning rates, one per kind of unit, in the ratio of the protocol's two grids (not tuned here)
            lora = [p for n, p in model.named_parameters() if ".lora_" in n]
            rest = [p for n, p in model.named_parameters() if ".lora_" not in n]
            groups = [{"params": rest, "lr": lr}, {"params": lora, "lr": lr * options.lora_lr_factor}]
            return torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)

        def describe() -> str:
            chosen = [set(r) for r in selector.records]
            return "/".join(f"{len(c - adapters)} tensors + {len(c & adapters)} adapters" for c in chosen)

        return Method(
            f"GreenTrainer mixed tensors+LoRA {options.lora_label()} rho {rho:g} (LoRA lr x{options.lora_lr_factor:g})",
            model,
            costs,
            inner,
            selector=selector,
            optimizer=optimizer,
            describe=describe,
            selections=lambda: selector.records,
        )

    return build_mixed


# ------------------------------------------------------------------------------------------------- LISA, BAdam
class LisaCallback(TrainerCallback):
    """LISA (Pan et al., NeurIPS 2024, arXiv 2403.17919, Algorithm 1) as a callback.

    Every ``interval`` steps all transformer blocks are frozen and ``layers`` of them, drawn uniformly without
    replacement, are unfrozen; the embeddings, the final norm and the LM head (everything outside the blocks) always
    train. The optimizer holds every parameter from the start (the Trainer creates it before the first freeze), so
    reactivated layers keep their AdamW moments, as in LMFlow's implementation.
    """

    def __init__(self, model: nn.Module, layers: int, interval: int, seed: int):
        self.model, self.interval = model, interval
        self.blocks: dict[int, list[nn.Parameter]] = {}
        for name, param in model.named_parameters():
            index = block_index(name)
            if index is not None:
                self.blocks.setdefault(index, []).append(param)
        if not 0 < layers <= len(self.blocks):
            raise SystemExit(f"LISA: cannot sample {layers} of {len(self.blocks)} blocks")
        self.layers = layers
        self.rng = np.random.default_rng(seed)
        self.records: list[list[int]] = []

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step % self.interval:
            return
        chosen = sorted(self.rng.choice(sorted(self.blocks), self.layers, replace=False).tolist())
        for index, params in self.blocks.items():
            for param in params:
                param.requires_grad_(index in chosen)
                if index not in chosen:
                    param.grad = None
        self.records.append(chosen)


def lisa_interval(total_steps: int) -> int:
    """K = T/10: the paper's sampling-period ablation (K = 13 of T = 122 steps); LMFlow's default is 20."""
    return max(1, math.ceil(total_steps / 10))


def _lisa(work: Workload, options: MethodOptions) -> Method:
    model = work.new_model()
    for param in model.parameters():
        param.requires_grad_(True)
    interval = lisa_interval(options.total_steps)
    selector = LisaCallback(model, options.lisa_layers, interval, options.seed)
    costs = work.base_costs(model)
    return Method(
        f"LISA (gamma {options.lisa_layers}, K {interval})",
        model,
        costs,
        model,
        selector=selector,
        describe=lambda: f"E+H+{options.lisa_layers}L of {len(selector.blocks)}, {len(selector.records)} draws",
        selections=lambda: [[f"layer {i}" for i in chosen] for chosen in selector.records],
    )


def badam_switch_every(train_size: int, batch_size: int, blocks: int) -> int:
    """BAdam README's adaptive K = n / (B D): every block gets about one pass over the data per epoch."""
    return max(1, math.ceil(train_size / (batch_size * blocks)))


def _badam(work: Workload, options: MethodOptions) -> Method:
    from badam import BlockOptimizer

    model = work.new_model()
    for param in model.parameters():
        param.requires_grad_(True)
    blocks = len({block_index(n) for n, _ in model.named_parameters()} - {None})
    switch_every = badam_switch_every(work.train_size, work.batch_size, blocks)

    def optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
        # BAdam's own block partition (one block per transformer layer), random reshuffled order as recommended
        base = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        return BlockOptimizer(
            base, list(model.named_parameters()), switch_block_every=switch_every, switch_mode="random", verbose=0
        )

    costs = work.base_costs(model)
    return Method(
        f"BAdam (random order, K {switch_every})",
        model,
        costs,
        model,
        optimizer=optimizer,
        describe=lambda: f"1 of {blocks} blocks, switched every {switch_every} steps",
    )


register("full", "tensors", _full)
register("lora", "lora", _lora)
register("top_k", "tensors", _top_k())
register("random", "tensors", _random)
for _rho in (0.4, 0.5, 0.7):
    register(f"gt_tensors_{_rho}", "tensors", _greentrainer("tensors", _rho))
register("gt_lora_0.5", "lora", _greentrainer("lora", 0.5))
register("gt_lora_at_lora", "lora", _greentrainer("lora", None))
register("lisa", "tensors", _lisa)
register("badam", "tensors", _badam)
# ablations of GreenTrainer's selection overhead and interval (issue 13's "improve"): the paper's one-batch probe, and
# 8 one-batch re-selections (as many probe batches as the protocol's 2 epochs x 4)
register("gt_tensors_0.5_probe1", "tensors", _greentrainer("tensors", 0.5, 1), ablation_of="gt_tensors_0.5")
register("gt_tensors_0.5_resel8", "tensors", _greentrainer("tensors", 0.5, 1, 8), ablation_of="gt_tensors_0.5")
# GreenTrainer as shipped, with its sparse LM head, at the same FLOPs as the dense-head row (a labelled extra row)
register(
    "gt_tensors_0.5_shipped_head",
    "tensors",
    _greentrainer("tensors", 0.5, shipped_head=True),
    ablation_of="gt_tensors_0.5",
)
# the same with LoRA units: the adapters' cheap weight gradients and the cheaper head both buy depth
register(
    "gt_lora_0.5_shipped_head",
    "lora",
    _greentrainer("lora", 0.5, shipped_head=True),
    ablation_of="gt_lora_0.5",
)

# the shipped-head GreenTrainer rows with their importances replaced by chance, at their learning rates: does the
# selection beat random choice through the same DP, budget and head?
register(
    "random_tensors_shipped_head",
    "tensors",
    _greentrainer("tensors", 0.5, shipped_head=True, chance=True),
    ablation_of="gt_tensors_0.5",
)
register(
    "random_lora_shipped_head",
    "lora",
    _greentrainer("lora", 0.5, shipped_head=True, chance=True),
    ablation_of="gt_lora_0.5",
)
# the shipped tensors row with its importance read as if no unit had trained: with the optimizer's moments, a
# re-selection favours the units not trained before, and swapped most of them at epoch 2
register(
    "gt_tensors_0.5_shipped_head_fresh",
    "tensors",
    _greentrainer("tensors", 0.5, shipped_head=True, importance="fresh"),
    ablation_of="gt_tensors_0.5",
)
# and with the importance of a plain gradient step (``lr * |g|^2``, the package's ``importance_update="gradient"``),
# which does not grow with a tensor's size as AdamW's first step (``lr * |g|_1``) does: at a first selection it reaches
# blocks 11-29 for their norms and projections; with adapters too
register(
    "gt_tensors_0.5_shipped_head_sgd",
    "tensors",
    _greentrainer("tensors", 0.5, shipped_head=True, importance="gradient"),
    ablation_of="gt_tensors_0.5",
)
register(
    "gt_lora_0.5_shipped_head_sgd",
    "lora",
    _greentrainer("lora", 0.5, shipped_head=True, importance="gradient"),
    ablation_of="gt_lora_0.5",
)
# and with FT-top-k's rule (the last blocks, as deep as fits) in their place
register("top_k_tensors_shipped_head", "tensors", _top_k("tensors", True), ablation_of="gt_tensors_0.5")
register("top_k_lora_shipped_head", "lora", _top_k("lora", True), ablation_of="gt_lora_0.5")


def _with_sparse_head(build: Builder) -> Builder:
    """The method with the sparse LM head GreenTrainer ships with. The head is exact (the same loss and gradients), so
    training follows the dense run's course and only the FLOPs change: the fair comparison for the shipped-head
    GreenTrainer rows, whose budget the cheaper head deepens."""

    def build_sparse(work: Workload, options: MethodOptions) -> Method:
        method = build(work, options)
        model = method.units_model.train()  # the head acts in training mode only, and is priced so
        enable_sparse_lm_head(model)
        dense = method.costs  # FLOPs stay fractions of dense full fine-tuning, the protocol's common reference
        method.costs = profile_model(model, work.example).unit_costs(dense.units, full_flops=dense.full_flops)
        method.name += ", with the sparse LM head"
        return method

    return build_sparse


# the strongest baselines with the shipped head too (labelled extra rows, at their parents' learning rates)
for _parent in ("full", "lora", "lisa", "badam"):
    register(
        f"{_parent}_sparse_head",
        REGISTRY[_parent].kind,
        _with_sparse_head(REGISTRY[_parent].build),
        ablation_of=_parent,
    )
# an idea no anchor has: one DP over base tensors and LoRA adapters together (tensors' lr grid, adapters scaled)
register("gt_mixed_0.5", "tensors", _mixed(0.5))
