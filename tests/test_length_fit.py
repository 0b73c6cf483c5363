"""Costs of unprofiled lengths: exact where the profiled ones pin a polynomial, refused everywhere else."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from peft_greentrainer.engine.costs import UnitCosts
from peft_greentrainer.engine.length_fit import LengthFit, length_family
from peft_greentrainer.engine.units import Unit

UNITS = [Unit(f"u{i}", (f"u{i}.weight",)) for i in range(3)]
ENTRIES = 3 * len(UNITS) + 3  # t_dw, t_dy, forward_share per unit; dy_head, forward_flops, full_flops


def _costs(coefficients: np.ndarray, length: int, labels: int | None) -> UnitCosts:
    """Costs whose every entry is k + a L + b L^2 (+ c n): ``coefficients`` has one row per entry."""
    basis = np.array([1, length, length * length, labels or 0], dtype=np.int64)
    values = (coefficients @ basis).astype(np.float64)
    n = len(UNITS)
    return UnitCosts(
        units=list(UNITS),
        t_dw=values[:n],
        t_dy=values[n : 2 * n],
        forward_share=values[2 * n : 3 * n],
        dy_head=float(values[3 * n]),
        forward_flops=float(values[3 * n + 1]),
        full_flops=float(values[3 * n + 2]),
    )


def _equal(a: UnitCosts, b: UnitCosts) -> bool:
    arrays = all(np.array_equal(getattr(a, name), getattr(b, name)) for name in ("t_dw", "t_dy", "forward_share"))
    scalars = (a.dy_head, a.forward_flops, a.full_flops) == (b.dy_head, b.forward_flops, b.full_flops)
    return arrays and scalars and [u.name for u in a.units] == [u.name for u in b.units]


coefficient_rows = st.lists(
    st.lists(st.integers(0, 10**6), min_size=4, max_size=4), min_size=ENTRIES, max_size=ENTRIES
).map(lambda rows: np.array(rows, dtype=np.int64))


@st.composite
def profiled_points(draw) -> list[tuple[int, int, int]]:
    """Lengths with a sparse head's bucket ends: the step priced at the top count, full fine-tuning at the bottom."""
    lengths = draw(st.lists(st.integers(8, 2048), min_size=7, max_size=7, unique=True))
    return [(n, draw(st.integers(1, n - 1)), draw(st.integers(0, n - 1))) for n in lengths]


@settings(max_examples=40, deadline=None)
@given(coefficients=coefficient_rows, points=profiled_points())
def test_a_polynomial_family_is_predicted_exactly_between_the_profiled_lengths(coefficients, points):
    def costs(length: int, top: int, bottom: int) -> UnitCosts:
        step = _costs(coefficients, length, top)
        step.full_flops = _costs(coefficients, length, bottom).full_flops
        return step

    fit = LengthFit()
    for point in points:
        if len(fit.checked) < LengthFit.CHECKS:
            assert fit.predict(*point, UNITS) is None  # not checked at enough lengths yet: every length is profiled
        fit.add(*point, costs(*point))
    assume(len(fit.checked) >= LengthFit.CHECKS)  # four points pin it, the others check it (almost always)
    assert not fit.broken
    low, high = min(p[0] for p in points), max(p[0] for p in points)
    for length in range(low, high + 1, max(1, (high - low) // 7)):
        point = (length, length // 2 + 1, length // 3)
        predicted = fit.predict(*point, list(reversed(UNITS)))  # None where the profiles do not span the point
        assert predicted is None or _equal(predicted, costs(*point))
    assert fit.predict(high + 1, high // 2, high // 3, UNITS) is None  # never beyond what was profiled
    assert fit.predict(low - 1, low // 2, low // 3, UNITS) is None


def test_a_sparse_head_family_is_predicted_at_new_lengths_and_label_counts():
    coefficients = np.arange(1, ENTRIES * 4 + 1, dtype=np.int64).reshape(ENTRIES, 4)
    fit = LengthFit()
    for length, top, bottom in ((40, 30, 5), (90, 20, 11), (150, 100, 60), (60, 41, 30), (120, 7, 3), (75, 50, 49)):
        step = _costs(coefficients, length, top)
        step.full_flops = _costs(coefficients, length, bottom).full_flops
        fit.add(length, top, bottom, step)
    assert len(fit.checked) >= LengthFit.CHECKS and not fit.broken
    expected = _costs(coefficients, 100, 64)
    expected.full_flops = _costs(coefficients, 100, 33).full_flops
    assert _equal(fit.predict(100, 64, 33, UNITS), expected)


def test_a_dense_head_needs_no_label_counts():
    coefficients = np.arange(ENTRIES * 4, dtype=np.int64).reshape(ENTRIES, 4)
    coefficients[:, 3] = 0
    fit = LengthFit()
    for length in (16, 40, 64, 100, 128):
        fit.add(length, None, None, _costs(coefficients, length, None))
    assert _equal(fit.predict(56, None, None, UNITS), _costs(coefficients, 56, None))
    assert fit.predict(56, 20, 10, UNITS) is None  # a head of the other kind: not this family's polynomial


def test_a_check_at_a_length_already_profiled_proves_nothing():
    """With a sparse head one length brings several label buckets: a quadratic through three lengths matches any
    other bucket at one of them, whatever the costs do between the lengths."""
    coefficients = np.ones((ENTRIES, 4), dtype=np.int64)
    fit = LengthFit()
    for length, top in ((40, 10), (80, 20), (120, 60), (120, 30), (80, 50), (40, 30), (120, 90)):
        step = _costs(coefficients, length, top)
        fit.add(length, top, top // 2, UnitCosts(**{**step.__dict__, "full_flops": 1e9 + length}))
    assert not fit.checked
    assert fit.predict(100, 40, 20, UNITS) is None


def test_predictions_that_would_be_negative_or_fractional_are_refused():
    coefficients = np.zeros((ENTRIES, 4), dtype=np.int64)
    coefficients[:, 1] = 1_000
    coefficients[0] = [3_000, -150, 1, 0]  # t_dw of u0: positive at the profiled lengths, negative near 74
    fit = LengthFit()
    for length in (10, 20, 140, 150, 160, 170):
        fit.add(length, None, None, _costs(coefficients, length, None))
    assert len(fit.checked) >= LengthFit.CHECKS and not fit.broken
    assert fit.predict(154, None, None, UNITS) is not None
    assert fit.predict(74, None, None, UNITS) is None


def test_lengths_are_predicted_only_at_residues_a_profile_had():
    """Pooling to ceil(L / 2) makes odd and even lengths follow two polynomials: profiles of even lengths only say
    nothing of odd ones."""
    coefficients = np.ones((ENTRIES, 4), dtype=np.int64)

    def pooled(length: int) -> UnitCosts:
        return _costs(coefficients, length + -(-length // 2), None)

    fit = LengthFit()
    for length in (16, 40, 64, 96, 128, 160):
        fit.add(length, None, None, pooled(length))
    assert not fit.broken and len(fit.checked) >= LengthFit.CHECKS
    assert _equal(fit.predict(80, None, None, UNITS), pooled(80))
    assert fit.predict(81, None, None, UNITS) is None


def test_costs_that_step_with_the_length_turn_prediction_off():
    """A scan padded to a multiple of its chunk costs the same for every length up to the chunk, then jumps."""
    coefficients = np.ones((ENTRIES, 4), dtype=np.int64)

    def chunked(length: int) -> UnitCosts:
        return _costs(coefficients, -(-length // 64) * 64, None)

    fit = LengthFit()
    for length in (10, 20, 30, 40, 50):
        fit.add(length, None, None, chunked(length))
    assert fit.predict(26, None, None, UNITS) is not None  # one chunk: a polynomial so far, and right inside it
    fit.add(100, None, None, chunked(100))  # the next chunk disagrees with it
    assert fit.broken
    assert fit.predict(26, None, None, UNITS) is None


def test_another_backward_order_turns_prediction_off():
    coefficients = np.ones((ENTRIES, 4), dtype=np.int64)
    fit = LengthFit()
    for length in (10, 20, 30):
        fit.add(length, None, None, _costs(coefficients, length, None))
    reordered = _costs(coefficients, 40, None)
    reordered.units = list(reversed(UNITS))
    fit.add(40, None, None, reordered)
    assert fit.broken


@pytest.mark.parametrize(
    ("inputs", "expected"),
    [
        ((("input_ids", (1, 12), "torch.int64"), ("labels", (1, 12), "torch.int64")), 12),
        ((("input_ids", (1, 12), "torch.int64"), ("labels", (1,), "torch.int64")), 12),  # a classifier's target
        ((("input_ids", (1, 12), "torch.int64"), ("labels", (1, 6), "torch.int64")), None),  # seq2seq: two lengths
        ((("pixel_values", (1, 3, 32, 32), "torch.float32"),), None),
        ((("input_ids", (1, 12), "torch.int64"), ("attention spans", (3, 12))), None),  # flash attention
    ],
)
def test_which_shapes_form_a_family_of_one_length(inputs, expected):
    found = length_family((inputs, ((), ())))
    assert (found[1] if found else None) == expected
    if found is not None:  # the family abstracts the length away, nothing else
        other = tuple((i[0], (1, 30), i[2]) if len(i) == 3 and len(i[1]) == 2 else i for i in inputs)
        assert length_family((other, ((), ())))[0] == found[0]
