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


def _solve(rows: list[tuple[int, ...]]) -> list[list[Fraction]]:
    """The inverse of the square design matrix ``rows``, exactly."""
    size = len(rows)
    matrix = [[Fraction(v) for v in row] + [Fraction(int(i == j)) for j in range(size)] for i, row in enumerate(rows)]
    for col in range(size):
        pivot = next(r for r in range(col, size) if matrix[r][col] != 0)
        matrix[col], matrix[pivot] = matrix[pivot], matrix[col]
        lead = matrix[col][col]
        matrix[col] = [v / lead for v in matrix[col]]
        for r in range(size):
            if r != col and matrix[r][col] != 0:
                factor = matrix[r][col]
                matrix[r] = [a - factor * b for a, b in zip(matrix[r], matrix[col], strict=True)]
    return [row[size:] for row in matrix]


def _independent(rows: list[tuple[int, ...]]) -> bool:
    """Whether ``rows`` are linearly independent, exactly."""
    matrix = [[Fraction(v) for v in row] for row in rows]
    rank = 0
    for col in range(len(matrix[0])):
        pivot = next((r for r in range(rank, len(matrix)) if matrix[r][col] != 0), None)
        if pivot is None:
            continue
        matrix[rank], matrix[pivot] = matrix[pivot], matrix[rank]
        for r in range(rank + 1, len(matrix)):
            factor = matrix[r][col] / matrix[rank][col]
            matrix[r] = [a - factor * b for a, b in zip(matrix[r], matrix[rank], strict=True)]
        rank += 1
    return rank == len(matrix)


@dataclass
class _Sample:
    """One profiled row: the step's entries and full fine-tuning, each with the basis of the point it was measured
    at."""

    length: int
    step_basis: tuple[int, ...]
    step: list[Fraction]
    full_basis: tuple[int, ...]
    full: Fraction


@dataclass
class _Polynomial:
    """Exact coefficients of a vector of costs over the basis of :func:`_basis`, kept as integer numerators over one
    common denominator, so that evaluating them is integer arithmetic (numpy object arrays of Python ints)."""

    numerators: np.ndarray  # (basis size, entries), dtype object: Python ints
    denominator: int

    def at(self, basis: tuple[int, ...]) -> np.ndarray:
        """The entries at ``basis``, times the denominator (Python ints)."""
        return np.array(basis, dtype=object) @ self.numerators

    def equals(self, basis: tuple[int, ...], values: list[Fraction]) -> bool:
        scaled = self.at(basis)
        return all(Fraction(int(v), self.denominator) == value for v, value in zip(scaled, values, strict=True))

    def floats(self, basis: tuple[int, ...]) -> list[float]:
        return [int(v) / self.denominator for v in self.at(basis)]  # int / int rounds correctly


def _fit(points: list[tuple[int, ...]], values: list[list[Fraction]]) -> tuple[list[int], _Polynomial] | None:
    """Exact coefficients from the first points that pin them all (their indices too), or None if they do not yet."""
    chosen: list[int] = []
    for i, point in enumerate(points):
        if _independent([points[j] for j in chosen] + [point]):
            chosen.append(i)
        if len(chosen) == len(point):
            inverse = np.array(_solve([points[j] for j in chosen]), dtype=object)
            coefficients = inverse @ np.array([values[j] for j in chosen], dtype=object)
            denominator = math.lcm(*(c.denominator for c in coefficients.flat))
            numerators = np.array([[int(c * denominator) for c in row] for row in coefficients], dtype=object)
            return chosen, _Polynomial(numerators, denominator)
    return None


class LengthFit:
    """The costs of one family of shapes as exact polynomials of the length (and labelled positions).

    :meth:`add` takes each profiled row's costs: the step's entries measured at ``step_labels`` labelled positions,
    full fine-tuning at ``full_labels`` (a sparse LM head's bucket ends; both None with a dense head). :meth:`predict`
    answers once every profile beyond those that pinned the coefficients agreed with them exactly (one at least),
    and only between the shortest and the longest length profiled.
    """

    def __init__(self) -> None:
        self.units: list[str] | None = None
        self.samples: list[_Sample] = []  # kept until the coefficients are pinned
        self.step: _Polynomial | None = None
        self.full: _Polynomial | None = None
        self.lengths: list[int] = []
        self.agreed_step = 0  # profiles that matched the pinned coefficients exactly, of the step and of full FT
        self.agreed_full = 0
        self.broken = False

    def add(self, length: int, step_labels: int | None, full_labels: int | None, costs: UnitCosts) -> None:
        if self.broken:
            return
        names = [u.name for u in costs.units]
        self.units = names if self.units is None else self.units
        if names != self.units or (step_labels is None) != (full_labels is None):
            self.broken = True  # another backward order, or the head changed kind: not one family after all
            return
        sample = _Sample(
            length,
            _basis(length, step_labels),
            _step_values(costs),
            _basis(length, full_labels),
            Fraction(costs.full_flops),
        )
        self.lengths.append(length)
        if self.step is None:
            self.samples.append(sample)
            step = _fit([s.step_basis for s in self.samples], [s.step for s in self.samples])
            full = _fit([s.full_basis for s in self.samples], [[s.full] for s in self.samples])
            if step is None or full is None:
                return
            (step_pinning, self.step), (full_pinning, self.full) = step, full
            checks = [(s, i not in step_pinning, i not in full_pinning) for i, s in enumerate(self.samples)]
            self.samples = []
        else:
            checks = [(sample, True, True)]
        for other, against_step, against_full in checks:  # profiles not fitted from must agree, exactly
            if against_step and not self.step.equals(other.step_basis, other.step):
                self.broken = True
            if against_full and not self.full.equals(other.full_basis, [other.full]):
                self.broken = True
            self.agreed_step += against_step
            self.agreed_full += against_full

    def predict(
        self, length: int, step_labels: int | None, full_labels: int | None, candidates: list
    ) -> UnitCosts | None:
        """The costs at ``length`` for ``candidates`` (the units, in any order), or None where not known exactly."""
        if self.broken or not (self.agreed_step and self.agreed_full) or self.step is None or self.full is None:
            return None
        if not min(self.lengths) <= length <= max(self.lengths) or (step_labels is None) != (
            len(self.step.numerators) == 3
        ):
            return None
        by_name = {u.name: u for u in candidates}
        if self.units is None or any(name not in by_name for name in self.units):
            return None
        step = self.step.floats(_basis(length, step_labels))
        (full,) = self.full.floats(_basis(length, full_labels))
        count = len(self.units)
        arrays = [np.array(step[i * count : (i + 1) * count], dtype=np.float64) for i in range(len(_ARRAYS))]
        return UnitCosts(
            units=[by_name[name] for name in self.units],
            t_dw=arrays[0],
            t_dy=arrays[1],
            forward_share=arrays[2],
            dy_head=step[-2],
            forward_flops=step[-1],
            full_flops=float(full),
        )


def _step_values(costs: UnitCosts) -> list[Fraction]:
    """The entries a step's cost is made of, in a fixed order, exactly."""
    values = [Fraction(float(v)) for name in _ARRAYS for v in getattr(costs, name)]
    return values + [Fraction(float(getattr(costs, name))) for name in _SCALARS]
