"""Per-unit costs of a training step, in backward order: what the selector decides on.

A profile (``profile.py``) measures one batch shape; :class:`UnitCosts` holds its costs per selectable unit and
answers what a selection would cost, which units fit a budget alone, and the exact DP over them. Several shapes are
bounded together by :func:`cost_envelope`, so a selection within budget under it is within budget at each;
:func:`select_at_every_shape` then spends what the envelope leaves unspent at each of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .selector import (
    Selection,
    infeasible_message,
    min_unit_costs,
    select_units,
    selection_backward_flops,
    smallest_ratio,
)
from .units import Unit

__all__ = ["BackwardOrdersDiffer", "UnitCosts", "cost_envelope", "select_at_every_shape"]

SLACK_SEARCH_STEPS = 12  # bisections of the raised budget: within 1/4096 of the widest bracket


class BackwardOrdersDiffer(ValueError):
    """Costs of several batch shapes list the units in different orders: no envelope bounds them together."""


@dataclass
class UnitCosts:
    """Per-unit costs in backward order, ready for the selector (all FLOPs per training step).

    ``dy_head`` is the activation-gradient cost above the first unit (paid as soon as anything is selected);
    ``t_dy[j]`` the cost of crossing unit ``j`` and the parameter-free ops below it, down to unit ``j + 1``.
    """

    units: list[Unit]
    t_dw: np.ndarray
    t_dy: np.ndarray
    forward_share: np.ndarray
    dy_head: float
    forward_flops: float
    full_flops: float

    def predicted_backward(self, mask: Sequence[bool] | np.ndarray) -> float:
        return selection_backward_flops(np.asarray(mask, dtype=bool), self.t_dw, self.t_dy, self.dy_head)

    def predicted_flops(self, mask: Sequence[bool] | np.ndarray) -> float:
        return self.forward_flops + self.predicted_backward(mask)

    def alone_costs(self) -> np.ndarray:
        """FLOPs of a step that trains each unit alone (the cheapest selection with it as the deepest)."""
        return min_unit_costs(self.t_dw, self.t_dy, self.forward_flops, self.dy_head)

    def min_feasible_rho(self) -> float:
        """Smallest rho that lets at least one unit train; below it only the forward pass would fit."""
        return smallest_ratio(float(self.alone_costs().min()), self.full_flops)

    def fits_alone(self, rho: float) -> np.ndarray:
        """Units that fit ``rho * full_flops`` on their own; every unit at ``rho >= 1`` (no budget)."""
        if rho >= 1:
            return np.ones(len(self.units), dtype=bool)
        return self.alone_costs() <= rho * self.full_flops

    def select(self, importance: Sequence[float] | np.ndarray, rho: float, *, resolution: int = 10_000) -> Selection:
        """The exact DP over these costs: the most total importance within ``rho * full_flops``.

        ``rho >= 1`` lifts the budget (any unit may train), as the tuner does. The selector's reference must cover
        training every unit, which units that add work (LoRA adapters) can together exceed: it is then their total,
        with the budget unchanged; the returned ``Selection`` speaks of ``rho`` and ``full_flops`` as given.
        """
        if not self.fits_alone(rho).any():
            cheapest = float(self.alone_costs().min())
            raise ValueError(infeasible_message(rho, cheapest, self.full_flops))
        span = max(self.full_flops, self.predicted_flops(np.ones(len(self.units), dtype=bool)))
        budget = span if rho >= 1 else rho * self.full_flops
        scaled = budget / span
        while scaled * span < budget:  # rounding must not shrink the budget the feasibility test above used
            scaled = math.nextafter(scaled, math.inf)
        selection = select_units(
            importance,
            self.t_dw,
            self.t_dy,
            self.forward_flops,
            scaled,
            full_flops=span,
            dy_head=self.dy_head,
            resolution=resolution,
        )
        return replace(selection, rho=rho, full_flops=self.full_flops, budget=min(rho, 1.0) * self.full_flops)

    def cost_arrays(self) -> list[np.ndarray]:
        """Every cost a step of these units pays, as arrays, for comparing the costs of two steps."""
        names = ("t_dw", "t_dy", "dy_head", "forward_flops", "full_flops")
        return [np.asarray(getattr(self, name), dtype=np.float64) for name in names]

    def scaled(self, factor: float) -> UnitCosts:
        """Every cost times ``factor`` (a step of ``factor`` times the rows, costs being linear in them)."""
        return replace(
            self,
            t_dw=self.t_dw * factor,
            t_dy=self.t_dy * factor,
            forward_share=self.forward_share * factor,
            dy_head=self.dy_head * factor,
            forward_flops=self.forward_flops * factor,
            full_flops=self.full_flops * factor,
        )

    def minus(self, other: UnitCosts) -> UnitCosts:
        """What these costs add to ``other``'s (a step of more rows less one of fewer), none below zero: a cost that
        does not grow is not refunded, which can only raise a price."""
        return replace(
            self,
            t_dw=np.maximum(self.t_dw - other.t_dw, 0.0),
            t_dy=np.maximum(self.t_dy - other.t_dy, 0.0),
            forward_share=np.maximum(self.forward_share - other.forward_share, 0.0),
            dy_head=max(self.dy_head - other.dy_head, 0.0),
            forward_flops=max(self.forward_flops - other.forward_flops, 0.0),
            full_flops=self.full_flops - other.full_flops,
        )

    def bounding(self, other: UnitCosts) -> UnitCosts:
        """Costs no lower than either's and a reference no higher, so a selection within rho under the result is
        within rho under both (two ranks measured the same shape: they agree, this only makes sure)."""
        return replace(
            self,
            t_dw=np.maximum(self.t_dw, other.t_dw),
            t_dy=np.maximum(self.t_dy, other.t_dy),
            forward_share=np.maximum(self.forward_share, other.forward_share),
            dy_head=max(self.dy_head, other.dy_head),
            forward_flops=max(self.forward_flops, other.forward_flops),
            full_flops=min(self.full_flops, other.full_flops),
        )

    def index(self, name: str) -> int:
        for i, unit in enumerate(self.units):
            if unit.name == name:
                return i
        raise KeyError(name)


def cost_envelope(costs: Sequence[UnitCosts]) -> UnitCosts:
    """Per-unit maxima over several batch shapes of the costs as fractions of full fine-tuning at that shape.

    The result is in units of "full fine-tuning FLOPs" (``full_flops`` is 1): the cost of any selection under the
    envelope bounds its cost at every one of the shapes, each as a fraction of full fine-tuning at that shape, so a
    selection within ``rho`` under the envelope is within ``rho`` at each shape. Attention grows quadratically with
    the sequence length, so the share of each unit moves with the length and no single shape bounds the others.
    Every entry must list the same units in the same backward order (the same model in the same mode). One shape is
    its own envelope, kept in FLOPs: whole numbers, on which the selector's DP is exact rather than on a grid.
    """
    if not costs:
        raise ValueError("cost_envelope needs the costs of at least one batch shape")
    if len(costs) == 1:
        return costs[0]
    names = [u.name for u in costs[0].units]
    for other in costs[1:]:
        if [u.name for u in other.units] != names:
            raise BackwardOrdersDiffer(
                "the batch shapes put the units in different backward orders (the forward pass takes a data-dependent "
                "path); their costs cannot be bounded together"
            )

    def largest(values: Callable[[UnitCosts], Any]) -> Any:
        return np.max([np.asarray(values(c), dtype=np.float64) / c.full_flops for c in costs], axis=0)

    return UnitCosts(
        units=list(costs[0].units),
        t_dw=largest(lambda c: c.t_dw),
        t_dy=largest(lambda c: c.t_dy),
        forward_share=largest(lambda c: c.forward_share),
        dy_head=float(largest(lambda c: c.dy_head)),
        forward_flops=float(largest(lambda c: c.forward_flops)),
        full_flops=1.0,
    )


def select_at_every_shape(
    shapes: Sequence[UnitCosts], importance: Sequence[float] | np.ndarray, rho: float, *, resolution: int = 10_000
) -> np.ndarray:
    """The units to train at several batch shapes: the most importance the envelope's DP finds while every shape's
    own cost stays within ``rho`` of its full fine-tuning.

    The envelope (:func:`cost_envelope`) bounds each unit by its costliest shape, and units peak at different shapes
    (attention's share grows with the length), so its selection at ``rho`` costs less than ``rho`` at every shape:
    with flash attention priced at its two span extremes it left about 7% of ``rho`` unspent. The budget given to the
    envelope's DP is therefore raised by bisection, each candidate checked exactly at every shape; the best checked
    one is kept, so the promise is the same as the envelope's. One shape is its own envelope and is exact already.
    """
    envelope = cost_envelope(shapes)
    best = envelope.select(importance, rho, resolution=resolution)
    if len(shapes) == 1 or rho >= 1:
        return best.mask

    def within_rho(mask: np.ndarray) -> bool:  # strictly: a raised budget may reach the edge, never past it
        return all(shape.predicted_flops(mask) <= rho * shape.full_flops for shape in shapes)

    low, high = rho, 1.0  # at 1 the envelope's DP selects every unit, which costs full fine-tuning
    for _ in range(SLACK_SEARCH_STEPS):
        raised = (low + high) / 2
        candidate = envelope.select(importance, raised, resolution=resolution)
        if not within_rho(candidate.mask):
            high = raised
            continue
        low = raised
        if candidate.importance > best.importance:
            best = candidate
    return best.mask
