"""Tests for the budgeted unit selector: exactness against brute force, budget safety and input validation."""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from peft_greentrainer.engine.selector import (
    Selection,
    min_feasible_rho,
    min_unit_costs,
    select_units,
    selection_backward_flops,
    selection_flops,
)

RTOL = 1e-12


def all_masks(n: int) -> np.ndarray:
    return np.array(list(itertools.product([False, True], repeat=n)), dtype=bool).reshape(-1, n)


def brute_force_costs(masks: np.ndarray, t_dw, t_dy, forward: float, dy_head: float) -> np.ndarray:
    """Cost of every mask, straight from the definition (independent of the selector's helpers)."""
    costs = np.full(len(masks), float(forward))
    for row, mask in enumerate(masks):
        selected = np.flatnonzero(mask)
        if selected.size:
            costs[row] += dy_head + sum(t_dy[: selected[-1]]) + sum(t_dw[i] for i in selected)
    return costs


def random_integer_instance(rng: np.random.Generator, integer_importance: bool):
    n = int(rng.integers(1, 11))
    t_dw = rng.integers(0, 20, n).astype(float)
    t_dy = rng.integers(0, 20, n).astype(float)
    forward = float(rng.integers(0, 30))
    dy_head = float(rng.integers(0, 10))
    importance = rng.integers(-3, 6, n).astype(float) if integer_importance else rng.normal(1.0, 1.5, n)
    all_cost = forward + dy_head + t_dy[:-1].sum() + t_dw.sum()
    full = all_cost + float(rng.integers(0, 10)) * (rng.random() < 0.3)
    return importance, t_dw, t_dy, forward, dy_head, full


@pytest.mark.parametrize("integer_importance", [True, False])
def test_matches_brute_force_when_quantum_is_one(integer_importance: bool) -> None:
    rng = np.random.default_rng(1234 + integer_importance)
    checked = 0
    for _ in range(300):
        importance, t_dw, t_dy, forward, dy_head, full = random_integer_instance(rng, integer_importance)
        span = full - forward - dy_head
        if span < 1:
            continue
        min_rho = min_feasible_rho(t_dw, t_dy, forward, full_flops=full, dy_head=dy_head)
        rho = rng.uniform(min_rho, 1.0) if rng.random() < 0.8 else min_rho
        if rho >= 1:
            continue
        sel = select_units(importance, t_dw, t_dy, forward, rho, full_flops=full, dy_head=dy_head, resolution=int(span))
        masks = all_masks(len(t_dw))
        costs = brute_force_costs(masks, t_dw, t_dy, forward, dy_head)
        values = masks.astype(float) @ importance
        feasible = costs <= rho * full
        best = values[feasible].max()
        assert sel.importance == pytest.approx(best, rel=1e-9, abs=1e-9)
        assert sel.flops <= rho * full
        assert sel.flops == brute_force_costs(sel.mask[None], t_dw, t_dy, forward, dy_head)[0]
        if integer_importance:
            # Exact arithmetic here, so ties must resolve to the cheapest optimal selection.
            assert sel.flops == costs[feasible & (values == best)].min()
        checked += 1
    assert checked > 200


costs_st = st.floats(0, 1e6, allow_nan=False, allow_infinity=False)


@st.composite
def instances(draw):
    n = draw(st.integers(1, 8))
    importance = np.array(draw(st.lists(st.floats(-10, 10), min_size=n, max_size=n)))
    t_dw = np.array(draw(st.lists(costs_st, min_size=n, max_size=n)))
    t_dy = np.array(draw(st.lists(costs_st, min_size=n, max_size=n)))
    forward = draw(costs_st)
    dy_head = draw(st.floats(0, 1e4))
    all_cost = forward + dy_head + t_dy[:-1].sum() + t_dw.sum()
    assume(all_cost > 0)
    full = all_cost * draw(st.sampled_from([1.0, 1.0, 1.3]))
    resolution = draw(st.integers(1, 300))
    return importance, t_dw, t_dy, forward, dy_head, full, resolution


@settings(max_examples=200, deadline=None)
@given(instances(), st.floats(1e-3, 0.999))
def test_selection_is_consistent_and_within_budget(instance, rho: float) -> None:
    importance, t_dw, t_dy, forward, dy_head, full, resolution = instance
    kwargs = {"full_flops": full, "dy_head": dy_head, "resolution": resolution}
    if rho < min_feasible_rho(t_dw, t_dy, forward, full_flops=full, dy_head=dy_head):
        with pytest.raises(ValueError, match="smallest feasible rho"):
            select_units(importance, t_dw, t_dy, forward, rho, **kwargs)
        return
    sel = select_units(importance, t_dw, t_dy, forward, rho, **kwargs)
    assert sel.mask.dtype == bool and sel.mask.shape == importance.shape
    assert sel.flops <= rho * full * (1 + RTOL)
    assert sel.budget == rho * full and sel.full_flops == full and sel.rho == rho
    assert not np.any(importance[sel.mask] <= 0)
    assert sel.importance == pytest.approx(importance[sel.mask].sum())
    assert sel.flops == selection_flops(sel.mask, t_dw, t_dy, forward, dy_head)
    assert sel.backward_flops == selection_backward_flops(sel.mask, t_dw, t_dy, dy_head)
    assert sel.ratio == pytest.approx(sel.flops / full)
    assert sel.deepest == (int(np.flatnonzero(sel.mask)[-1]) if sel.mask.any() else None)
    if not np.any(importance > 0):
        assert not sel.mask.any() and sel.flops == forward


@settings(max_examples=150, deadline=None)
@given(instances(), st.lists(st.floats(1e-3, 0.999), min_size=2, max_size=5))
def test_optimum_is_monotone_in_rho(instance, rhos: list[float]) -> None:
    importance, t_dw, t_dy, forward, dy_head, full, resolution = instance
    min_rho = min_feasible_rho(t_dw, t_dy, forward, full_flops=full, dy_head=dy_head)
    rhos = sorted(r for r in rhos if r >= min_rho)
    values = [
        select_units(
            importance, t_dw, t_dy, forward, r, full_flops=full, dy_head=dy_head, resolution=resolution
        ).importance
        for r in rhos
    ]
    assert all(a <= b for a, b in itertools.pairwise(values))


def test_rho_at_least_one_selects_everything() -> None:
    importance = np.array([-1.0, 0.0, 2.0])
    t_dw, t_dy = np.array([1.0, 2.0, 3.0]), np.array([1.0, 1.0, 1.0])
    for rho in (1.0, 1.5):
        sel = select_units(importance, t_dw, t_dy, 10.0, rho)
        assert sel.mask.all()
        assert sel.flops == sel.full_flops == 10 + 2 + 6
        assert sel.importance == 1.0 and sel.ratio == 1.0 and sel.deepest == 2


def test_rho_below_floor_names_min_feasible_rho() -> None:
    t_dw = np.array([5.0, 3.0, 40.0])
    t_dy = np.array([4.0, 6.0, 0.0])
    forward = 30.0
    min_rho = min_feasible_rho(t_dw, t_dy, forward)
    assert min_rho == pytest.approx(min_unit_costs(t_dw, t_dy, forward).min() / (30 + 10 + 48))
    for rho in (0.12, forward / 88 * 0.99, min_rho * 0.999):
        with pytest.raises(ValueError, match="smallest feasible rho") as excinfo:
            select_units([1.0, 1.0, 1.0], t_dw, t_dy, forward, rho)
        numbers = re.findall(r"feasible rho (\d+\.\d{4})", str(excinfo.value))
        assert numbers and abs(float(numbers[0]) - min_rho) <= 1e-4
        assert f"raise rho to at least {numbers[0]}" in str(excinfo.value)
        assert float(numbers[0]) >= min_rho  # following the advice must work
        select_units([1.0, 1.0, 1.0], t_dw, t_dy, forward, float(numbers[0]))
    sel = select_units([1.0, 1.0, 1.0], t_dw, t_dy, forward, min_rho)
    assert sel.mask.sum() == 1


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_importance_raises_with_indices(bad: float) -> None:
    with pytest.raises(ValueError, match=r"\[1, 3\]"):
        select_units([1.0, bad, 2.0, bad], [1.0] * 4, [1.0] * 4, 1.0, 0.5)


@pytest.mark.parametrize(
    ("importance", "t_dw", "t_dy"),
    [([1.0, 2.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]), ([1.0, 2.0], [1.0, 1.0], [1.0]), ([], [], [])],
)
def test_length_mismatch_or_empty_raises(importance, t_dw, t_dy) -> None:
    with pytest.raises(ValueError):
        select_units(importance, t_dw, t_dy, 1.0, 0.5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rho": 0.0},
        {"rho": -0.5},
        {"rho": math.nan},
        {"rho": math.inf},
        {"resolution": 0},
        {"resolution": 2.5},
        {"t_dw": [1.0, -1.0]},
        {"t_dy": [1.0, math.nan]},
        {"forward_flops": -1.0},
        {"full_flops": 1.0},
    ],
)
def test_invalid_arguments_raise(kwargs) -> None:
    args = {"importance": [1.0, 1.0], "t_dw": [1.0, 1.0], "t_dy": [1.0, 1.0], "forward_flops": 1.0, "rho": 0.5}
    args.update(kwargs)
    with pytest.raises(ValueError):
        select_units(**args)


def test_non_positive_importance_gives_empty_selection() -> None:
    sel = select_units([-1.0, 0.0, -3.0], [1.0, 2.0, 3.0], [1.0, 1.0, 1.0], 10.0, 0.9)
    assert not sel.mask.any() and sel.deepest is None
    assert sel.flops == 10.0 and sel.backward_flops == 0.0 and sel.importance == 0.0


def test_zero_importance_units_are_skipped_even_if_free() -> None:
    sel = select_units([0.0, 1.0, 0.0], [0.0, 1.0, 5.0], [0.0, 0.0, 0.0], 1.0, 0.5)
    assert sel.mask.tolist() == [False, True, False]


def test_deep_unit_chosen_only_when_its_dy_path_is_affordable() -> None:
    # Unit 2 (deepest, e.g. the embedding) is worth more than units 0 and 1 together, but training it means
    # propagating the activation gradient through units 0 and 1 as well.
    importance = [1.0, 1.5, 5.0]
    t_dw = [1.0, 1.0, 1.0]
    forward = 10.0
    cheap_path = select_units(importance, t_dw, [1.0, 1.0, 0.0], forward, 13 / 15, resolution=5)
    assert cheap_path.mask.tolist() == [False, False, True]  # 10 + 2 (dy path) + 1 = 13 <= 13
    # Same budget, but unit 1's activation gradient is now expensive: unit 2 alone would cost 10 + 11 + 1 = 22.
    costly_path = select_units(importance, t_dw, [1.0, 10.0, 0.0], forward, 13 / 24, resolution=14)
    assert costly_path.mask.tolist() == [True, True, False]  # 10 + 1 + 2 = 13 <= 13
    # With enough budget the deep unit wins again, together with the best of what still fits.
    roomy = select_units(importance, t_dw, [1.0, 10.0, 0.0], forward, 23 / 24, resolution=14)
    assert roomy.mask.tolist() == [False, True, True]  # 10 + 11 + 2 = 23
    assert roomy.importance == 6.5


def test_selection_is_immutable_and_helpers_check_masks() -> None:
    sel = select_units([1.0, 2.0], [1.0, 1.0], [1.0, 1.0], 1.0, 0.8)
    assert isinstance(sel, Selection)
    with pytest.raises(ValueError):
        sel.mask[0] = True
    with pytest.raises(TypeError):
        selection_flops([0, 1], [1.0, 1.0], [1.0, 1.0], 1.0)
    with pytest.raises(ValueError):
        selection_flops([True], [1.0, 1.0], [1.0, 1.0], 1.0)
    assert selection_backward_flops([False, False], [1.0, 1.0], [1.0, 1.0], dy_head=5.0) == 0.0
    assert selection_backward_flops([False, True], [1.0, 2.0], [3.0, 4.0], dy_head=5.0) == 5 + 3 + 2


# ---------------------------------------------------------------------------------------------------------------
# Quantisation: LoRA-like profiles (tiny weight-gradient costs next to large activation-gradient costs)
# ---------------------------------------------------------------------------------------------------------------

LORA_SHAPES = [(4096, 4096)] * 4 + [(4096, 11008), (4096, 11008), (11008, 4096)]  # q k v o, gate up down


def lora_like_profile(layers: int, jitter_seed: int | None = None):
    """Backward-ordered costs of LoRA adapters (r=8) on a 7B-shaped decoder at 2048 tokens.

    An adapter's weight gradient costs ``2 * tokens * r * (in + out)``, while reaching it costs the base layer's
    activation gradient ``2 * tokens * in * out``: three orders of magnitude more. ``jitter_seed`` perturbs the costs
    into non-integers (the selector's grid path); without it they are whole FLOP counts, as profiles measure them.
    """
    tokens, r = 2048, 8
    shapes = np.array(LORA_SHAPES * layers, dtype=float)[::-1]
    t_dw = 2.0 * tokens * r * shapes.sum(axis=1)
    t_dy = 2.0 * tokens * shapes.prod(axis=1)
    if jitter_seed is not None:
        rng = np.random.default_rng(jitter_seed)
        t_dw = t_dw * rng.uniform(0.9, 1.1, t_dw.size)
        t_dy = t_dy * rng.uniform(0.9, 1.1, t_dy.size)
    t_dy[-1] = 0.0
    forward = float(t_dy.sum())
    full = forward + 2.0 * float(t_dy.sum())  # full fine-tuning: dW and dY of every base weight
    return t_dw, t_dy, forward, full


def rhos_between_floor_and_all(t_dw, t_dy, forward: float, full: float, count: int = 40) -> np.ndarray:
    """Budgets strictly between the smallest feasible one and the one that trains every unit (where all fit)."""
    floor = min_feasible_rho(t_dw, t_dy, forward, full_flops=full)
    everything = (forward + t_dy[:-1].sum() + t_dw.sum()) / full
    return np.linspace(floor, everything, count + 2)[1:-1]


def max_count(t_dw, t_dy, forward: float, budget: float, charge=None) -> int:
    """Most units selectable within ``budget`` (uniform importance), independently of the selector.

    For each deepest unit k the cheapest weight gradients above it are taken first. ``charge(costs, capacity)``
    returns (costs, capacity) in the units a quantising selector packs them in (default: exact).
    """
    prefix = np.concatenate(([0.0], np.cumsum(t_dy[:-1])))
    best = 0
    for k in range(len(t_dw)):
        capacity = budget - forward - prefix[k] - t_dw[k]
        if capacity < 0:
            continue
        above = np.asarray(t_dw[:k], dtype=float)
        if charge is not None:
            above, capacity = charge(above, capacity)
        best = max(best, 1 + int(np.searchsorted(np.cumsum(np.sort(above)), capacity, side="right")))
    return best


def whole_quantum_of_backward(t_dw, forward: float, full: float, resolution: int = 10_000):
    """The previous rule: every weight gradient rounded up to quanta of 1/resolution of the full backward pass."""
    quantum = (full - forward) / resolution
    return lambda costs, capacity: (np.ceil(costs / quantum), np.floor(capacity / quantum))


def test_lora_like_profile_fits_the_exact_maximum_of_adapters() -> None:
    t_dw, t_dy, forward, full = lora_like_profile(layers=32)
    rhos = rhos_between_floor_and_all(t_dw, t_dy, forward, full)
    counts, exact, previous = [], [], []
    for rho in rhos:
        sel = select_units(np.ones(t_dw.size), t_dw, t_dy, forward, rho, full_flops=full)
        assert sel.flops <= rho * full
        counts.append(int(sel.mask.sum()))
        exact.append(max_count(t_dw, t_dy, forward, rho * full))
        previous.append(max_count(t_dw, t_dy, forward, rho * full, whole_quantum_of_backward(t_dw, forward, full)))
    counts, exact, previous = map(np.array, (counts, exact, previous))
    np.testing.assert_array_equal(counts, exact)  # whole FLOP counts: the optimum is exact
    assert (counts >= previous).all()
    # a whole quantum of the backward pass per adapter left budget unused at most rhos
    assert (counts > previous).mean() > 0.5


def test_lora_like_profile_with_fractional_costs_loses_at_most_a_quantum_per_unit() -> None:
    t_dw, t_dy, forward, full = lora_like_profile(layers=32, jitter_seed=3)
    resolution = 10_000
    # grid path: the quantum is below 2 * sum(t_dw) / resolution, and rounding loses under one quantum per unit
    slack = (t_dw.size + 1) * 2 * t_dw.sum() / resolution
    more = 0
    for rho in rhos_between_floor_and_all(t_dw, t_dy, forward, full):
        sel = select_units(np.ones(t_dw.size), t_dw, t_dy, forward, rho, full_flops=full, resolution=resolution)
        assert sel.flops <= rho * full
        count = int(sel.mask.sum())
        assert max_count(t_dw, t_dy, forward, rho * full - slack) <= count <= max_count(t_dw, t_dy, forward, rho * full)
        previous = max_count(t_dw, t_dy, forward, rho * full, whole_quantum_of_backward(t_dw, forward, full))
        assert count >= previous
        more += count > previous
    assert more > 20  # of 40 rhos


@st.composite
def integer_instances(draw):
    """Whole-number costs sharing a random common factor, weight gradients tiny or comparable to the rest."""
    n = draw(st.integers(1, 8))
    factor = draw(st.sampled_from([1, 3, 1024, 2**20 * 3]))
    dw_scale = draw(st.sampled_from([1, 1000]))  # 1000: dy and forward dwarf dw, as with LoRA
    ints = st.integers(0, 60)
    importance = np.array(draw(st.lists(st.floats(-2, 10), min_size=n, max_size=n)))
    t_dw = np.array(draw(st.lists(ints, min_size=n, max_size=n)), dtype=float) * factor
    t_dy = np.array(draw(st.lists(ints, min_size=n, max_size=n)), dtype=float) * factor * dw_scale
    forward = float(draw(ints)) * factor * dw_scale
    dy_head = float(draw(ints)) * factor
    assume(forward + dy_head + t_dy[:-1].sum() + t_dw.sum() > 0)
    return importance, t_dw, t_dy, forward, dy_head, draw(st.sampled_from([1, 7, 10_000]))


@settings(max_examples=200, deadline=None)
@given(integer_instances(), st.floats(1e-3, 0.999))
def test_whole_number_costs_give_the_brute_force_optimum(instance, rho: float) -> None:
    importance, t_dw, t_dy, forward, dy_head, resolution = instance
    if rho < min_feasible_rho(t_dw, t_dy, forward, dy_head=dy_head):
        return
    masks = all_masks(len(t_dw))
    costs = brute_force_costs(masks, t_dw, t_dy, forward, dy_head)
    full = costs.max()
    values = masks.astype(float) @ importance
    best = values[costs <= rho * full].max()
    divisor = math.gcd(*(int(c) for c in t_dw[importance > 0])) if (importance > 0).any() else 0
    sel = select_units(importance, t_dw, t_dy, forward, rho, dy_head=dy_head, resolution=resolution)
    assert sel.flops <= rho * full * (1 + RTOL)
    if divisor == 0 or t_dw[importance > 0].sum() / divisor <= resolution + (importance > 0).sum():
        assert sel.importance == pytest.approx(best, rel=1e-9, abs=1e-9)  # the exact quantum applies
    else:
        assert sel.importance <= best + 1e-9


@settings(max_examples=150, deadline=None)
@given(instances(), st.floats(1e-3, 0.999))
def test_finer_resolution_is_never_worse(instance, rho: float) -> None:
    importance, t_dw, t_dy, forward, dy_head, full, resolution = instance
    if rho < min_feasible_rho(t_dw, t_dy, forward, full_flops=full, dy_head=dy_head):
        return
    kwargs = {"full_flops": full, "dy_head": dy_head}
    coarse = select_units(importance, t_dw, t_dy, forward, rho, resolution=resolution, **kwargs)
    fine = select_units(importance, t_dw, t_dy, forward, rho, resolution=2 * resolution, **kwargs)
    assert fine.importance >= coarse.importance - 1e-9 * max(1.0, abs(coarse.importance))
    assert fine.flops <= rho * full * (1 + RTOL)


def test_unit_costs_select_keeps_the_budget_when_units_together_cost_more_than_full_fine_tuning() -> None:
    """LoRA or mixed units add work: all of them together can cost more than full FT of the base, which the bare
    selector refuses as a reference; ``UnitCosts.select`` rescales, and stays the brute-force optimum within budget."""
    from peft_greentrainer.engine.costs import UnitCosts
    from peft_greentrainer.engine.units import Unit

    rng, checked = np.random.default_rng(7), 0
    for _ in range(60):
        n = int(rng.integers(2, 9))
        t_dw, t_dy = rng.integers(1, 20, n).astype(float), rng.integers(0, 20, n).astype(float)
        forward, dy_head = float(rng.integers(5, 30)), float(rng.integers(0, 5))
        every = forward + dy_head + t_dy[:-1].sum() + t_dw.sum()
        full = every * float(rng.uniform(0.6, 0.95))  # the base's full FT is cheaper than training every unit
        costs = UnitCosts(
            units=[Unit(f"u{i}", (f"u{i}",)) for i in range(n)],
            t_dw=t_dw,
            t_dy=t_dy,
            forward_share=np.zeros(n),
            dy_head=dy_head,
            forward_flops=forward,
            full_flops=full,
        )
        importance = rng.uniform(0.1, 2.0, n)
        rho = float(rng.uniform(0.5, 0.9))
        masks = all_masks(n)[1:]  # not the empty selection
        fits = brute_force_costs(masks, t_dw, t_dy, forward, dy_head) <= rho * full * (1 + 1e-12)
        if not fits.any():  # the advice is in the caller's terms: following it makes the selection feasible
            floor = brute_force_costs(masks, t_dw, t_dy, forward, dy_head).min() / full
            with pytest.raises(ValueError, match=f"rho={rho:g} is below the smallest feasible rho") as error:
                costs.select(importance, rho)
            advice = float(re.search(r"at least ([0-9.]+)", str(error.value)).group(1))
            assert floor <= advice < floor + 2e-4
            assert costs.select(importance, advice).mask.any()
            continue
        selection = costs.select(importance, rho, resolution=100_000)
        assert (selection.rho, selection.full_flops, selection.budget) == (rho, full, rho * full)
        assert costs.predicted_flops(selection.mask) <= rho * full * (1 + 1e-9)
        best = (masks[fits] @ importance).max()
        assert selection.mask @ importance >= best - 1e-6 * best
        checked += 1
    assert checked >= 20
