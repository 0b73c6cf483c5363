"""Costs of a sequence length not profiled yet, from the polynomial the profiled lengths follow exactly.

Every op FlopCounterMode counts in a decoder costs a fixed amount per position (projections, MLPs, LoRA), per pair of
positions (attention scores), per labelled position (an LM head that projects only those), or per step whatever the
length (a LoRA delta merged into a weight). So each entry of one row's :class:`~.costs.UnitCosts` is
``k + a*L + b*L**2 + c*n`` in the row's length ``L`` and labelled positions ``n``.

Batches padded per batch (the default of transformers' collators and TRL) bring a new length at almost every step,
and each new length costs a profile: a few forward passes under a Python dispatch mode, 5 to 14 steps of a
launch-bound step's time. Once the profiles of one family of shapes (the same inputs, modes and units, other
lengths) pin the coefficients and a further profile agrees with them exactly, in rational arithmetic, a length
between the shortest and the longest profiled is priced by evaluating the polynomial instead. A profile that
disagrees (a model whose costs step with the length, such as a scan padded to a multiple of its chunk) turns
prediction off for that family for good; lengths outside the profiled range are always profiled, and checked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from .costs import UnitCosts

__all__ = ["LengthFit", "length_family"]

_ARRAYS = ("t_dw", "t_dy", "forward_share")
_SCALARS = ("dy_head", "forward_flops")


def length_family(key: tuple) -> tuple[tuple, int, tuple[int, int] | None] | None:
    """``(family, length, (bottom, top) labelled positions or None)`` of a one-row profile key, or None when its
    costs are not a polynomial of one length: several lengths (a decoder's labels shorter than the encoder's input),
    inputs other than ``(1, L)`` sequences and per-row scalars, or attention priced at its spans (flash attention)."""
    inputs, signature = key
    length, labels, family = None, None, []
    for item in inputs:
        name = item[0]
        if name == "labelled positions":
            labels = item[1]
            continue
        if name == "attention spans":
            return None
        if len(item) == 3:  # a tensor: (name, shape, dtype)
            shape = item[1]
            if len(shape) == 2 and shape[0] == 1 and shape[1] > 0:
                if length is not None and shape[1] != length:
                    return None
                length = shape[1]
                item = (name, "L", item[2])
            elif shape != (1,):
                return None
        family.append(item)
    if length is None:
        return None
    return (tuple(family), signature), length, labels


def _basis(length: int, labels: int | None) -> tuple[int, ...]:
    return (1, length, length * length) if labels is None else (1, length, length * length, labels)


def _combination(points: list[tuple[int, ...]], query: tuple[int, ...]) -> list[Fraction] | None:
    """``alpha`` with ``query == sum(alpha[i] * points[i])``, exactly, or None if ``query`` is outside their span."""
    if not points:
        return None
    # the augmented system points^T alpha = query, one row per basis coordinate
    rows = [[Fraction(p[c]) for p in points] + [Fraction(query[c])] for c in range(len(query))]
    unknowns, pivots, rank = len(points), [], 0
    for col in range(unknowns):
        pivot = next((r for r in range(rank, len(rows)) if rows[r][col] != 0), None)
        if pivot is None:
            continue
        rows[rank], rows[pivot] = rows[pivot], rows[rank]
        lead = rows[rank][col]
        rows[rank] = [v / lead for v in rows[rank]]
        for r in range(len(rows)):
            if r != rank and rows[r][col] != 0:
                factor = rows[r][col]
                rows[r] = [a - factor * b for a, b in zip(rows[r], rows[rank], strict=True)]
        pivots.append(col)
        rank += 1
    if any(row[-1] != 0 for row in rows[rank:]):
        return None  # inconsistent: not a combination of the points
    alpha = [Fraction(0)] * unknowns
    for r, col in enumerate(pivots):
        alpha[col] = rows[r][-1]
    return alpha


@dataclass
class _Span:
    """Profiled points whose bases are linearly independent, with their entries (Python ints): any point in their
    span has its entries fixed by them, exactly, if the costs are the polynomial."""

    points: list[tuple[int, ...]]
    values: list[np.ndarray]  # dtype object: Python ints

    def combination(self, basis: tuple[int, ...]) -> list[Fraction] | None:
        """How ``basis`` combines the points, or None outside their span (or a head of the other kind)."""
        if self.points and len(basis) != len(self.points[0]):
            return None
        return _combination(self.points, basis)

    def value(self, alpha: list[Fraction]) -> np.ndarray | None:
        """The entries of the point ``alpha`` combines (Python ints), or None where they would not be whole."""
        denominator = math.lcm(*(a.denominator for a in alpha))
        total = sum(
            (int(a * denominator) * v for a, v in zip(alpha, self.values, strict=True)), np.zeros_like(self.values[0])
        )
        if any(int(t) % denominator for t in total):
            return None
        return np.array([int(t) // denominator for t in total], dtype=object)

    def at(self, basis: tuple[int, ...]) -> np.ndarray | None:
        """The entries at ``basis``, or None outside the span or where they would not be whole."""
        alpha = self.combination(basis)
        return None if alpha is None else self.value(alpha)


def _whole(values: list[float]) -> np.ndarray | None:
    """FLOP counts as Python ints, or None if any is not a whole number (exactness could not be checked)."""
    if not all(float(v).is_integer() for v in values):
        return None
    return np.array([int(v) for v in values], dtype=object)


class LengthFit:
    """The costs of one family of shapes as exact polynomials of the length (and labelled positions).

    :meth:`add` takes each profiled row's costs: the step's entries measured at ``step_labels`` labelled positions,
    full fine-tuning at ``full_labels`` (a sparse LM head's bucket ends; both None with a dense head). A profile whose
    point the earlier ones span is a check, and it counts only at a length none of the spanning ones has: a check at
    a length already profiled (another label bucket) says nothing of how costs follow the length. :meth:`predict`
    answers once ``CHECKS`` lengths checked out and none failed, only at whole, non-negative entries, only between
    the shortest and the longest length profiled, and only at a residue modulo ``PERIOD`` a profiled length had.
    """

    CHECKS = 2  # lengths beyond the spanning ones a family's profiles must match at before it predicts
    PERIOD = 8  # costs can also follow the length's residue (pooling to ceil(L / 2), ceil(L / 4)): predicted only at
    # residues modulo this that a profile had

    def __init__(self) -> None:
        self.units: list[str] | None = None
        self.step = _Span([], [])
        self.full = _Span([], [])
        self.pinned: set[int] = set()  # lengths of the spanning profiles
        self.checked: set[int] = set()  # other lengths whose profiles matched exactly
        self.broken = False
        self.predictions = 0  # lengths priced from the polynomial so far

    @property
    def lengths(self) -> set[int]:
        return self.pinned | self.checked

    def add(self, length: int, step_labels: int | None, full_labels: int | None, costs: UnitCosts) -> None:
        if self.broken:
            return
        names = [u.name for u in costs.units]
        self.units = names if self.units is None else self.units
        step, full = _whole(_step_values(costs)), _whole([costs.full_flops])
        kind = self.step.points[0] if self.step.points else _basis(length, step_labels)
        if (
            names != self.units
            or (step_labels is None) != (full_labels is None)
            or len(kind) != len(_basis(length, step_labels))
            or step is None
            or full is None
        ):
            self.broken = True  # another backward order, the head changed kind, or counts not whole
            return
        checks = []
        for span, basis, values in (
            (self.step, _basis(length, step_labels), step),
            (self.full, _basis(length, full_labels), full),
        ):
            alpha = span.combination(basis)
            if alpha is None:
                span.points.append(basis)  # a new direction: pins more of the polynomial
                span.values.append(values)
                self.pinned.add(length)
            else:
                expected = span.value(alpha)
                checks.append(
                    expected is not None and all(int(a) == int(b) for a, b in zip(expected, values, strict=True))
                )
        if not all(checks):
            self.broken = True
        elif checks and length not in self.pinned:
            self.checked.add(length)

    def predict(
        self, length: int, step_labels: int | None, full_labels: int | None, candidates: list
    ) -> UnitCosts | None:
        """The costs at ``length`` for ``candidates`` (the units, in any order), or None where not known exactly."""
        if self.broken or len(self.checked) < self.CHECKS or not min(self.lengths) <= length <= max(self.lengths):
            return None
        if length % self.PERIOD not in {other % self.PERIOD for other in self.lengths}:
            return None
        by_name = {u.name: u for u in candidates}
        if self.units is None or any(name not in by_name for name in self.units):
            return None
        step, full = self.step.at(_basis(length, step_labels)), self.full.at(_basis(length, full_labels))
        if step is None or full is None or any(v < 0 for v in step) or full[0] <= 0:
            return None
        self.predictions += 1
        count = len(self.units)
        values = [float(v) for v in step]
        arrays = [np.array(values[i * count : (i + 1) * count], dtype=np.float64) for i in range(len(_ARRAYS))]
        return UnitCosts(
            units=[by_name[name] for name in self.units],
            t_dw=arrays[0],
            t_dy=arrays[1],
            forward_share=arrays[2],
            dy_head=values[-2],
            forward_flops=values[-1],
            full_flops=float(full[0]),
        )


def _step_values(costs: UnitCosts) -> list[float]:
    """The entries a step's cost is made of, in a fixed order."""
    values = [float(v) for name in _ARRAYS for v in getattr(costs, name)]
    return values + [float(getattr(costs, name)) for name in _SCALARS]
