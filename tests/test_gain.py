"""Gain closed and its bootstrap interval over seeds."""

from __future__ import annotations

import numpy as np
import pytest

from dataeff.experiment.gain import gain_closed, mean_interval


def test_gain_is_the_share_of_the_gap_closed() -> None:
    assert gain_closed([4.0, 4.0], [3.5, 3.5], [3.0, 3.0]).value == pytest.approx(0.5)
    assert gain_closed([4.0], [4.2], [3.0]).value == pytest.approx(-0.2)  # worse than repeating
    assert gain_closed([4.0], [2.5], [3.0]).value == pytest.approx(1.5)  # better than the oracle
    none = gain_closed([3.0, 3.1], [2.9, 3.0], [3.2, 3.3])
    assert none.value is None and none.low is None and none.high is None


def test_identical_seeds_give_a_point_interval_and_noise_widens_it() -> None:
    g = gain_closed([4.0, 4.0, 4.0], [3.4, 3.4], [3.0, 3.0])
    assert g.low == pytest.approx(0.6) and g.high == pytest.approx(0.6)
    rng = np.random.default_rng(1)
    rep, sbp, ora = (list(c + 0.05 * rng.standard_normal(4)) for c in (4.0, 3.5, 3.0))
    noisy = gain_closed(rep, sbp, ora)
    assert noisy.low is not None and noisy.high is not None and noisy.low < noisy.value < noisy.high
    # The interval is the percentile interval of the resampled ratio of means.
    r = np.random.default_rng(0)
    means = [np.asarray(v)[r.integers(0, len(v), size=(2000, len(v)))].mean(axis=1) for v in (rep, sbp, ora)]
    ratios = (means[0] - means[1]) / (means[0] - means[2])
    assert noisy.low == pytest.approx(np.sort(ratios)[50]) and noisy.high == pytest.approx(np.sort(ratios)[1949])


def test_an_oracle_within_noise_of_repetition_leaves_the_interval_unbounded() -> None:
    g = gain_closed([4.0, 3.0], [3.5, 3.4], [3.6, 3.3])
    assert g.value is not None and g.low is None and g.high is None


def test_mean_interval_brackets_the_mean() -> None:
    mean, low, high = mean_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and 1.0 <= low < mean < high <= 3.0
    assert mean_interval([5.0]) == (5.0, 5.0, 5.0)
