"""What a training step costs at each batch shape a run trains on, per unit: the tuner's price list.

A step is priced before it runs, from one-row profiles (``CostProfile``) of the model as it will run the step, since
its costs are linear in its rows: the costliest row of the batch (``costliest_row``), and where the costs depend on more
than the shape, the rows that bound them (an LM head that projects only labelled positions: the row widened to its
label bucket's top, with full fine-tuning at its bottom; attention that runs within the sequences the inputs delimit:
the spans' two extremes). Lengths padded per batch are predicted from the polynomial earlier lengths follow
(``length_fit``). Linearity is checked once per run on copies of a row: where the rows couple (a loss scoring every row
against every other) steps are priced on their whole batch, and a cost that does not grow with the rows is priced apart
(what each row more adds). Under ``torch.distributed`` every rank learns every rank's shapes, so all decide on the same
prices.

The tuner measures (``GreenTrainerModel._measure``: adapters, a quantized base's float twin, FSDP2 shards); this
module decides what to measure and keeps what was measured, per set of active adapters.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from torch import nn

from . import ranks
from .engine.attention_spans import attention_extremes, attention_follows_values, encoder_decoder_error
from .engine.costs import BackwardOrdersDiffer, UnitCosts, cost_envelope
from .engine.label_buckets import LabelBucket, label_bucket
from .engine.length_fit import LengthFit, length_family
from .engine.module_tree import ModuleTree
from .engine.profile import (
    CLIP_MASKS,
    CostProfile,
    LossFn,
    batch_size,
    costliest_row,
    default_loss,
    input_key,
    module_modes,
    profile_key,
    returns_dict,
    rows_of,
    training_mode,
)
from .engine.selector import rounded_up_rho
from .engine.step_loss import step_loss as loss_of_step
from .engine.targets import labelled_counts, own_head_follows_labels
from .engine.units import Unit
from .sparse_head import attached_sparse_lm_head

logger = logging.getLogger(__name__)


@dataclass
class ProfileCaches:
    """What is known of the costs of a model's steps: valid for the adapters active when it was measured."""

    profiles: dict[tuple, tuple[CostProfile, float]] = field(default_factory=dict)  # by batch shape
    measured_rows: dict[tuple, UnitCosts] = field(default_factory=dict)  # one row's costs, by shape key
    shape_costs: dict[tuple, UnitCosts] = field(default_factory=dict)  # agreed on by every rank (learn_shapes)
    length_fits: dict[tuple, LengthFit] = field(default_factory=dict)  # by shape family (length_fit.length_family)
    # a profile computed FLOPs on parameters alone: a step's costs grow by less than a row's per row (price_rows)
    fixed_costs_per_step: bool = False
    # whether a step's costs grow faster than its rows (an in-batch contrastive loss: rows x rows logits), which
    # steps are then priced on their whole batch; None: not checked yet (_rows_couple)
    rows_couple: bool | None = None
    # the outputs a caller's loss_fn reads, the roots of rho's reference (step_loss); None: not probed yet
    loss_reads: frozenset[str] | None = None
    # (modes, selected units): the selection that fits every shape known in those modes (profile_key's second part)
    checked: tuple[tuple, frozenset[str]] | None = None


class PricedTuner(Protocol):
    """What the pricer asks of the tuner whose steps it prices (``GreenTrainerModel``)."""

    model: nn.Module  # the base model

    def candidate_units(self) -> list[Unit]: ...

    def _module_tree(self) -> ModuleTree: ...

    def _measure(self, batch: Mapping[str, Any], loss_fn: LossFn) -> tuple[CostProfile, float]: ...


class StepPricer:
    """The prices of a tuner's training steps, per batch shape and unit (module docstring).

    It keeps one :class:`ProfileCaches` per set of active adapters.
    """

    def __init__(self, tuner: PricedTuner) -> None:
        self._tuner = tuner
        self.caches = ProfileCaches()
        self._caches_by_active_adapters: dict[tuple[str, ...], ProfileCaches] = {}

    def drop(self) -> None:
        """Forget every price: profiles describe the model as it ran (which adapters it had, which were active)."""
        self.caches = ProfileCaches()
        self._caches_by_active_adapters.clear()

    def switch(self, previous: tuple[str, ...], current: tuple[str, ...]) -> None:
        """Keep the prices of the adapters active until now for when they are active again, and bring back those of
        the adapters now active: TRL's DPO switches to its reference adapter and back around every step, which would
        otherwise profile every step's shape again."""
        if current == previous:
            return
        self._caches_by_active_adapters[previous] = self.caches
        self.caches = self._caches_by_active_adapters.pop(current, None) or ProfileCaches()

    def profile(self, batch: Mapping[str, Any], loss_fn: LossFn = default_loss) -> tuple[CostProfile, float]:
        """Profile of one training step on ``batch``, and the full fine-tuning FLOPs of the base model.

        Measured in training mode (checkpointing acts only there). Cached per input shapes, checkpointed blocks and
        module modes (:func:`~peft_greentrainer.engine.profile.profile_key`): one forward pass the first time.
        """
        with training_mode(self._tuner.model):
            tree = self._tuner._module_tree()
            key = (profile_key(self._tuner.model, batch, tree), self._clip_frames(batch, tree))
            counts = labelled_counts(batch, shifts=self._next_token_targets)
            dense_head = not self.head_follows_labels(batch)
            if not dense_head and counts is not None:  # a sparse head's cost follows each row's labelled positions
                key = (key, tuple(counts.tolist()))
            cache = self.caches.profiles
            if key not in cache:
                cache[key] = self._tuner._measure(batch, loss_fn)
                # training steps at this shape need no profile of their own: costs are linear in the batch size (a
                # sparse head's steps are priced on rows widened to a bucket of labels: see row_keys)
                # (attention that follows the values: steps are priced at the row's spans' extremes instead)
                self._check_rows_couple(batch)
                rows = self.row_keys(batch)
                # unless an op computes on parameters alone (``B @ A`` folded into a weight, as PEFT's LoRA on a
                # parameter does), which costs the same for any number of rows, or rows are priced whole
                linear = cache[key][0].scales_with_rows and not self.caches.rows_couple
                if (dense_head or counts is None) and len(rows) == 1 and linear:
                    costs = cache[key][0].unit_costs(self._tuner.candidate_units(), full_flops=cache[key][1])
                    row_costs = costs.scaled(1 / (batch_size(batch) or 1))
                    self.caches.measured_rows.setdefault(rows[0][1], row_costs)
        return cache[key]

    def min_feasible_rho(self, batch: Mapping[str, Any]) -> float:
        """The smallest rho that lets a unit train on ``batch``, priced as its training steps are, so that a rho at or
        above it does not fail at the first selection."""
        return cost_envelope(self.step_prices(batch)).min_feasible_rho()

    def step_prices(self, batch: Mapping[str, Any]) -> list[UnitCosts]:
        """The costs a training step on ``batch`` is priced at (``price_rows``): one row's each, usually one; with an
        LM head that projects only labelled positions, at its label bucket's ends; with attention that follows the
        values, at its spans' extremes. A selection within rho at each is within rho on ``batch``."""
        with training_mode(self._tuner.model):
            new: dict[tuple, UnitCosts] = {}
            keys = self.price_rows(batch, new)
        return [new.get(key) or self.shape_costs[key] for key in keys]

    @property
    def shape_costs(self) -> dict[tuple, UnitCosts]:
        """Costs of every batch shape trained or selected on (one row each), by ``profile_key``. Only
        ``learn_shapes`` adds to it, so it is the same on every rank."""
        return self.caches.shape_costs

    def price_rows(
        self, batch: Mapping[str, Any], new: dict[tuple, UnitCosts], tree: ModuleTree | None = None
    ) -> list[tuple]:
        """The keys ``batch``'s steps are priced at (``row_keys``); the costs of those not agreed on yet (one row,
        current modes) go into ``new``, measured unless this process measured them before (``profile``)."""
        keys = []
        caches = self.caches
        self._check_rows_couple(batch, tree)
        for row, key, bucket in self.row_keys(batch, tree):
            if key not in self.shape_costs and key not in new:
                if key not in caches.measured_rows:
                    caches.measured_rows[key] = self._row_costs(row, key, bucket)
                new[key] = caches.measured_rows[key]
            keys.append(key)
            more = _each_row_more_key(key)
            if caches.fixed_costs_per_step and batch_size(row) == 1:
                # a step of B rows costs one row's costs plus B - 1 times what each row more adds, so a selection
                # within rho at both is within rho at every B; one row alone does not bound them (DeBERTa's relative
                # position projections cost the same for any number of rows, and full fine-tuning pays their backward)
                if more not in self.shape_costs and more not in new:
                    if more not in caches.measured_rows:
                        one = new[key] if key in new else self.shape_costs[key]  # (another rank's, maybe)
                        caches.measured_rows[more] = self._each_row_more_costs(row, one, bucket)
                    new[more] = caches.measured_rows[more]
                keys.append(more)
        return keys

    def _check_rows_couple(self, batch: Mapping[str, Any], tree: ModuleTree | None = None) -> None:
        """Find out, at the first batch of several rows, whether its steps are priced on whole batches
        (``_rows_couple``). The costliest row's own costs, which its steps need anyway, are measured here."""
        caches = self.caches
        if caches.rows_couple is not None or (batch_size(batch) or 1) < 2:
            return
        if self._clip_frames(batch, tree or self._tuner._module_tree()):
            caches.rows_couple = True  # (see _clip_frames)
            return
        row, key, bucket = self.row_keys(batch, tree)[0]
        if key not in caches.measured_rows:
            caches.measured_rows[key] = self._row_costs(row, key, bucket)
        caches.rows_couple = self._rows_couple(row, caches.measured_rows[key], bucket)

    def _rows_couple(self, row: dict[str, Any], one: UnitCosts, bucket: LabelBucket | None) -> bool:
        """Whether copies of ``row`` (``one``: its costs) cost more than in proportion to their number, once a cost
        that does not grow with them is set apart (checked once: it is the model's and its loss's, not the shape's).
        Every cost a transformer's step counts is linear in the rows, but a loss that scores every row against every
        other (CLIP's) is not: priced from one row, a 256-row step cost 0.62 of full fine-tuning at rho 0.5. Two
        copies profiled; where they cost other than twice one, three as well, and the second difference compared
        with 0 (a cost that does not grow with the rows, DeBERTa-v2's relative positions, leaves it 0)."""
        costs = [one.cost_arrays()]
        for n in (2, 3):
            copies = self._copies_costs(row, n, bucket)
            if [u.name for u in copies.units] != [u.name for u in one.units]:
                return True  # another backward order: not one row repeated; price whole batches
            costs.append(copies.cost_arrays())
            if n == 2 and all(np.allclose(b, 2 * a, rtol=1e-9) for a, b in zip(*costs, strict=True)):
                return False
        return not all(np.allclose(a + c, 2 * b, rtol=1e-9) for a, b, c in zip(*costs, strict=True))

    def _copies_costs(self, row: dict[str, Any], n: int, bucket: LabelBucket | None) -> UnitCosts:
        """The costs of a step on ``n`` copies of ``row``, priced as ``_row_costs`` prices one."""
        profile, full = self._measure(rows_of(bucket.widened if bucket is not None else row, [0] * n))
        if bucket is not None:
            full = self._measure(rows_of(bucket.narrowed, [0] * n))[1]
        return profile.unit_costs(self._tuner.candidate_units(), full_flops=full)

    def _each_row_more_costs(self, row: dict[str, Any], one: UnitCosts, bucket: LabelBucket | None) -> UnitCosts:
        """What a second copy of ``row`` adds to a step (``one``: the row's own costs): two rows profiled, less one."""
        two = self._copies_costs(row, 2, bucket)
        if [u.name for u in two.units] != [u.name for u in one.units]:
            raise RuntimeError("two rows put the units in another backward order than one row; cannot price rows")
        return two.minus(one)

    def _row_costs(self, row: dict[str, Any], key: tuple, bucket: LabelBucket | None) -> UnitCosts:
        """One row's costs at ``key``: from the polynomial the lengths profiled before follow exactly where there is
        one (``length_fit``: padding per batch brings a new length at almost every step), profiled otherwise."""
        found = length_family(key)
        fit = self.caches.length_fits.setdefault(found[0], LengthFit()) if found is not None else None
        labels = (bucket.top, bucket.bottom) if bucket is not None else (None, None)
        if fit is not None:
            predicted = fit.predict(found[1], *labels, self._tuner.candidate_units())
            if predicted is not None:
                return predicted
        profile, full = self._measure(bucket.widened if bucket is not None else row)
        self.caches.fixed_costs_per_step |= not profile.scales_with_rows
        if bucket is not None:  # full fine-tuning at the bucket's fewest labels: bounds every row in it
            full = self._measure(bucket.narrowed)[1]
        costs = profile.unit_costs(self._tuner.candidate_units(), full_flops=full)
        if fit is not None:
            was_broken = fit.broken
            fit.add(found[1], *labels, costs)
            if fit.broken and not was_broken and fit.predictions:
                logger.warning(
                    "GreenTrainer: the costs of this model stopped following one polynomial of the sequence length at "
                    "length %d, after %d lengths had been priced from it (they may have been priced too low); every "
                    "new length is profiled from now on.",
                    found[1],
                    fit.predictions,
                )
        return costs

    def row_keys(
        self, batch: Mapping[str, Any], tree: ModuleTree | None = None
    ) -> list[tuple[dict[str, Any], tuple, LabelBucket | None]]:
        """One-row batches whose step costs bound every row of ``batch`` together, each with its key and label bucket.

        Usually one: the costliest row, keyed by ``profile_key``. Where the LM head projects only labelled positions
        (``head_follows_labels``) the key adds the label-count bucket of the batch's mean (``label_bucket``: the step
        is then priced on the row widened to the bucket's top, and full fine-tuning at its bottom). Where attention
        runs only within the sequences the inputs delimit (``attention_follows_values``: flash attention on padded or
        packed rows) there are two, the row's spans' extremes (``attention_extremes``): a selection within rho at both
        is within rho whatever the sequences. ``tree``: the base model's modules, listed before.

        It runs before every training step: the label counts come to the host once (one wait for the device), and
        the modules are read from ``tree`` once for every row priced.
        """
        tree = tree or self._tuner._module_tree()
        head_follows_labels = self.head_follows_labels(batch)
        wanted = head_follows_labels or batch_size(batch) not in (None, 1)
        found = labelled_counts(batch, shifts=self._next_token_targets) if wanted else None
        counts = found.tolist() if found is not None else None
        clips = self._clip_frames(batch, tree)
        row = dict(batch) if self.caches.rows_couple or clips else costliest_row(batch, counts)
        spans = attention_extremes(row) if attention_follows_values(self._tuner.model, tree) else None
        if spans is not None and getattr(self._tuner.model.config, "is_encoder_decoder", False):
            raise NotImplementedError(encoder_decoder_error(self._tuner.model))
        mean = sum(counts) / len(counts) if head_follows_labels and counts is not None else None
        signature = module_modes(tree)  # profile_key's second part: the same for every row
        priced = []
        for span, variant in spans or [(None, row)]:
            inputs = input_key(self._tuner.model, variant)
            bucket = label_bucket(variant, mean, shifts=self._next_token_targets) if mean is not None else None
            extra = [] if span is None else [("attention spans", span)]
            extra += [("clip frames", clips)] if clips else []
            if bucket is not None:  # re-labelling changes no shape
                extra.append(("labelled positions", (bucket.bottom, bucket.top)))
            priced.append((variant, ((*inputs, *extra), signature), bucket))
        return priced

    def _clip_frames(self, batch: Mapping[str, Any], tree: ModuleTree) -> tuple[int, ...]:
        """Each clip's valid frames, where an encoder runs on those alone (``ModuleTree.valid_frame_encoders``): a
        step's cost follows them, and its rows differ in cost by them, so such steps are priced whole, by them (priced
        by shape, short clips in a long clip's shapes measured 0.538 of full fine-tuning at rho 0.5 on Qwen3-ASR;
        priced from one row, a longer clip in another row 0.621 at rho 0.6). Empty for other models."""
        if not tree.valid_frame_encoders:
            return ()
        masks = [batch[name] for name in CLIP_MASKS if batch.get(name) is not None]
        return tuple(int(n) for mask in masks for n in mask.sum(-1).flatten().tolist())

    def head_follows_labels(self, batch: Mapping[str, Any]) -> bool:
        """Whether the LM head of a training forward on ``batch`` projects only the labelled positions, so that its
        cost follows the labels: our sparse head (when on: not under FSDP2, nor for tuple outputs), TRL's fused
        head (``fused_lm_head=True``), which does so on CUDA/XPU (Triton devices; elsewhere every position), or the
        model's own (``own_head_follows_labels``: ModernBERT's masked-LM head with ``sparse_prediction``)."""
        if batch.get("fused_lm_head") or own_head_follows_labels(self._tuner.model):
            return True
        head = attached_sparse_lm_head(self._tuner.model)
        return head is not None and head.enabled and returns_dict(self._tuner.model, batch)

    @property
    def _next_token_targets(self) -> bool:
        """Whether position t is scored against ``labels[t + 1]`` (a causal LM's head, ours or TRL's), not against
        ``labels[t]`` (a masked LM's own sparse head)."""
        return not own_head_follows_labels(self._tuner.model)

    def learn_shapes(self, new: dict[tuple, UnitCosts]) -> dict[tuple, UnitCosts]:
        """Add the costs of new shapes. Every rank adds those of every rank, so all hold the same set of shapes."""
        if ranks.is_distributed():
            if not ranks.any_across_ranks(bool(new)):
                return {}
            merged: dict[tuple, UnitCosts] = {}
            for part in ranks.gather(new):
                for key, costs in part.items():
                    merged[key] = merged[key].bounding(costs) if key in merged else costs
            new = merged
        self.shape_costs.update(new)
        return new

    def feasible_envelope(self, signature: tuple, rho: float) -> tuple[UnitCosts, list[tuple], np.ndarray]:
        """The cost envelope of every shape seen in the current modes (``signature``), those shapes, and the units
        that fit the budget on their own there (the cheapest selection with each as the deepest). A rho that affords
        no unit is an error, raised before any importance is computed."""
        keys = sorted((k for k in self.shape_costs if k[1] == signature), key=repr)
        try:
            envelope = cost_envelope([self.shape_costs[k] for k in keys])
        except BackwardOrdersDiffer as error:
            raise ValueError(_orders_differ_message([self.shape_costs[k] for k in keys])) from error
        feasible = envelope.fits_alone(rho)  # the selector's own test
        if feasible.any():
            return envelope, keys, feasible
        advice = rounded_up_rho(float(envelope.alone_costs().min()), envelope.full_flops)
        fixed = (
            " Some of this model's costs do not grow with the rows (such as DoRA's weight norm, LoRA on stacked "
            "parameters, DeBERTa's relative-position projections): they are priced for a step of any number of rows, "
            "one row included, whose share of them is the largest."
            if self.caches.fixed_costs_per_step
            else ""
        )
        raise ValueError(
            f"rho={rho:g} is below the smallest feasible rho {advice:.4f} for this model at the batch shapes trained "
            f"on ({_describe(keys)}): the forward pass plus the cheapest single unit. Raise rho to at least "
            f"{advice:.4f}, or cap the sequence length (attention's share grows with it).{fixed}"
        )

    def learn_loss_reads(
        self, reads: tuple[frozenset[str], ...], forward_flops: tuple[float, ...], outside_flops: tuple[float, ...]
    ) -> None:
        """Keep the outputs every probed loss reads, the roots of rho's reference (fewer roots make a smaller
        reference, so the budget holds for each), and say where no price can bound a step."""
        common = frozenset.intersection(*reads)
        if not common or any(r != common for r in reads):
            logger.warning(
                "GreenTrainer: the loss that loss_fn computes reads %s. A step is priced before its loss exists, "
                "from the outputs every probed loss reads (%s), so a step whose loss reads other outputs, or only "
                "what hooks capture inside the model, may cost more than rho of its full fine-tuning: return from "
                "forward only what the loss reads, or compute the loss in forward.",
                "different outputs on different batches" if any(reads) else "none of the model's outputs",
                ", ".join(sorted(common)) or "none: every output then",
            )
        forward, outside = sum(forward_flops), sum(outside_flops)
        if outside > 0:
            logger.warning(
                "GreenTrainer: loss_fn computes %.3g FLOPs outside the model's forward (%.1f%% of it): no price of a "
                "step covers them, and where they grow faster than the rows (a contrastive loss scoring every row "
                "against every other) a step may cost more than rho of its full fine-tuning. Compute them inside the "
                "model's forward: GreenTrainer prices what the forward runs.",
                outside / len(reads),
                100 * outside / forward if forward else float("inf"),
            )
        self.drop()  # profiled from other roots
        self.caches.loss_reads = common

    def _measure(self, batch: Mapping[str, Any]) -> tuple[CostProfile, float]:
        """The tuner's profile of a training step on ``batch`` and its reference, backpropagating from what the loss
        reads (``step_loss``)."""
        return self._tuner._measure(batch, self.step_loss)

    def step_loss(self, model: nn.Module, batch: Mapping[str, Any]) -> Any:
        """A training step's forward on ``batch``, returning what it backpropagates from (``step_loss``)."""
        return loss_of_step(model, batch, self.caches.loss_reads)

    def step_figures(self, key: tuple, keys: list[tuple], rows: int, mask: np.ndarray) -> tuple[float, float, float]:
        """(FLOPs, backward FLOPs, full fine-tuning's FLOPs) of a step of ``rows`` rows priced at ``key``: its row's
        costs, and each further row's (the row's own again, unless ``keys`` price what each row more adds)."""
        one = self.shape_costs[key]
        more = self.shape_costs[_each_row_more_key(key)] if _each_row_more_key(key) in keys else one
        return (
            one.predicted_flops(mask) + (rows - 1) * more.predicted_flops(mask),
            one.predicted_backward(mask) + (rows - 1) * more.predicted_backward(mask),
            one.full_flops + (rows - 1) * more.full_flops,
        )


_EACH_ROW_MORE = (("each row more", True),)


def is_each_row_more(key: tuple) -> bool:
    """Whether ``key`` prices what each row beyond the first adds, rather than a row (``price_rows``)."""
    return key[0][-1:] == _EACH_ROW_MORE


def _each_row_more_key(key: tuple) -> tuple:
    """The shape key of what each row beyond the first adds at ``key`` (the same modes: ``key[1]``)."""
    return ((*key[0], *_EACH_ROW_MORE), key[1])


def _orders_differ_message(costs: list[UnitCosts]) -> str:
    """Why no selection can be priced for batches whose steps run different units, and what to do."""
    sets = [{u.name for u in c.units} for c in costs]
    some_only = sorted(set.union(*sets) - set.intersection(*sets))
    if not some_only:
        return (
            "GreenTrainer cannot price one selection for these batches: their forward passes run the same units in "
            "different orders (a path chosen by the data), so no price bounds them all. Make the forward take the same "
            "path for every batch, or use plain LoRA (peft.LoraConfig)."
        )
    return (
        f"GreenTrainer cannot price one selection for these batches: some run units that others skip ({some_only[0]} "
        f"and {len(some_only) - 1} more: a vision tower on text-only batches, say), so no order of the units holds for "
        "all. Keep those units out of the candidates (exclude_patterns naming them, e.g. the vision tower and its "
        "projector, or units='lora' with target_modules in the part every batch runs), or give every batch the same "
        "inputs (an image in each)."
    )


def _describe(keys: list[tuple]) -> str:
    """The shapes of profile keys, briefly: ``input_ids`` (or the first tensor) of one row each."""
    shapes, labelled = [], []
    for inputs, _ in keys:
        tensors = {item[0]: item[1] for item in inputs if len(item) == 3}
        shapes.append(tensors.get("input_ids", next(iter(tensors.values()), ())))
        labelled += [item[1][1] for item in inputs if item[0] == "labelled positions"]
    shapes = sorted(set(shapes))
    text = f"input shapes {', '.join(map(str, shapes[:4]))}{', ...' if len(shapes) > 4 else ''}"
    return text + (f", up to {max(labelled)} labelled positions per sequence" if labelled else "")
