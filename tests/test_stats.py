"""grpo_jax.stats: bootstrap intervals over seeds and paired differences, by hand."""
import numpy as np
import pytest

from grpo_jax.stats import Interval, bootstrap, paired


def test_bootstrap_by_hand():
    assert bootstrap([2.0, 2.0, 2.0]) == Interval(2.0, 2.0, 2.0, 3)
    # two values: the resampled mean is 0 (p 1/4), 0.5 (p 1/2) or 1 (p 1/4); the 2.5% / 97.5% quantiles are 0 and 1
    iv = bootstrap([0.0, 1.0])
    assert (iv.mean, iv.lo, iv.hi, iv.n) == (0.5, 0.0, 1.0, 2)
    # an 80% interval of five seeds lies inside their range and around their mean
    iv = bootstrap([1.0, 2.0, 3.0, 4.0, 10.0], level=0.8)
    assert 1.0 < iv.lo < iv.mean == 4.0 < iv.hi < 10.0
    assert np.isnan(bootstrap([3.0]).lo) and bootstrap([3.0]).mean == 3.0 and bootstrap([float("nan")]).n == 0
    assert bootstrap([1.0, float("nan"), 3.0]).n == 2  # a run without the metric is left out, not counted as 0
    with pytest.raises(ValueError, match="level"):
        bootstrap([1.0, 2.0], level=95)


def test_paired_difference_by_hand():
    anchor, variant = [0.50, 0.90, 0.20, 0.70, 0.40], [0.55, 0.97, 0.24, 0.78, 0.43]
    iv = paired(variant, anchor)  # every seed gains 0.03-0.08: the interval excludes 0 although the seeds spread 0.7
    assert iv.mean == pytest.approx(0.054) and 0.03 <= iv.lo < iv.hi <= 0.08 and iv.excludes(0.0)
    assert not bootstrap(variant).excludes(np.mean(anchor))  # unpaired, the seed spread hides it
    assert not paired([1.0, 2.0], [1.5, 1.5]).excludes(0.0)  # -0.5 and +0.5
    assert not paired([1.0], [0.0]).excludes(0.0)  # one seed: no interval
    with pytest.raises(ValueError, match="one per seed"):
        paired([1.0, 2.0], [1.0])
