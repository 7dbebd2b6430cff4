"""`compile_plan.largest_fitting_batch`, the search behind `plan --find_max_batch`, on memory
curves given as functions (each call stands for a TPU compile of minutes): its answer is the
brute-force answer, and it takes few measurements where memory is affine in the batch."""

import math

import numpy as np
import pytest

from skipnet_jax.tools.compile_plan import largest_fitting_batch

GRANULARITY, LIMIT = 8, 8192


def _brute_force(needed, capacity):
    fitting = [b for b in range(GRANULARITY, LIMIT + 1, GRANULARITY) if (v := needed(b)) is not None and v <= capacity]
    return max(fitting, default=None)


def _search(needed, capacity, known=()):
    calls = []

    def measure(batch):
        calls.append(batch)
        return needed(batch)

    found = largest_fitting_batch(measure, capacity, GRANULARITY, LIMIT, {b: needed(b) for b in known})
    assert len(calls) == len(set(calls)), f"measured a batch twice: {calls}"
    return found, calls


def test_an_affine_curve_takes_four_compiles_from_the_planned_batch():
    # SkipNet-M's shape on a v5e chip: ~0.4 GB fixed, ~12 MB per example, 16 GB of HBM.
    needed = lambda b: 0.4e9 + 12.1e6 * b  # noqa: E731
    found, calls = _search(needed, 16e9, known=(256,))
    assert found == _brute_force(needed, 16e9) == 1288
    assert len(calls) <= 4, calls


@pytest.mark.parametrize("seed", range(40))
def test_any_rising_curve_gives_the_brute_force_answer_in_logarithmic_steps(seed):
    rng = np.random.default_rng(seed)
    fixed, per_example, power = rng.uniform(0, 4e9), rng.uniform(1e5, 5e7), rng.choice([0.7, 1.0, 1.3, 2.0])
    jumps = np.sort(rng.integers(GRANULARITY, LIMIT, size=rng.integers(0, 4)))  # the compiler changes strategy
    refused_above = rng.choice([None, int(rng.integers(GRANULARITY, LIMIT))])  # the compiler runs out itself

    def needed(b):
        if refused_above is not None and b > refused_above:
            return None
        return fixed + per_example * b**power / GRANULARITY ** (power - 1) + 1e9 * np.searchsorted(jumps, b)

    capacity = rng.uniform(1e9, 32e9)
    known = (int(rng.integers(1, 64)) * GRANULARITY,) if seed % 2 else ()
    found, calls = _search(needed, capacity, known)
    assert found == _brute_force(needed, capacity)
    assert len(calls) <= 2 * math.log2(LIMIT / GRANULARITY) + 3, calls


def test_nothing_fits_and_everything_fits():
    assert _search(lambda b: 1e12, 16e9)[0] is None
    assert _search(lambda b: None, 16e9)[0] is None
    found, calls = _search(lambda b: 1e6 * b, 16e9, known=(256,))
    assert found == LIMIT and len(calls) <= 6, calls
