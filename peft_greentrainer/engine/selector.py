"""Choose which units to train so that total importance is maximal under a FLOPs budget (GreenTrainer, eq. 4).

Units are indexed in *backward order*: index 0 is closest to the loss, the last one is the deepest (e.g. the input
embedding). Training a selection ``S`` with deepest unit ``k = max(S)`` costs, per step::

    forward_flops + dy_head + sum(t_dy[j] for j < k) + sum(t_dw[i] for i in S)

because the activation gradient has to travel through every unit above the deepest trained one, while each trained
unit additionally pays for its weight gradient. An empty selection costs only the forward pass.

The optimum is found exactly (up to a rho-independent quantisation of the weight-gradient costs) by a dynamic
programme over the deepest selected unit, carrying a 0/1 knapsack table of the units above it: O(N * T) time and an
``N x (T + 1)`` boolean table for backtracking, where ``T <= resolution + N``. The quantum is sized on the
weight-gradient costs that can be packed (their common divisor when FLOP counts allow, making the optimum exact;
otherwise a power-of-two refinement of ``full backward / resolution``), so units whose weight gradients are tiny
next to their activation gradients (LoRA adapters) are not overcharged.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Selection",
    "min_feasible_rho",
    "min_unit_costs",
    "select_units",
    "selection_backward_flops",
    "selection_flops",
]

# Relative slack allowed between the reconstructed selection's true cost and the budget: only float round-off.
_BUDGET_RTOL = 1e-12


@dataclass(frozen=True, eq=False)
class Selection:
    """The outcome of :func:`select_units`.

    Compared by identity (``eq=False``) because element-wise array equality has no single truth value; the mask is
    stored read-only so the frozen dataclass really is immutable.

    Attributes:
        mask: Boolean array of shape ``(N,)`` in backward order; ``True`` means the unit is trained.
        flops: Predicted forward + backward FLOPs of one step with this selection (true costs, not quantised).
        backward_flops: The backward part of ``flops``.
        importance: Total importance of the selected units.
        budget: The FLOPs budget the selection had to respect, ``min(rho, 1) * full_flops``.
        full_flops: FLOPs of full fine-tuning, the reference for ``rho``.
        rho: The requested budget ratio, as given.
    """

    mask: np.ndarray
    flops: float
    backward_flops: float
    importance: float
    budget: float
    full_flops: float
    rho: float

    def __post_init__(self) -> None:
        mask = np.array(self.mask, dtype=bool, copy=True)
        mask.flags.writeable = False
        object.__setattr__(self, "mask", mask)

    @property
    def ratio(self) -> float:
        """Fraction of full fine-tuning FLOPs this selection costs (what rho promised to bound)."""
        return self.flops / self.full_flops

    @property
    def deepest(self) -> int | None:
        """Index of the deepest selected unit (it fixes how far the activation gradient travels), None if empty."""
        selected = np.flatnonzero(self.mask)
        return int(selected[-1]) if selected.size else None


def _as_costs(name: str, values: object) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    bad = np.flatnonzero(~np.isfinite(array) | (array < 0))
    if bad.size:
        raise ValueError(f"{name} must be finite and >= 0; offending unit indices: {_format_indices(bad)}")
    return array


def _as_scalar_cost(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return value


def _format_indices(indices: np.ndarray, limit: int = 10) -> str:
    shown = ", ".join(str(int(i)) for i in indices[:limit])
    return f"[{shown}{', ...' if indices.size > limit else ''}] ({indices.size} in total)"


def _check_costs(t_dw: object, t_dy: object) -> tuple[np.ndarray, np.ndarray]:
    t_dw = _as_costs("t_dw", t_dw)
    t_dy = _as_costs("t_dy", t_dy)
    if t_dw.shape != t_dy.shape:
        raise ValueError(f"t_dw and t_dy must have the same length, got {t_dw.size} and {t_dy.size}")
    if t_dw.size == 0:
        raise ValueError("at least one unit is required")
    return t_dw, t_dy


def _check_mask(mask: object, n: int) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.dtype != np.bool_:
        # An integer array is far more likely a list of indices than a 0/1 mask; refuse to guess.
        raise TypeError(f"mask must be a boolean array, got dtype {mask.dtype}")
    if mask.shape != (n,):
        raise ValueError(f"mask must have shape ({n},), got {mask.shape}")
    return mask


def _dy_prefix(t_dy: np.ndarray) -> np.ndarray:
    """``prefix[k] = sum(t_dy[:k])``: activation-gradient cost of reaching unit k from the loss."""
    prefix = np.zeros_like(t_dy)
    np.cumsum(t_dy[:-1], out=prefix[1:])
    return prefix


def _full_flops(t_dw: np.ndarray, t_dy: np.ndarray, forward: float, dy_head: float, full_flops: object) -> float:
    """Resolve the rho reference; an explicit value below training everything would make rho=1 infeasible."""
    all_units = forward + dy_head + float(t_dy[:-1].sum()) + float(t_dw.sum())
    if full_flops is None:
        full = all_units
    else:
        full = _as_scalar_cost("full_flops", full_flops)
        if full < all_units * (1 - _BUDGET_RTOL):
            raise ValueError(
                f"full_flops={full:g} is below the cost of training every unit ({all_units:g}); "
                "it must cover at least forward pass plus the full backward pass"
            )
    if full <= 0:
        raise ValueError("full_flops must be positive (all costs are zero)")
    return full


def selection_backward_flops(mask: object, t_dw: object, t_dy: object, dy_head: float = 0.0) -> float:
    """Backward FLOPs of training the units in ``mask`` (0 if nothing is trained: no backward pass at all)."""
    t_dw, t_dy = _check_costs(t_dw, t_dy)
    mask = _check_mask(mask, t_dw.size)
    dy_head = _as_scalar_cost("dy_head", dy_head)
    selected = np.flatnonzero(mask)
    if selected.size == 0:
        return 0.0
    deepest = int(selected[-1])
    return dy_head + float(t_dy[:deepest].sum()) + float(t_dw[selected].sum())


def selection_flops(mask: object, t_dw: object, t_dy: object, forward_flops: float, dy_head: float = 0.0) -> float:
    """Forward + backward FLOPs of one training step with the units in ``mask``."""
    forward = _as_scalar_cost("forward_flops", forward_flops)
    return forward + selection_backward_flops(mask, t_dw, t_dy, dy_head)


def min_unit_costs(t_dw: object, t_dy: object, forward_flops: float, dy_head: float = 0.0) -> np.ndarray:
    """Cost of training unit k alone, for every k: the cheapest selection whose deepest unit is k."""
    t_dw, t_dy = _check_costs(t_dw, t_dy)
    forward = _as_scalar_cost("forward_flops", forward_flops)
    dy_head = _as_scalar_cost("dy_head", dy_head)
    return forward + dy_head + _dy_prefix(t_dy) + t_dw


def min_feasible_rho(
    t_dw: object, t_dy: object, forward_flops: float, *, full_flops: float | None = None, dy_head: float = 0.0
) -> float:
    """Smallest rho that lets at least one unit train; below it only the forward pass would fit."""
    t_dw, t_dy = _check_costs(t_dw, t_dy)
    forward = _as_scalar_cost("forward_flops", forward_flops)
    dy_head = _as_scalar_cost("dy_head", dy_head)
    full = _full_flops(t_dw, t_dy, forward, dy_head, full_flops)
    return smallest_ratio(float(min_unit_costs(t_dw, t_dy, forward, dy_head).min()), full)


def smallest_ratio(cost: float, full: float) -> float:
    """``cost / full``, nudged up by ulps if needed so that passing it back as rho really affords ``cost``."""
    ratio = cost / full
    while ratio * full < cost:
        ratio = math.nextafter(ratio, math.inf)
    return ratio


def _check_importance(importance: object, n: int) -> np.ndarray:
    importance = np.asarray(importance, dtype=np.float64)
    if importance.ndim != 1:
        raise ValueError(f"importance must be one-dimensional, got shape {importance.shape}")
    if importance.size != n:
        raise ValueError(f"importance, t_dw and t_dy must have the same length, got {importance.size} and {n}")
    bad = np.flatnonzero(~np.isfinite(importance))
    if bad.size:
        raise ValueError(f"importance must be finite; NaN/inf at unit indices {_format_indices(bad)}")
    return importance


def _check_rho(rho: object) -> float:
    if isinstance(rho, bool) or not isinstance(rho, numbers.Real):
        raise TypeError(f"rho must be a real number, got {type(rho).__name__}")
    rho = float(rho)
    if not math.isfinite(rho) or rho <= 0:
        raise ValueError(f"rho must be a finite number > 0, got {rho}")
    return rho


def _raise_if_infeasible(rho: float, min_cost: float, full: float) -> None:
    if rho * full < min_cost:
        raise ValueError(infeasible_message(rho, min_cost, full))


def rounded_up_rho(min_cost: float, full: float = 1.0) -> float:
    """The rho to advise for a unit costing ``min_cost`` of ``full``: to 4 decimals, rounded *up*, so that
    following the advice really is feasible."""
    advice = math.ceil(min_cost / full * 10_000) / 10_000
    while advice * full < min_cost:
        advice += 1e-4
    return advice


def infeasible_message(rho: float, min_cost: float, full: float) -> str:
    advice = rounded_up_rho(min_cost, full)
    return (
        f"rho={rho:g} is below the smallest feasible rho {advice:.4f} for this model "
        f"(forward pass plus the cheapest single unit); raise rho to at least {advice:.4f}"
    )


def select_units(
    importance: object,
    t_dw: object,
    t_dy: object,
    forward_flops: float,
    rho: float,
    *,
    full_flops: float | None = None,
    dy_head: float = 0.0,
    resolution: int = 10_000,
) -> Selection:
    """Pick the units to train: maximal total importance with cost at most ``rho * full_flops``.

    Args:
        importance: Per-unit importance (e.g. predicted loss reduction); units with importance <= 0 are never
            selected, since training them costs FLOPs without a predicted benefit.
        t_dw: Per-unit weight-gradient FLOPs.
        t_dy: Per-unit activation-gradient FLOPs (paid for every unit above the deepest selected one).
        forward_flops: FLOPs of the forward pass, paid whatever is selected.
        rho: Budget as a fraction of ``full_flops``; values >= 1 select every unit.
        full_flops: FLOPs of full fine-tuning; defaults to the cost of selecting every unit.
        dy_head: Activation-gradient FLOPs above unit 0 (loss and head), paid by any non-empty selection.
        resolution: Resolution of the knapsack over weight-gradient costs. When the weight-gradient costs of the
            units with importance > 0 are whole numbers whose greatest common divisor splits their total into at
            most ``resolution + N`` quanta (true of FLOP counts from real profiles), that divisor is the quantum
            and the optimum is exact. Otherwise the quantum is the full backward cost divided by ``resolution``,
            halved as long as those costs still fit in ``resolution`` quanta, so tiny costs such as LoRA adapters'
            are not each charged a quantum of the whole backward pass. The quantum does not depend on rho, so the
            optimum is monotone in rho; weight costs are rounded up and capacities down, so the true cost never
            exceeds the budget. Time is O(N * T) and memory ``N * (T + 1)`` bytes with ``T <= resolution + N``.

    Raises:
        ValueError: On malformed inputs, or if the budget cannot pay for even the cheapest single unit.
    """
    t_dw, t_dy = _check_costs(t_dw, t_dy)
    n = t_dw.size
    importance = _check_importance(importance, n)
    forward = _as_scalar_cost("forward_flops", forward_flops)
    dy_head = _as_scalar_cost("dy_head", dy_head)
    rho = _check_rho(rho)
    if isinstance(resolution, bool) or not isinstance(resolution, numbers.Integral) or resolution < 1:
        raise ValueError(f"resolution must be an integer >= 1, got {resolution!r}")
    resolution = int(resolution)
    full = _full_flops(t_dw, t_dy, forward, dy_head, full_flops)

    def result(mask: np.ndarray, budget: float) -> Selection:
        backward = selection_backward_flops(mask, t_dw, t_dy, dy_head)
        return Selection(
            mask=mask,
            flops=forward + backward,
            backward_flops=backward,
            importance=float(importance[mask].sum()),
            budget=budget,
            full_flops=full,
            rho=rho,
        )

    if rho >= 1:
        return result(np.ones(n, dtype=bool), full)

    budget = rho * full
    unit_costs = min_unit_costs(t_dw, t_dy, forward, dy_head)
    _raise_if_infeasible(rho, float(unit_costs.min()), full)
    if not np.any(importance > 0):
        return result(np.zeros(n, dtype=bool), budget)

    mask = _solve(importance, t_dw, budget - unit_costs, full - forward - dy_head, resolution)
    selection = result(mask, budget)
    if selection.flops > budget * (1 + _BUDGET_RTOL):
        raise RuntimeError(f"internal error: selection costs {selection.flops!r} FLOPs, over the budget {budget!r}")
    return selection


def _quantum(costs: np.ndarray, backward_span: float, resolution: int) -> float:
    """The knapsack's cost quantum for packing the weight-gradient ``costs`` of the units worth training.

    Only these costs are ever packed, and on LoRA-like profiles they are a tiny fraction of the backward pass (a 7B
    model's adapters: ~0.1%), so a quantum sized on the whole backward pass would charge each adapter many times its
    cost. In order of preference:

    1. Exact: FLOP counts are whole numbers, and real profiles share a large common divisor (powers of two in the
       token count and hidden sizes). When their greatest common divisor splits the total into at most
       ``resolution + len(costs)`` quanta, every cost is a whole number of quanta: no rounding at all, and the
       programme's optimum is the true optimum.
    2. Grid: ``backward_span / resolution``, halved while the total still fits in ``resolution`` quanta. Halving is
       exact in binary floating point and makes each grid a refinement of the coarser one (a set that fits on the
       coarse grid fits on the fine one), so the optimum is never worse than with the unrefined quantum.

    Neither depends on rho or the budget, so the optimum stays monotone in rho.
    """
    if backward_span <= 0:
        return 1.0
    total = float(costs.sum())
    divisor = _common_divisor(costs)
    if divisor is not None and total / divisor <= resolution + costs.size:
        return divisor
    quantum = backward_span / resolution
    if total <= 0 or total >= backward_span:
        return quantum
    _, exponent = math.frexp(backward_span / total)  # ratio = m * 2**exponent with 0.5 <= m < 1
    refined = math.ldexp(quantum, -(exponent - 1))  # divided by the largest power of two <= ratio
    return refined if refined > 0 else quantum


def _common_divisor(costs: np.ndarray) -> float | None:
    """Greatest common divisor of the positive costs if all are whole numbers exact in float64, else None."""
    positive = costs[costs > 0]
    if positive.size == 0 or positive.max() > 2.0**53 or not np.all(positive == np.floor(positive)):
        return None
    return float(np.gcd.reduce(positive.astype(np.int64)))


def _solve(
    importance: np.ndarray, t_dw: np.ndarray, capacity: np.ndarray, backward_span: float, resolution: int
) -> np.ndarray:
    """Dynamic programme over the deepest selected unit k.

    ``capacity[k]`` is what the budget leaves for the weight gradients of units above k once k is the deepest
    (negative: k cannot be the deepest). ``dp[c]`` is the best importance from units ``0..k-1`` whose quantised
    weight-gradient cost is at most ``c``; ``take[k, c]`` records whether unit k improved ``dp[c]``, for backtracking.
    """
    n = t_dw.size
    useful = importance > 0
    quantum = _quantum(t_dw[useful], backward_span, resolution)
    # Quantised weights: rounded up, so a quantised fit is a true fit. Clamped before the int cast (no overflow).
    weights = np.ceil(np.minimum(t_dw / quantum, np.iinfo(np.int64).max / (4 * n)))
    total = float(weights[useful].sum())  # the heaviest any table set can be: a larger capacity is never needed
    feasible = capacity >= 0
    cap_idx = np.zeros(n, dtype=np.int64)
    with np.errstate(over="ignore"):  # a capacity that overflows to inf is clamped to total like any large one
        cap_idx[feasible] = np.minimum(np.floor(capacity[feasible] / quantum), total)  # rounded down: within budget
    top = int(cap_idx[feasible].max())  # <= total <= resolution + number of useful units
    # Costs beyond the table can never fit.
    weight = np.minimum(weights, top + 1).astype(np.int64)

    dp = np.zeros(top + 1)
    take = np.zeros((n, top + 1), dtype=bool)
    candidates: list[tuple[float, int, int]] = []  # (importance, deepest k, capacity index to backtrack from)
    for k in range(n):
        if not useful[k]:
            continue
        if feasible[k]:
            rest = dp[cap_idx[k]]
            # dp is non-decreasing; the first capacity reaching the same value gives the lightest equal-value set.
            lightest = int(np.searchsorted(dp, rest, side="left"))
            candidates.append((float(importance[k] + rest), k, lightest))
        w = int(weight[k])
        if w <= top:
            gain = dp[: top + 1 - w] + importance[k]
            tail = dp[w:]
            take[k, w:] = gain > tail
            np.maximum(tail, gain, out=tail)

    def backtrack(k: int, c: int) -> np.ndarray:
        mask = np.zeros(n, dtype=bool)
        mask[k] = True
        for j in range(k - 1, -1, -1):
            if take[j, c]:
                mask[j] = True
                c -= int(weight[j])
        return mask

    if not candidates:  # every unit worth training is too expensive to be the deepest
        return np.zeros(n, dtype=bool)
    best_value = max(value for value, _, _ in candidates)
    tied = [(k, c) for value, k, c in candidates if value == best_value]
    masks = [backtrack(k, c) for k, c in tied]
    if len(masks) == 1:
        return masks[0]
    # Equal importance: prefer the cheapest. A selection's cost minus the budget is its other units' weight
    # gradients minus the capacity they were given when k is the deepest (t_dw[k] is already inside capacity[k]).
    excess = [float(t_dw[m].sum() - t_dw[k]) - float(capacity[k]) for m, (k, _) in zip(masks, tied, strict=True)]
    return masks[int(np.argmin(excess))]
